"""The map kinds that replace a range of blocks, each declared once: fit, parameter count, label.

A map for range i→j sends hs[i] to hs[j], one map shared by all (real) tokens, fitted in closed
form from token statistics (:mod:`rba_core.stats`), never from a second pass over the model. The
CLI's choices, the search, the export and the pages' pickers all read :data:`MAPS`; a map's
hyperparameters travel as one :class:`MapParams`. A fitted map is a
:class:`rba_core.approx.LinearMap` module; this module itself imports no torch, so the CLI lists
the kinds without loading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from rba_core.errors import RBAError

if TYPE_CHECKING:  # torch loads only when a map is fitted: the CLI can list the kinds without it
    from rba_core.approx import FoldedMap, LinearMap
    from rba_core.fold import FoldStats
    from rba_core.stats import TokenStats

Range = tuple[int, int]


@dataclass(frozen=True)
class MapParams:
    """Hyperparameters of the map kinds; each kind reads only those it declares in ``uses``."""

    ridge: float = 1e-2  # λ of the ridge map, in units of the per-token second moment


#: Relative precision of a statistic's entries, by how its products were formed: float32 products
#: (summed in float64) resolve eigenvalues down to about 2⁻²⁴ of the largest, float64 products to 2⁻⁵³.
PRODUCT_EPS = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}


@dataclass(frozen=True)
class Conditioning:
    """How well a fit's system was determined: ``condition`` = λmax/λmin of its Gram matrix (inf when
    singular to the statistics' precision), ``rank`` the directions the solve used out of ``dimension``."""

    condition: float
    rank: int
    dimension: int
    precision: str  # how the statistics' products were formed: "float64" or "float32"

    @property
    def dropped(self) -> int:
        return self.dimension - self.rank

    def to_json(self) -> dict:
        return {"condition_number": None if not np.isfinite(self.condition) else float(self.condition),
                "rank": self.rank, "dimension": self.dimension, "statistics_precision": self.precision}


def solve_spd_conditioned(gram: np.ndarray, rhs: np.ndarray, precision: str = "float64"
                          ) -> tuple[np.ndarray, Conditioning]:
    """The minimum-norm least-squares solution of gram @ T = rhs for a symmetric PSD ``gram`` (float64
    eigendecomposition), and its :class:`Conditioning`.

    Eigenvalues below ``eps · λmax`` count as zero, ``eps`` being the precision the statistics carry
    (:data:`PRODUCT_EPS` of ``precision``): below it an eigenvalue is smaller than the rounding of the
    largest, a direction the products cannot resolve, dropped rather than inverted as noise (as ``lstsq``
    drops singular values below its ``rcond``). A larger cutoff (``dimension · eps``) would drop directions
    float32 products do resolve: on BERT-family tokens it cost 1e-3 of ||Y||² against ``lstsq``."""
    import torch

    g = torch.from_numpy(np.asarray(gram, np.float64))
    r = torch.from_numpy(np.asarray(rhs, np.float64))
    g = (g + g.T) / 2
    values, vectors = torch.linalg.eigh(g)
    top = float(values.max().clamp_min(0))
    cutoff = top * PRODUCT_EPS[precision]
    keep = values > cutoff
    inverse = torch.where(keep, 1 / values, torch.zeros_like(values))
    solution = (vectors @ (inverse[:, None] * (vectors.T @ r))).numpy()
    low = float(values.min())
    condition = top / low if low > cutoff else float("inf")
    return solution, Conditioning(condition, int(keep.sum()), g.shape[0], precision)


def solve_spd(gram: np.ndarray, rhs: np.ndarray, precision: str = "float64") -> np.ndarray:
    """:func:`solve_spd_conditioned` without its report."""
    return solve_spd_conditioned(gram, rhs, precision)[0]


def _fit_linear(stats: "TokenStats", rng: Range, params: MapParams) -> "LinearMap":
    """Least squares: T = (XᵀX)⁻¹ XᵀY over every fitted token."""
    from rba_core.approx import LinearMap

    i, j = rng
    weight, conditioning = solve_spd_conditioned(stats.gram(i, i), stats.gram(i, j), stats.precision)
    return LinearMap(weight, conditioning=conditioning)


