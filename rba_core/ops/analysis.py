"""The operations on a run (:class:`rba_core.ops.run.Run`): analyse a model, approximate ranges, export them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rba_core.passes.approx import ApproximatedEncoder, Range, approximate_encoder, count_params, paper_notation
from rba_core.cache import make_key
from rba_core.data import UNITS, open_dataset, open_sample
from rba_core.distributed import single_flight, world
from rba_core.passes.extract import Extraction, Progress, model_inputs
from rba_core.latency import BATCH as LATENCY_BATCH, METHOD as LATENCY_METHOD, measure as measure_latency
from rba_core.maps import (PRODUCT_EPS, Conditioning, FitData, MapParams, MissingStatistics, fit_map, map_kind,
                           tokens_per_sample, validate_ranges)
from rba_core.maps.module import FittedMap
from rba_core.data.lm_data import LMText
from rba_core.measures.metrics import cosine_matrix, linear_cka_matrix
from rba_core.models import Encoder
from rba_core.passes.perplexity import lm_scores
from rba_core.passes.range_pass import RangeStatistics, range_statistics
from rba_core.measures.probe import converged_probe_accuracy, probe_accuracy, small_classes_note
from rba_core.store.results import AnalysisResult, ApproximationResult
from rba_core.ops.run import Run
from rba_core.measures.scores import SCORES


def _matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]


def analysis_results(ex: Extraction, windows: Sequence[int] = ()) -> AnalysisResult:
    """The ``analyze`` result: BR for blocks 1..L, cosine, CKA and fit-residual matrices over 0..L;
    with token statistics also BR on every token, Block Influence, and for each window size n in
    ``windows`` the angular distance between block outputs l and l+n of the pooled vectors."""
    meta = ex.meta
    stats = ex.token_stats
    windows = sorted({n for n in windows if 1 <= n <= ex.num_blocks})
    score = {name: SCORES[name].values(ex) for name in SCORES if not SCORES[name].windowed}
    listed = lambda values: None if values is None else values.tolist()  # noqa: E731
    return AnalysisResult(
        model=meta["model"], dataset=meta["dataset"], split=meta["split"],
        modality=meta.get("modality", "image"), family=meta["family"], pooling=meta.get("pooling", "first"),
        max_length=meta.get("max_length"), num_blocks=ex.num_blocks, hidden_size=ex.hidden_size,
        n=int(len(ex.indices)), seed=meta["seed"],
        block_redundancy=listed(score["block_redundancy"]),
        cosine=cosine_matrix(ex.pooled).tolist(),
        cka=linear_cka_matrix(ex.pooled).tolist(),
        fit_residual=_matrix(score["fit_residual"]),
        cache={"key": ex.key, "hit": ex.hit},
        notes=ex.notes,
        block_redundancy_all_tokens=listed(score["block_redundancy_all_tokens"]),
        block_influence=listed(score["block_influence"]),
        angular_distance={str(n): SCORES["angular_distance"].values(ex, n).tolist() for n in windows} or None,
        stats=meta.get("stats") if stats is not None else None,
        workers=int(meta.get("workers", 1)),
        threads=meta.get("threads"),
    )


def analyze(model, dataset, n: int, seed: int = 0, split: str = "train", **options) -> AnalysisResult:
    """Extract (or reopen) and compute every redundancy metric: :func:`analyze_run` of the :class:`Run`
    of ``model`` on ``n`` samples of ``dataset``'s ``split``.

    ``model``: alias, hub id, folder or a loaded model; ``dataset``: alias, folder or a list of samples
    (for a causal LM also a language-model text, read as ``n`` windows of ``seq_len`` tokens). ``options``:
    the run's (``max_length``, ``seq_len``, ``cache``, ``progress``) and the analysis's (``windows``,
    ``stats_window``, ``stats_budget``)."""
    run, asked = Run.of(model, dataset, {**options, "fit_n": n, "eval_n": n, "seed": seed}, ANALYZE_OPTIONS)
    return analyze_run(run, split, **asked)


ANALYZE_OPTIONS = ("windows", "stats_window", "stats_budget")


def analyze_run(run: Run, split: str = "train", windows: Sequence[int] = (1,), stats_window: int | None = None,
                stats_budget: int | None = None) -> AnalysisResult:
    """The redundancy metrics of the run's samples of ``split``; ``stats_window`` keeps token statistics for
    windows of that many blocks instead of all pairs, within ``stats_budget`` bytes."""
    return analysis_results(run.extract(split, stats_window=stats_window, stats_budget=stats_budget), windows)


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


def map_statistics(run: Run, kind: str, fit: Extraction, sets: Sequence[Sequence[Range]],
                   params: MapParams) -> FitData:
    """What maps of ``kind`` for the ranges of ``sets`` are fitted from (the statistics it declares): the token
    statistics of the fit pass ``fit``, and the fold statistics of every range over the same samples
    (:func:`rba_core.passes.fold.fold_pass`: one more pass unless stored; one sentence for ranges that cannot fold)."""
    def fold():
        from rba_core.passes.fold import fold_pass

        run.stage(f"Fit samples (train split): what the {kind} maps of these candidates are fitted from")
        return fold_pass(run.ref, run.data, fit.meta["n"], fit.meta["seed"], sets, max_length=run.max_length,
                         cache=run.cache, progress=run.progress, encoder=run.lazy)

    def samples():
        run.stage(f"Fit samples (train split): token states the {kind} maps of these candidates are trained on")
        ranges = sorted({tuple(r) for ranges in sets for r in ranges})
        return range_statistics(run.ref, run.data, fit.meta["n"], fit.meta["seed"], ranges, tokens=False, fold=False,
                                samples=tokens_per_sample(params, fit.meta["n"]), max_length=run.max_length,
                                cache=run.cache, progress=run.progress, encoder=run.lazy).samples

    return map_kind(kind).gather(tokens=fit.stats, fold=fold, samples=samples, seed=run.seed, progress=run.progress)


def approximated_outputs(run: Run, fit, maps: Sequence, ex: Extraction, ranges: list[Range], kind: str,
                         params: MapParams, timed: bool = False) -> tuple[np.ndarray, dict]:
    """Cached approximated final representations on ``ex``'s samples, and the run's measurements
    (latency only when ``timed``: the probe's extra runs are not timed). ``fit``: the statistics (with
    ``key`` and ``meta``) that ``maps``, one per range (None: skipped), were fitted from."""
    spec = {"kind": "approximated", "fit": fit.key, "samples": ex.key, "ranges": ranges, "map": kind,
            "map_params": map_kind(kind).key(params)}
    key = make_key({**spec, "timed": timed and LATENCY_METHOD})
    # An untimed request is served by a timed entry too (the same outputs); a timed one needs its latency.
    keys = [key] if timed else [make_key({**spec, "timed": LATENCY_METHOD}), key]

    cache = run.cache

    def lookup() -> tuple[np.ndarray, dict] | None:
        for stored_key in keys:
            stored = cache.load(stored_key, "final")
            if stored is not None:
                return stored["final"], cache.get(stored_key).meta
        return None

    def compute(progress: Progress | None) -> tuple[np.ndarray, dict]:
        encoder = run.lazy()
        net = ApproximatedEncoder(encoder, ranges, maps).eval()
        final, measured = _approximated_finals(net, encoder, run.data, ex, progress, timed)
        meta = {"params": count_params(net), "latency_ms_per_image": measured, "model": fit.meta["model"],
                "dataset": fit.meta["dataset"], "split": ex.meta["split"], "n": len(ex.indices), "ranges": ranges,
                "map": kind, "workers": world().size}
        if world().is_main:  # one writer per group of workers
            cache.put(key, {"final": {"final": final}}, meta)
        return final, meta

    return single_flight(cache, key, lookup, compute, run.progress)  # one run per key across processes and ranks


def _lm_scores(run: Run, fit, maps: Sequence, ev: Extraction, ranges: list[Range], kind: str, params: MapParams,
               timed: bool = False) -> tuple[dict, np.ndarray, dict]:
    """Perplexity and top-1 agreement of the original, approximated and skipped models on ``ev``'s windows,
    the approximated model's final representations and its measurements (parameters; latency when
    ``timed``), all from one loop over the windows in which each approximation runs only from its first
    range on (:func:`rba_core.passes.perplexity.lm_scores`); cached like every other result (a stored result never
    loads the model)."""
    key = make_key({"kind": "lm-scores", "fit": fit.key, "samples": ev.key, "ranges": ranges, "map": kind,
                    "map_params": map_kind(kind).key(params), "timed": timed and LATENCY_METHOD})

    cache = run.cache

    def lookup() -> tuple[dict, np.ndarray, dict] | None:
        entry = cache.get(key)
        stored = None if entry is None else cache.load(key, "final")
        return None if stored is None else (entry.meta["scores"], stored["final"], entry.meta)

    def compute(progress: Progress | None) -> tuple[dict, np.ndarray, dict]:
        loaded = run.lazy()
        windows = (ev.source or open_dataset(run.data, "test")).items(ev.indices)
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

    return cache.single_flight(key, lookup, compute, run.progress)


def fit_range_maps(run: Run, ranges: list[Range], kind: str, params: MapParams) -> tuple[RangeStatistics, list]:
    """The maps of ``kind`` for ``ranges`` and the fit statistics they come from: one float64 pass over the
    run's fit samples up to the last range's end, holding the Gram blocks and (where the model folds) the
    fold statistics of the ranges, so every map kind of the same ranges shares it
    (:func:`rba_core.passes.range_pass.range_statistics`). A fold that the model cannot take is one sentence
    before the pass."""
    declared = map_kind(kind)
    if declared.check_ranges:
        declared.check_ranges(ranges, run.info.num_blocks)

    def load() -> Encoder:
        loaded = run.lazy()
        if declared.check_encoder:
            declared.check_encoder(loaded, ranges)
        return loaded

    fit = range_statistics(run.ref, run.data, run.fit_n, run.seed, ranges, max_length=run.max_length, cache=run.cache,
                           progress=run.progress, encoder=load,
                           samples=tokens_per_sample(params, run.fit_n) if declared.trained else 0)
    try:
        maps = [_fitted(run, fit, rng, kind, params) for rng in ranges]
    except MissingStatistics:  # a stored entry of a model that cannot take this kind: say why
        load()
        raise
    return fit, maps


def _fitted(run: Run, fit: RangeStatistics, rng: Range, kind: str, params: MapParams):
    """The map of range ``rng``: solved at once in closed form, or, for a kind trained by gradient descent, trained
    once (progress and Stop like every long step) and cached with everything that changes it in the key."""
    declared = map_kind(kind)
    if not declared.trained:
        return fit_map(fit, rng, kind, params)
    key = make_key({"kind": "trained-map", "fit": fit.key, "map": kind, "map_params": declared.key(params),
                    "range": list(rng), "seed": run.seed})

    def lookup():
        entry = run.cache.get(key)
        stored = None if entry is None else run.cache.load(key, "map")
        if stored is None:
            return None
        conditioning = entry.meta.get("conditioning")
        return FittedMap(kind, stored, rng[0], conditioning=conditioning and Conditioning(**conditioning),
                         params=declared.key(params), report=entry.meta["training"])

    def compute(progress: Progress | None):
        run.stage(f"Training the {kind} map of range {rng[0]}→{rng[1]} (Adam, at most {params.train_steps} steps)")
        fitted = fit_map(FitData(fit.tokens, fit.fold, fit.samples, run.seed, progress), rng, kind, params)
        meta = {"kind": "trained map", "model": fit.meta["model"], "dataset": fit.meta["dataset"], "split": "train",
                "n": fit.meta["n"], "map": kind, "range": list(rng), "training": fitted.report,
                "conditioning": fitted.conditioning and dataclasses.asdict(fitted.conditioning)}
        if world().is_main:  # one writer per group of workers; every rank trained the same map
            run.cache.put(key, {"map": {n: getattr(fitted, n).detach().cpu().numpy() for n in fitted.names}}, meta)
        return fitted

    return single_flight(run.cache, key, lookup, compute, run.progress)


def _healing(run: Run, fit, ev, ranges, maps, kind: str, params: MapParams, plan) -> dict:
    """The healing report of ``approximate --heal``, cached like every result (:func:`rba_core.ops.heal.heal`)."""
    key = make_key({"kind": "healing", "fit": fit.key, "samples": ev.key, "ranges": ranges, "map": kind,
                    "map_params": map_kind(kind).key(params), "heal": plan.key(), "seed": run.seed})

    def lookup():
        entry = run.cache.get(key)
        return None if entry is None else entry.meta["healing"]

    def compute(progress):
        from rba_core.ops.heal import heal

        run.stage(f"Healing: {plan.steps} steps of distillation on the fit samples"
                  + (f", LoRA rank {plan.lora_rank} on the kept blocks after the first range" if plan.lora_rank else ""))
        report = heal(run, ranges, maps, plan)[1]
        if world().is_main:
            run.cache.put(key, {}, {"kind": "healing", "healing": report, "model": fit.meta["model"],
                                    "dataset": fit.meta["dataset"], "split": "test", "n": len(ev.indices)})
        return report

    return single_flight(run.cache, key, lookup, compute, run.progress)


def training_report(ranges: Sequence[Range], maps: Sequence) -> list[dict]:
    """Each trained map's losses and steps, by range (empty for maps solved in closed form)."""
    return [{"range": [i, j], **m.report} for (i, j), m in zip(ranges, maps) if getattr(m, "report", None)]


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


