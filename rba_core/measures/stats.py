"""Token-level sufficient statistics of all block outputs, accumulated batch by batch.

With Z = [hs[0] | hs[1] | ... | hs[L]] (rows = tokens, (L+1)·D columns), the least-squares map
for any range i→j needs only Gram blocks ``hs[i]ᵀhs[i]`` and ``hs[i]ᵀhs[j]``, so we keep the
block upper triangle of ZᵀZ (a <= b), the per-block token sums (for affine maps) and the count.

All pairs cost ((L+1)·D)²/2 doubles: fine for a 12-block ViT, 73 GB for Llama-3-8B. A plan
(:func:`planned_pairs`) can instead keep only windows of n blocks (``hs[i]ᵀhs[i]`` and
``hs[i]ᵀhs[i+n]`` for every i) or explicit ranges; :func:`stats_bytes` says what a plan needs
before the pass and :func:`check_fits` turns a plan that does not fit into one sentence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rba_core.errors import RBAError

Pair = tuple[int, int]

#: Significant bits of a product's dtype, as a statistics entry stores it.
PRODUCT_BITS = {"float32": 24, "float64": 53}


@dataclass
class TokenStats:
    """``upper[a]``: (D, (L+1-a)·D) float64, equal to hs[a]ᵀ [hs[a] | ... | hs[L]]."""

    upper: list[np.ndarray]  # empty when only some pairs were kept
    sums: np.ndarray  # (L+1, D) float64: sum of each block output over tokens
    count: int  # number of tokens accumulated
    pairs: dict[Pair, np.ndarray] | None = None  # (a, b) -> hs[a]ᵀhs[b] when only some pairs were kept
    precision: str = "float32"  # the products' dtype (sums are float64 either way): what a solve can resolve

    @property
    def kind(self) -> str:
        return "all-pairs" if self.pairs is None else "pairs"

    @property
    def hidden_size(self) -> int:
        return self.sums.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.sums.shape[0] - 1

    def gram(self, a: int, b: int) -> np.ndarray:
        """hs[a]ᵀ hs[b] for a <= b, (D, D) float64."""
        if self.pairs is not None:
            if (a, b) not in self.pairs:
                raise RBAError(f"The statistics of this pass do not hold hs[{a}]ᵀhs[{b}]; collect them for range "
                               f"{a}→{b} (or for all pairs) first.")
            return self.pairs[a, b]
        d = self.hidden_size
        return self.upper[a][:, (b - a) * d : (b - a + 1) * d]

    def has(self, a: int, b: int) -> bool:
        """Whether hs[a]ᵀhs[b] (a <= b) was collected."""
        return self.pairs is None or (a, b) in self.pairs

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"upper_{a}": u for a, u in enumerate(self.upper)}
        arrays.update({f"pair_{a}_{b}": g for (a, b), g in (self.pairs or {}).items()})
        return {**arrays, "sums": self.sums, "count": np.array([self.count], np.int64),
                "product_bits": np.array([PRODUCT_BITS[self.precision]], np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TokenStats":
        pairs = {tuple(int(v) for v in key.split("_")[1:]): g for key, g in arrays.items() if key.startswith("pair_")}
        bits = int(arrays["product_bits"][0]) if "product_bits" in arrays else PRODUCT_BITS["float32"]
        precision = next(name for name, b in PRODUCT_BITS.items() if b == bits)
        if pairs:
            return cls([], arrays["sums"], int(arrays["count"][0]), pairs, precision)
        upper = [arrays[f"upper_{a}"] for a in range(len(arrays["sums"]))]
        return cls(upper, arrays["sums"], int(arrays["count"][0]), precision=precision)


def planned_pairs(num_states: int, window: int | None = None, ranges: Sequence[Pair] = ()) -> list[Pair] | None:
    """The Gram blocks a plan keeps: None for all pairs; with ``window`` n, hs[i]ᵀhs[i] for every i
    and hs[i]ᵀhs[i+n]; with ``ranges``, hs[i]ᵀhs[i], hs[i]ᵀhs[j] and hs[j]ᵀhs[j] of each i→j."""
    if window is None and not ranges:
        return None
    pairs: set[Pair] = set()
    if window is not None:
        if not 1 <= window < num_states:
            raise RBAError(f"A statistics window must be 1..{num_states - 1} blocks, got {window}.")
        pairs |= {(i, i) for i in range(num_states)} | {(i, i + window) for i in range(num_states - window)}
    for i, j in ranges:
        pairs |= {(i, i), (i, j), (j, j)}
    return sorted(pairs)


def planned_precision(window: int | None = None, ranges: Sequence[Pair] = ()) -> str:
    """The products' dtype of a plan: float64 for the given ranges of a fit (few Gram blocks, each feeding a
    solve), float32 for all pairs or windows (the analysis: every block pair at the full GEMM rate)."""
    return "float64" if ranges and window is None else "float32"


@dataclass(frozen=True)
class StatsPlan:
    """What token statistics a pass keeps: the Gram blocks (``pairs``; None: all pairs) and the dtype of their
    products (``precision``)."""

    pairs: list[Pair] | None = None
    precision: str = "float32"

    @classmethod
    def of(cls, num_states: int, window: int | None = None, ranges: Sequence[Pair] = ()) -> "StatsPlan":
        """The plan of a window of n blocks, of given ranges, or (neither) of all pairs."""
        return cls(planned_pairs(num_states, window, ranges), planned_precision(window, ranges))


def stats_bytes(num_states: int, hidden_size: int, pairs: Sequence[Pair] | None = None) -> int:
    """Bytes the float64 accumulators of a plan allocate (Gram blocks and token sums)."""
    blocks = num_states * (num_states + 1) // 2 if pairs is None else len(pairs)
    return 8 * hidden_size * (hidden_size * blocks + num_states)


def memory_budget(device: str | torch.device = "cpu") -> int:
    """The default statistics budget: a quarter of the free memory of ``device`` (GPU or RAM)."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] // 4
    try:
        with open("/proc/meminfo") as info:
            free_kb = next(int(line.split()[1]) for line in info if line.startswith("MemAvailable:"))
        return free_kb * 1024 // 4
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 4


