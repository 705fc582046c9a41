"""Compression plans to a budget: which blocks to remove, one step after another, and the model that results.

A plan removes blocks until a budget is met (``remove_blocks`` exactly, at most ``max_params`` parameters, or at
most ``max_latency_ms`` estimated per sample), in steps. Each step replaces one range of the *current* model (the
original with the earlier steps applied) by a map of the plan's kind, fitted from statistics of the current model
over the fit samples, and is judged by the plan's metric on the evaluation samples (the same ones for every
candidate and every strategy): perplexity for a causal LM on a language-model text, else the final-representation
MSE against the original model.

Strategies:

- ``greedy`` (default): at each step every range of the current model that removes 1..``max_size`` blocks (at most
  what is left of the budget) is a candidate; the ``top_k`` candidates whose end states are closest in angle
  (Block Influence between the current model's hs[i] and hs[j] on the evaluation samples, free from the cached
  states) are fitted and *measured*, and the one whose metric grows least per removed block is applied. The
  statistics are then collected again on the cut model, so later maps are fitted to the states the earlier cuts
  produce (ReplaceMe's multi-window procedure); ranges need not be adjacent. With ``max_size`` 1 (the default) a
  step costs one pass over the fit samples and at most ``top_k`` evaluations from the candidate's start on; a
  wider window still forms when it is best, as adjacent single cuts, each refitted, at L·K candidates fewer.
- ``window``: the best single contiguous window of K blocks (PruneMe, ReplaceMe), fitted on the original and
  measured like the greedy candidates (the ``top_k`` of lowest angular distance).
- ``shortgpt``: the K blocks of lowest Block Influence on the fit samples (ShortGPT), skipped.

Every candidate runs only from its range's start on over the current model's cached block outputs
(:meth:`rba_core.passes.approx.ApproximatedEncoder.resume`), and after a step those outputs are recomputed only from the
changed block on. The current model is a real encoder: a folded (or cut) copy when the kind folds into the weights
or skips, else a copy whose layer list holds the map where the blocks were; :func:`export_plan` writes it as a
plain checkpoint in the first two cases and in the compressed format otherwise.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rba_core.ops.analysis import fit_range_maps
from rba_core.passes.approx import ApproximatedEncoder, captured, count_params, mlp_outputs, paper_notation
from rba_core.data import open_sample
from rba_core.errors import RBAError
from rba_core.passes.extract import model_inputs
from rba_core.passes.cut import MapSlot, blocks_path
from rba_core.passes.fold import cut_config, folded_encoder
from rba_core.data.lm_data import LMText
from rba_core.maps import MapParams, Range, fit_map, map_kind
from rba_core.maps.module import FittedMap
from rba_core.models import Encoder
from rba_core.models.decoder import DecoderLM
from rba_core.passes.range_pass import range_statistics
from rba_core.store.results import Result
from rba_core.ops.run import Run
from rba_core.ops.search import latency_estimate

STRATEGIES = ("greedy", "window", "shortgpt")
METRICS = ("perplexity", "mse")
TOP_K = 8  # candidates measured per step, after the angular prefilter
CONFIDENCE = 0.95  # of the bootstrap interval of a plan's metric
BOOTSTRAP = 1000  # resamples of the evaluation samples
BATCH = 8
SKIP = "identity"  # the map kind that skips its blocks: ShortGPT's


@dataclass(frozen=True)
class PlanSpec:
    """What a plan is asked: the budget (``remove_blocks`` exactly, at most ``max_params`` parameters, at most
    ``max_latency_ms`` estimated per sample; at least one), the ``strategy``, the map ``kind`` (any registered name)
    and its ``map_params``, the ``metric`` (None: perplexity for a causal LM on a language-model text, else mse), and
    the greedy search's ``max_size`` (largest range per step) and ``top_k`` (candidates measured per step; None:
    all)."""

    remove_blocks: int | None = None
    max_params: int | None = None
    max_latency_ms: float | None = None
    strategy: str = "greedy"
    kind: str = "linear"
    map_params: MapParams | None = None
    metric: str | None = None
    max_size: int = 1
    top_k: int | None = TOP_K


@dataclass
class PlanResult(Result):
    """``plan``: the steps (each with the metric after it and its interval), the original and final model, and
    the final model with the same blocks skipped. ``compressed`` (not in the JSON) is what :func:`export_plan`
    writes."""

    model: str
    dataset: str
    modality: str
    fit_n: int
    eval_n: int
    seed: int
    num_blocks: int
    strategy: str
    map: str
    map_params: dict
    metric: str
    budget: dict
    original: dict
    steps: list[dict]
    final: dict
    plain_checkpoint: bool  # every step folds or skips: the export is a plain Hugging Face checkpoint
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compressed: Any = None
    healing: dict | None = None  # --heal: the healed model's metric before and after

    _not_json = ("compressed",)
    _omit_if_none = ("healing",)

    def to_frame(self):
        """One row per step: blocks removed so far, the range, the metric and its interval."""
        import pandas as pd

        rows = [{"blocks_removed": 0, "range": "original", "metric": self.original["metric"],
                 "low": self.original["interval"][0], "high": self.original["interval"][1]}]
        rows += [{"blocks_removed": s["blocks_removed"], "range": s["range_label"], "metric": s["metric"],
                  "low": s["interval"][0], "high": s["interval"][1]} for s in self.steps]
        return pd.DataFrame(rows)


def _cut(encoder: Encoder, rng: Range, layer: nn.Module | None) -> Encoder:
    """A copy of ``encoder`` without blocks i+1..j, ``layer`` (if any) standing in their place; the config's layer
    count and per-layer lists follow. The encoder is untouched."""
    i, j = rng
    model = copy.deepcopy(encoder.model)
    layers = model.get_submodule(blocks_path(encoder))
    for k in range(j - 1, i - 1, -1):
        del layers[k]
    if layer is not None:
        layers.insert(i, layer)
    for new, block in enumerate(layers):  # caches and masks index layers by position
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    keep = list(range(i)) + ([i] if layer is not None else []) + list(range(j, encoder.num_blocks))
    cut_config(model.config, keep, encoder.num_blocks, [rng])
    return type(encoder)(encoder.name, encoder.source, encoder.family, model.eval(), encoder.processor,
                         encoder.device, encoder.pooling, encoder.max_length)


@dataclass
class _Current:
    """The model after the steps so far: a real encoder, and for each of its blocks the original states (a, b) it
    stands between (a kept block k: (k-1, k), extended to b when the blocks after it were folded into it or
    skipped; a map layer: its original range), with ``stem`` the original state its hs[0] stands for."""

    encoder: Encoder
    spans: list[Range]
    stem: int = 0
    maps: dict[Range, FittedMap | None] = field(default_factory=dict)  # map layers and skips, by original range

    def state(self, k: int) -> int:
        """The original state that this model's hs[k] stands for."""
        return self.stem if k == 0 else self.spans[k - 1][1]

    def is_map(self, k: int) -> bool:
        return isinstance(self.encoder.blocks[k - 1], MapSlot)

    def cost(self, rng: Range) -> int:
        """Original blocks that removing this model's blocks i+1..j removes (a map layer removes none)."""
        return sum(not self.is_map(k) for k in range(rng[0] + 1, rng[1] + 1))

    def original_range(self, rng: Range) -> Range:
        return self.state(rng[0]), self.state(rng[1])

    def ranges(self) -> list[Range]:
        """The original ranges this model has removed, in order."""
        out = [(0, self.stem)] if self.stem else []
        for k, (a, b) in enumerate(self.spans, start=1):
            if self.is_map(k):
                out.append((a, b))
            elif b > a + 1:
                out.append((a + 1, b))
        return out

    def apply(self, rng: Range, fitted: FittedMap | None, kind: str) -> "_Current":
        """This model with its range i→j replaced by ``fitted`` (folded into block i when the kind folds, a map layer
        otherwise; None: the blocks are skipped)."""
        i, j = rng
        declared = map_kind(kind)
        original = self.original_range(rng)
        maps = {r: m for r, m in self.maps.items() if not (original[0] <= r[0] and r[1] <= original[1])}
        spans = list(self.spans)
        if fitted is not None and not declared.folds:
            encoder = _cut(self.encoder, rng, MapSlot(fitted))
            maps[original] = fitted
            return _Current(encoder, spans[:i] + [original] + spans[j:], self.stem, maps)
        if fitted is None:
            encoder = _cut(self.encoder, rng, None)
            maps[original] = None
        else:
            encoder = folded_encoder(self.encoder, {rng: declared.folds(fitted)})
        if i == 0:
            return _Current(encoder, spans[j:], original[1], maps)
        spans[i - 1] = (spans[i - 1][0], original[1])
        return _Current(encoder, spans[:i] + spans[j:], self.stem, maps)


