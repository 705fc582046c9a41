"""Token-level sufficient statistics of all block outputs, accumulated batch by batch.

With Z = [hs[0] | hs[1] | ... | hs[L]] (rows = tokens, (L+1)·D columns), the least-squares map
for any range i→j needs only Gram blocks ``hs[i]ᵀhs[i]`` and ``hs[i]ᵀhs[j]``, so we keep the
block upper triangle of ZᵀZ (a <= b), the per-block token sums (for affine maps) and the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenStats:
    """``upper[a]``: (D, (L+1-a)·D) float64, equal to hs[a]ᵀ [hs[a] | ... | hs[L]]."""

    upper: list[np.ndarray]
    sums: np.ndarray  # (L+1, D) float64: sum of each block output over tokens
    count: int  # number of tokens accumulated

    @property
    def hidden_size(self) -> int:
        return self.sums.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.sums.shape[0] - 1

    def gram(self, a: int, b: int) -> np.ndarray:
        """hs[a]ᵀ hs[b] for a <= b, (D, D) float64."""
        d = self.hidden_size
        return self.upper[a][:, (b - a) * d : (b - a + 1) * d]

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"upper_{a}": u for a, u in enumerate(self.upper)}
        return {**arrays, "sums": self.sums, "count": np.array([self.count], np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TokenStats":
        upper = [arrays[f"upper_{a}"] for a in range(len(arrays["sums"]))]
        return cls(upper, arrays["sums"], int(arrays["count"][0]))


#: Samples whose tokens share one float32 product (see :meth:`StatsAccumulator.add`).
SAMPLE_GROUP = 8


class StatsAccumulator:
    """Adds one batch of hidden states at a time; memory is O(((L+1)·D)²), not O(tokens)."""

    def __init__(self, num_states: int, hidden_size: int, device: str | torch.device):
        d, s = hidden_size, num_states
        self.upper = [torch.zeros(d, (s - a) * d, dtype=torch.float64, device=device) for a in range(s)]
        self.sums = torch.zeros(s, d, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, states: list[torch.Tensor], token_rows: torch.Tensor | None = None) -> None:
        """``states``: L+1 tensors (B, T, D); ``token_rows`` optionally keeps a subset of B·T rows.

        Products run in the states' dtype (float32: the fast path), one per group of
        :data:`SAMPLE_GROUP` consecutive samples, and are summed into float64 accumulators. A group's
        product sees the same rows whatever the batch size or the number of workers (batches and
        worker shares start at multiples of the group; left-out tokens are zero rows, which add
        exactly nothing), so the sums agree to float64 rounding however the samples were split.
        """
        b, t, d = states[0].shape
        pad = -b % SAMPLE_GROUP  # zero samples complete the last group
        keep = None
        if token_rows is not None:
            keep = torch.zeros(b * t, dtype=states[0].dtype, device=states[0].device)
            keep[token_rows] = 1
            keep = keep.reshape(b, t, 1)
        xs = []
        for h in states:
            h = h if keep is None else h * keep
            h = torch.cat([h, h.new_zeros(pad, t, d)]) if pad else h
            xs.append(h.reshape(-1, SAMPLE_GROUP * t, d))  # (groups, G·T, D)
        for a, acc in enumerate(self.upper):
            xa = xs[a].transpose(1, 2)
            for c in range(a, len(xs)):
                acc[:, (c - a) * d : (c - a + 1) * d] += torch.bmm(xa, xs[c]).sum(0, dtype=torch.float64)
            self.sums[a] += xs[a].sum((0, 1), dtype=torch.float64)
        self.count += b * t if token_rows is None else len(token_rows)

    def result(self) -> TokenStats:
        return TokenStats([u.cpu().numpy() for u in self.upper], self.sums.cpu().numpy(), self.count)
