"""The two end-to-end operations the CLI and the app run: analyse a model, approximate ranges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rba_core.approx import ApproximatedEncoder, Range, approximate_encoder, count_params, paper_notation, validate_ranges
from rba_core.cache import Cache, make_key
from rba_core.data import UNITS, open_dataset, open_sample
from rba_core.distributed import single_flight, world
from rba_core.errors import RBAError
from rba_core.extract import Extraction, Progress, extract, model_inputs
from rba_core.latency import BATCH as LATENCY_BATCH, METHOD as LATENCY_METHOD, measure as measure_latency
from rba_core.maps import PRODUCT_EPS, MapParams, fit_map, fit_residual_matrix, map_kind
from rba_core.lm_data import DEFAULT_SEQ_LEN, LMText, is_lm_text
from rba_core.metrics import (angular_distance, block_redundancy, block_redundancy_all_tokens, cosine_matrix,
                              linear_cka_matrix)
from rba_core.models import (Encoder, ModelRef, adapter_class, load_config, load_encoder,
                             model_ref, readable_source)
from rba_core.models.decoder import DecoderLM
from rba_core.perplexity import lm_scores
from rba_core.range_pass import RangeStatistics, range_statistics
from rba_core.probe import converged_probe_accuracy, probe_accuracy, small_classes_note
from rba_core.registry import lm_text_mismatch
from rba_core.results import AnalysisResult, ApproximationResult

Stage = Callable[[str], None]


def _matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]


def analysis_results(ex: Extraction, windows: Sequence[int] = ()) -> AnalysisResult:
    """The ``analyze`` result: BR for blocks 1..L, cosine, CKA and fit-residual matrices over 0..L;
    with token statistics also BR on every token, Block Influence, and for each window size n in
    ``windows`` the angular distance between block outputs l and l+n of the pooled vectors."""
    meta = ex.meta
    stats = ex.token_stats
    windows = sorted({n for n in windows if 1 <= n <= ex.num_blocks})
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
        block_redundancy_all_tokens=block_redundancy_all_tokens(stats).tolist() if stats is not None and all(
            stats.has(k - 1, k) for k in range(1, ex.num_blocks + 1)) else None,
        block_influence=None if ex.block_influence is None else ex.block_influence.tolist(),
        angular_distance={str(n): angular_distance(ex.pooled, n).tolist() for n in windows} or None,
        stats=meta.get("stats") if stats is not None else None,
        workers=int(meta.get("workers", 1)),
        threads=meta.get("threads"),
    )


def lm_dataset(model, dataset, seq_len: int = DEFAULT_SEQ_LEN, ref: ModelRef | None = None):
    """For a causal LM and a language-model text source (hub alias, ``.txt`` file, folder of texts),
    the source as windows of ``seq_len`` of the model's tokens; any other pair is returned unchanged."""
    if not is_lm_text(dataset):
        return dataset
    ref = ref or model_ref(model)
    if not issubclass(adapter_class(ref.info.family), DecoderLM):
        raise RBAError(lm_text_mismatch(ref.name, ref.info.modality, dataset))
    if ref.loaded is not None:
        source, config = ref.loaded.source, ref.loaded.config
    else:
        config = load_config(model)
        source = readable_source(model)  # a GGUF file: its plain checkpoint, which holds the tokenizer
    return LMText(dataset, source, seq_len, getattr(config, "max_position_embeddings", None))


