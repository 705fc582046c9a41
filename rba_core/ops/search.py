"""Which ranges to approximate under a budget: every candidate ranked by measured final-representation MSE.

Candidates are every contiguous range i→j and, with ``pairs``, every pair of disjoint ranges with
at least one kept block between them (adjacent ranges would be one range with a factored map).
The original model runs once over the evaluation samples keeping every block output hs[0..L]
(in chunks of samples when they do not all fit in memory); each candidate then costs only what
its compressed model computes after its first map: T applied to the cached hs[i], then blocks
j+1..L. Pairs sharing a first range also share its suffix up to the second range.

The cheap scores come for free from the fit extraction: the Block Redundancy score of a candidate
is -Σ BR(k) over its removed blocks (the change those blocks make to the pooled vector; the same
over every real token), the fit-residual score the sum of its ranges' relative residuals, ShortGPT's
Block Influence that of a one-block range l-1→l and PruneMe's angular distance that of a range
l→l+n. Their Spearman correlation with the measured MSE, each over the candidates it covers
(:func:`score_agreement`), says which cheap score is enough to choose.

With the map kind ``folded`` the candidates whose ranges cannot fold (:func:`rba_core.passes.fold.check_foldable`)
are left out with a note; block i's MLP output, which a folded map of range i→j needs, is captured
while block i runs (again, from the cached hs[i-1], for a first range).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rba_core.ops.analysis import approximate_run, map_statistics
from rba_core.passes.approx import LinearMap, captured, mlp_outputs
from rba_core.data import open_dataset
from rba_core.distributed import World, world
from rba_core.errors import RBAError
from rba_core.passes.extract import Extraction, model_inputs
from rba_core.maps import MapParams, Range, fit_map, map_kind
from rba_core.maps.module import FittedMap
from rba_core.models import Encoder
from rba_core.progress import duration_text
from rba_core.store.results import SearchResult
from rba_core.ops.run import Run
from rba_core.measures.scores import SCORES, candidate_scores
from rba_core.ops.table import row_label

Candidate = tuple[Range, ...]
WARM_UP_IMAGES = 2
FIRST_ROUND_SHARE = 8  # the first round sees 1/8 of the evaluation samples ...
MIN_ROUND_SAMPLES = 8  # ... but at least this many
CONFIDENCE = 0.999  # of the interval that decides whether a candidate may leave the race
TOP_K = 5  # the ranking's head that the race keeps exact
METRICS = ("mse", "head-accuracy")  # what the candidates are ranked by


def candidate_ranges(num_blocks: int, pairs: bool = False) -> list[Candidate]:
    """Every contiguous range, then (with ``pairs``) every pair with a kept block between them."""
    singles = [((i, j),) for i in range(num_blocks) for j in range(i + 1, num_blocks + 1)]
    if not pairs:
        return singles
    return singles + [a + b for a in singles for b in singles if b[0][0] > a[0][1]]


def removed_blocks(candidate: Candidate) -> int:
    return sum(j - i for i, j in candidate)


def candidate_params(candidate: Candidate, num_params: int, block_params: Sequence[int],
                     hidden_size: int, kind: str) -> int:
    """Parameters of the approximated encoder: the original minus removed blocks plus the maps."""
    per_map = map_kind(kind).added_params(hidden_size)
    removed = sum(block_params[k - 1] for i, j in candidate for k in range(i + 1, j + 1))
    return num_params - removed + per_map * len(candidate)


def _available_memory() -> int:
    """Half of MemAvailable (Linux), else 2 GiB: the budget for cached block outputs."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 2 << 30


