"""One pass over the fit samples that collects, in float64, what the maps of given ranges are fitted from.

An ``approximate`` or ``export`` of ranges i→j needs neither all block pairs nor the blocks after the last
j: per range, the Gram blocks hs[i]ᵀhs[i], hs[i]ᵀhs[j], hs[j]ᵀhs[j] and the token sums (linear, affine,
ridge maps) and, where the model can fold the range, the fold statistics MᵀM and Mᵀ(H_j − H_i)
(:mod:`rba_core.passes.fold`). This pass collects both at once, runs blocks 1..max j only, and forms every
product in float64, so a solve from them resolves what the hidden states hold (a float32 product resolves
about 2⁻²⁴ of the largest eigenvalue, too little for many MLP outputs). The result is cached like every
stage; under a launcher each rank sums its share and the float64 sums are added over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rba_core.passes.approx import captured
from rba_core.cache import Cache, make_key
from rba_core.data import open_sample
from rba_core.distributed import single_flight, world
from rba_core.errors import RBAError
from rba_core.passes.extract import PassOptions, check_modality, compute_dtype, extraction_key, model_inputs
from rba_core.maps import Range
from rba_core.maps.folded import FoldStats
from rba_core.models import Encoder, check_text_length, default_device, load_encoder, model_ref
from rba_core.progress import Progress
from rba_core.measures.stats import SAMPLE_GROUP, TokenStats


@dataclass
class TokenSamples:
    """Token states of the fit samples for maps trained by gradient descent: ``states[k]`` (R, D) float32 rows of
    hs[k], ``mlp[i]`` block i's MLP output on the same rows (fold starts i > 0), ``sample`` each row's sample
    index. Rows of every tenth sample (in index order, the first included) are held out for validation."""

    states: dict[int, np.ndarray]
    mlp: dict[int, np.ndarray]
    sample: np.ndarray

    def held_out(self) -> np.ndarray:
        """(R,) bool: the validation rows."""
        ids = np.unique(self.sample)
        return np.isin(self.sample, ids[::10])

    def pair(self, rng: Range) -> tuple[np.ndarray, np.ndarray]:
        """(hs[i], hs[j]) rows of range i→j."""
        i, j = rng
        return self.states[i], self.states[j]

    def fold_target(self, rng: Range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(m, r, hs[j]) rows of range i→j, hs[i] = r + m (at i = 0, m = hs[0] and r = 0)."""
        i, j = rng
        m = self.states[0] if i == 0 else self.mlp[i]
        return m, self.states[i] - m if i else np.zeros_like(m), self.states[j]


@dataclass
class RangeStatistics:
    """What the maps of ``ranges`` are fitted from, over the real tokens of the fit samples."""

    key: str
    hit: bool
    meta: dict  # model, dataset, split, n, seed, num_blocks, hidden_size, num_params, label_names, max_length
    tokens: TokenStats | None  # float64 Gram blocks of each range (None when not asked for)
    fold: dict[Range, FoldStats] | None  # the ranges the model can fold (None when not asked for)
    samples: TokenSamples | None = None  # token states for trained maps (None when not asked for)

    @property
    def num_blocks(self) -> int:
        return self.meta["num_blocks"]

    @property
    def label_names(self) -> list[str]:
        return self.meta.get("label_names") or []


def _token_pairs(ranges: Sequence[Range]) -> list[tuple[int, int]]:
    return sorted({p for i, j in ranges for p in ((i, i), (i, j), (j, j))})


def _picked_rows(batch: np.ndarray, mask: torch.Tensor | None, tokens: int, per_sample: int) -> torch.Tensor:
    """Rows of the flattened (B·T) batch kept as token samples: up to ``per_sample`` real tokens of each sample,
    drawn by a generator seeded with the sample's index (so neither the batch size nor the workers change them),
    in position order."""
    rows = []
    for b, index in enumerate(batch):
        real = torch.arange(tokens) if mask is None else mask[b].nonzero().flatten().cpu()
        chosen = torch.randperm(len(real), generator=torch.Generator().manual_seed(int(index)))[:per_sample]
        rows.append(b * tokens + real[chosen.sort().values])
    return torch.cat(rows)