class _Evaluation:
    """The evaluation samples as the current model sees them: per batch its inputs, block outputs hs[0..M], block
    context and (for maps that read it) every block's MLP output; after a step they are recomputed from the first
    changed block on. ``metric`` values are per sample (sum, count): next-token loss over the window's predicted
    positions, or squared error of the final representation against the original's (``reference``)."""

    def __init__(self, encoder: Encoder, batches: list[dict], metric: str, needs_m: bool, progress=None):
        self.batches, self.metric, self.needs_m, self.progress = batches, metric, needs_m, progress
        self.states: list[tuple[list[torch.Tensor], Any, dict]] = []
        self.reference: list[torch.Tensor] = []
        self.encoder = self.original = encoder
        self._recompute(encoder, 0)
        self.original_states = self.states
        self.reference = [encoder.final(hs[-1], encoder.token_mask(inputs)).double()
                          for (hs, _, _), inputs in zip(self.states, batches)]

    @torch.inference_mode()
    def _recompute(self, encoder: Encoder, first: int) -> None:
        """hs[first..M] of every batch (hs[0..first-1] and the MLP outputs of blocks below ``first`` are kept)."""
        fresh = []
        for b, inputs in enumerate(self.batches):
            old_hs, _, old_m = self.states[b] if first > 0 else ([], None, {})
            hidden = old_hs[first - 1] if first > 0 else encoder.embed(inputs)
            ctx = encoder.context(inputs, old_hs[0] if first > 0 else hidden)
            hs = old_hs[:first] if first > 0 else [hidden]
            wanted = [k for k in range(max(first, 1), encoder.num_blocks + 1)
                      if self.needs_m and not isinstance(encoder.blocks[k - 1], MapSlot)]
            with captured(mlp_outputs(encoder, wanted)) as m:
                for k in range(max(first, 1), encoder.num_blocks + 1):
                    hs.append(encoder.run_block(encoder.blocks[k - 1], hs[-1], ctx))
            fresh.append((hs, ctx, {**{k: v for k, v in old_m.items() if k < first}, **m}))
        self.states, self.encoder = fresh, encoder

    def advance(self, encoder: Encoder, rng: Range) -> None:
        """The states of the model after the step that replaced this model's range ``rng``."""
        self._recompute(encoder, max(rng[0], 0))

    @torch.inference_mode()
    def values(self, hidden: torch.Tensor, b: int, enc: Encoder) -> np.ndarray:
        """(B, 2) per-sample (sum, count) of the metric for the last hidden states ``hidden`` of batch ``b``, read
        with ``enc``'s final norm and head."""
        inputs = self.batches[b]
        mask = enc.token_mask(inputs)
        if self.metric == "perplexity":
            targets = inputs["input_ids"][:, 1:]
            logits = enc.logits(hidden)[:, :-1].float()
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()
            real = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask[:, 1:] & mask[:, :-1]
            return torch.stack([(loss * real).sum(1), real.sum(1).double()], 1).cpu().numpy()
        error = ((enc.final(hidden, mask).double() - self.reference[b]) ** 2).sum(-1)
        return torch.stack([error, torch.full_like(error, hidden.shape[-1])], 1).cpu().numpy()

    @torch.inference_mode()
    def measure(self, nets: dict[Any, ApproximatedEncoder | None], original: bool = False) -> dict[Any, np.ndarray]:
        """Per-sample (sum, count) of every net (None: the current model itself), each from its first range on over
        the current model's block outputs (``original``: the original model's)."""
        states, enc = (self.original_states, self.original) if original else (self.states, self.encoder)
        out: dict[Any, list] = {name: [] for name in nets}
        sizes = [len(hs[0]) for hs, _, _ in states]
        done, total = 0, len(nets) * sum(sizes)  # samples (windows) run, over all nets
        for b, (hs, ctx, m) in enumerate(states):
            for name, net in nets.items():
                out[name].append(self.values(hs[-1] if net is None else net.resume(hs, m, ctx), b, enc))
                done += sizes[b]
                if self.progress:
                    self.progress(done, total)
        return {name: np.concatenate(parts) for name, parts in out.items()}

    @torch.inference_mode()
    def influence(self, rng: Range) -> float:
        """Block Influence between the current hs[i] and hs[j]: 1 − cos over the real tokens (lower: closer)."""
        total, count = 0.0, 0
        for inputs, (hs, _, _) in zip(self.batches, self.states):
            mask = self.encoder.token_mask(inputs)
            a, b = (hs[k] if mask is None else hs[k][mask] for k in rng)
            total += float((1 - F.cosine_similarity(a.double(), b.double(), dim=-1)).sum())
            count += a.shape[0] if mask is not None else a.shape[0] * a.shape[1]
        return total / max(count, 1)


