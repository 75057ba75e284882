"""Run a TP 2 group (CPU, gloo) in its own process and save its logits: ``python quant_tp_driver.py MODEL QUANT
IDS OUT`` (QUANT "none" for a checkpoint's own scheme; IDS and OUT are torch files). A process of its own, so
the group never meets the session-wide groups of tests/distributed/conftest.py (one group per process)."""

from __future__ import annotations

import sys

import torch

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.executor import DistributedExecutor
from mixtral.model.quantized import quant_weights


def main() -> None:
    model, quant, ids_path, out_path = sys.argv[1:5]
    torch.set_num_threads(1)
    ex = DistributedExecutor.start(model, ParallelConfig(tensor_parallel_size=2), "cpu", "fp32",
                                   quantization=None if quant == "none" else quant)
    try:
        logits = ex.forward(torch.load(ids_path))
        rank0 = {p: {"in_features": q.in_features, "group": getattr(getattr(q.method, "format", None),
                                                                      "group_size", None)}
                 for p, q in quant_weights(ex.model)}
        torch.save({"logits": logits, "rank0": rank0}, out_path)
    finally:
        ex.shutdown()


if __name__ == "__main__":
    main()