def chunk_size(n: int, tokens: int, hidden: int, states: int, heads: int, pairs: bool,
               memory_bytes: int) -> int:
    """Samples per chunk whose cached block outputs (twice with pairs: the shared suffix states
    too) and one block's activations fit in ``memory_bytes``; all n when they fit."""
    per_sample = 4 * tokens * hidden * states * (2 if pairs else 1) + 4 * tokens * (heads * tokens + 6 * hidden)
    return int(max(1, min(n, memory_bytes // per_sample)))


def _states(encoder: Encoder, inputs: dict) -> tuple[list[torch.Tensor], dict, dict]:
    """hs[0..L] of one chunk, its block context, and the time of each stage in ms per sample."""
    n = len(next(iter(inputs.values())))
    seconds: list[float] = []
    hs, ctx = encoder.hidden_states(inputs, seconds)
    mask = encoder.token_mask(inputs)
    clock = time.perf_counter
    began = clock()
    encoder.final(hs[-1], mask)
    t_norm = clock() - began
    identity = LinearMap(torch.eye(encoder.hidden_size)).to(encoder.device)
    began = clock()
    identity(hs[-1])
    t_map = clock() - began
    ms = lambda s: 1000.0 * s / n  # noqa: E731
    timing = {"embed": ms(seconds[0]), "blocks": [ms(t) for t in seconds[1:]], "norm": ms(t_norm), "map": ms(t_map)}
    return hs, (ctx, mask), timing


def latency_estimate(candidate: Candidate, timing: dict, kind: str) -> float:
    """ms per image: embedding + kept blocks + maps + final norm, from the measured stage times."""
    removed = {k for i, j in candidate for k in range(i + 1, j + 1)}
    kept = sum(t for k, t in enumerate(timing["blocks"], start=1) if k not in removed)
    maps = len(candidate) if map_kind(kind).added_params(1) else 0  # identity and folded maps add no step
    return timing["embed"] + kept + maps * timing["map"] + timing["norm"]


def candidate_run_ms(candidate: Candidate, timing: dict, kind: str) -> float:
    """ms per sample that measuring a candidate costs: the original block outputs are kept, so it runs from its
    first range's start (its maps, the kept blocks after it and the final norm)."""
    before = sum(timing["blocks"][: candidate[0][0]])
    return latency_estimate(candidate, timing, kind) - timing["embed"] - before


def _on(fitted: FittedMap | None, device: str) -> FittedMap | None:
    return None if fitted is None else fitted.to(device)


def _apply(fitted: FittedMap | None, hidden: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The map on the state at its range's start; ``m``: that block's MLP output (for maps that read it)."""
    return hidden if fitted is None else fitted(hidden, m)


@torch.inference_mode()
def _chunk_sse(encoder: Encoder, hs: list[torch.Tensor], batch: tuple, reference: torch.Tensor,
               groups: dict[Range, list[Candidate]], maps: dict[Range, FittedMap | None],
               errors: dict[Candidate, list[np.ndarray]], tick) -> None:
    """Append each candidate's per-sample squared error (mean over dimensions) on this chunk;
    candidates are grouped by first range so that pairs reuse the state after the first map and
    the blocks up to their second range. ``batch`` is the chunk's (block context, token mask)."""
    last = encoder.num_blocks
    ctx, mask = batch
    folded = any(m is not None and m.needs_mlp_output for m in maps.values())

    def run(hidden: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        return encoder.run_blocks(hidden, first, stop, ctx)

    def run_to_start(hidden: torch.Tensor, first: int, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hs at ``start`` from the state before block ``first``, with block ``start``'s MLP output
        when folded maps need it (block ``start`` must then be among those run)."""
        with captured(mlp_outputs(encoder, [start] if folded else [])) as m:
            return run(hidden, first, start), m.get(start)

    def add(candidate: Candidate, hidden: torch.Tensor) -> None:
        final = encoder.final(hidden, mask).double()
        errors[candidate].append(((final.to(reference) - reference) ** 2).mean(-1).cpu().numpy())
        tick()

    for (i1, j1), members in groups.items():
        seconds = defaultdict(list)  # start of the second range -> its candidates
        for candidate in members:
            if len(candidate) == 2:
                seconds[candidate[1][0]].append(candidate)
        begin = i1 - 1 if folded and i1 > 0 else i1  # a folded map reruns block i1 to see its MLP output
        state, at = _apply(maps[(i1, j1)], *run_to_start(hs[begin], begin + 1, i1)), j1
        for stop in sorted(seconds):
            state, m = run_to_start(state, at + 1, stop)
            at = stop
            for candidate in seconds[stop]:
                i2, j2 = candidate[1]
                add(candidate, run(_apply(maps[(i2, j2)], state, m), j2 + 1, last))
        if ((i1, j1),) in members:
            add(((i1, j1),), run(state, at + 1, last))


def _select(candidates: list[Candidate], fit: Extraction, timing: dict | None, plan: SearchPlan) -> list[Candidate]:
    """The candidates within the plan's budget."""
    num_params, block_params = fit.meta["num_params"], fit.meta["block_params"]
    kind, blocks, max_params, max_latency_ms = plan.kind, plan.blocks, plan.max_params, plan.max_latency_ms
    chosen = []
    for c in candidates:
        if blocks is not None and removed_blocks(c) != blocks:
            continue
        if max_params is not None and candidate_params(c, num_params, block_params, fit.hidden_size, kind) > max_params:
            continue
        if max_latency_ms is not None and latency_estimate(c, timing, kind) > max_latency_ms:
            continue
        chosen.append(c)
    return chosen


def score_agreement(rows: list[dict], fit: Extraction) -> dict[str, dict]:
    """How well each cheap score of the fit pass predicts the measured ranking: ``{score: {"spearman": ρ,
    "candidates": k}}``, ρ between the score and the measured MSE over the k candidates the score covers.
    Every score grows with the change the removed blocks make, so ρ near 1 means it orders them as
    measured. ``block_redundancy`` (the pooled vector: CLS, mean or last real token) and
    ``block_redundancy_all_tokens`` (every real token) sum -BR(k) over the removed blocks, ``fit_residual``
    the ranges' relative residuals; ``block_influence`` covers the one-block ranges l-1→l and
    ``angular_distance_n{n}`` the ranges l→l+n."""
    candidates = [[tuple(r) for r in row["ranges"]] for row in rows]
    measured = [row["mse_final"] for row in rows]
    out = {}
    for name, scores in sorted(candidate_scores(fit, candidates).items()):
        pairs = [(score, mse) for score, mse in zip(scores, measured) if score is not None]
        if pairs:
            out[name] = {"spearman": _spearman(*map(list, zip(*pairs))), "candidates": len(pairs)}
    return out


def _spearman(score: list[float], measured: list[float]) -> float | None:
    """Spearman correlation; None with fewer than 3 candidates or a constant side."""
    from scipy.stats import spearmanr

    if len(score) < 3 or np.ptp(score) == 0 or np.ptp(measured) == 0:
        return None
    return float(spearmanr(score, measured).statistic)


def sample_rounds(n: int, exhaustive: bool = False) -> list[int]:
    """How many evaluation samples the candidates still in the race have seen after each round:
    an eighth of them (at least :data:`MIN_ROUND_SAMPLES`), doubling up to all ``n``; one round
    with all of them when ``exhaustive``."""
    counts, m = [], max(MIN_ROUND_SAMPLES, -(-n // FIRST_ROUND_SHARE))
    while not exhaustive and m < n:
        counts.append(m)
        m *= 2
    return counts + [n]


def confidence_interval(errors: np.ndarray) -> tuple[float, float]:
    """Two-sided Student-t interval (:data:`CONFIDENCE`) for the mean of per-sample errors."""
    from scipy.stats import t

    m, mean = len(errors), float(np.mean(errors))
    if m < 2:
        return 0.0, float("inf")
    half = float(t.ppf((1 + CONFIDENCE) / 2, m - 1)) * float(np.std(errors, ddof=1)) / np.sqrt(m)
    return max(0.0, mean - half), mean + half


def still_in_race(errors: dict[Candidate, np.ndarray], top_k: int) -> list[Candidate]:
    """The candidates that may still be among the best ``top_k``: a candidate leaves only when the
    lower end of its interval is above the ``top_k``-th smallest upper end, i.e. when (at the
    interval's confidence) ``top_k`` others are surely better. With well-separated errors about
    half leave each round (successive halving); close ones all stay and see more samples."""
    bounds = {c: confidence_interval(e) for c, e in errors.items()}
    kth_upper = sorted(high for _, high in bounds.values())[min(top_k, len(bounds)) - 1]
    return [c for c in errors if bounds[c][0] <= kth_upper]


def _measure(run: Run, encoder: Encoder, source, ev: Extraction, size: int, choose, plan: SearchPlan,
             on_round: Callable[[dict, dict], None]):
    """Rounds of the measured search. Each round runs the original model over new evaluation samples
    (a seeded random order, in chunks of ``size``) keeping hs[0..L] of the chunk, and appends the
    per-sample error of every candidate still in the race; then :func:`still_in_race` keeps those
    that may be among the best ``top_k``. The last round brings the survivors to all samples, so
    their MSEs are exact. Under a launcher every rank runs the original model on each chunk and
    measures its own share of the candidates; the errors are gathered after each round. ``choose(timing)`` picks the candidates and their maps once the first
    chunk has measured the stage times; ``on_round(summary, errors)`` follows the race with the
    per-sample errors of the candidates that ran in the round."""
    n, here, progress, top_k = len(ev.indices), world(), run.progress, plan.top_k
    order = np.random.default_rng(run.seed).permutation(n)  # any prefix is a random sample
    seconds = {"original_forward": 0.0, "candidates": 0.0}
    errors: dict[Candidate, list[np.ndarray]] = {}  # per candidate, its per-sample errors of each round
    racing: list[Candidate] = []
    seen, counts = 0, sample_rounds(n, plan.exhaustive)
    for number, until in enumerate(counts, start=1):
        done, total, mine = 0, 0, {}

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        with here.all_or_none("the measured search"):
            starts = range(seen, until, size)
            chunks = [np.sort(order[start : min(start + size, until)]) for start in starts]  # sorted: files in order
            for start, positions, inputs in zip(starts, chunks,
                                                model_inputs(encoder, source, [ev.indices[p] for p in chunks])):
                began = time.perf_counter()
                with torch.inference_mode():
                    if start == 0:  # warm-up: the first call of each stage pays one-time set-up costs, untimed
                        _states(encoder, {k: v[:WARM_UP_IMAGES] for k, v in inputs.items()})
                    hs, batch, chunk_timing = _states(encoder, inputs)
                seconds["original_forward"] += time.perf_counter() - began
                if start == 0:  # a latency budget needs the stage times, so candidates are chosen here
                    timing = here.from_main(chunk_timing)  # every rank chooses the same candidates
                    chosen, maps = choose(timing)
                    errors, racing = {c: [] for c in chosen}, chosen
                if start == seen:
                    groups = _my_groups(racing, here)  # whole groups, so pairs keep sharing their prefix
                    mine = {c: [] for members in groups.values() for c in members}
                    total = len(mine) * -(-(until - seen) // size)
                    run.stage(f"Measured search, round {number} of at most {len(counts)}: {len(racing)} candidates "
                          f"on samples {seen + 1}-{until} of {n}")
                reference = torch.as_tensor(ev.final[positions], dtype=torch.float64, device=encoder.device)
                began = time.perf_counter()
                _chunk_sse(encoder, hs, batch, reference, groups, maps, mine, tick)
                seconds["candidates"] += time.perf_counter() - began
                del hs
        for part in here.gather_objects({c: np.concatenate(e) for c, e in mine.items()}):
            for c, e in part.items():
                errors[c].append(e)
        seen = until
        per_sample = {c: np.concatenate(errors[c]) for c in racing}
        if until < n:
            racing = still_in_race(per_sample, top_k)
        on_round({"round": number, "samples": until, "candidates": len(per_sample), "kept": len(racing),
                  "seconds": seconds["original_forward"] + seconds["candidates"]}, per_sample)
    return {c: np.concatenate(e) for c, e in errors.items()}, timing, seconds


def _admissible(encoder: Encoder, candidates: list[Candidate], kind: str, notes: list[str]) -> list[Candidate]:
    """The candidates whose ranges this model can take with maps of ``kind`` (its ``check_encoder``); a note
    says how many were left out and why (the reason of the first), and a model that takes none is one sentence."""
    kept, reasons = [], {}
    for c in candidates:
        try:
            map_kind(kind).check_encoder(encoder, c)
            kept.append(c)
        except RBAError as exc:
            reasons[c] = str(exc)
    if not kept:
        raise RBAError(next(iter(reasons.values())))
    if reasons:
        first, reason = next(iter(reasons.items()))
        notes.append(f"{len(reasons)} of {len(candidates)} candidates cannot take {kind} maps and were left out of "
                     f"the {kind} search, e.g. {row_label(first)[0]}: {reason}")
    return kept


def _my_groups(candidates: list[Candidate], here: World) -> dict[Range, list[Candidate]]:
    """This rank's candidates, grouped by first range; groups are dealt to the ranks in turn."""
    groups: dict[Range, list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[c[0]].append(c)
    return {first: members for k, (first, members) in enumerate(groups.items()) if k % here.size == here.rank}


def _ranking(errors: dict[Candidate, np.ndarray], fit: Extraction, kind: str, timing: dict) -> list[dict]:
    """One row per candidate, lowest MSE (mean of its per-sample errors so far) first."""
    residual, redundancy = (SCORES[name].values(fit) for name in ("fit_residual", "block_redundancy"))
    num_params, block_params = fit.meta["num_params"], fit.meta["block_params"]
    rows = []
    for c, error in errors.items():
        label, paper = row_label(c)
        removed = [k for i, j in c for k in range(i + 1, j + 1)]
        rows.append({
            "ranges": [list(r) for r in c], "range": label, "paper": paper, "removed_blocks": len(removed),
            "params": candidate_params(c, num_params, block_params, fit.hidden_size, kind),
            "latency_ms_per_image_estimate": latency_estimate(c, timing, kind),
            "mse_final": float(np.mean(error)), "mse_ci": list(confidence_interval(error)), "samples": len(error),
            "block_redundancy_score": SCORES["block_redundancy"].candidate(redundancy, c),
            "fit_residual_score": SCORES["fit_residual"].candidate(residual, c),
        })
    return sorted(rows, key=lambda row: row["mse_final"])


@dataclass(frozen=True)
class SearchPlan:
    """What a measured search is asked: the budget (``blocks`` removed exactly, at most ``max_params``
    parameters, at most ``max_latency_ms`` estimated per image; none means every candidate), whether pairs of
    ranges are candidates, the map kind and its hyperparameters, the probe for the best ``probe_top``, and the
    race (``top_k``, ``exhaustive``, ``memory_bytes`` for the cached block outputs), and the ``metric`` it ranks
    by."""

    blocks: int | None = None
    max_params: int | None = None
    max_latency_ms: float | None = None
    pairs: bool = False
    probe_top: int = 0
    kind: str = "linear"
    map_params: MapParams | None = None
    memory_bytes: int | None = None
    exhaustive: bool = False
    top_k: int = TOP_K
    metric: str = "mse"  # or "head-accuracy": rank by the model's own classifier head
    label_map: Any = None  # a JSON file matching the dataset's classes to the head's (:mod:`rba_core.ops.head`)


def search(model, dataset, fit_n: int, eval_n: int, seed: int = 0, **options) -> SearchResult:
    """:func:`search_run` of the :class:`Run` of these arguments. ``options``: the run's (``max_length``,
    ``seq_len``, ``cache``, ``progress``, ``on_stage``, ``encoder``), the :class:`SearchPlan`'s fields and
    ``on_round``."""
    plan_fields = [f.name for f in fields(SearchPlan)]
    run, asked = Run.of(model, dataset, {**options, "fit_n": fit_n, "eval_n": eval_n, "seed": seed},
                        (*plan_fields, "on_round"))
    on_round = asked.pop("on_round", None)
    return search_run(run, SearchPlan(**asked), on_round)


def search_run(run: Run, plan: SearchPlan, on_round: Callable[[list[dict], dict], None] | None = None
               ) -> SearchResult:
    """Rank the candidates that fit the budget by measured final-representation MSE (lowest first).

    Budgets (any combination of the plan's; none means every candidate): ``blocks`` removes exactly that many
    blocks, ``max_params`` caps the parameters (T included), ``max_latency_ms`` caps the latency
    per image estimated from the measured time of each stage. The best ``probe_top`` candidates
    also get probe accuracies from :func:`rba_core.ops.analysis.approximate` (cached like it).
    ``memory_bytes`` bounds the cached block outputs (default: half the available memory).

    The measurement is a race (:func:`_measure`): every candidate on an eighth of the evaluation
    samples, then only those that may still be among the best ``top_k`` on twice as many, and so
    on until the survivors have seen all samples. The best ``top_k`` rows carry the MSE over all
    samples, as ``exhaustive=True`` (every candidate on every sample) measures it, and they are the
    exhaustive ranking's best ``top_k`` unless an interval (:data:`CONFIDENCE` each) missed; rows of
    candidates that left early carry the estimate over the samples they saw (``samples``, ``mse_ci``).
    ``on_round(rows, summary)`` gets the ranking after each round, as it sharpens. A causal LM on a
    language-model text reads it as windows of ``seq_len`` tokens. ``score_agreement`` says how well
    each cheap score predicts the measured ranking (:func:`score_agreement`). ``metric`` ``head-accuracy``
    then ranks the candidates by the top-1 accuracy of the model's own classifier head, each measured as
    ``approximate`` measures it (:func:`rba_core.ops.head.rank_by_head`; ``label_map`` as there).
    """
    kind = plan.kind
    declared = map_kind(kind)
    if plan.metric not in METRICS:
        raise RBAError(f"Unknown metric '{plan.metric}': use {' or '.join(METRICS)}.")
    params = plan.map_params or MapParams()
    began = time.perf_counter()
    stage = run.stage
    run.check_samples("train", "test")  # before any pass
    run.stage("Fit samples (train split): representations and token statistics")
    fit = run.extract("train")
    run.stage("Evaluation samples (test split): original model")
    ev = run.extract("test", with_stats=False)
    num_blocks = fit.num_blocks
    if plan.metric == "head-accuracy":
        from rba_core.ops.head import find_head

        why = find_head(run.lazy, run.ref.name, ev, plan.label_map)[1]
        if why:
            raise RBAError(f"{why.removesuffix('.')}, so search cannot rank by it; use --metric mse.")
    if plan.blocks is not None and not 1 <= plan.blocks <= num_blocks:
        raise RBAError(f"Cannot remove {plan.blocks} blocks: this model has {num_blocks}; choose 1..{num_blocks}.")
    everything = candidate_ranges(num_blocks, plan.pairs)

    notes: list[str] = []

    def choose(timing: dict) -> tuple[list[Candidate], dict[Range, FittedMap | None]]:
        chosen = _select(everything, fit, timing, plan)
        if not chosen:
            raise RBAError("No range fits this budget: allow more parameters or latency, or remove fewer blocks.")
        if declared.check_encoder:
            chosen = _admissible(encoder, chosen, kind, notes)
        n = len(ev.indices)
        most = n * (latency_estimate((), timing, kind) + sum(candidate_run_ms(c, timing, kind) for c in chosen)) / 1000
        stage(f"Measured search: {len(chosen)} of {len(everything)} candidates fit the budget; measuring every one on "
              f"all {n} samples would take about {duration_text(most)} here (the race stops most of them earlier)")
        fitted = map_statistics(run, kind, fit, chosen, params)
        needed = sorted({r for c in chosen for r in c})  # pairs share ranges: fit each map once
        return chosen, {r: _on(fit_map(fitted, r, kind, params), encoder.device) for r in needed}

    encoder = run.lazy()
    source = ev.source or open_dataset(run.data, "test")
    with torch.inference_mode():
        tokens = encoder.embed(encoder.preprocess(source.items(ev.indices[:1]))).shape[1]
    tokens = max(tokens, encoder.max_length or 0)  # texts of a chunk pad to the longest one
    heads = getattr(encoder.config, "num_attention_heads", None) or encoder.hidden_size // 64 or 1
    size = chunk_size(len(ev.indices), tokens, encoder.hidden_size, num_blocks + 1,
                      heads, plan.pairs, plan.memory_bytes or _available_memory())
    stage(f"Measured search: original block outputs in chunks of {size} of {len(ev.indices)} samples")
    rounds: list[dict] = []
    seen: dict[Candidate, np.ndarray] = {}  # each candidate's errors so far, for the interim rankings

    def round_done(summary: dict, errors: dict[Candidate, np.ndarray]) -> None:
        rounds.append(summary)
        seen.update(errors)
        if on_round:
            on_round(_ranking(seen, fit, kind, timing_of[0]), summary)

    timing_of: list[dict] = []  # the stage times, measured on the first chunk

    def choose_timed(timing: dict):
        timing_of.append(timing)
        return choose(timing)

    errors, timing, seconds = _measure(run, encoder, source, ev, size, choose_timed, plan, round_done)
    rows = _ranking(errors, fit, kind, timing)
    agreement = score_agreement(rows, fit)
    results = SearchResult(
        model=fit.meta["model"], dataset=fit.meta["dataset"], fit_n=run.fit_n, eval_n=run.eval_n, seed=run.seed,
        num_blocks=num_blocks, map=kind, map_params=declared.key(params),
        budget={"blocks": plan.blocks, "max_params": plan.max_params, "max_latency_ms": plan.max_latency_ms},
        pairs=plan.pairs, considered=len(everything), evaluated=len(rows), chunk_size=size,
        original={"params": fit.meta["num_params"], "latency_ms_per_image_estimate": latency_estimate((), timing, kind)},
        timing_ms_per_image=timing,
        spearman={name: agreement[name]["spearman"] for name in ("block_redundancy", "fit_residual")},
        score_agreement=agreement,
        candidates=rows, cache={"fit": fit.key, "eval": ev.key}, notes=sorted(set(fit.notes + ev.notes)) + notes,
        seconds=seconds, exhaustive=plan.exhaustive, top_k=plan.top_k, rounds=rounds,
    )
    if plan.metric == "head-accuracy":
        from rba_core.ops.head import rank_by_head

        rows[:], results.original["head_accuracy"] = rank_by_head(rows, lambda ranges: approximate_run(
            run.quiet(), ranges, kind, params, latency=False, label_map=plan.label_map), stage)
        results.metric = plan.metric
    if plan.probe_top > 0:
        stage(f"Linear probe for the best {min(plan.probe_top, len(rows))} candidates")
        for row in rows[:plan.probe_top]:
            res = approximate_run(run.quiet(), row["ranges"], kind, params, probe=True, latency=False)
            row["accuracy"] = {"approximated": res.accuracy["approximated"], "skip": res.accuracy["skip"]}
            results.original["accuracy"] = res.accuracy["original"]
    seconds["total"] = time.perf_counter() - began
    return results