def metric_value(values: np.ndarray, metric: str) -> float:
    """The metric of per-sample (sum, count) values: exp of the mean loss (perplexity) or the mean squared error."""
    mean = float(values[:, 0].sum() / values[:, 1].sum())
    return float(np.exp(mean)) if metric == "perplexity" else mean


def interval(values: np.ndarray, metric: str, seed: int = 0) -> list[float]:
    """A :data:`CONFIDENCE` bootstrap interval of the metric over the evaluation samples (percentiles of
    :data:`BOOTSTRAP` resamples, seeded)."""
    picks = np.random.default_rng(seed).integers(0, len(values), (BOOTSTRAP, len(values)))
    means = values[picks, 0].sum(1) / values[picks, 1].sum(1)
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return [float(np.exp(low)), float(np.exp(high))] if metric == "perplexity" else [float(low), float(high)]


def _effect(values: np.ndarray, before: np.ndarray, metric: str, cost: int) -> float:
    """How much a candidate worsens the metric per block it removes (log perplexity, or MSE)."""
    after, base = (values[:, 0].sum() / values[:, 1].sum()), (before[:, 0].sum() / before[:, 1].sum())
    return float(after - base) / cost


def _check(run: Run, spec: PlanSpec) -> str:
    """The metric the plan is judged by; one sentence for a request it cannot serve."""
    if spec.strategy not in STRATEGIES:
        raise RBAError(f"Unknown strategy '{spec.strategy}': use one of {', '.join(STRATEGIES)}.")
    map_kind(spec.kind)  # an unknown map fails before any work
    if spec.remove_blocks is None and spec.max_params is None and spec.max_latency_ms is None:
        raise RBAError("Give the plan a budget: --remove-blocks K, --max-params P or --max-latency-ms T.")
    blocks = run.info.num_blocks
    if spec.remove_blocks is not None and not 1 <= spec.remove_blocks < blocks:
        raise RBAError(f"Cannot remove {spec.remove_blocks} blocks: this model has {blocks}; choose 1..{blocks - 1}.")
    if spec.max_size < 1 or (spec.top_k is not None and spec.top_k < 1):
        raise RBAError("--max-size and --top-k must be at least 1.")
    if not run.fit_n or not run.eval_n:
        raise RBAError("A plan needs fit samples and evaluation samples: give --fit-n and --eval-n (at least 1).")
    lm = isinstance(run.data, LMText) and issubclass(type(run.lazy()), DecoderLM)
    metric = spec.metric or ("perplexity" if lm else "mse")
    if metric not in METRICS:
        raise RBAError(f"Unknown metric '{metric}': use one of {', '.join(METRICS)}.")
    if metric == "perplexity" and not lm:
        raise RBAError("Perplexity needs a causal LM on a language-model text (such as demo-GPT on demo-text); "
                       "use --metric mse for this model.")
    return metric


