"""What the driver (rank 0) tells the workers, and the channel it goes over: flat int64 tensors, no pickle.

Every message is one 1-D int64 tensor whose first entry is a :class:`Command`. The channel broadcasts a fixed
buffer of ``capacity`` slots over the gloo control group: entry 0 is the message length, the message follows.
One broadcast carries any message up to ``capacity - 1`` entries (a decode step of a few hundred sequences);
a longer one (a long prefill chunk's token ids) sends its rest in a second broadcast of exactly that size.
The alternatives measured (bench/parallel.py ``measure_control``, docs/PARALLEL.md): two broadcasts per step
(length, then payload) cost a second gloo round trip on every decode step; a larger fixed buffer costs more
bytes per step than it saves.

A step (``STEP``) carries, per scheduled sequence, what changed since the driver last described it:

    header   [STEP, S, R, T, B, D, W]      S sequences, R released ids, T token ids, B new block ids,
                                           D = length of a device-side ids tensor broadcast next (0: none),
                                           W = number of input rows (-1: none)
    S x      [seq_id, epoch, start, num_new_tokens, num_new_blocks]
    R        released seq ids (finished since the last step: workers drop their state)
    T        the new tokens' ids, sequence after sequence (T = 0 when they come from the device)
    B        block ids to append to each sequence's table (a new ``epoch`` first clears the table)
    W        rows of the device ids tensor that feed this step (a step launched ahead of its inputs)

A step that rank 0 runs without CUDA graphs (it captures a request's routing: engine/routing.py) is sent as
``STEP_EAGER`` with the same layout: every rank must run it eagerly too, or the all-reduces of a graph padded to
its batch size would not pair with rank 0's.

Example: sequence 7 decoding its 10th token (position 9), which needs a new block 42 of 4 slots, and
sequence 9 finished: ``[1, 1, 1, 1, 1, 0, -1,  7, 0, 9, 1, 1,  9,  t9,  42]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

# Inline slots of the control buffer (16 KiB): a decode step of 64 sequences takes ~7 + 6 * 64 = 391.
CONTROL_CAPACITY = 2048
_STEP_HEADER = 7
_SEQ_FIELDS = 5


class Command(IntEnum):
    STEP = 1  # run the forward pass of one engine step
    INIT_RUNNER = 2  # build the rank's ModelRunner for an EngineConfig (JSON)
    PROFILE = 3  # ModelRunner.profile_activation_bytes (a forward pass: every rank must run it)
    PLAN_BLOCKS = 4  # each rank plans its KV blocks; the minimum wins
    ALLOCATE = 5  # allocate the KV cache (and capture CUDA graphs) with this many blocks
    FORWARD = 6  # a dense forward over [B, T] ids (equality checks)
    BENCH_ALL_REDUCE = 7  # time all-reduces of given sizes (bench/parallel.py)
    STOP = 8  # leave the loop and exit
    LOAD = 9  # load the rank's shard (JSON: model, dtype, device type, seed)
    STEP_EAGER = 10  # a STEP every rank runs without CUDA graphs (rank 0 captures routing in it)


class ControlChannel:
    """Broadcasts int64 messages from rank 0 over ``group`` (gloo, CPU tensors)."""

    def __init__(self, group: dist.ProcessGroup, capacity: int = CONTROL_CAPACITY) -> None:
        if capacity < 16:
            raise ValueError(f"control capacity must be at least 16 slots, got {capacity}")
        self.group = group
        self.capacity = capacity
        self._buf = torch.zeros(capacity, dtype=torch.int64)

    def send(self, msg: torch.Tensor) -> None:
        n = msg.shape[0]
        inline = min(n, self.capacity - 1)
        self._buf[0] = n
        self._buf[1:1 + inline] = msg[:inline]
        dist.broadcast(self._buf, src=0, group=self.group)
        if n > inline:
            dist.broadcast(msg[inline:].contiguous(), src=0, group=self.group)

    def recv(self) -> torch.Tensor:
        dist.broadcast(self._buf, src=0, group=self.group)
        n = int(self._buf[0])
        inline = min(n, self.capacity - 1)
        msg = torch.empty(n, dtype=torch.int64)
        msg[:inline] = self._buf[1:1 + inline]
        if n > inline:
            rest = torch.empty(n - inline, dtype=torch.int64)
            dist.broadcast(rest, src=0, group=self.group)
            msg[inline:] = rest
        return msg


# --------------------------------------------------------------------------- small messages
def command_message(cmd: Command, *values: int) -> torch.Tensor:
    return torch.tensor([int(cmd), *values], dtype=torch.int64)


def json_message(cmd: Command, payload: dict[str, Any]) -> torch.Tensor:
    """A command with a JSON object, its UTF-8 bytes one per slot (one-off messages: load, runner config)."""
    data = json.dumps(payload, separators=(",", ":")).encode()
    return torch.cat([torch.tensor([int(cmd), len(data)], dtype=torch.int64),
                      torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)])


def read_json(msg: torch.Tensor) -> dict[str, Any]:
    n = int(msg[1])
    return json.loads(bytes(msg[2:2 + n].to(torch.uint8).tolist()).decode())


# --------------------------------------------------------------------------- steps
@dataclass
class StepMessage:
    """One step as the workers need it (see the module docstring for the layout)."""

    seqs: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # seq_id, epoch, start, n, new blocks
    released: list[int] = field(default_factory=list)
    token_ids: list[torch.Tensor] = field(default_factory=list)  # int64 [n] per sequence (empty: from device)
    blocks: list[int] = field(default_factory=list)
    device_ids: int = 0
    input_rows: list[int] | None = None
    eager: bool = False  # sent as STEP_EAGER

    def encode(self) -> torch.Tensor:
        tokens = torch.cat(self.token_ids) if self.token_ids else torch.empty(0, dtype=torch.int64)
        rows = self.input_rows if self.input_rows is not None else []
        cmd = Command.STEP_EAGER if self.eager else Command.STEP
        header = [int(cmd), len(self.seqs), len(self.released), tokens.shape[0], len(self.blocks),
                  self.device_ids, len(rows) if self.input_rows is not None else -1]
        flat = [v for rec in self.seqs for v in rec]
        return torch.cat([torch.tensor(header + flat + self.released, dtype=torch.int64), tokens,
                          torch.tensor(self.blocks + rows, dtype=torch.int64)])

    @classmethod
    def decode(cls, msg: torch.Tensor) -> StepMessage:
        cmd, s, r, t, b, d, w = msg[:_STEP_HEADER].tolist()
        pos = _STEP_HEADER
        flat = msg[pos:pos + s * _SEQ_FIELDS].tolist()
        pos += s * _SEQ_FIELDS
        seqs = [tuple(flat[i:i + _SEQ_FIELDS]) for i in range(0, len(flat), _SEQ_FIELDS)]
        released = msg[pos:pos + r].tolist()
        pos += r
        tokens = msg[pos:pos + t]
        pos += t
        blocks = msg[pos:pos + b].tolist()
        pos += b
        rows = msg[pos:pos + w].tolist() if w >= 0 else None
        token_ids: list[torch.Tensor] = []
        if t:
            at = 0
            for rec in seqs:
                token_ids.append(tokens[at:at + rec[3]])
                at += rec[3]
        return cls(seqs, released, token_ids, blocks, d, rows, cmd == Command.STEP_EAGER)  # type: ignore[arg-type]
