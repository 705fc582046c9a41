"""The two end-to-end operations the CLI and the app run: analyse a model, approximate ranges."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from rba_core.approx import ApproximatedEncoder, Range, approximate_encoder, count_params, paper_notation, validate_ranges
from rba_core.cache import Cache, make_key
from rba_core.data import open_dataset
from rba_core.distributed import single_flight, world
from rba_core.extract import Extraction, Progress, extract
from rba_core.latency import BATCH as LATENCY_BATCH, METHOD as LATENCY_METHOD, measure as measure_latency
from rba_core.maps import MapParams, fit_residual_matrix, map_kind
from rba_core.metrics import block_redundancy, cosine_matrix, linear_cka_matrix
from rba_core.models import Encoder, load_encoder, model_ref
from rba_core.probe import converged_probe_accuracy, probe_accuracy, small_classes_note
from rba_core.results import AnalysisResult, ApproximationResult

Stage = Callable[[str], None]


def _matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]


def analysis_results(ex: Extraction) -> AnalysisResult:
    """The ``analyze`` result: BR for blocks 1..L, cosine, CKA and fit-residual matrices over 0..L."""
    meta = ex.meta
    return AnalysisResult(
        model=meta["model"], dataset=meta["dataset"], split=meta["split"],
        modality=meta.get("modality", "image"), family=meta["family"], pooling=meta.get("pooling", "first"),
        max_length=meta.get("max_length"), num_blocks=ex.num_blocks, hidden_size=ex.hidden_size,
        n=int(len(ex.indices)), seed=meta["seed"],
        block_redundancy=block_redundancy(ex.pooled).tolist(),
        cosine=cosine_matrix(ex.pooled).tolist(),
        cka=linear_cka_matrix(ex.pooled).tolist(),
        fit_residual=_matrix(ex.fit_residual if ex.fit_residual is not None else fit_residual_matrix(ex.stats())),
        cache={"key": ex.key, "hit": ex.hit},
        notes=ex.notes,
        workers=int(meta.get("workers", 1)),
    )


def analyze(model, dataset, n: int, seed: int = 0, split: str = "train", *, max_length: int = 128,
            cache: Cache | None = None, progress: Progress | None = None) -> AnalysisResult:
    """Extract (or reopen) and compute every redundancy metric.

    ``model``: alias, hub id, folder or a loaded model; ``dataset``: alias, folder or a list of samples."""
    return analysis_results(extract(model, dataset, n, seed, split, max_length=max_length, cache=cache,
                                    progress=progress))


class LazyEncoder:
    """Loads the model only when a forward pass is really needed (never on a full cache hit)."""

    def __init__(self, model, encoder: Encoder | Callable[[], Encoder] | None = None, max_length: int = 128):
        # A zero-arg loader lets the app share its model cache; a loaded model is used as it is.
        self.model, self.encoder, self.max_length = model, encoder, max_length
        if encoder is None and not isinstance(model, str):
            self.encoder = model_ref(model, max_length).loaded

    def __call__(self) -> Encoder:
        if self.encoder is None:
            self.encoder = load_encoder(self.model, max_length=self.max_length)
        elif not isinstance(self.encoder, Encoder):
            self.encoder = self.encoder()
        return self.encoder.with_max_length(self.max_length)


@torch.inference_mode()
def _approximated_finals(net: ApproximatedEncoder, encoder: Encoder, dataset, ex: Extraction,
                         progress: Progress | None, timed: bool, batch_size: int = 32) -> tuple[np.ndarray, dict | None]:
    """Final representations of the approximated model on ``ex``'s samples, plus latencies if ``timed``.
    Under a launcher each rank runs its share and the rows are gathered; rank 0 times the models."""
    source = open_dataset(dataset, ex.meta["split"])
    here = world()
    n, mine = len(ex.indices), here.share(len(ex.indices))
    out, latency = np.empty((len(mine), *ex.final.shape[1:]), ex.final.dtype), {} if timed and here.is_main else None
    original = ApproximatedEncoder(encoder, [], [])  # no range: the original model's own path
    with here.all_or_none("the approximated model's evaluation"):
        for start in range(0, len(mine), batch_size):
            inputs = encoder.preprocess(source.items(ex.indices[mine[start : start + batch_size]]))
            out[start : start + batch_size] = net(**inputs).cpu().numpy()
            if latency == {}:  # timed on the first batch, both models interleaved on the same inputs
                latency = measure_latency({"original": original, "approximated": net},
                                          {k: v[:LATENCY_BATCH] for k, v in inputs.items()})
            if progress:
                progress(round(min(start + batch_size, len(mine)) * n / len(mine)), n)
    return here.gather_rows(out, mine, n), latency


def approximated_outputs(lazy: LazyEncoder, dataset, fit: Extraction, ex: Extraction, ranges: list[Range],
                         kind: str, params: MapParams, cache: Cache, progress: Progress | None,
                         timed: bool = False) -> tuple[np.ndarray, dict]:
    """Cached approximated final representations on ``ex``'s samples, and the run's measurements
    (latency only when ``timed``: the probe's extra runs are not timed)."""
    key = make_key({"kind": "approximated", "fit": fit.key, "samples": ex.key, "timed": timed and LATENCY_METHOD,
                    "ranges": ranges, "map": kind, "map_params": map_kind(kind).key(params)})

    def lookup() -> tuple[np.ndarray, dict] | None:
        stored = cache.load(key, "final")
        return None if stored is None else (stored["final"], cache.get(key).meta)

    def compute(progress: Progress | None) -> tuple[np.ndarray, dict]:
        encoder = lazy()
        net = approximate_encoder(encoder, fit.stats(), ranges, kind, params)
        final, measured = _approximated_finals(net, encoder, dataset, ex, progress, timed)
        meta = {"params": count_params(net), "latency_ms_per_image": measured, "model": fit.meta["model"],
                "dataset": fit.meta["dataset"], "split": ex.meta["split"], "n": len(ex.indices), "ranges": ranges,
                "map": kind, "workers": world().size}
        if world().is_main:  # one writer per group of workers
            cache.put(key, {"final": {"final": final}}, meta)
        return final, meta

    return single_flight(cache, key, lookup, compute, progress)  # one run per key across processes and ranks


def approximate(model, dataset, fit_n: int, eval_n: int, seed: int,
                ranges: Sequence[Sequence[int]], kind: str = "linear", *, map_params: MapParams | None = None,
                probe: bool = False, max_length: int = 128, cache: Cache | None = None,
                progress: Progress | None = None, on_stage: Stage | None = None,
                encoder: Encoder | LazyEncoder | Callable[[], Encoder] | None = None) -> ApproximationResult:
    """Fit maps on ``fit_n`` train samples, evaluate the approximated model on ``eval_n`` test samples.

    The result's ``final`` holds the original and approximated final representations of the
    evaluation samples with their labels (numpy; not in the JSON).
    """
    declared = map_kind(kind)  # an unknown map fails before any work
    params = map_params or MapParams()
    cache = cache or Cache()
    stage = on_stage or (lambda _: None)
    # A shared LazyEncoder lets many calls (table rows, search probes) load the model at most once.
    lazy = encoder if isinstance(encoder, LazyEncoder) else LazyEncoder(model, encoder, max_length)
    info = model_ref(lazy.encoder if isinstance(lazy.encoder, Encoder) else model, max_length).info
    ranges = validate_ranges(ranges, info.num_blocks)  # before any pass
    stage("Fit samples (train split): representations and token statistics")
    fit = extract(model, dataset, fit_n, seed, "train", max_length=max_length, cache=cache, progress=progress,
                  encoder=lazy)
    stage("Evaluation samples (test split): original model")
    ev = extract(model, dataset, eval_n, seed, "test", with_stats=False, max_length=max_length, cache=cache,
                 progress=progress, encoder=lazy)
    stage("Evaluation samples: approximated model")
    final, measured = approximated_outputs(lazy, dataset, fit, ev, ranges, kind, params, cache, progress,
                                           timed=True)
    removed = sum(j - i for i, j in ranges)
    result = ApproximationResult(
        model=fit.meta["model"], dataset=fit.meta["dataset"], modality=info.modality, pooling=info.pooling,
        max_length=fit.meta.get("max_length"), fit_n=fit_n, eval_n=eval_n, seed=seed, num_blocks=fit.num_blocks,
        ranges=[{"start": i, "end": j, "removed_blocks": list(range(i + 1, j + 1)),
                 "paper": paper_notation((i, j))} for i, j in ranges],
        map=kind, map_params=declared.key(params),
        blocks={"original": fit.num_blocks, "approximated": fit.num_blocks - removed},
        mse_final=float(np.mean((final.astype(np.float64) - ev.final) ** 2)),
        params={"original": fit.meta["num_params"], "approximated": measured["params"]},
        latency_ms_per_image=measured["latency_ms_per_image"],
        cache={"fit": fit.key, "eval": ev.key},
        notes=sorted(set(fit.notes + ev.notes)),
        final={"original": ev.final, "approximated": final, "labels": ev.labels, "label_names": fit.label_names},
    )
    if probe:
        stage("Linear probe: approximated and skipped models on the fit samples")
        train = {"original": fit.final}
        test = {"original": ev.final}
        for name, map_name in (("approximated", kind), ("skip", "identity")):
            train[name] = approximated_outputs(lazy, dataset, fit, fit, ranges, map_name, params, cache, progress)[0]
            test[name] = final if map_name == kind else approximated_outputs(
                lazy, dataset, fit, ev, ranges, map_name, params, cache, progress)[0]
        result.accuracy = {name: probe_accuracy(train[name], fit.labels, test[name], ev.labels)
                           for name in ("original", "approximated", "skip")}
        result.accuracy_converged = {name: converged_probe_accuracy(train[name], fit.labels, test[name], ev.labels)
                                     for name in ("original", "approximated", "skip")}
        result.notes += [note] if (note := small_classes_note(ev.labels, fit.label_names)) else []
    return result