class _Budget:
    """Whether a model meets the plan's budget, and how many blocks a step may still remove."""

    def __init__(self, spec: PlanSpec, original: Encoder, timing: dict | None, kind: str):
        self.spec, self.kind, self.timing = spec, kind, timing
        self.num_params = original.num_params()
        self.block_params = [original.block_params(k) for k in range(1, original.num_blocks + 1)]
        self.hidden = original.hidden_size
        self.num_blocks = original.num_blocks

    def params(self, ranges: Sequence[Range], maps: int) -> int:
        removed = sum(self.block_params[k - 1] for i, j in ranges for k in range(i + 1, j + 1))
        return self.num_params - removed + maps * map_kind(self.kind).added_params(self.hidden)

    def latency(self, ranges: Sequence[Range]) -> float | None:
        return None if self.timing is None else latency_estimate(tuple(ranges), self.timing, self.kind)

    def met(self, ranges: Sequence[Range], removed: int, maps: int) -> bool:
        spec = self.spec
        return ((spec.remove_blocks is None or removed >= spec.remove_blocks)
                and (spec.max_params is None or self.params(ranges, maps) <= spec.max_params)
                and (spec.max_latency_ms is None or self.latency(ranges) <= spec.max_latency_ms))

    def room(self, removed: int) -> int:
        """The most blocks the next step may remove (one block is always kept)."""
        left = self.num_blocks - 1 - removed
        return left if self.spec.remove_blocks is None else min(left, self.spec.remove_blocks - removed)


