"""``affine``: least squares with a bias, [X 1] [T; b] ≈ Y, h ↦ h·T + b."""

import numpy as np

from rba_core.maps.base import Fitted, FitData, MapKind, solve_spd_conditioned


def fit(data: FitData, rng, params) -> Fitted:
    stats, (i, j) = data.require("tokens"), rng
    sums, n = stats.sums, stats.count
    aug = np.block([[stats.gram(i, i), sums[i][:, None]], [sums[i][None, :], np.array([[n]])]])
    solution, conditioning = solve_spd_conditioned(aug, np.vstack([stats.gram(i, j), sums[j][None, :]]),
                                                   stats.precision)
    return Fitted({"weight": solution[:-1], "bias": solution[-1]}, conditioning)


def apply(affine_map, hidden, m):
    return hidden @ affine_map.weight + affine_map.bias


KIND = MapKind("affine", "affine: least squares with a bias", fit, lambda d: {"weight": (d, d), "bias": (d,)}, apply)
