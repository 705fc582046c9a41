"""``linear``: least squares, the paper's map: T = (XᵀX)⁻¹ XᵀY over every fitted token, h ↦ h·T; and the
least-squares maps and residuals of every range at once, from all-pairs statistics."""

import numpy as np

from rba_core.maps.base import Fitted, FitData, MapKind, solve_spd, solve_spd_conditioned


def fit(data: FitData, rng, params) -> Fitted:
    stats, (i, j) = data.require("tokens"), rng
    weight, conditioning = solve_spd_conditioned(stats.gram(i, i), stats.gram(i, j), stats.precision)
    return Fitted({"weight": weight}, conditioning)


def apply(linear_map, hidden, m):
    return hidden @ linear_map.weight


def square(d: int) -> dict:
    return {"weight": (d, d)}


KIND = MapKind("linear", "linear: least squares, the paper's map", fit, square, apply)


def all_pair_maps(stats):
    """Least-squares maps for every range i→j, one factorisation per i.

    Yields ``(i, maps)`` where ``maps``: (D, (L-i)·D) float64 holds T for j = i+1..L side by side.
    """
    d = stats.hidden_size
    for i in range(stats.num_blocks):
        yield i, solve_spd(stats.gram(i, i), stats.upper[i][:, d:], stats.precision)


def fit_residual_matrix(stats) -> np.ndarray:
    """Relative residual ||hs[i] T - hs[j]||² / ||hs[j]||² of the least-squares map for every
    i < j, (L+1, L+1) float64, NaN where i >= j. Needs no forward pass."""
    states, d = stats.num_blocks + 1, stats.hidden_size
    out = np.full((states, states), np.nan)

    def residual(t: np.ndarray, cross: np.ndarray, j: int) -> float:
        target = np.trace(stats.gram(j, j))
        explained = np.sum(t * cross)  # tr(Tᵀ C) = tr(Tᵀ G T) at optimum
        return max(target - explained, 0.0) / target

    if stats.pairs is not None:  # only some pairs kept: the ranges whose three Gram blocks are there
        for i, j in stats.pairs:
            if i < j and stats.has(i, i) and stats.has(j, j):
                out[i, j] = residual(solve_spd(stats.gram(i, i), stats.gram(i, j), stats.precision), stats.gram(i, j), j)
        return out
    for i, maps in all_pair_maps(stats):
        cross = stats.upper[i][:, d:]
        for j in range(i + 1, states):
            block = slice((j - i - 1) * d, (j - i) * d)
            out[i, j] = residual(maps[:, block], cross[:, block], j)
    return out
