"""Which blocks and ranges are the best candidates: top Block Redundancy, lowest fit residual.

Pure numpy over Block Redundancy (blocks 1..L) and the (L+1, L+1) fit-residual matrix of
:func:`rba_core.maps.fit_residual_matrix` (NaN where i >= j); no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def removes_text(rng: tuple[int, int]) -> str:
    """What range i→j removes, in words: "removes blocks 3..6", or "removes block 4" for one block."""
    first, last = rng[0] + 1, rng[1]
    return f"removes block {last}" if first == last else f"removes blocks {first}..{last}"


@dataclass(frozen=True)
class RankedRange:
    """Range i→j (blocks i+1..j removed) and the relative residual of its least-squares map."""

    start: int
    end: int
    residual: float

    @property
    def removed_blocks(self) -> list[int]:
        return list(range(self.start + 1, self.end + 1))


def rank_ranges(residual: np.ndarray, removed: int) -> list[RankedRange]:
    """Every range removing exactly ``removed`` consecutive blocks, lowest residual first.

    Ties keep the earlier range first; ranges whose residual is NaN are left out.
    """
    residual = np.asarray(residual, dtype=np.float64)
    num_blocks = residual.shape[0] - 1
    if not 1 <= removed <= num_blocks:
        return []
    candidates = [RankedRange(i, i + removed, float(residual[i, i + removed]))
                  for i in range(num_blocks - removed + 1) if not np.isnan(residual[i, i + removed])]
    return sorted(candidates, key=lambda c: c.residual)  # sorted() is stable: ties stay in order


def top_blocks(redundancy: np.ndarray, k: int) -> list[int]:
    """The ``k`` most redundant blocks (1..L, highest Block Redundancy first; ties: lower block first)."""
    order = np.argsort(-np.asarray(redundancy, dtype=np.float64), kind="stable")
    return [int(b) + 1 for b in order[: max(k, 0)]]


def suggested_removed(num_blocks: int) -> int:
    """How many blocks to try removing first: a third, as in the paper's 12 → 8 blocks example."""
    return max(1, num_blocks // 3)


def default_ranges(num_blocks: int, count: int = 1) -> list[tuple[int, int]]:
    """Up to ``count`` disjoint ranges to start from, the main one first: the paper's 2→6 on a model with at
    least 12 blocks, else about a third of the blocks ending one block before the last; then one-block
    ranges after it, then before it. The first does not depend on ``count``."""
    removed = suggested_removed(num_blocks)
    first = (2, 6) if num_blocks >= 12 else (max(0, num_blocks - 1 - removed), max(1, num_blocks - 1))
    ranges, start = [first], first[1] + 1
    while len(ranges) < count and start < num_blocks:
        ranges.append((start, start + 1))
        start += 2
    while len(ranges) < count:  # no room after the first: before it, one block each
        end = min(r[0] for r in ranges) - 1
        if end < 1:
            break
        ranges.append((end - 1, end))
    return ranges
