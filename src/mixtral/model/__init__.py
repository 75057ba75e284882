"""The Mixtral architecture in PyTorch: ModelArgs, layers, the sparse MoE and the decoder."""

from mixtral.model.args import ConfigError, ModelArgs
from mixtral.model.mixtral import Transformer
from mixtral.model.presets import preset

__all__ = ["ConfigError", "ModelArgs", "Transformer", "preset"]
