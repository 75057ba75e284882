"""BlockTables: the model runner's persistent, incrementally updated copy of every running sequence's block table.

Rebuilding ``[num_seqs, max_blocks]`` from Python lists each step costs O(all blocks of the batch); here each
sequence owns a row of a host table that is written only where it grew (a decode step adds a block every
``block_size`` tokens), the touched rows are copied to the device in one transfer, and the rows of this
step's sequences are gathered on the device in scheduled order into a persistent output buffer.

A row is keyed by ``seq_id`` and tagged with the sequence's ``block_table_epoch``; the block manager bumps
the epoch whenever it drops a table (finish or preemption), so a recomputed sequence rewrites its row.

Example: sequences 7 (rows [3, 9]) and 4 (rows [1]) get rows 0 and 1 of the host table; a later step where
7 grows to [3, 9, 2] writes only table[0, 2] = 2 and copies row 0 to the device.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from mixtral.engine.sequence import Sequence


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, device: torch.device, initial_rows: int = 64) -> None:
        self.width = max_blocks_per_seq
        self.device = device
        self._pin = device.type == "cuda"
        self._rows: dict[int, list[int]] = {}  # seq_id -> [row, epoch, blocks written]
        self._alloc(initial_rows)
        self._out = torch.zeros(0, self.width, dtype=torch.int32, device=device)  # gathered, scheduled order

    def _alloc(self, rows: int) -> None:
        host = torch.zeros(rows, self.width, dtype=torch.int32, pin_memory=self._pin)  # [rows, W]
        dev = host if self.device.type == "cpu" else torch.zeros(rows, self.width, dtype=torch.int32,
                                                                 device=self.device)
        old = getattr(self, "host", None)
        if old is not None:
            host[: old.shape[0]] = old
            if dev is not host:
                dev[: old.shape[0]] = self.dev
        self.host, self.dev = host, dev
        used = {r for r, _, _ in self._rows.values()}
        self._free_rows = [r for r in range(rows - 1, -1, -1) if r not in used]

    def release(self, seq_id: int) -> None:
        """The sequence finished: its row can be reused."""
        entry = self._rows.pop(seq_id, None)
        if entry is not None:
            self._free_rows.append(entry[0])

    def gather(self, seqs: Seq[Sequence], put: Callable[[str, torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Bring the rows of ``seqs`` up to date and return their tables [len(seqs), W] (int32, device) in order.
        ``put(name, host)`` copies the row index to the device (the model runner's pinned staging); without
        it the index is pinned per call (~60 us)."""
        lo, hi = self.host.shape[0], -1  # range of rows written this step
        order: list[int] = []
        for seq in seqs:
            entry = self._rows.get(seq.seq_id)
            if entry is None:
                if not self._free_rows:
                    self._alloc(2 * self.host.shape[0])
                entry = self._rows[seq.seq_id] = [self._free_rows.pop(), seq.block_table_epoch, 0]
            row, epoch, written = entry
            if epoch != seq.block_table_epoch:
                entry[1], entry[2], written = seq.block_table_epoch, 0, 0
            n = len(seq.block_table)
            if n > written:
                self.host[row, written:n] = torch.tensor(seq.block_table[written:n], dtype=torch.int32)
                entry[2] = n
                lo, hi = min(lo, row), max(hi, row)
            order.append(row)
        if hi >= lo and self.dev is not self.host:
            self.dev[lo:hi + 1].copy_(self.host[lo:hi + 1], non_blocking=True)
        index = torch.tensor(order, dtype=torch.int64)
        if self.device.type == "cpu":
            return self.dev.index_select(0, index)
        index = put("block_table_rows", index) if put is not None else index.pin_memory().to(self.device,
                                                                                             non_blocking=True)
        if self._out.shape[0] < len(order):
            self._out = torch.zeros(max(len(order), 2 * self._out.shape[0]), self.width, dtype=torch.int32,
                                    device=self.device)
        out = self._out[: len(order)]
        torch.index_select(self.dev, 0, index, out=out)
        return out
