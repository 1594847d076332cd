"""Adapter groups that act on some rows of a batch: several runs' adapters in one model, each on its own slice of one
batch (packed training and evaluation, `ldm.train.pack`, `ldm.evaluation.packed`).

A group with `rows` reads only its rows at din and adds only to its rows at dout (a projection form: only to its rows
of the module's output). The blocks of the networks act on each row alone (no batch norm), so a row's result is that of
its run computed alone. Classifier-free guidance runs a batch of k x `period` rows (uncond, cond): the group's rows
repeat in each block of `period` rows.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ldm.modules.adapters.spec import AdapterConfigError


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of each block of `period` rows of a batch (period None: of the whole batch)."""
    start: int
    stop: int
    period: Optional[int] = None

    @property
    def empty(self) -> bool:
        return self.stop <= self.start

    def blocks(self, n: int) -> int:
        """How many blocks of `period` rows a batch of `n` rows holds."""
        period = self.period or n
        if n % period or self.stop > period:
            raise AdapterConfigError(f"adapter rows {self.start}:{self.stop} of every {period} do not fit a batch of "
                                     f"{n}: the batch is not the one the rows were set for")
        return n // period


def pick(t: torch.Tensor, rows: Optional[Rows]) -> torch.Tensor:
    """The rows of `t` (batch first) a group acts on, block after block."""
    if rows is None:
        return t
    blocks = rows.blocks(t.shape[0])
    if blocks == 1:
        return t[rows.start:rows.stop]
    return t.unflatten(0, (blocks, -1))[:, rows.start:rows.stop].flatten(0, 1)


def place(t: torch.Tensor, parts: List[Tuple[Optional[Rows], torch.Tensor]]) -> torch.Tensor:
    """t plus each part's addend on its rows (rows None: on every row). Rows no part covers are passed through;
    a covered row gets t + addend, the very sum its run computes alone."""
    for rows, d in parts:
        if rows is None:
            t = t + d
    parts = sorted([(r, d) for r, d in parts if r is not None], key=lambda p: p[0].start)
    if not parts:
        return t
    blocks = parts[0][0].blocks(t.shape[0])
    period = t.shape[0] // blocks
    for (a, _), (b, _) in zip(parts, parts[1:]):
        if b.start < a.stop or b.blocks(t.shape[0]) != blocks:
            raise AdapterConfigError(f"adapter groups on rows {a.start}:{a.stop} and {b.start}:{b.stop} overlap: "
                                     "each row belongs to one group")
    pieces = []
    for block in range(blocks):
        cursor, offset = 0, block * period
        for rows, d in parts:
            n = rows.stop - rows.start
            pieces += [t[offset + cursor:offset + rows.start]] if rows.start > cursor else []
            pieces.append(t[offset + rows.start:offset + rows.stop] + d[block * n:(block + 1) * n])
            cursor = rows.stop
        pieces += [t[offset + cursor:offset + period]] if cursor < period else []
    return torch.cat(pieces)


def gather(parts: List[Tuple[Optional[Rows], torch.Tensor]], rows: Optional[Rows], d: torch.Tensor) -> None:
    """Add addend `d` of `rows` to `parts`: summed into an earlier part of the same rows (in order, as a run alone
    sums its adapters at one point), else appended."""
    for i, (r, earlier) in enumerate(parts):
        if r == rows:
            parts[i] = (r, earlier + d)
            return
    parts.append((rows, d))
