"""The Mixtral architecture in PyTorch: ModelArgs, layers, the sparse MoE and the decoder."""

from mixtral.model.args import ConfigError, ModelArgs, preset
from mixtral.model.mixtral import Transformer

__all__ = ["ConfigError", "ModelArgs", "Transformer", "preset"]