def _timing(encoder: Encoder, inputs: dict) -> dict:
    """ms per sample of the embedding, each block, the final norm and one map, on one batch (after a warm-up)."""
    with torch.inference_mode():
        encoder.hidden_states(inputs)
        seconds: list[float] = []
        hs, _ = encoder.hidden_states(inputs, seconds)
        began = time.perf_counter()
        encoder.final(hs[-1], encoder.token_mask(inputs))
        norm = time.perf_counter() - began
        began = time.perf_counter()
        hs[-1] @ torch.eye(encoder.hidden_size, device=hs[-1].device, dtype=hs[-1].dtype)
        step = time.perf_counter() - began
    n = len(next(iter(inputs.values())))
    ms = lambda s: 1000.0 * s / n  # noqa: E731
    return {"embed": ms(seconds[0]), "blocks": [ms(t) for t in seconds[1:]], "norm": ms(norm), "map": ms(step)}


def _label(ranges: Sequence[Range]) -> str:
    return " + ".join(f"{i}→{j}" for i, j in ranges) or "none"


class _Planner:
    """One plan's work: the current model, its evaluation states, the budget, and the steps so far."""

    def __init__(self, run: Run, spec: PlanSpec, metric: str):
        self.run, self.spec, self.metric = run, spec, metric
        self.kind, self.params = spec.kind, spec.map_params or MapParams()
        self.declared = map_kind(spec.kind)
        self.original = run.lazy()
        self.current = _Current(self.original, [(k - 1, k) for k in range(1, self.original.num_blocks + 1)])
        run.stage(f"Evaluation samples (test split): the original model's block outputs on {run.eval_n} samples")
        source, indices = open_sample(run.data, "test", run.eval_n, run.seed)
        groups = [indices[s : s + BATCH] for s in range(0, len(indices), BATCH)]
        batches = list(model_inputs(self.original, source, groups))
        needs_m = self.declared.needs_mlp_output
        self.eval = _Evaluation(self.original, batches, metric, needs_m, run.progress)
        timing = _timing(self.original, batches[0]) if spec.max_latency_ms is not None else None
        self.budget = _Budget(spec, self.original, timing, spec.kind)
        blocks = self.original.num_blocks
        if not any(self.budget.met([(0, k - 1), (k, blocks)] if k < blocks else [(0, k - 1)], blocks - 1, 1)
                   for k in range(1, blocks + 1)):
            raise RBAError("No plan meets this budget: even with one block left the model is larger or slower; "
                           "allow more parameters or latency.")
        self.before = self.eval.measure({"current": None})["current"]
        self.first = self.before
        self.steps: list[dict] = []
        self.notes: list[str] = []

    # --- the state of the plan --------------------------------------------------------------------
    @property
    def removed(self) -> int:
        return sum(j - i for i, j in self.current.ranges())

    def done(self) -> bool:
        ranges = self.current.ranges()
        return self.budget.met(ranges, self.removed, sum(m is not None for m in self.current.maps.values())) or \
            self.budget.room(self.removed) < 1

    def _summary(self, values: np.ndarray) -> dict:
        return {"metric": metric_value(values, self.metric), "interval": interval(values, self.metric, self.run.seed)}

    def _sub_run(self) -> Run:
        """The run's request on the current model (its statistics are those of the cut model)."""
        run = self.run
        return Run(self.current.encoder, run.dataset, run.fit_n, run.eval_n, run.seed, run.max_length, run.seq_len,
                   run.cache, run.progress, None, self.current.encoder)

    def _admissible(self, candidates: list[Range]) -> list[Range]:
        check = self.declared.check_encoder
        kept, reason = [], None
        for rng in candidates:
            try:
                if check:
                    check(self.current.encoder, [rng])
                kept.append(rng)
            except RBAError as exc:
                reason = reason or str(exc)
        if not kept:
            raise RBAError(reason or "No range of this model fits the budget.")
        if reason:
            self.notes.append(f"{len(candidates) - len(kept)} candidates cannot take {self.kind} maps and were left "
                              f"out, e.g.: {reason}")
        return kept

    def fit(self, ranges: list[Range]) -> dict[Range, FittedMap | None]:
        """Maps of the plan's kind for (possibly overlapping) ranges of the current model, from its statistics over
        the fit samples: one float64 pass for every range of a kind solved in closed form, else
        :func:`rba_core.ops.analysis.fit_range_maps` once per group of ranges that its checks take together."""
        declared, sub = self.declared, self._sub_run()
        if not declared.shapes(self.original.hidden_size):  # a kind that skips reads no statistics
            return dict.fromkeys(ranges)
        self.run.stage(f"Fit samples (train split): statistics of {len(ranges)} candidate range"
                       f"{'s' if len(ranges) > 1 else ''} on the current model")
        if set(declared.statistics) <= {"tokens", "fold"}:
            stats = range_statistics(sub.ref, sub.data, sub.fit_n, sub.seed, ranges,
                                     tokens="tokens" in declared.statistics, fold="fold" in declared.statistics,
                                     max_length=sub.max_length, cache=sub.cache, progress=sub.progress,
                                     encoder=sub.lazy)
            return {rng: fit_map(stats, rng, self.kind, self.params) for rng in ranges}
        fitted: dict[Range, FittedMap | None] = {}
        for group in self._groups(ranges):
            fitted.update(zip(group, fit_range_maps(sub, group, self.kind, self.params)[1]))
        return fitted

    def _groups(self, ranges: list[Range]) -> list[list[Range]]:
        """The ranges in groups that the kind's checks take as one set (disjoint, foldable together), first fit."""
        declared, encoder = self.declared, self.current.encoder

        def fits(group: list[Range]) -> bool:
            try:
                if declared.check_ranges:
                    declared.check_ranges(group, encoder.num_blocks)
                if declared.check_encoder:
                    declared.check_encoder(encoder, group)
                return True
            except RBAError:
                return False

        groups: list[list[Range]] = []
        for rng in ranges:
            home = next((g for g in groups if fits(g + [rng])), None)
            if home is None:
                groups.append([rng])
            else:
                home.append(rng)
        return groups

    def measure(self, fitted: dict[Range, FittedMap | None]) -> dict[Range, np.ndarray]:
        self.run.stage(f"Evaluation samples: {len(fitted)} candidate{'s' if len(fitted) > 1 else ''} from their "
                       "range's start on")
        nets = {rng: ApproximatedEncoder(self.current.encoder, [rng], [m]).eval() for rng, m in fitted.items()}
        return self.eval.measure(nets)

    def step(self, rng: Range, fitted: FittedMap | None, values: np.ndarray, measured: list[dict]) -> None:
        """Apply the chosen candidate and record the step."""
        original = self.current.original_range(rng)
        removes = [self.current.spans[k - 1][0] + 1 for k in range(rng[0] + 1, rng[1] + 1) if not self.current.is_map(k)]
        self.current = self.current.apply(rng, fitted, self.kind)
        self.eval.advance(self.current.encoder, rng)
        # the model as it now is (a folded step's weights compute what its candidate did, up to float32 rounding)
        values = self.before = self.eval.measure({"current": None})["current"]
        ranges = self.current.ranges()
        maps = sum(m is not None for m in self.current.maps.values())
        self.steps.append({
            "step": len(self.steps) + 1, "range": list(rng), "original_range": list(original),
            "range_label": f"{original[0]}→{original[1]}", "paper": paper_notation(original), "removes": removes,
            "blocks_removed": self.removed, "ranges": [list(r) for r in ranges],
            **self._summary(values), "params": self.budget.params(ranges, maps),
            **({"latency_ms_per_sample_estimate": self.budget.latency(ranges)} if self.budget.timing else {}),
            "candidates": measured,
        })

    def choose(self, fitted: dict[Range, FittedMap | None], measured: dict[Range, np.ndarray]) -> None:
        """Apply the measured candidate that worsens the metric least per removed block."""
        rows = []
        for rng, values in measured.items():
            original = self.current.original_range(rng)
            rows.append({"range": list(rng), "original_range": list(original),
                         "blocks": self.current.cost(rng), "metric": metric_value(values, self.metric),
                         "effect_per_block": _effect(values, self.before, self.metric, self.current.cost(rng))})
        rows.sort(key=lambda r: (r["effect_per_block"], r["metric"]))
        best = tuple(rows[0]["range"])
        self.step(best, fitted[best], measured[best], rows)

    def prefilter(self, candidates: list[Range]) -> list[Range]:
        """The ``top_k`` candidates of lowest Block Influence between their end states (all when fewer)."""
        top = self.spec.top_k
        if top is None or len(candidates) <= top:
            return candidates
        return sorted(candidates, key=self.eval.influence)[:top]


