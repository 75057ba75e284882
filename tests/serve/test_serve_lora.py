"""`mixtral serve --lora PATH`: the engine it builds runs the base weights plus the adapter's delta."""

from __future__ import annotations

from pathlib import Path

import torch
from lora_testing import save_nonzero_adapter

from mixtral.checkpoint.loader import load_model
from mixtral.cli.main import build_parser
from mixtral.cli.serve import load_engine
from mixtral.train.lora import merge_lora


def test_serve_lora_merges_the_adapter(tmp_path: Path) -> None:
    # An adapter with non-zero B (a fresh one is a no-op), saved the way `mixtral train` saves it.
    adapted = load_model("tiny", seed=0)
    adapter_dir = save_nonzero_adapter(adapted, tmp_path / "adapter")
    merge_lora(adapted)

    args = build_parser("serve").parse_args(
        ["serve", "tiny", "--device", "cpu", "--lora", str(adapter_dir), "--kv-cache-bytes", str(1 << 22)])
    engine = load_engine(args)
    served = engine.model_runner.model
    base = load_model("tiny", seed=0)
    tokens = torch.randint(1000, 32768, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(served(tokens), adapted(tokens), rtol=1e-5, atol=1e-5)
        assert (served(tokens) - base(tokens)).abs().max() > 1e-3  # the adapter changed the output
