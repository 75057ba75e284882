"""Run under ``torchrun --standalone --nproc-per-node 2``: the multi-host path on one host.

Every rank parses the same flags; ``parallel_engine_kwargs`` sends rank 1 to the worker loop (it exits there
when rank 0 stops the group); rank 0 builds the engine over the torchrun group, generates greedily and prints
the token ids as JSON. Usage: ``torchrun ... torchrun_script.py CHECKPOINT -tp 2``.
"""

from __future__ import annotations

import argparse
import json

import torch

from mixtral.cli.parallel_args import add_parallel_args, parallel_engine_kwargs
from mixtral.distributed.engine import build_parallel_engine, pop_parallel_config
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams

p = argparse.ArgumentParser()
p.add_argument("checkpoint")
add_parallel_args(p)
args = p.parse_args()
torch.set_num_threads(1)
kwargs = parallel_engine_kwargs(args)  # rank 1 never returns
parallel = pop_parallel_config(kwargs)
engine = build_parallel_engine(LLMEngine, args.checkpoint, parallel, device="cpu", dtype="fp32", max_model_len=128,
                               num_kv_blocks=64)
engine.add_request("a", list(range(200, 230)), SamplingParams(temperature=0, max_tokens=8))
out = None
while engine.has_unfinished_requests():
    for o in engine.step():
        out = o
engine.model_runner.shutdown()
print(json.dumps({"tokens": list(out.outputs[0].token_ids)}), flush=True)
