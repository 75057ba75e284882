"""BlockTables: the model runner's persistent, incrementally updated copy of every running sequence's block table.

Rebuilding ``[num_seqs, max_blocks]`` from Python lists each step costs O(all blocks of the batch); here each
sequence owns a row of a table kept on the device that is written only where it grew (a decode step adds a block
every ``block_size`` tokens), and the rows of this step's sequences are gathered on the device in scheduled order
into a persistent output buffer. On CUDA the step's new entries travel as one small (row, column, block) list
scattered into the table by one kernel: copying the touched rows instead moved whole rows (8 KiB each at a
32K context), scattered over the table, for a handful of new entries.

A row is keyed by ``seq_id`` and tagged with the sequence's ``block_table_epoch``; the block manager bumps
the epoch whenever it drops a table (finish or preemption), so a recomputed sequence rewrites its row.

Example: sequences 7 (rows [3, 9]) and 4 (rows [1]) get rows 0 and 1 of the table; a later step where
7 grows to [3, 9, 2] writes only table[0, 2] = 2 (the update list (0, 2, 2)).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from mixtral.engine.host_tensors import host_tensor
from mixtral.engine.sequence import Sequence


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, device: torch.device, initial_rows: int = 64) -> None:
        self.width = max_blocks_per_seq
        self.device = device
        self._rows: dict[int, list[int]] = {}  # seq_id -> [row, epoch, blocks written]
        self.table = torch.zeros(0, self.width, dtype=torch.int32, device=device)  # [rows, W]
        self._free_rows: list[int] = []
        self._alloc(initial_rows)
        self._out = torch.zeros(0, self.width, dtype=torch.int32, device=device)  # gathered, scheduled order

    def _alloc(self, rows: int) -> None:
        old = self.table
        self.table = torch.zeros(rows, self.width, dtype=torch.int32, device=self.device)  # [rows, W]
        self.table[: old.shape[0]] = old
        # On the CPU the table is written in place through a numpy view (a tensor's item writes cost ~us each).
        self._np = self.table.numpy() if self.device.type == "cpu" else None
        self._free_rows = list(range(rows - 1, old.shape[0] - 1, -1)) + self._free_rows

    def release(self, seq_id: int) -> None:
        """The sequence finished: its row can be reused."""
        entry = self._rows.pop(seq_id, None)
        if entry is not None:
            self._free_rows.append(entry[0])

    def gather(self, seqs: Seq[Sequence], put: Callable[[str, torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Bring the rows of ``seqs`` up to date and return their tables [len(seqs), W] (int32, device) in order.
        ``put(name, host)`` copies a host tensor to the device (the model runner's pinned staging); without it
        each copy is pinned per call (~60 us)."""
        np_table = self._np
        # The step's new entries (CUDA): rows, columns, then blocks, flattened.
        upd_rows: list[int] = []
        upd_cols: list[int] = []
        upd_blocks: list[int] = []
        order: list[int] = []
        rows = self._rows
        for seq in seqs:
            entry = rows.get(seq.seq_id)
            if entry is None:
                if not self._free_rows:
                    self._alloc(2 * self.table.shape[0])
                    np_table = self._np
                entry = rows[seq.seq_id] = [self._free_rows.pop(), seq.block_table_epoch, 0]
            row, epoch, written = entry
            if epoch != seq.block_table_epoch:
                entry[1], entry[2], written = seq.block_table_epoch, 0, 0
            table = seq.block_table
            n = len(table)
            if n > written:
                if np_table is not None:
                    np_table[row, written:n] = table[written:n]
                else:
                    upd_rows += [row] * (n - written)
                    upd_cols += range(written, n)
                    upd_blocks += table[written:n]
                entry[2] = n
            order.append(row)
        if np_table is not None:
            return self.table.index_select(0, host_tensor(order))

        def to_device(name: str, host: torch.Tensor) -> torch.Tensor:
            if put is not None:
                return put(name, host)
            if self.device.type == "cpu":
                return host
            return host.pin_memory().to(self.device, non_blocking=True)

        if upd_rows:
            k = len(upd_rows)
            upd = to_device("block_table_updates", host_tensor(upd_rows + upd_cols + upd_blocks))  # [3K]
            self.table.index_put_((upd[:k], upd[k:2 * k]), upd[2 * k:].to(torch.int32))
        index = to_device("block_table_rows", host_tensor(order))  # [S]
        if self._out.shape[0] < len(order):
            self._out = torch.zeros(max(len(order), 2 * self._out.shape[0]), self.width, dtype=torch.int32,
                                    device=self.device)
        out = self._out[: len(order)]
        torch.index_select(self.table, 0, index, out=out)
        return out