def analyze(model, dataset, n: int, seed: int = 0, split: str = "train", *, max_length: int = 128,
            seq_len: int = DEFAULT_SEQ_LEN, windows: Sequence[int] = (1,), stats_window: int | None = None,
            stats_budget: int | None = None, cache: Cache | None = None,
            progress: Progress | None = None) -> AnalysisResult:
    """Extract (or reopen) and compute every redundancy metric.

    ``model``: alias, hub id, folder or a loaded model; ``dataset``: alias, folder or a list of samples
    (for a causal LM also a language-model text, read as ``n`` windows of ``seq_len`` tokens).
    ``stats_window`` keeps token statistics for windows of that many blocks instead of all pairs."""
    dataset = lm_dataset(model, dataset, seq_len)
    return analysis_results(extract(model, dataset, n, seed, split, max_length=max_length, cache=cache,
                                    progress=progress, stats_window=stats_window, stats_budget=stats_budget),
                            windows)


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
    source = ex.source or open_dataset(dataset, ex.meta["split"])
    here = world()
    n, mine = len(ex.indices), here.share(len(ex.indices))
    out, latency = np.empty((len(mine), *ex.final.shape[1:]), ex.final.dtype), {} if timed and here.is_main else None
    original = ApproximatedEncoder(encoder, [], [])  # no range: the original model's own path
    with here.all_or_none("the approximated model's evaluation"):
        starts = range(0, len(mine), batch_size)
        batches = [ex.indices[mine[start : start + batch_size]] for start in starts]
        for start, inputs in zip(starts, model_inputs(encoder, source, batches)):
            out[start : start + batch_size] = net(**inputs).float().cpu().numpy()
            if latency == {}:  # timed on the first batch, both models interleaved on the same inputs
                latency = measure_latency({"original": original, "approximated": net},
                                          {k: v[:LATENCY_BATCH] for k, v in inputs.items()})
            if progress:
                progress(round(min(start + batch_size, len(mine)) * n / len(mine)), n)
    return here.gather_rows(out, mine, n), latency


def map_statistics(kind: str, fit: Extraction, dataset, sets: Sequence[Sequence[Range]], lazy: LazyEncoder,
                   cache: Cache, progress: Progress | None = None):
    """What maps of ``kind`` are fitted from (its ``statistics``): the token statistics of the fit pass
    ``fit``, or the fold statistics of every range of ``sets`` over the same samples
    (:func:`rba_core.fold.fold_pass`: one more pass unless stored; one sentence for ranges that cannot fold)."""
    if map_kind(kind).statistics == "tokens":
        return fit.stats()
    from rba_core.fold import fold_pass

    return fold_pass(lazy.model, dataset, fit.meta["n"], fit.meta["seed"], sets, max_length=lazy.max_length,
                     cache=cache, progress=progress, encoder=lazy)


def approximated_outputs(lazy: LazyEncoder, dataset, fit, maps: Sequence, ex: Extraction, ranges: list[Range],
                         kind: str, params: MapParams, cache: Cache, progress: Progress | None,
                         timed: bool = False) -> tuple[np.ndarray, dict]:
    """Cached approximated final representations on ``ex``'s samples, and the run's measurements
    (latency only when ``timed``: the probe's extra runs are not timed). ``fit``: the statistics (with
    ``key`` and ``meta``) that ``maps``, one per range (None: skipped), were fitted from."""
    spec = {"kind": "approximated", "fit": fit.key, "samples": ex.key, "ranges": ranges, "map": kind,
            "map_params": map_kind(kind).key(params)}
    key = make_key({**spec, "timed": timed and LATENCY_METHOD})
    # An untimed request is served by a timed entry too (the same outputs); a timed one needs its latency.
    keys = [key] if timed else [make_key({**spec, "timed": LATENCY_METHOD}), key]

    def lookup() -> tuple[np.ndarray, dict] | None:
        for stored_key in keys:
            stored = cache.load(stored_key, "final")
            if stored is not None:
                return stored["final"], cache.get(stored_key).meta
        return None

    def compute(progress: Progress | None) -> tuple[np.ndarray, dict]:
        encoder = lazy()
        net = ApproximatedEncoder(encoder, ranges, maps).eval()
        final, measured = _approximated_finals(net, encoder, dataset, ex, progress, timed)
        meta = {"params": count_params(net), "latency_ms_per_image": measured, "model": fit.meta["model"],
                "dataset": fit.meta["dataset"], "split": ex.meta["split"], "n": len(ex.indices), "ranges": ranges,
                "map": kind, "workers": world().size}
        if world().is_main:  # one writer per group of workers
            cache.put(key, {"final": {"final": final}}, meta)
        return final, meta

    return single_flight(cache, key, lookup, compute, progress)  # one run per key across processes and ranks


