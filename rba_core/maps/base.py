"""What every map kind is made of: ranges, hyperparameters, the statistics a fit reads, the conditioned
solve, and :class:`MapKind`, the declaration each kind file fills in (:mod:`rba_core.maps`).

Nothing here imports torch: the CLI and the pages list the kinds and their options without loading it.
A kind's ``apply`` works on tensors it is handed (operators and tensor methods only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any, Callable, Sequence

import numpy as np

from rba_core.errors import RBAError

Range = tuple[int, int]

#: Relative precision of a statistic's entries, by how its products were formed: float32 products
#: (summed in float64) resolve eigenvalues down to about 2⁻²⁴ of the largest, float64 products to 2⁻⁵³.
PRODUCT_EPS = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}


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
    cutoff = top * (g.shape[0] * PRODUCT_EPS["float64"] + PRODUCT_EPS[precision])
    keep = values > cutoff
    inverse = torch.where(keep, 1 / values, torch.zeros_like(values))
    solution = (vectors @ (inverse[:, None] * (vectors.T @ r))).numpy()
    low = float(values.min())
    condition = top / low if low > cutoff else float("inf")
    return solution, Conditioning(condition, int(keep.sum()), g.shape[0], precision)


def solve_spd(gram: np.ndarray, rhs: np.ndarray, precision: str = "float64") -> np.ndarray:
    """:func:`solve_spd_conditioned` without its report."""
    return solve_spd_conditioned(gram, rhs, precision)[0]


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a map kind: its CLI flag (``--name``) and dashboard widget derive from it."""

    name: str
    default: float
    label: str  # the widget's label
    help: str
    minimum: float = 0.0
    type: type = float


@dataclass(frozen=True)
class FitData:
    """The statistics a map is fitted from, by name: ``tokens`` (:class:`rba_core.measures.stats.TokenStats`: Gram
    blocks and sums), ``fold`` (range -> :class:`rba_core.maps.folded.FoldStats`) and ``samples`` (token states,
    :class:`rba_core.passes.range_pass.TokenSamples`, for maps trained by gradient descent). A kind declares the ones it
    reads (:attr:`MapKind.statistics`); the others may be None. A trained fit draws with ``seed`` and reports its
    steps to ``progress``."""

    tokens: Any = None
    fold: Any = None
    samples: Any = None
    seed: int = 0
    progress: Any = None

    @classmethod
    def of(cls, stats) -> "FitData":
        """Whatever a caller holds: a FitData, a RangeStatistics (both parts), token statistics or fold statistics."""
        if isinstance(stats, FitData):
            return stats
        if hasattr(stats, "tokens") and hasattr(stats, "fold"):
            return cls(stats.tokens, stats.fold, getattr(stats, "samples", None))
        return cls(fold=stats) if isinstance(stats, dict) else cls(tokens=stats)

    def require(self, name: str):
        found = getattr(self, name)
        if found is None:
            raise MissingStatistics(f"These statistics hold no {name} statistics; collect them first.")
        return found


class MissingStatistics(RBAError):
    """A fit asked for statistics that were not collected (a stored pass of a model that cannot take the kind)."""


@dataclass(frozen=True)
class Fitted:
    """What a kind's fit returns: the map's named tensors (numpy, float64) and how well they were determined."""

    tensors: dict[str, np.ndarray]
    conditioning: Conditioning | None = None
    training: dict | None = None  # a trained map's train_loss, val_loss, steps


@dataclass(frozen=True)
class MapKind:
    """One kind of map, complete: everything the tool does with a kind reads this declaration.

    ``fit(data, range, params)`` returns :class:`Fitted` (None: the blocks are skipped); ``shapes(D)`` the
    tensors of one map; ``apply(map, hidden, m)`` what the map computes (``map`` exposes the tensors as
    attributes; ``m``: block i's MLP output where ``needs_mlp_output``). ``folds(map)``, when set, is the
    matrix folded into block i's MLP output layer, so the map leaves no module (exported as a plain
    checkpoint); ``check_ranges(ranges, L)`` and ``check_encoder(encoder, ranges)`` refuse, in one
    sentence, ranges or models the kind cannot take."""

    name: str
    label: str
    fit: Callable[[FitData, Range, Any], Fitted | None] = field(repr=False)
    shapes: Callable[[int], dict[str, tuple[int, ...]]] = field(repr=False)
    apply: Callable | None = field(default=None, repr=False)
    hypers: tuple[Hyper, ...] = ()
    statistics: tuple[str, ...] = ("tokens",)  # FitData fields it reads
    needs_mlp_output: bool = False
    folds: Callable[[Any], np.ndarray] | None = field(default=None, repr=False)  # a FittedMap -> T
    check_ranges: Callable[[Sequence[Range], int], Any] | None = field(default=None, repr=False)
    check_encoder: Callable[[Any, Sequence[Range]], Any] | None = field(default=None, repr=False)

    @property
    def uses(self) -> tuple[str, ...]:
        """The hyperparameters that change its result."""
        return tuple(h.name for h in self.hypers)

    def added_params(self, hidden_size: int) -> int:
        """Parameters one map adds to the model (none where it folds into the weights)."""
        return 0 if self.folds else sum(prod(shape) for shape in self.shapes(hidden_size).values())

    def key(self, params) -> dict:
        """The hyperparameters that change this kind's result (for cache keys and JSON)."""
        values = asdict(params)
        return {name: values[name] for name in self.uses}

    @property
    def trained(self) -> bool:
        """Fitted by gradient descent on token samples (not in closed form): its fits are worth caching."""
        return "samples" in self.statistics

    def gather(self, **providers: Callable[[], Any]) -> FitData:
        """The statistics this kind reads, each from its provider (called only when read); ``seed`` and
        ``progress`` are passed through."""
        extra = {k: providers[k] for k in ("seed", "progress") if k in providers}
        return FitData(**{name: providers[name]() for name in self.statistics}, **extra)


#: The hyperparameters of the kinds trained by gradient descent (:mod:`rba_core.maps.training`).
TRAINING = (
    Hyper("train_lr", 3e-3, "Training: learning rate", "trained maps: Adam's learning rate"),
    Hyper("train_steps", 300, "Training: steps", "trained maps: at most this many Adam steps (of 2048 tokens), "
          "fewer when the held-out loss stops improving", minimum=1, type=int),
    Hyper("train_tokens", 32768, "Training: tokens", "trained maps: token states drawn from the fit samples to "
          "train on (a seeded sample, the same share of each sample; every tenth sample held out)", minimum=16,
          type=int),
)


def tokens_per_sample(params, fit_n: int) -> int:
    """How many token states of each fit sample a trained kind's ``train_tokens`` asks for."""
    return max(1, -(-int(params.train_tokens) // max(fit_n, 1)))
