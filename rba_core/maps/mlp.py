"""``mlp``: TOAST's translator, residual to the least-squares map. h ↦ h·T + MLP(h), the MLP with one hidden
layer of width D (:mod:`rba_core.maps.deep_mlp`: more), ReLU, its last layer starting at zero so that training
(Adam on the mean squared error to hs[j], :mod:`rba_core.maps.training`) starts from the closed-form linear map,
which stays as it is: the MLP learns what the linear map leaves.
They do not fold: they export in the compressed format and ``load_compressed`` rebuilds them."""

import numpy as np

from rba_core.maps.base import TRAINING, Fitted, FitData, MapKind, solve_spd_conditioned


def _layers(mlp_map) -> list[tuple]:
    """(w_k, b_k) of the MLP's layers, k = 1, 2, ...: the hidden layers, then the output layer."""
    layers, k = [], 1
    while hasattr(mlp_map, f"w{k}"):
        layers.append((getattr(mlp_map, f"w{k}"), getattr(mlp_map, f"b{k}")))
        k += 1
    return layers


def apply(mlp_map, hidden, m):
    inner = hidden
    layers = _layers(mlp_map)
    for w, b in layers[:-1]:
        inner = (inner @ w + b).clamp_min(0)
    w, b = layers[-1]
    return hidden @ mlp_map.weight + inner @ w + b


def shapes(depth: int):
    """The tensors of a translator with ``depth`` hidden layers of width D."""
    def of(d: int) -> dict:
        out = {"weight": (d, d)}
        for k in range(1, depth + 2):
            out[f"w{k}"], out[f"b{k}"] = (d, d), (d,)
        return out
    return of


def fitter(depth: int):
    def fit(data: FitData, rng, params) -> Fitted:
        from rba_core.maps.training import Fitting, train

        stats, samples, (i, j) = data.require("tokens"), data.require("samples"), rng
        start, conditioning = solve_spd_conditioned(stats.gram(i, i), stats.gram(i, j), stats.precision)
        x, y = samples.pair(rng)
        held_out = samples.held_out()
        d = x.shape[1]
        gen = np.random.default_rng(data.seed)
        mean, std = x[~held_out].mean(0), x[~held_out].std(0) + 1e-6  # the first layer sees standardised states
        init = {"weight": start}
        for k in range(1, depth + 2):
            last = k == depth + 1
            w = np.zeros((d, d)) if last else gen.standard_normal((d, d)) * np.sqrt(2 / d)
            init[f"w{k}"], init[f"b{k}"] = w, np.zeros(d)
        init["w1"] = init["w1"] / std[:, None]
        init["b1"] = -(mean @ init["w1"])
        # The least-squares map stays: the MLP learns what it leaves (TOAST's residual translator).
        fitting = Fitting(apply, (x, None), y, held_out, frozen=("weight",))
        tensors, report = train(init, fitting, params, data.seed, data.progress)
        return Fitted(tensors, conditioning, report)
    return fit


KIND = MapKind("mlp", "mlp: the linear map plus a one-hidden-layer MLP (TOAST's translator), trained", fitter(1),
               shapes(1), apply, hypers=TRAINING, statistics=("tokens", "samples"))