def _lm_scores(lazy: LazyEncoder, dataset: LMText, fit, maps: Sequence, ev: Extraction, ranges: list[Range],
               kind: str, params: MapParams, cache: Cache, progress: Progress | None,
               timed: bool = False) -> tuple[dict, np.ndarray, dict]:
    """Perplexity and top-1 agreement of the original, approximated and skipped models on ``ev``'s windows,
    the approximated model's final representations and its measurements (parameters; latency when
    ``timed``), all from one loop over the windows in which each approximation runs only from its first
    range on (:func:`rba_core.perplexity.lm_scores`); cached like every other result (a stored result never
    loads the model)."""
    key = make_key({"kind": "lm-scores", "fit": fit.key, "samples": ev.key, "ranges": ranges, "map": kind,
                    "map_params": map_kind(kind).key(params), "timed": timed and LATENCY_METHOD})

    def lookup() -> tuple[dict, np.ndarray, dict] | None:
        entry = cache.get(key)
        stored = None if entry is None else cache.load(key, "final")
        return None if stored is None else (entry.meta["scores"], stored["final"], entry.meta)

    def compute(progress: Progress | None) -> tuple[dict, np.ndarray, dict]:
        loaded = lazy()
        windows = (ev.source or open_dataset(dataset, "test")).items(ev.indices)
        nets = {"approximated": ApproximatedEncoder(loaded, ranges, maps).eval(),
                "skip": approximate_encoder(loaded, None, ranges, "identity")}
        finals: dict[str, list] = {}
        scores = lm_scores(loaded, nets, windows, progress=progress, finals=finals)
        latency = None
        if timed:  # both models on the first windows, interleaved
            inputs = loaded.preprocess(list(windows[:LATENCY_BATCH]))
            latency = measure_latency({"original": ApproximatedEncoder(loaded, [], []),
                                       "approximated": nets["approximated"]}, inputs)
        final = torch.cat(finals["approximated"]).numpy()
        meta = {"kind": "scores", "scores": scores, "params": count_params(nets["approximated"]),
                "latency_ms_per_image": latency, "model": fit.meta["model"], "dataset": fit.meta["dataset"],
                "split": "test", "n": len(ev.indices), "ranges": ranges, "map": kind}
        meta = cache.put(key, {"final": {"final": final}}, meta).meta
        return scores, final, meta

    return cache.single_flight(key, lookup, compute, progress)


def fit_range_maps(model, dataset, n: int, seed: int, ranges: list[Range], kind: str, params: MapParams,
                   cache: Cache, progress: Progress | None, lazy: LazyEncoder) -> tuple[RangeStatistics, list]:
    """The maps of ``kind`` for ``ranges`` and the fit statistics they come from: one float64 pass over the
    ``n`` fit samples up to the last range's end, holding the Gram blocks and (where the model folds) the
    fold statistics of the ranges, so every map kind of the same ranges shares it
    (:func:`rba_core.range_pass.range_statistics`). A fold that the model cannot take is one sentence
    before the pass."""
    from rba_core.fold import check_fold_set, check_foldable

    folds = map_kind(kind).statistics == "fold"
    if folds:
        check_fold_set(ranges, model_ref(lazy.encoder if isinstance(lazy.encoder, Encoder) else model,
                                         lazy.max_length).info.num_blocks)

    def load() -> Encoder:
        loaded = lazy()
        if folds:
            check_foldable(loaded, ranges)
        return loaded

    fit = range_statistics(model, dataset, n, seed, ranges, max_length=lazy.max_length, cache=cache,
                           progress=progress, encoder=load)
    if folds and any(rng not in fit.fold for rng in ranges):  # a stored entry of a model that cannot fold
        check_foldable(load(), ranges)
    maps = [fit_map(fit.fold if folds else fit.tokens, rng, kind, params) for rng in ranges]
    return fit, maps


def conditioning_report(ranges: Sequence[Range], maps: Sequence) -> tuple[list[dict] | None, list[str]]:
    """Each fitted map's condition number and the rank its solve used (JSON), and a note for every map whose
    solve dropped directions that its statistics could not resolve."""
    rows, notes = [], []
    for (i, j), fitted in zip(ranges, maps):
        conditioning = getattr(fitted, "conditioning", None)
        if conditioning is None:
            continue
        rows.append({"range": [i, j], **conditioning.to_json()})
        if conditioning.dropped:
            notes.append(f"The map of range {i}→{j} used {conditioning.rank} of {conditioning.dimension} directions: "
                         f"the fit samples' block {i} outputs span the other {conditioning.dropped} too weakly for "
                         f"{conditioning.precision} statistics to resolve (condition number above "
                         f"{1 / PRODUCT_EPS[conditioning.precision]:.0e}); more or more "
                         "varied fit samples, or --map ridge, determine them.")
    return rows or None, notes


