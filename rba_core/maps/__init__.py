"""The map kinds that replace a range of blocks: the registry, one file per kind.

A map for range i→j sends hs[i] to hs[j], one map shared by all (real) tokens, fitted from statistics of
the fit samples (:mod:`rba_core.measures.stats`, :mod:`rba_core.passes.range_pass`), never from a second pass over the model.
Each kind is one module of this package declaring a :class:`~rba_core.maps.base.MapKind`: the statistics it
reads, its fit, the tensors and computation of its module (:class:`~rba_core.maps.module.FittedMap`), whether
it folds into the weights, what ranges and models it takes, and its hyperparameters. Everything else (the
CLI's flags, the pages' pickers, approximate, search, table, export and ``load_compressed``) reads
:data:`MAPS`; a new kind is a new file plus its name in :data:`~rba_core.maps.registry.KINDS`. Importing this package loads no torch.
"""

from __future__ import annotations

from rba_core.maps.base import (PRODUCT_EPS, Conditioning, FitData, Fitted, Hyper, MapKind, MissingStatistics, Range,
                                solve_spd, solve_spd_conditioned, tokens_per_sample, validate_ranges)
from rba_core.maps.linear import all_pair_maps, fit_residual_matrix
from rba_core.maps.registry import HYPERS, KINDS, MAPS, MapParams, map_kind

def fit_map(stats, rng: Range, kind: str = "linear", params=None):  # -> a FittedMap, or None
    """The map of ``kind`` for range i→j (None for a kind that skips the blocks) from the statistics its kind
    reads: ``stats`` is a :class:`FitData`, a :class:`rba_core.passes.range_pass.RangeStatistics`, token statistics
    or fold statistics."""
    from rba_core.maps.module import FittedMap

    declared = map_kind(kind)
    params = params or MapParams()
    fitted = declared.fit(FitData.of(stats), tuple(rng), params)
    if fitted is None:
        return None
    return FittedMap(kind, fitted.tensors, rng[0], conditioning=fitted.conditioning, params=declared.key(params),
                     report=fitted.training)


def empty_map(kind: str, hidden_size: int, start: int, params: dict | None = None):  # -> a FittedMap, or None
    """A map of ``kind`` with uninitialised tensors of the right shapes (to load stored ones into)."""
    import torch

    from rba_core.maps.module import FittedMap

    shapes = map_kind(kind).shapes(hidden_size)
    if not shapes:
        return None
    return FittedMap(kind, {name: torch.empty(shape) for name, shape in shapes.items()}, start, params=params)


__all__ = ["HYPERS", "KINDS", "MAPS", "PRODUCT_EPS", "Conditioning", "FitData", "Fitted", "Hyper", "MapKind",
           "MapParams", "MissingStatistics", "Range", "all_pair_maps", "empty_map", "fit_map", "fit_residual_matrix",
           "map_kind", "solve_spd", "solve_spd_conditioned", "tokens_per_sample", "validate_ranges"]
