"""The parallelism flags every model-running command shares (vLLM's names), and what they turn into.

    add_parallel_args(parser)            --tensor-parallel-size/-tp, --enable-expert-parallel, --expert-parallel-size
    parallel_engine_kwargs(args)         {} for one process, else {"parallel_config": ParallelConfig} for
                                         LLM(...) / LLMEngine.from_config
    run_torchrun_worker_if_rank(args)    under torchrun, ranks > 0 serve rank 0 here and exit (never return)

One host: ``mixtral serve MODEL --tensor-parallel-size 4`` starts its 3 workers itself. Several hosts: the same
command on every host under ``torchrun --nnodes H --nproc-per-node G --node-rank I --rdzv-endpoint HOST:PORT``
(``-m mixtral.cli.main serve ...``); rank 0 loads, schedules and serves, the others follow (docs/PARALLEL.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from mixtral.distributed.config import ParallelConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parallel_args(parser: argparse.ArgumentParser, *, server: bool = False) -> None:
    """Add the parallelism flags. ``server``: a worker that dies makes the process exit with status 1 (so a
    supervisor restarts it) instead of raising in the engine."""
    g = parser.add_argument_group("parallelism (one model over several GPUs)")
    g.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1, metavar="N",
                   help="spread the model over N GPUs (one process each; this host's cuda:0..N-1, or N ranks "
                        "started by torchrun across hosts): attention heads and every expert's FFN width split "
                        "N ways, one all-reduce after attention and one after the MoE per layer (default: 1)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="place whole experts on the N ranks (8 experts over 4 GPUs: 2 each) instead of splitting "
                        "every expert's FFN width; attention stays split over N (vLLM's flag)")
    g.add_argument("--expert-parallel-size", type=_positive_int, default=None, metavar="M",
                   help="spread the experts over M of the N ranks' groups and split each expert's FFN width over "
                        "the N/M ranks of a group ('TP 2 x EP 2' is -tp 4 --expert-parallel-size 2); implies "
                        "--enable-expert-parallel (default with it: M = N)")
    parser.set_defaults(_exit_on_worker_failure=server)


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    """The validated layout the flags ask for (``ParallelConfigError``, a ValueError, names a bad value)."""
    return ParallelConfig(
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        enable_expert_parallel=getattr(args, "enable_expert_parallel", False),
        expert_parallel_size=getattr(args, "expert_parallel_size", None),
        exit_on_worker_failure=getattr(args, "_exit_on_worker_failure", False),
    )


def run_torchrun_worker_if_rank(args: argparse.Namespace) -> None:
    """Under torchrun, a rank other than 0 becomes a worker of rank 0 here and exits the process when rank 0
    stops it; rank 0 (and any process not started by torchrun) returns at once."""
    from mixtral.distributed.groups import DistributedInit

    init = DistributedInit.from_env()
    if init is not None and init.rank > 0:
        from mixtral.distributed.worker import run_torchrun_worker

        run_torchrun_worker(init, parallel_config_from_args(args))


def parallel_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``LLM(...)`` / ``LLMEngine.from_config``: none for one process. Under torchrun,
    ranks > 0 do not return (see ``run_torchrun_worker_if_rank``)."""
    run_torchrun_worker_if_rank(args)
    config = parallel_config_from_args(args)
    return {"parallel_config": config} if config.is_distributed else {}
