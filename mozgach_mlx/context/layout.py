"""Which positions of a sequence each rank holds: contiguous slices or the zig-zag split.

``contiguous``: the sequence is cut into N near-equal slices, rank r holds slice r.
``zigzag``: it is cut into 2N near-equal chunks, rank r holds chunks r and 2N-1-r (in
that order). Under a causal mask the work of a query grows with its position, so the
contiguous split gives the last rank ~2N-1 times the first's attention work; the zig-zag
pairs an early chunk with a late one and every rank gets about the same.

Lengths need not divide: chunk sizes differ by at most one token (the first chunks are
the longer). A rank's local arrays are its pieces concatenated in order; every rank
knows every rank's pieces, so a receiver always knows the shape it receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

SPLITS = ("zigzag", "contiguous")


def _cuts(length: int, n: int) -> list[tuple[int, int]]:
    base, extra = divmod(length, n)
    out, a = [], 0
    for i in range(n):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


@dataclass(frozen=True)
class Layout:
    """How a sequence of ``length`` positions is spread over ``ranks`` ranks (``split``:
    ``zigzag`` or ``contiguous``)."""

    length: int
    ranks: int
    split: str = "zigzag"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"context_split={self.split!r} is not one of {', '.join(SPLITS)}")
        chunks = 2 * self.ranks if self.split == "zigzag" else self.ranks
        if self.ranks < 1 or self.length < chunks:
            raise ConfigError(f"context parallel: a sequence of {self.length} tokens is shorter than the {chunks} "
                              f"chunks a {self.split} split over {self.ranks} ranks needs; use longer sequences "
                              "(max_seq_length), fewer ranks or --distributed none")

    @cached_property
    def _pieces(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        if self.split == "contiguous":
            return tuple((c,) for c in _cuts(self.length, self.ranks))
        c = _cuts(self.length, 2 * self.ranks)
        return tuple((c[r], c[2 * self.ranks - 1 - r]) for r in range(self.ranks))

    def pieces(self, rank: int) -> tuple[tuple[int, int], ...]:
        """[start, end) positions of the pieces rank ``rank`` holds, in local order."""
        return self._pieces[rank]

    def local_length(self, rank: int) -> int:
        return sum(b - a for a, b in self.pieces(rank))

    def offsets(self, rank: int) -> list[int]:
        """Local index of each piece's first position."""
        out, n = [], 0
        for a, b in self.pieces(rank):
            out.append(n)
            n += b - a
        return out

    def positions(self, rank: int) -> np.ndarray:
        """Global positions of rank ``rank``'s local tokens, in local order."""
        return np.concatenate([np.arange(a, b) for a, b in self.pieces(rank)])

    def shard(self, x: mx.array, rank: int, axis: int = 1) -> mx.array:
        """Rank ``rank``'s slice of ``x`` (the whole sequence along ``axis``)."""
        if x.shape[axis] != self.length:
            raise ConfigError(f"context parallel: an array of {x.shape[axis]} positions for a layout of {self.length}")
        idx = [slice(None)] * x.ndim
        parts = []
        for a, b in self.pieces(rank):
            idx[axis] = slice(a, b)
            parts.append(x[tuple(idx)])
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)

    def unshard(self, parts: list[mx.array], axis: int = 1) -> mx.array:
        """The whole sequence from every rank's local array (tests and benchmarks)."""
        pieces = []
        for r, x in enumerate(parts):
            for (a, b), off in zip(self.pieces(r), self.offsets(r), strict=True):
                idx = [slice(None)] * x.ndim
                idx[axis] = slice(off, off + b - a)
                pieces.append((a, x[tuple(idx)]))
        return mx.concatenate([p for _, p in sorted(pieces, key=lambda t: t[0])], axis=axis)