def size_text(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


class StatsTooLarge(RBAError):
    """The requested token statistics do not fit the memory budget (checked before the pass)."""


def check_fits(num_states: int, hidden_size: int, pairs: Sequence[Pair] | None, budget: int) -> int:
    """The plan's bytes when they fit ``budget``; otherwise one sentence saying what would fit."""
    need = stats_bytes(num_states, hidden_size, pairs)
    if need <= budget:
        return need
    what = "all pairs" if pairs is None else "the requested statistics"
    options = [(n, stats_bytes(num_states, hidden_size, planned_pairs(num_states, n)))
               for n in (8, 4, 2, 1) if n < num_states]
    fitting = [f"windows of {n} need {size_text(size)}" for n, size in options if size <= budget][:1]
    advice = f"; {fitting[0]}" if fitting else "; even windows of 1 do not fit, so use fewer or explicit ranges"
    raise StatsTooLarge(f"Token statistics for {what} need {size_text(need)}, above the budget of {size_text(budget)}{advice}.")


#: Samples whose tokens share one float32 product (see :meth:`StatsAccumulator.add`).
SAMPLE_GROUP = 8


class StatsAccumulator:
    """Adds one batch of hidden states at a time; memory is O(((L+1)·D)²), not O(tokens).

    ``precision``: the dtype of the products. ``"float64"`` (what a fit of given ranges uses) gives Gram
    blocks as exact as the hidden states; ``"float32"`` (all pairs and windows, the analysis) runs at the
    full float32 GEMM rate, and solves from it drop the directions below its resolution
    (:func:`rba_core.maps.solve_spd_conditioned`)."""

    def __init__(self, num_states: int, hidden_size: int, device: str | torch.device,
                 pairs: Sequence[Pair] | None = None, precision: str = "float32"):
        d, s = hidden_size, num_states
        self.precision = precision
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.upper = [zeros(d, (s - a) * d) for a in range(s)] if pairs is None else []
        self.pairs = None if pairs is None else {(a, b): zeros(d, d) for a, b in pairs}
        self.sums = zeros(s, d)
        self.count = 0

    @property
    def allocated_bytes(self) -> int:
        tensors = [*self.upper, *(self.pairs or {}).values(), self.sums]
        return sum(t.numel() * t.element_size() for t in tensors)

    def add(self, states: list[torch.Tensor], token_rows: torch.Tensor | None = None) -> None:
        """``states``: L+1 tensors (B, T, D); ``token_rows`` optionally keeps a subset of B·T rows.

        Products run in the accumulator's ``precision``, one per group of
        :data:`SAMPLE_GROUP` consecutive samples, and are summed into float64 accumulators. A group's
        product sees the same rows whatever the batch size or the number of workers (batches and
        worker shares start at multiples of the group; left-out tokens are zero rows, which add
        exactly nothing), so the sums agree to float64 rounding however the samples were split.
        """
        # bfloat16 states (decoders on CUDA) or blocks spread over devices: float32 on the accumulator's device
        states = [h.to(device=self.sums.device, dtype=getattr(torch, self.precision)) for h in states]
        b, t, d = states[0].shape
        pad = -b % SAMPLE_GROUP  # zero samples complete the last group
        keep = None
        if token_rows is not None:
            keep = torch.zeros(b * t, dtype=torch.bool, device=states[0].device)
            keep[token_rows] = True
            keep = keep.reshape(b, t, 1)
        xs = []
        for h in states:
            h = h if keep is None else h.masked_fill(~keep, 0)  # not h * keep: a padding row may hold NaN
            h = torch.cat([h, h.new_zeros(pad, t, d)]) if pad else h
            xs.append(h.reshape(-1, SAMPLE_GROUP * t, d))  # (groups, G·T, D)

        def product(a: int, c: int) -> torch.Tensor:  # hs[a]ᵀhs[c]: one product per group, summed in float64
            return torch.bmm(xs[a].transpose(1, 2), xs[c]).sum(0, dtype=torch.float64)

        for a, acc in enumerate(self.upper):
            for c in range(a, len(xs)):
                acc[:, (c - a) * d : (c - a + 1) * d] += product(a, c)
        for (a, c), acc in (self.pairs or {}).items():
            acc += product(a, c)
        for a, x in enumerate(xs):
            self.sums[a] += x.sum((0, 1), dtype=torch.float64)
        self.count += b * t if token_rows is None else len(token_rows)

    def result(self) -> TokenStats:
        pairs = None if self.pairs is None else {p: g.cpu().numpy() for p, g in self.pairs.items()}
        return TokenStats([u.cpu().numpy() for u in self.upper], self.sums.cpu().numpy(), self.count, pairs,
                          self.precision)