def approximate(model, dataset, fit_n: int, eval_n: int, seed: int, ranges: Sequence[Sequence[int]],
                kind: str = "linear", **options) -> ApproximationResult:
    """Fit maps of ``kind`` for ``ranges`` on ``fit_n`` train samples and evaluate the approximated model on
    ``eval_n`` test samples: :func:`approximate_run` of the :class:`Run` of these arguments. ``options``: the
    run's (``max_length``, ``seq_len``, ``cache``, ``progress``, ``on_stage``, ``encoder``) and the
    approximation's (``map_params``, ``probe``, ``latency``, ``label_map``)."""
    run, asked = Run.of(model, dataset, {**options, "fit_n": fit_n, "eval_n": eval_n, "seed": seed},
                        APPROXIMATE_OPTIONS)
    return approximate_run(run, ranges, kind, **asked)


APPROXIMATE_OPTIONS = ("map_params", "probe", "latency", "label_map", "heal")


def approximate_run(run: Run, ranges: Sequence[Sequence[int]], kind: str = "linear",
                    map_params: MapParams | None = None, probe: bool = False, latency: bool = True,
                    label_map=None, heal=None) -> ApproximationResult:
    """Fit maps on the run's fit samples (train split), evaluate the approximated model on its evaluation
    samples (test split).

    The result's ``final`` holds the original and approximated final representations of the
    evaluation samples with their labels (numpy; not in the JSON). For a causal LM on a
    language-model text the samples are windows of ``seq_len`` tokens and the result adds the
    perplexity and top-1 next-token agreement of the original, approximated and skipped models.
    The maps come from one float64 pass over the fit samples that keeps only the ranges' own statistics
    (:func:`fit_range_maps`). ``latency``: time both models per image (a few seconds); off, the result's
    ``latency_ms_per_image`` is None. ``probe``: the linear probe's accuracy of the original, approximated
    and skipped models (the paper's protocol, and a converged probe). A model with a classification head whose
    classes match the dataset's (or ``label_map``, a JSON file) adds ``head_accuracy`` (:mod:`rba_core.ops.head`);
    otherwise a note says why not. ``heal`` (a :class:`rba_core.ops.heal.HealPlan`) adds ``healing``: the metric of
    the approximated model healed by distillation on the fit samples, before and after (:mod:`rba_core.ops.heal`).
    """
    declared = map_kind(kind)  # an unknown map fails before any work
    params = map_params or MapParams()
    info = run.info
    ranges = validate_ranges(ranges, info.num_blocks)  # before any pass
    run.check_samples("train", "test")
    run.stage("Fit samples (train split): statistics of the ranges (float64, blocks up to the last range's end)")
    fit, maps = fit_range_maps(run, ranges, kind, params)
    conditioning, notes = conditioning_report(ranges, maps)
    run.stage("Evaluation samples (test split): original model")
    ev = run.extract("test", with_stats=False)
    scores = None
    if isinstance(run.data, LMText):
        run.stage("Evaluation windows: the approximated and skipped models from their first range on; perplexity "
                  "and next-token agreement")
        scores, final, measured = _lm_scores(run, fit, maps, ev, ranges, kind, params, timed=latency)
    else:
        run.stage("Evaluation samples: approximated model")
        final, measured = approximated_outputs(run, fit, maps, ev, ranges, kind, params, timed=latency)
    removed = sum(j - i for i, j in ranges)
    result = ApproximationResult(
        model=fit.meta["model"], dataset=fit.meta["dataset"], modality=info.modality, pooling=info.pooling,
        max_length=fit.meta.get("max_length"), fit_n=run.fit_n, eval_n=run.eval_n, seed=run.seed,
        num_blocks=fit.num_blocks,
        ranges=[{"start": i, "end": j, "removed_blocks": list(range(i + 1, j + 1)),
                 "paper": paper_notation((i, j))} for i, j in ranges],
        map=kind, map_params={**declared.key(params), **({"training": trained} if (trained := training_report(
            ranges, maps)) else {})},
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
        from rba_core.ops.head import measure_head

        result.head_accuracy, why = measure_head(run, fit, ev, ranges, maps, kind, declared.key(params), label_map)
        result.notes += [why] if why and (probe or label_map) else []
    if heal is not None:
        result.healing = _healing(run, fit, ev, ranges, maps, kind, params, heal)
    if probe:
        run.stage("Linear probe: original, approximated and skipped models on the fit samples")
        reps = run.extract("train", with_stats=False)
        train = {"original": reps.final}
        test = {"original": ev.final}
        skipped = [None] * len(ranges)
        for name, map_name, fitted in (("approximated", kind, maps), ("skip", "identity", skipped)):
            train[name] = approximated_outputs(run, fit, fitted, reps, ranges, map_name, params)[0]
            test[name] = final if map_name == kind else approximated_outputs(
                run, fit, fitted, ev, ranges, map_name, params)[0]
        result.accuracy = {name: probe_accuracy(train[name], reps.labels, test[name], ev.labels)
                           for name in ("original", "approximated", "skip")}
        result.accuracy_converged = {name: converged_probe_accuracy(train[name], reps.labels, test[name], ev.labels)
                                     for name in ("original", "approximated", "skip")}
        result.notes += [note] if (note := small_classes_note(ev.labels, fit.label_names,
                                                              unit=UNITS[info.modality])) else []
    return result


def export(model, dataset, fit_n: int, seed: int, ranges: Sequence[Sequence[int]], kind: str, out,
           **options) -> dict:
    """Fit the maps of ``ranges`` on ``fit_n`` train samples and write the export folder ``out``:
    :func:`export_run` of the :class:`Run` of these arguments. ``options``: the run's (``eval_n``, ``max_length``,
    ``seq_len``, ``cache``, ``progress``, ``on_stage``, ``encoder``) and the export's (``map_params``, ``onnx``)."""
    run, asked = Run.of(model, dataset, {**options, "fit_n": fit_n, "seed": seed}, EXPORT_OPTIONS)
    return export_run(run, ranges, kind, out, **asked)


EXPORT_OPTIONS = ("map_params", "onnx", "heal")


def export_run(run: Run, ranges: Sequence[Sequence[int]], kind: str, out, map_params: MapParams | None = None,
               onnx: bool = False, heal=None) -> dict:
    """Fit the maps of ``ranges`` on the run's fit samples and write the export folder ``out``.

    ``kind`` ``folded`` gives a plain Hugging Face checkpoint with fewer layers (pre-LN models; its
    ``rba.json`` records the data and, with ``eval_n`` test samples, the perplexity of the original
    and folded models on the windows of a language-model text, else the final-representation MSE
    of the folded model against the original); other kinds the rba-compressed folder with
    the maps as modules (:func:`rba_core.store.export.save_compressed`). ``heal`` (a :class:`rba_core.ops.heal.HealPlan`):
    the maps and (with LoRA) the kept blocks healed first, the record's ``healing`` saying how (the metric on the
    run's evaluation samples before and after). Returns the record written."""
    from rba_core.store.export import save_compressed, save_folded
    from rba_core.passes.fold import folded_encoder

    params = map_params or MapParams()
    checked = validate_ranges(ranges, run.info.num_blocks)
    run.check_samples("train", "test")
    run.stage("Fit samples (train split): statistics of the ranges (float64, blocks up to the last range's end)")
    fit, fitted = fit_range_maps(run, checked, kind, params)
    conditioning, notes = conditioning_report(checked, fitted)  # the compressed record holds it per range
    declared = map_kind(kind)
    original = encoder = run.lazy()
    healing = {}
    if heal is not None:
        from rba_core.ops.heal import heal as healed

        run.stage(f"Healing: {heal.steps} steps of distillation on the fit samples")
        net, report = healed(run, checked, fitted, heal)
        encoder, fitted, healing = net.encoder, net.maps, {"healing": report}
    if not declared.folds:  # the maps stay modules: the rba-compressed folder
        save_compressed(ApproximatedEncoder(encoder, checked, fitted).eval(), out, onnx=onnx)
        return {**json.loads((Path(out) / "rba.json").read_text()), **healing, "notes": notes}
    folded = folded_encoder(encoder, {rng: declared.folds(m) for rng, m in zip(checked, fitted)})
    record = {"source": encoder.source, "family": encoder.family, "map": kind,
              "ranges": [list(rng) for rng in checked],
              "paper": [paper_notation(rng) for rng in checked],
              "layers": {"original": encoder.num_blocks, "folded": folded.num_blocks},
              "params": {"original": count_params(encoder.model), "folded": count_params(folded.model)},
              "data": {"dataset": str(run.dataset), "fit_n": run.fit_n, "seed": run.seed,
                       **({"seq_len": run.seq_len} if isinstance(run.data, LMText)
                          else {"max_length": encoder.max_length})},
              "conditioning": conditioning, **({"training": trained} if (trained := training_report(checked, fitted))
                                                  else {}), **healing}
    if run.eval_n:
        test, indices = open_sample(run.data, "test", run.eval_n, run.seed)
        samples = test.items(indices)
        record["data"]["eval_n"] = run.eval_n
        if isinstance(run.data, LMText):
            run.stage("Evaluation windows: perplexity of the original and folded models")
            record["perplexity"] = {"original": lm_scores(original, {}, samples)["perplexity"]["original"],
                                    "folded": lm_scores(folded, {}, samples)["perplexity"]["original"]}
        else:
            run.stage("Evaluation samples (test split): final representations of the original and folded models")
            record["mse_final"] = _final_mse(original, folded, samples)
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
