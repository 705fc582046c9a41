"""``diagonal``: a per-feature scale and shift, h ↦ h ⊙ a + b, fitted in closed form (ReplaceMe's diagonal
variant, with a shift): feature d's least-squares line through the pairs (hs[i]_d, hs[j]_d) of every fitted
token, from the diagonals of the Gram blocks and the token sums. 2·D parameters."""

import numpy as np

from rba_core.maps.base import PRODUCT_EPS, Conditioning, Fitted, FitData, MapKind


def fit(data: FitData, rng, params) -> Fitted:
    stats, (i, j) = data.require("tokens"), rng
    n = stats.count
    sx, sy = stats.sums[i], stats.sums[j]
    sxx, sxy = np.diag(stats.gram(i, i)), np.diag(stats.gram(i, j))
    spread = n * sxx - sx * sx  # n² · the variance of feature d at block i
    # A feature whose variance the statistics cannot tell from 0 gets no scale: b is then its mean at block j.
    resolved = spread > PRODUCT_EPS[stats.precision] * n * np.maximum(sxx, 1e-300) * 4
    scale = np.where(resolved, (n * sxy - sx * sy) / np.where(resolved, spread, 1), 0.0)
    shift = (sy - scale * sx) / n
    kept = spread[resolved]
    condition = float(kept.max() / kept.min()) if kept.size else float("inf")
    return Fitted({"scale": scale, "shift": shift},
                  Conditioning(condition, int(resolved.sum()), len(spread), stats.precision))


def apply(diagonal_map, hidden, m):
    return hidden * diagonal_map.scale + diagonal_map.shift


KIND = MapKind("diagonal", "diagonal: a per-feature scale and shift (ReplaceMe's diagonal map)", fit,
               lambda d: {"scale": (d,), "shift": (d,)}, apply)
