"""``ridge``: (XᵀX/n + λI) T = XᵀY/n, λ in units of the per-token second moment; applied as ``linear``."""

import numpy as np

from rba_core.maps.base import Fitted, FitData, Hyper, MapKind, solve_spd_conditioned
from rba_core.maps.linear import apply, square


def fit(data: FitData, rng, params) -> Fitted:
    stats, (i, j) = data.require("tokens"), rng
    n, d = stats.count, stats.hidden_size
    weight, conditioning = solve_spd_conditioned(stats.gram(i, i) / n + params.ridge * np.eye(d),
                                                 stats.gram(i, j) / n, stats.precision)
    return Fitted({"weight": weight}, conditioning)


KIND = MapKind("ridge", "ridge: (XᵀX/n + λI) T = XᵀY/n", fit, square, apply,
               hypers=(Hyper("ridge", 1e-2, "Ridge λ", "λ for --map ridge: (XᵀX/n + λI) T = XᵀY/n"),))