def _greedy(planner: _Planner) -> None:
    while not planner.done():
        current, room = planner.current, planner.budget.room(planner.removed)
        size = min(planner.spec.max_size, room)
        blocks = current.encoder.num_blocks
        candidates = [(i, j) for i in range(blocks) for j in range(i + 1, blocks + 1)
                      if 1 <= current.cost((i, j)) <= size]
        chosen = planner.prefilter(planner._admissible(candidates))
        planner.run.stage(f"Step {len(planner.steps) + 1}: {len(chosen)} of {len(candidates)} candidates measured")
        fitted = planner.fit(chosen)
        planner.choose(fitted, planner.measure(fitted))


def _window_size(planner: _Planner) -> int:
    """The blocks the window removes: ``remove_blocks``, or the fewest whose best window meets the budget."""
    budget, blocks = planner.budget, planner.original.num_blocks
    for size in range(1, blocks):
        if any(budget.met([(i, i + size)], size, 1 if planner.declared.shapes(1) else 0)
               for i in range(blocks - size + 1)):
            return size
    raise RBAError("No window of blocks meets this budget: allow more parameters or latency.")


def _window(planner: _Planner) -> None:
    size = _window_size(planner)
    blocks = planner.original.num_blocks
    candidates = [(i, i + size) for i in range(blocks - size + 1)
                  if planner.budget.met([(i, i + size)], size, 1 if planner.declared.shapes(1) else 0)]
    chosen = planner.prefilter(planner._admissible(candidates))
    planner.run.stage(f"Window of {size} blocks: {len(chosen)} of {len(candidates)} candidates measured")
    fitted = planner.fit(chosen)
    planner.choose(fitted, planner.measure(fitted))