@torch.inference_mode()
def collect(encoder: Encoder, batches, ranges: Sequence[Range], tokens: bool, fold: Sequence[Range],
            per_sample: int = 0) -> dict[str, np.ndarray]:
    """The float64 sums of one process's batches (``(sample indices, inputs)`` pairs): ``pair_a_b``
    (hs[a]ᵀhs[b]), ``sums``, ``count`` and, for the ranges in ``fold``, ``mm_i`` (MᵀM per start) and ``md_i_j``
    (Mᵀ(H_j − H_i)); with ``per_sample`` > 0 also token samples, float32: ``tok_k`` (hs[k] of up to that many
    tokens of each sample, for each state a range starts or ends at), ``tokm_i`` (block i's MLP output there,
    for the fold starts) and ``tok_sample`` (each row's sample index). Runs blocks 1..max j."""
    d, last = encoder.hidden_size, max(j for _, j in ranges)
    f64 = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    pairs = {p: f64(d, d) for p in _token_pairs(ranges)} if tokens else {}
    needed = sorted({k for p in pairs for k in p} | {k for rng in fold for k in rng})
    sums = f64(encoder.num_blocks + 1, d)
    mm = {i: f64(d, d) for i in sorted({i for i, _ in fold})}
    md = {rng: f64(d, d) for rng in fold}
    count = 0
    starts = {i: encoder.mlp_output_module(i) for i in mm if i > 0}
    ends = sorted({k for rng in ranges for k in rng})
    picked: dict[str, list[torch.Tensor]] = {}
    keep = lambda name, value: picked.setdefault(name, []).append(value.float().cpu())  # noqa: E731
    for batch, inputs in batches:
        mask = encoder.token_mask(inputs)
        rows = (lambda x: x.reshape(-1, d) if mask is None else x[mask])  # noqa: E731  real tokens only
        states: dict[int, torch.Tensor] = {}
        with captured(starts) as outputs:
            hidden = encoder.embed(inputs)
            ctx = encoder.context(inputs, hidden)
            sampled = _picked_rows(batch, mask, hidden.shape[1], per_sample).to(hidden.device) if per_sample else None
            for k in range(last + 1):
                if k:
                    hidden = encoder.run_block(encoder.blocks[k - 1], hidden, ctx)
                if k in needed:
                    states[k] = rows(hidden).to(torch.float64)
                if sampled is not None and k in ends:
                    keep(f"tok_{k}", hidden.reshape(-1, d)[sampled])
        if sampled is not None:
            for i in (i for i in mm if i > 0):  # at 0, m is hs[0] itself (tok_0)
                keep(f"tokm_{i}", outputs[i].reshape(-1, d)[sampled])
            keep("tok_sample", torch.as_tensor(np.asarray(batch), dtype=torch.int64)[
                (sampled // hidden.shape[1]).cpu()])
        for (a, b), total in pairs.items():
            total += (states[a].T @ states[b]).cpu()
        for k, x in states.items():
            sums[k] += x.sum(0).cpu()
        for i, total in mm.items():
            m = rows(outputs[i]).to(torch.float64) if i > 0 else states[0]
            total += (m.T @ m).cpu()
            for (start, j), cross in md.items():
                if start == i:  # the difference per token before the product: m is often far smaller than hs
                    cross += (m.T @ (states[j] - states[i])).cpu()
        count += int(mask.sum()) if mask is not None else int(hidden.shape[0] * hidden.shape[1])
    arrays = {f"pair_{a}_{b}": t for (a, b), t in pairs.items()}
    arrays.update({f"mm_{i}": t for i, t in mm.items()})
    arrays.update({f"md_{i}_{j}": t for (i, j), t in md.items()})
    arrays.update(sums=sums, count=torch.tensor([float(count)], dtype=torch.float64))
    here = world()
    if here.size > 1:  # float64 sums: exact to combine
        here.sum(list(arrays.values()))
    out = {name: t.numpy() for name, t in arrays.items()}
    if per_sample:  # the ranks' rows in rank order: the samples' order, as one process keeps them
        local = {name: torch.cat(parts).numpy() for name, parts in picked.items()}
        shares = here.gather_objects(local)
        for name in sorted(set().union(*shares)):
            out[name] = np.concatenate([share[name] for share in shares if name in share])
    return out


def _result(key: str, hit: bool, meta: dict, arrays: dict[str, np.ndarray], ranges: Sequence[Range], tokens: bool,
            fold: bool) -> RangeStatistics:
    count = int(round(float(arrays["count"][0])))
    token_stats = None
    if tokens:
        pairs = {(a, b): arrays[f"pair_{a}_{b}"] for a, b in _token_pairs(ranges)}
        token_stats = TokenStats([], arrays["sums"], count, pairs, "float64")
    folds = None if not fold else {(i, j): FoldStats(arrays[f"mm_{i}"], arrays[f"md_{i}_{j}"], count)
                                   for i, j in ranges if f"md_{i}_{j}" in arrays}
    samples = None if "tok_sample" not in arrays else TokenSamples(
        {int(n[4:]): a for n, a in arrays.items() if n.startswith("tok_") and n != "tok_sample"},
        {int(n[5:]): a for n, a in arrays.items() if n.startswith("tokm_")}, arrays["tok_sample"])
    return RangeStatistics(key, hit, meta, token_stats, folds, samples)


def range_statistics(model, dataset, n: int, seed: int, ranges: Sequence[Range], **options) -> RangeStatistics:
    """The statistics of ``ranges`` over the ``n`` fit samples (the train split, sampled as
    :func:`rba_core.passes.extract.extract` samples them): the Gram blocks when ``tokens``, the fold statistics of
    the ranges the model can fold (:meth:`rba_core.models.Encoder.folds_at`) when ``fold`` (both by default).
    From the cache when stored, otherwise one pass. ``options``: ``tokens``, ``fold`` and the
    :class:`rba_core.passes.extract.PassOptions` (``encoder``: a loaded encoder or a function that loads one, called
    only on a miss); ``samples``: with n > 0, also up to n token states of each fit sample (:class:`TokenSamples`,
    for maps trained by gradient descent)."""
    how, asked = PassOptions.split(options, {"tokens": True, "fold": True, "samples": 0})
    tokens, fold, per_sample = asked["tokens"], asked["fold"], int(asked["samples"])
    max_length, progress, encoder = how.max_length, how.progress, how.encoder
    cache = how.cache or Cache()
    ref = model_ref(model, max_length)
    if ref.info.modality == "text" and not hasattr(dataset, "open_split"):  # windows of a LM text are not truncated
        check_text_length(ref.info, max_length)  # before the dataset is opened
    source, indices = open_sample(dataset, "train", n, seed)  # a stream is read only as far as its sample
    check_modality(ref.info.modality, source, ref.name)
    length = max_length if source.modality == "text" else None
    ranges = sorted({(int(i), int(j)) for i, j in ranges})
    if not ranges:
        raise RBAError("Give at least one range i→j of blocks to approximate.")
    dtype = compute_dtype(ref, world().device or default_device())
    samples = extraction_key(ref.fingerprint, source, indices, None, 1.0, ref.info.pooling, length, dtype)
    key = make_key({"kind": "range-statistics", "samples": samples, "ranges": [list(r) for r in ranges],
                    "tokens": tokens, "fold": fold, **({"token_samples": per_sample} if per_sample else {})})

    def lookup() -> RangeStatistics | None:
        entry = cache.get(key)
        arrays = None if entry is None else cache.load(key, "stats")
        return None if arrays is None else _result(key, True, entry.meta, arrays, ranges, tokens, fold)

    def compute(progress: Progress | None) -> RangeStatistics:
        here = world()
        loaded = ((encoder() if callable(encoder) else encoder) or ref.loaded
                  or load_encoder(model, how.device or here.device, length)).with_max_length(length)
        mine = here.share(len(indices), SAMPLE_GROUP)
        local = indices[mine]
        batches = [local[start : start + SAMPLE_GROUP] for start in range(0, len(local), SAMPLE_GROUP)]

        def reading():
            done = 0
            for batch, inputs in zip(batches, model_inputs(loaded, source, batches, how.decode_workers)):
                yield batch, inputs
                done += len(batch)
                if progress:
                    progress(round(done * len(indices) / max(len(local), 1)), len(indices))

        if progress:
            progress(0, len(indices))
        with here.all_or_none("the fit pass"):
            arrays = collect(loaded, reading(), ranges, tokens, [r for r in ranges if fold and loaded.folds_at(r[0])],
                             per_sample)
        meta = {"kind": "range-statistics", "model": ref.name, "dataset": source.name, "split": "train", "n": n,
                "seed": seed, "ranges": ranges, "num_blocks": loaded.num_blocks, "hidden_size": loaded.hidden_size,
                "num_params": loaded.num_params(), "label_names": source.label_names, "max_length": length,
                "workers": here.size}
        if here.is_main:  # one writer per group of workers
            cache.put(key, {"stats": arrays}, meta)
        return _result(key, False, meta, arrays, ranges, tokens, fold)

    return single_flight(cache, key, lookup, compute, progress)