def approximate(model, dataset, fit_n: int, eval_n: int, seed: int,
                ranges: Sequence[Sequence[int]], kind: str = "linear", *, map_params: MapParams | None = None,
                probe: bool = False, max_length: int = 128, seq_len: int = DEFAULT_SEQ_LEN,
                latency: bool = True, label_map=None,
                cache: Cache | None = None, progress: Progress | None = None, on_stage: Stage | None = None,
                encoder: Encoder | LazyEncoder | Callable[[], Encoder] | None = None) -> ApproximationResult:
    """Fit maps on ``fit_n`` train samples, evaluate the approximated model on ``eval_n`` test samples.

    The result's ``final`` holds the original and approximated final representations of the
    evaluation samples with their labels (numpy; not in the JSON). For a causal LM on a
    language-model text the samples are windows of ``seq_len`` tokens and the result adds the
    perplexity and top-1 next-token agreement of the original, approximated and skipped models.
    The maps come from one float64 pass over the fit samples that keeps only the ranges' own statistics
    (:func:`fit_range_maps`). ``latency``: time both models per image (a few seconds); off, the result's
    ``latency_ms_per_image`` is None. A model with a classification head whose classes match the dataset's
    (or ``label_map``, a JSON file) adds ``head_accuracy`` (:mod:`rba_core.head`); otherwise a note says why not.
    """
    declared = map_kind(kind)  # an unknown map fails before any work
    params = map_params or MapParams()
    cache = cache or Cache()
    stage = on_stage or (lambda _: None)
    # A shared LazyEncoder lets many calls (table rows, search probes) load the model at most once.
    lazy = encoder if isinstance(encoder, LazyEncoder) else LazyEncoder(model, encoder, max_length)
    ref = model_ref(lazy.encoder if isinstance(lazy.encoder, Encoder) else model, max_length)
    info = ref.info
    ranges = validate_ranges(ranges, info.num_blocks)  # before any pass
    dataset = lm_dataset(model, dataset, seq_len, ref)
    stage("Fit samples (train split): statistics of the ranges (float64, blocks up to the last range's end)")
    fit, maps = fit_range_maps(model, dataset, fit_n, seed, ranges, kind, params, cache, progress, lazy)
    conditioning, notes = conditioning_report(ranges, maps)
    stage("Evaluation samples (test split): original model")
    ev = extract(model, dataset, eval_n, seed, "test", with_stats=False, max_length=max_length, cache=cache,
                 progress=progress, encoder=lazy)
    scores = None
    if isinstance(dataset, LMText):
        stage("Evaluation windows: the approximated and skipped models from their first range on; perplexity "
              "and next-token agreement")
        scores, final, measured = _lm_scores(lazy, dataset, fit, maps, ev, ranges, kind, params, cache, progress,
                                             timed=latency)
    else:
        stage("Evaluation samples: approximated model")
        final, measured = approximated_outputs(lazy, dataset, fit, maps, ev, ranges, kind, params, cache, progress,
                                               timed=latency)
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
        notes=sorted(set(ev.notes + notes)),
        conditioning=conditioning,
        final={"original": ev.final, "approximated": final, "labels": ev.labels, "label_names": fit.label_names},
    )
    if scores is not None:
        result.perplexity, result.top1_agreement = scores["perplexity"], scores["top1_agreement"]
    else:  # the model's own classifier head, where it has one matching the dataset's classes (issue 17)
        from rba_core.head import measure_head

        result.head_accuracy, why = measure_head(lazy, model, dataset, fit, ev, ranges, maps, kind,
                                                 declared.key(params), cache, label_map, progress, stage)
        result.notes += [why] if why and (probe or label_map) else []
    if probe:
        stage("Linear probe: original, approximated and skipped models on the fit samples")
        reps = extract(model, dataset, fit_n, seed, "train", with_stats=False, max_length=max_length, cache=cache,
                       progress=progress, encoder=lazy)
        train = {"original": reps.final}
        test = {"original": ev.final}
        skipped = [None] * len(ranges)
        for name, map_name, fitted in (("approximated", kind, maps), ("skip", "identity", skipped)):
            train[name] = approximated_outputs(lazy, dataset, fit, fitted, reps, ranges, map_name, params, cache,
                                               progress)[0]
            test[name] = final if map_name == kind else approximated_outputs(
                lazy, dataset, fit, fitted, ev, ranges, map_name, params, cache, progress)[0]
        result.accuracy = {name: probe_accuracy(train[name], reps.labels, test[name], ev.labels)
                           for name in ("original", "approximated", "skip")}
        result.accuracy_converged = {name: converged_probe_accuracy(train[name], reps.labels, test[name], ev.labels)
                                     for name in ("original", "approximated", "skip")}
        result.notes += [note] if (note := small_classes_note(ev.labels, fit.label_names,
                                                              unit=UNITS[info.modality])) else []
    return result