def _shortgpt(planner: _Planner) -> None:
    run = planner.run
    run.stage("Fit samples (train split): Block Influence of every block (ShortGPT)")
    influence = run.extract("train", stats_window=1).block_influence
    if planner.declared.shapes(planner.original.hidden_size):  # a kind with a map: ShortGPT skips instead
        planner.notes.append(f"shortgpt skips its blocks (ShortGPT); --map {planner.kind} was not used.")
        planner.kind = planner.budget.kind = SKIP
        planner.declared = map_kind(SKIP)
    for block in np.argsort(influence, kind="stable") + 1:
        if planner.done():
            break
        k = next(n for n, (a, _) in enumerate(planner.current.spans, start=1) if a + 1 == block)
        rng = (k - 1, k)
        values = planner.measure({rng: None})[rng]
        planner.step(rng, None, values, [{"range": list(rng), "original_range": [int(block) - 1, int(block)],
                                         "block_influence": float(influence[block - 1]),
                                         "metric": metric_value(values, planner.metric)}])


STRATEGY = {"greedy": _greedy, "window": _window, "shortgpt": _shortgpt}


def plan(model, dataset, fit_n: int, eval_n: int, seed: int = 0, **options) -> PlanResult:
    """:func:`plan_run` of the :class:`Run` of these arguments. ``options``: the run's (``max_length``, ``seq_len``,
    ``cache``, ``progress``, ``on_stage``, ``encoder``) and the :class:`PlanSpec`'s fields."""
    run, asked = Run.of(model, dataset, {**options, "fit_n": fit_n, "eval_n": eval_n, "seed": seed},
                        [f.name for f in fields(PlanSpec)])
    return plan_run(run, PlanSpec(**asked))