def _fit_ridge(stats: "TokenStats", rng: Range, params: MapParams) -> "LinearMap":
    """(XᵀX/n + λI) T = XᵀY/n."""
    from rba_core.approx import LinearMap

    i, j = rng
    n, d = stats.count, stats.hidden_size
    weight, conditioning = solve_spd_conditioned(stats.gram(i, i) / n + params.ridge * np.eye(d),
                                                 stats.gram(i, j) / n, stats.precision)
    return LinearMap(weight, conditioning=conditioning)


def _fit_affine(stats: "TokenStats", rng: Range, params: MapParams) -> "LinearMap":
    """Least squares with a bias: [X 1] [T; b] ≈ Y."""
    from rba_core.approx import LinearMap

    i, j = rng
    sums, n = stats.sums, stats.count
    aug = np.block([[stats.gram(i, i), sums[i][:, None]], [sums[i][None, :], np.array([[n]])]])
    solution, conditioning = solve_spd_conditioned(aug, np.vstack([stats.gram(i, j), sums[j][None, :]]),
                                                   stats.precision)
    return LinearMap(solution[:-1], solution[-1], conditioning=conditioning)


def _fit_folded(stats: "dict[Range, FoldStats]", rng: Range, params: MapParams) -> "FoldedMap":
    """ReplaceMe's map, exact: T minimising ||m·T − (hs[j] − r)||² where hs[i] = r + m, m being block i's
    MLP output (for i = 0, m = hs[0] and r = 0), from the fold statistics of the range."""
    from rba_core.approx import FoldedMap

    if rng not in stats:
        raise RBAError(f"The fold statistics of this pass do not hold range {rng[0]}→{rng[1]}; collect them first.")
    weight, conditioning = stats[rng].solve()
    return FoldedMap(weight, rng[0], conditioning=conditioning)


@dataclass(frozen=True)
class MapKind:
    """One kind of map: how it is fitted, how many parameters it adds, and what it is called."""

    name: str
    label: str
    fit: Callable[["TokenStats", Range, MapParams], "LinearMap | None"] = field(repr=False)
    added_params: Callable[[int], int] = field(repr=False)  # parameters of one map, given D
    uses: tuple[str, ...] = ()  # the MapParams fields that change its result
    # What it is fitted from: "tokens", the token statistics of the pass (rba_core.stats.TokenStats), or
    # "fold", the fold statistics of its ranges (rba_core.fold.fold_pass), which a model must be able to take.
    statistics: str = "tokens"

    def key(self, params: MapParams) -> dict:
        """The hyperparameters that change this kind's result (for cache keys and JSON)."""
        values = asdict(params)
        return {name: values[name] for name in self.uses}


MAPS: dict[str, MapKind] = {kind.name: kind for kind in (
    MapKind("linear", "linear: least squares, the paper's map", _fit_linear, lambda d: d * d),
    MapKind("affine", "affine: least squares with a bias", _fit_affine, lambda d: d * d + d),
    MapKind("ridge", "ridge: (XᵀX/n + λI) T = XᵀY/n", _fit_ridge, lambda d: d * d, uses=("ridge",)),
    MapKind("identity", "identity: skip the blocks (the paper's ablation)", lambda *_: None, lambda d: 0),
    MapKind("folded", "folded: fitted on block i's MLP output and folded into its last linear layer (ReplaceMe, "
            "exact); no added parameters", _fit_folded, lambda d: 0, statistics="fold"),
)}


def map_kind(name: str) -> MapKind:
    """The declaration of a map kind; an :class:`RBAError` naming the choices otherwise."""
    if name not in MAPS:
        raise RBAError(f"Unknown map '{name}': use one of {', '.join(MAPS)}.")
    return MAPS[name]


def fit_map(stats, rng: Range, kind: str = "linear", params: MapParams | None = None) -> "LinearMap | FoldedMap | None":
    """The map of ``kind`` for range i→j minimising ||hs[i] T - hs[j]||² over all fitted tokens
    (None for ``identity``: the blocks are skipped), from the statistics its kind declares."""
    return map_kind(kind).fit(stats, rng, params or MapParams())


def all_pair_maps(stats: "TokenStats"):
    """Least-squares maps for every range i→j, one factorisation per i.

    Yields ``(i, maps)`` where ``maps``: (D, (L-i)·D) float64 holds T for j = i+1..L side by side.
    """
    d = stats.hidden_size
    for i in range(stats.num_blocks):
        yield i, solve_spd(stats.gram(i, i), stats.upper[i][:, d:], stats.precision)


def fit_residual_matrix(stats: "TokenStats") -> np.ndarray:
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