def export(model, dataset, fit_n: int, seed: int, ranges: Sequence[Sequence[int]], kind: str, out,
           *, eval_n: int = 0, map_params: MapParams | None = None, max_length: int = 128,
           seq_len: int = DEFAULT_SEQ_LEN, onnx: bool = False, cache: Cache | None = None,
           progress: Progress | None = None, on_stage: Stage | None = None,
           encoder: Encoder | Callable[[], Encoder] | None = None) -> dict:
    """Fit the maps of ``ranges`` on ``fit_n`` train samples and write the export folder ``out``
    (``encoder``: a loaded encoder of ``model`` or a loader, as for :func:`approximate`).

    ``kind`` ``folded`` gives a plain Hugging Face checkpoint with fewer layers (pre-LN models; its
    ``rba.json`` records the data and, with ``eval_n`` test samples, the perplexity of the original
    and folded models on the windows of a language-model text, else the final-representation MSE
    of the folded model against the original); other kinds the rba-compressed folder with
    the maps as modules (:func:`rba_core.export.save_compressed`). Returns the record written."""
    from rba_core.export import save_compressed, save_folded
    from rba_core.fold import folded_encoder

    params = map_params or MapParams()
    stage = on_stage or (lambda _: None)
    lazy = LazyEncoder(model, encoder, max_length)
    ref = model_ref(model, max_length)
    checked = validate_ranges(ranges, ref.info.num_blocks)
    data = lm_dataset(model, dataset, seq_len, ref)
    stage("Fit samples (train split): statistics of the ranges (float64, blocks up to the last range's end)")
    fit, fitted = fit_range_maps(model, data, fit_n, seed, checked, kind, params, cache or Cache(), progress, lazy)
    conditioning, notes = conditioning_report(checked, fitted)  # the compressed record holds it per range
    if map_kind(kind).statistics == "tokens":  # the maps stay modules: the rba-compressed folder
        save_compressed(ApproximatedEncoder(lazy(), checked, fitted).eval(), out, onnx=onnx)
        return {**json.loads((Path(out) / "rba.json").read_text()), "notes": notes}
    encoder = lazy()
    maps = {rng: m.weight.double().cpu().numpy() for rng, m in zip(checked, fitted)}
    folded = folded_encoder(encoder, maps)
    record = {"source": encoder.source, "family": encoder.family, "map": "folded",
              "ranges": [list(rng) for rng in checked],
              "paper": [paper_notation(rng) for rng in checked],
              "layers": {"original": encoder.num_blocks, "folded": folded.num_blocks},
              "params": {"original": count_params(encoder.model), "folded": count_params(folded.model)},
              "data": {"dataset": str(dataset), "fit_n": fit_n, "seed": seed,
                       **({"seq_len": seq_len} if isinstance(data, LMText) else {"max_length": encoder.max_length})},
              "conditioning": conditioning}
    if eval_n:
        test, indices = open_sample(data, "test", eval_n, seed)
        samples = test.items(indices)
        record["data"]["eval_n"] = eval_n
        if isinstance(data, LMText):
            stage("Evaluation windows: perplexity of the original and folded models")
            record["perplexity"] = {"original": lm_scores(encoder, {}, samples)["perplexity"]["original"],
                                    "folded": lm_scores(folded, {}, samples)["perplexity"]["original"]}
        else:
            stage("Evaluation samples (test split): final representations of the original and folded models")
            record["mse_final"] = _final_mse(encoder, folded, samples)
    save_folded(folded, out, record)
    return {**record, "notes": notes}


@torch.inference_mode()
def _final_mse(original: Encoder, other: Encoder, samples: Sequence, batch_size: int = 8) -> float:
    """Mean squared difference of the two encoders' final representations over samples and dimensions."""
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        inputs = original.preprocess(samples[start : start + batch_size])
        mask = original.token_mask(inputs)
        ours, theirs = (enc.final(enc.hidden_states(inputs)[0][-1], mask).double() for enc in (original, other))
        total, count = total + float(((ours - theirs) ** 2).sum()), count + ours.numel()
    return total / count