def plan_run(run: Run, spec: PlanSpec) -> PlanResult:
    """Remove blocks of the run's model until ``spec``'s budget is met, by its strategy (see the module); each
    step's metric is measured on the run's evaluation samples, and the final model is compared with the original
    and with skipping the same blocks."""
    began = time.perf_counter()
    metric = _check(run, spec)
    planner = _Planner(run, spec, metric)
    if planner.done():
        raise RBAError("The original model already meets this budget: ask for fewer parameters, less latency or "
                       "some blocks removed.")
    STRATEGY[spec.strategy](planner)
    ranges = planner.current.ranges()
    run.stage("Evaluation samples: the original model with the same blocks skipped")
    skip = ApproximatedEncoder(planner.original, ranges, [None] * len(ranges)).eval()
    skipped = planner.eval.measure({"skip": skip}, original=True)["skip"]
    maps = sum(m is not None for m in planner.current.maps.values())
    declared = planner.declared
    plain = bool(declared.folds) or not declared.shapes(planner.original.hidden_size)
    compressed = planner.current.encoder if plain else ApproximatedEncoder(
        planner.original, ranges, [planner.current.maps[r] for r in ranges]).eval()
    original = {**planner._summary(planner.first), "params": planner.budget.num_params,
                **({"latency_ms_per_sample_estimate": planner.budget.latency([])} if planner.budget.timing else {})}
    last = planner.steps[-1]
    final = {"ranges": [list(r) for r in ranges], "paper": [paper_notation(r) for r in ranges],
             "removed_blocks": [k for i, j in ranges for k in range(i + 1, j + 1)],
             "blocks": {"original": planner.original.num_blocks, "approximated": planner.original.num_blocks
                        - planner.removed},
             "metric": last["metric"], "interval": last["interval"],
             "params": planner.budget.params(ranges, maps),
             **({"latency_ms_per_sample_estimate": planner.budget.latency(ranges)} if planner.budget.timing else {}),
             "skip": planner._summary(skipped)}
    info = run.info
    return PlanResult(
        model=planner.original.name, dataset=str(getattr(run.data, "name", run.dataset)), modality=info.modality,
        fit_n=run.fit_n, eval_n=run.eval_n, seed=run.seed, num_blocks=planner.original.num_blocks,
        strategy=spec.strategy, map=planner.kind, map_params=declared.key(planner.params), metric=metric,
        budget={"remove_blocks": spec.remove_blocks, "max_params": spec.max_params,
                "max_latency_ms": spec.max_latency_ms, "max_size": spec.max_size, "top_k": spec.top_k},
        original=original, steps=planner.steps, final=final, plain_checkpoint=plain, notes=sorted(set(planner.notes)),
        seconds=time.perf_counter() - began, compressed=compressed)


def heal_plan(run: Run, result: PlanResult, plan) -> PlanResult:
    """The plan's model healed (:func:`rba_core.ops.heal.heal`, a :class:`~rba_core.ops.heal.HealPlan`) against the
    run's original model: a plain checkpoint's cut model with LoRA adapters on its blocks, a compressed model's
    maps (and adapters). ``result.healing`` gives the metric before and after; the model to export is the healed
    one, still a plain checkpoint where the plan's was one."""
    from rba_core.ops.heal import heal

    if result.compressed is None:
        raise RBAError("This plan holds no model to heal (a plan read back from JSON); run it again with --heal.")
    if result.plain_checkpoint:
        net, report = heal(run, [], [], plan, encoder=result.compressed)
        result.compressed = net.encoder
    else:
        model = result.compressed
        net, report = heal(run, model.ranges, model.maps, plan)
        result.compressed = net
    result.healing = report
    return result


def export_plan(result: PlanResult, out) -> dict:
    """Write a plan's model to the folder ``out``: a plain Hugging Face checkpoint (config with the new layer count,
    safetensors, tokenizer or processor; ``rba.json`` records the plan) when every step folds into the weights or
    skips, else the compressed format (:func:`rba_core.store.export.save_compressed`). Returns the record written."""
    import json
    from pathlib import Path

    from rba_core.store.export import RECORD, save_compressed, save_folded

    compressed = result.compressed
    if compressed is None:
        raise RBAError("This plan holds no model to export (a plan read back from JSON); run it again with --out.")
    plan_record = {"strategy": result.strategy, "metric": result.metric, "budget": result.budget,
                   "steps": [{k: v for k, v in s.items() if k != "candidates"} for s in result.steps],
                   "original": result.original, "final": result.final}
    if not result.plain_checkpoint:
        save_compressed(compressed, out)
        path = Path(out) / RECORD
        return json.loads(path.read_text())
    encoder: Encoder = compressed
    ranges = [tuple(r) for r in result.final["ranges"]]
    record = {"source": encoder.source, "family": encoder.family, "map": result.map, "ranges": [list(r) for r in ranges],
              "paper": [paper_notation(r) for r in ranges],
              "layers": {"original": result.num_blocks, "folded": encoder.num_blocks},
              "params": {"original": result.original["params"], "folded": count_params(encoder.model)},
              "data": {"dataset": result.dataset, "fit_n": result.fit_n, "eval_n": result.eval_n, "seed": result.seed},
              "plan": plan_record}
    final = result.healing["after"] if result.healing else result.final["metric"]
    if result.metric == "perplexity":
        record["perplexity"] = {"original": result.original["metric"], "folded": final}
    else:
        record["mse_final"] = final
    if result.healing:
        record["healing"] = result.healing
    save_folded(encoder, out, record)
    return record
