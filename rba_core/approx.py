"""Closed-form maps T for block ranges i→j, and the approximated encoder that uses them.

A range i→j (0 <= i < j <= L) removes blocks i+1..j and sends hs[i] to hs[j] with one map
shared by all tokens. Maps come from token statistics (:mod:`rba_core.stats`), never from a
second pass over the model.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from rba_core.errors import RBAError
from rba_core.models import Encoder
from rba_core.stats import TokenStats

MapKind = Literal["linear", "affine", "ridge", "identity"]
MAP_KINDS: tuple[str, ...] = ("linear", "affine", "ridge", "identity")
Range = tuple[int, int]


def paper_notation(rng: Range) -> str:
    """The paper's tables write range i→j in 0-indexed block outputs as "i-1 j-1"; a range that
    starts at the embeddings (i = 0) has no such index and is written "emb j-1"."""
    start = "emb" if rng[0] == 0 else str(rng[0] - 1)
    return f"{start} {rng[1] - 1}"


def validate_ranges(ranges: Sequence[Sequence[int]], num_blocks: int) -> list[Range]:
    """Sorted, checked ranges: integers with 0 <= i < j <= L, pairwise disjoint."""
    if not ranges:
        raise RBAError("Give at least one range i→j of blocks to approximate.")
    checked = []
    for rng in ranges:
        if len(rng) != 2:
            raise RBAError(f"A range has two ends i and j; got {list(rng)}.")
        i, j = (int(v) for v in rng)
        if i >= j:
            raise RBAError(f"Range {i}→{j} is empty or reversed: the start i must be smaller than the end j.")
        if i < 0 or j > num_blocks:
            raise RBAError(f"Range {i}→{j} is outside 0..{num_blocks}: this model has {num_blocks} blocks.")
        checked.append((i, j))
    checked.sort()
    for (_, j1), (i2, j2) in zip(checked, checked[1:]):
        if i2 < j1:
            raise RBAError(f"Ranges overlap at {i2}→{j2}: each block can be removed only once.")
    return checked


def _solve_spd(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve gram @ T = rhs for a symmetric PSD gram (float64 Cholesky); least squares
    (minimum norm, SVD-based) if it is singular."""
    g, r = torch.from_numpy(np.asarray(gram, np.float64)), torch.from_numpy(np.asarray(rhs, np.float64))
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(r, factor).numpy()
    return torch.linalg.lstsq(g, r, driver="gelsd").solution.numpy()


class LinearMap(nn.Module):
    """h ↦ h @ weight + bias, applied to every token. ``weight``: (D, D)."""

    def __init__(self, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden @ self.weight
        return out if self.bias is None else out + self.bias


def fit_map(stats: TokenStats, rng: Range, kind: MapKind = "linear", ridge: float = 1e-2) -> LinearMap | None:
    """The map for range i→j minimising ||hs[i] T - hs[j]||² over all fitted tokens.

    ``ridge`` is λ in (Gᵢᵢ/n + λI) T = Cᵢⱼ/n, i.e. in units of the per-token second moment.
    Returns None for ``identity`` (the blocks are skipped).
    """
    i, j = rng
    if kind == "identity":
        return None
    gram, cross = stats.gram(i, i), stats.gram(i, j)
    if kind == "linear":
        return LinearMap(_solve_spd(gram, cross))
    if kind == "ridge":
        n, d = stats.count, stats.hidden_size
        return LinearMap(_solve_spd(gram / n + ridge * np.eye(d), cross / n))
    if kind == "affine":
        sums, n = stats.sums, stats.count
        aug = np.block([[gram, sums[i][:, None]], [sums[i][None, :], np.array([[n]])]])
        solution = _solve_spd(aug, np.vstack([cross, sums[j][None, :]]))
        return LinearMap(solution[:-1], solution[-1])
    raise RBAError(f"Unknown map '{kind}': use one of {', '.join(MAP_KINDS)}.")


def all_pair_maps(stats: TokenStats):
    """Least-squares maps for every range i→j, one factorisation per i.

    Yields ``(i, maps)`` where ``maps``: (D, (L-i)·D) float64 holds T for j = i+1..L side by side.
    """
    d = stats.hidden_size
    for i in range(stats.num_blocks):
        yield i, _solve_spd(stats.gram(i, i), stats.upper[i][:, d:])


def fit_residual_matrix(stats: TokenStats) -> np.ndarray:
    """Relative residual ||hs[i] T - hs[j]||² / ||hs[j]||² of the least-squares map for every
    i < j, (L+1, L+1) float64, NaN where i >= j. Needs no forward pass."""
    states, d = stats.num_blocks + 1, stats.hidden_size
    out = np.full((states, states), np.nan)
    for i, maps in all_pair_maps(stats):
        cross = stats.upper[i][:, d:]
        for j in range(i + 1, states):
            block = slice((j - i - 1) * d, (j - i) * d)
            target = np.trace(stats.gram(j, j))
            explained = np.sum(maps[:, block] * cross[:, block])  # tr(Tᵀ C) = tr(Tᵀ G T) at optimum
            out[i, j] = max(target - explained, 0.0) / target
    return out


class _Block(nn.Module):
    """A transformer block that always returns a tensor."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


class ApproximatedEncoder(nn.Module):
    """Blocks 1..i, T, blocks j+1..L, final norm: only what the compressed model computes.

    Shares (never modifies) the original encoder's modules. ``forward`` returns the final
    representation (B, D): the final-norm CLS token.
    """

    def __init__(self, encoder: Encoder, ranges: Sequence[Range], maps: Sequence[LinearMap | None]):
        super().__init__()
        self.ranges = list(ranges)
        self.embeddings = encoder.model.embeddings
        starts = {i: (j, m) for (i, j), m in zip(ranges, maps)}
        steps, k = [], 0
        while k < encoder.num_blocks:
            if k in starts:
                k, linear_map = starts[k]
                if linear_map is not None:
                    steps.append(linear_map.to(encoder.device))
            else:
                steps.append(_Block(encoder.blocks[k]))
                k += 1
        self.steps = nn.Sequential(*steps)
        self.norm = encoder.final_norm

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.steps(self.embeddings(pixel_values)))[:, 0, :]


def approximate_encoder(encoder: Encoder, stats: TokenStats, ranges: Sequence[Range],
                        kind: MapKind = "linear", ridge: float = 1e-2) -> ApproximatedEncoder:
    """Fit one map per range and build the approximated encoder."""
    maps = [fit_map(stats, rng, kind, ridge) for rng in ranges]
    return ApproximatedEncoder(encoder, ranges, maps).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
