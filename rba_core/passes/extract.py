"""The streaming pass: run the encoder once over sampled images or texts and cache what every view needs."""

from __future__ import annotations

import os
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from rba_core.cache import Cache, make_key
from rba_core.data import Source, open_sample
from rba_core.distributed import single_flight, world
from rba_core.errors import RBAError, refuse_unknown
from rba_core.maps import fit_residual_matrix
from rba_core.measures.metrics import influence_sums
from rba_core.models import Encoder, adapter_class, check_text_length, default_device, load_encoder, model_ref
from rba_core.progress import Progress
from rba_core.registry import DEFAULT_MAX_LENGTH, modality_mismatch
from rba_core.measures.stats import (SAMPLE_GROUP, StatsAccumulator, StatsPlan, TokenStats, check_fits, memory_budget,
                            stats_bytes)


@dataclass
class Extraction:
    """Cached result of one pass. ``pooled``: (L+1, N, D), the pooled vector (CLS / first token, or
    the mean over real tokens) of every block output; ``final``: (N, D) final representations."""

    key: str
    hit: bool
    meta: dict
    pooled: np.ndarray
    final: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    token_stats: TokenStats | None = field(repr=False)
    fit_residual: np.ndarray | None = None  # (L+1, L+1), stored with the statistics
    notes: list[str] = field(default_factory=list)  # e.g. a damaged cache entry recomputed
    block_influence: np.ndarray | None = None  # (L,) ShortGPT's score over the statistics' tokens
    source: Source | None = field(default=None, repr=False)  # the split the samples come from

    @property
    def num_blocks(self) -> int:
        return self.pooled.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.pooled.shape[2]

    @property
    def label_names(self) -> list[str]:
        return self.meta["label_names"]

    def stats(self) -> TokenStats:
        """The token statistics; only extractions made ``with_stats`` have them."""
        if self.token_stats is None:
            raise ValueError(f"extraction {self.key[:12]} was made without token statistics")
        return self.token_stats


def extraction_key(model: dict, source: Source, indices: np.ndarray, stats: StatsPlan | None,
                   token_fraction: float, pooling: str, max_length: int | None, dtype: str = "float32") -> str:
    """Cache key: every input that changes the stored arrays (not the batch size, device or workers).
    ``model`` is the model's fingerprint (:func:`rba_core.models.model_fingerprint`); ``stats`` what token
    statistics are kept (None: none; its ``pairs`` None: all pairs); ``dtype`` the model's compute dtype
    (:meth:`rba_core.models.Encoder.compute_dtype`)."""
    with_stats = stats is not None
    plan = {} if not with_stats or stats.pairs is None else {"pairs": [list(p) for p in stats.pairs],
                                                              "precision": stats.precision}
    return make_key({**plan,
        "kind": "extraction",
        "model": model,
        "dataset": source.fingerprint,
        "split": source.split,
        "indices": indices.tolist(),
        "stats": with_stats,
        "token_fraction": token_fraction if with_stats else None,
        "pooling": pooling,
        "max_length": max_length if source.modality == "text" else None,
        "dtype": dtype,
    })


def token_rows(indices: np.ndarray, mask: torch.Tensor | None, tokens: int, fraction: float) -> torch.Tensor | None:
    """Rows of the flattened (B·T) batch that enter the statistics: every real token, or with
    ``fraction`` < 1 the first token plus a random share of the other real tokens, drawn from a
    generator seeded by the sample's index, so the choice depends neither on the batch size nor
    on how samples are split across workers. None keeps every row."""
    if fraction >= 1.0 and (mask is None or bool(mask.all())):  # no padding (images, LM windows): no copies
        return None
    rows = []
    for b, index in enumerate(indices):
        real = torch.arange(tokens) if mask is None else mask[b].nonzero().flatten().cpu()
        if fraction < 1.0 and len(real) > 1:
            keep = max(1, round((len(real) - 1) * fraction))
            gen = torch.Generator().manual_seed(int(index))
            real = torch.cat([real[:1], real[1:][torch.randperm(len(real) - 1, generator=gen)[:keep]]])
        rows.append(b * tokens + real)
    return torch.cat(rows)


#: Environment variable: processes that decode and preprocess samples during the pass (CLI --decode-workers).
DECODE_WORKERS_ENV = "RBA_DECODE_WORKERS"


def decode_workers(device: torch.device | str) -> int:
    """DataLoader worker processes for decoding: ``$RBA_DECODE_WORKERS``, else none on CPU (the cores
    run the model) and min(8, CPUs) on a GPU, which a single decoding process would starve."""
    chosen = os.environ.get(DECODE_WORKERS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit():
            raise RBAError(f"{DECODE_WORKERS_ENV} must be a whole number of processes (0: decode in the pass's own "
                           f"process), got '{chosen}'.")
        return int(chosen)
    return min(8, len(os.sched_getaffinity(0))) if torch.device(device).type == "cuda" else 0


class _Batches(torch.utils.data.Dataset):
    """Batch k of the pass, decoded and preprocessed (in a DataLoader worker when there are workers)."""

    def __init__(self, load: Callable, batches: list[np.ndarray]):
        self.load, self.batches = load, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        try:
            return self.load(self.batches[k])
        except RBAError as exc:  # handed back as a value: DataLoader would wrap it in a worker's traceback
            return exc


def model_inputs(encoder: Encoder, source: Source, batches: Sequence[np.ndarray],
                 workers: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The model's inputs for each batch of sample indices, in order, decoded and preprocessed ahead of
    the model: by ``workers`` DataLoader processes (default :func:`decode_workers`), which work on the
    CPU only (their tensors move to the encoder's device here), or by one thread. A sample that cannot
    be read raises its :class:`RBAError`. Every loop over samples (the pass, evaluations, the search,
    fold statistics) reads through this."""
    workers = decode_workers(encoder.device) if workers is None else workers
    host = encoder
    if workers > 0 and str(encoder.device) != "cpu":  # a forked worker must not touch the GPU
        host = copy.copy(encoder)
        host.device = "cpu"
    load = lambda batch: host.preprocess(source.items(batch))  # noqa: E731
    for inputs in _prefetched(load, list(batches), workers):
        if isinstance(inputs, RBAError):
            raise inputs
        yield inputs if host is encoder else {k: v.to(encoder.device) for k, v in inputs.items()}


def _prefetched(load: Callable, batches: list[np.ndarray], workers: int) -> Iterator:
    """The loaded batches in order, read ahead of the model: by ``workers`` DataLoader processes, or with
    none by one thread (PIL, numpy and the tokenizers release the GIL)."""
    if workers > 0:
        import multiprocessing

        fork = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # closures need no pickling
        yield from torch.utils.data.DataLoader(_Batches(load, batches), batch_size=None, num_workers=workers,
                                               multiprocessing_context=fork)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0])
        for number in range(len(batches)):
            loaded = pending.result()
            if number + 1 < len(batches):
                pending = pool.submit(load, batches[number + 1])
            yield loaded


@torch.inference_mode()
def run_pass(encoder: Encoder, source: Source, indices: np.ndarray, stats: StatsPlan | None,
             batch_size: int = 32, token_fraction: float = 1.0, progress: Progress | None = None,
             workers: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """One forward pass over ``indices``; returns array groups ``reps`` (pooled (L+1, n, D) and final (n, D)
    vectors) and, with a ``stats`` plan, ``stats`` (its Gram blocks, token sums, Block Influence and the fit
    residuals). ``workers``: decoding processes (default :func:`decode_workers`); they change the speed, never
    the result.

    Under a launcher each rank runs its share of the samples; the statistics are summed and the
    per-sample vectors gathered across ranks (:mod:`rba_core.distributed`), so every rank returns
    what a single process would."""
    here = world()
    # Shares and batches start at multiples of the statistics' sample group, so each group's product
    # sees the same samples however the pass is split (rba_core.measures.stats.SAMPLE_GROUP).
    total, mine = len(indices), here.share(len(indices), SAMPLE_GROUP)
    batch_size = max(SAMPLE_GROUP, batch_size // SAMPLE_GROUP * SAMPLE_GROUP)
    states, d = encoder.num_blocks + 1, encoder.hidden_size
    acc = None if stats is None else StatsAccumulator(states, d, encoder.device, stats.pairs, stats.precision)
    influence = np.zeros(encoder.num_blocks)  # Σ over the statistics' tokens of 1 - cos(hs[k-1], hs[k])
    local = indices[mine]
    n = len(local)
    pooled, final = np.empty((states, n, d), np.float32), np.empty((n, d), np.float32)
    batches = [local[start : start + batch_size] for start in range(0, n, batch_size)]
    if progress:
        progress(0, total)  # the clock of the rate and ETA starts with the pass, not after its first batch
    with here.all_or_none("the pass"):
        start = 0
        for batch, inputs in zip(batches, model_inputs(encoder, source, batches, workers) if batches else ()):
            hs, _ = encoder.hidden_states(inputs)
            mask = encoder.token_mask(inputs)
            stop = start + len(batch)
            pooled[:, start:stop] = torch.stack([encoder.pool(h, mask).to(hs[0]) for h in hs]).float().cpu().numpy()
            final[start:stop] = encoder.final(hs[-1], mask).float().cpu().numpy()
            if acc is not None:
                rows = token_rows(batch, mask, hs[0].shape[1], token_fraction)
                acc.add(hs, None if rows is None else rows.to(hs[0].device))
                flat = [h.reshape(-1, d) for h in hs]
                influence += influence_sums(flat if rows is None else [x[rows.to(x.device)] for x in flat])
            start = stop
            if progress:
                progress(round(stop * total / n), total)  # in units of the whole group's samples
    groups = {"reps": {"pooled": np.moveaxis(here.gather_rows(np.moveaxis(pooled, 1, 0), mine, total), 0, 1),
                       "final": here.gather_rows(final, mine, total)}}
    if acc is not None:
        count = torch.tensor([float(acc.count)], dtype=torch.float64, device=acc.sums.device)
        summed = torch.as_tensor(influence, dtype=torch.float64, device=acc.sums.device)
        here.sum([*acc.upper, *(acc.pairs or {}).values(), acc.sums, count, summed])  # float64: exact to combine
        acc.count = int(count.item())
        result = acc.result()
        groups["stats"] = result.to_arrays()
        groups["stats"]["block_influence"] = summed.cpu().numpy() / max(result.count, 1)
        # Stored once here so that reopening an analysis costs no solves.
        groups["stats"]["fit_residual"] = fit_residual_matrix(result)
    return groups


@dataclass(frozen=True)
class PassOptions:
    """Where and how a pass over samples runs, none of which changes its result: ``max_length`` truncates
    texts (that one does, and is in the key), ``cache``, ``progress``, ``device``, ``batch_size``,
    ``decode_workers`` (processes that decode samples, default :func:`decode_workers`) and ``encoder`` (a loaded
    encoder of the model, or a function that loads one, called only on a cache miss)."""

    max_length: int | None = DEFAULT_MAX_LENGTH
    cache: Cache | None = None
    progress: Progress | None = None
    device: str | None = None
    batch_size: int = 32
    decode_workers: int | None = None
    encoder: Any = None

    @classmethod
    def split(cls, options: dict, asked: dict) -> tuple["PassOptions", dict]:
        """The pass options among keyword ``options``, and the caller's own (``asked``: name -> default);
        any other keyword is a :class:`TypeError`, as Python would say."""
        names = {f.name for f in fields(cls)}
        refuse_unknown(options, names, asked)
        own = {**asked, **{k: v for k, v in options.items() if k in asked}}
        return cls(**{k: v for k, v in options.items() if k in names}), own


#: What a pass keeps, besides :class:`PassOptions` (the keywords of :func:`extract` and their defaults).
EXTRACT_OPTIONS = {"with_stats": True, "token_fraction": 1.0, "stats_window": None, "stats_ranges": (),
                   "stats_budget": None}


def extract(model, dataset, n: int, seed: int = 0, split: str = "train", **options) -> Extraction:
    """Per-block pooled vectors, final representations and (optionally) token statistics, from
    the cache when present; otherwise one streaming pass. A cache hit never loads the model.

    ``model`` is an alias, hub id or folder, or a loaded model (:class:`Encoder` or Hugging Face
    object); ``dataset`` an alias or folder, or a list of samples. ``options``: :class:`PassOptions` (``encoder``
    may be a loaded encoder or a function that loads one, called only on a miss; ``max_length`` truncates texts)
    and what the pass keeps (:data:`EXTRACT_OPTIONS`): token statistics (``with_stats``, of ``token_fraction``
    of the tokens) keep all Gram pairs unless ``stats_window`` (windows of n blocks) or ``stats_ranges`` ask for
    fewer; their size is checked against ``stats_budget`` bytes (default a quarter of the free memory) before
    the pass.
    """
    how, asked = PassOptions.split(options, EXTRACT_OPTIONS)
    with_stats, token_fraction = asked["with_stats"], asked["token_fraction"]
    stats_window, stats_ranges, stats_budget = asked["stats_window"], asked["stats_ranges"], asked["stats_budget"]
    max_length, progress, device, encoder = how.max_length, how.progress, how.device, how.encoder
    cache = how.cache or Cache()
    seen = len(cache.damaged)
    ref = model_ref(model, max_length)
    if ref.info.modality == "text" and not hasattr(dataset, "open_split"):  # windows of a LM text are not truncated
        check_text_length(ref.info, max_length)  # before the dataset is opened
    source, indices = open_sample(dataset, split, n, seed)
    check_modality(ref.info.modality, source, ref.name)
    length = max_length if source.modality == "text" else None
    plan = StatsPlan.of(ref.info.num_blocks + 1, stats_window, stats_ranges)
    pairs = plan.pairs
    dtype = compute_dtype(ref, device or world().device or default_device())
    # An entry with statistics also serves a request without them; the last key is the one stored.
    keys = [extraction_key(ref.fingerprint, source, indices, plan, token_fraction, ref.info.pooling, length, dtype)]
    if not with_stats:
        keys.append(extraction_key(ref.fingerprint, source, indices, None, token_fraction, ref.info.pooling, length,
                                   dtype))

    def lookup() -> Extraction | None:
        for key in keys:
            entry = cache.get(key)
            if entry is None or (with_stats and not entry.has("stats")):
                continue
            reps = cache.load(key, "reps")
            stats = cache.load(key, "stats") if with_stats else None
            if reps is not None and (stats is not None or not with_stats):
                return _extraction(key, True, entry.meta, reps, stats, source, indices, cache.damaged[seen:])
        return None

    def compute(progress: Progress | None) -> Extraction:
        here = world()
        loaded = (ref.loaded or (encoder() if callable(encoder) else encoder)
                  or load_encoder(model, device or here.device, max_length))
        loaded = loaded.with_max_length(length)
        if with_stats:  # before the pass: a plan that does not fit is one sentence, not an out-of-memory crash
            budget = here.from_main(stats_budget or memory_budget(loaded.device))  # every rank decides alike
            check_fits(loaded.num_blocks + 1, loaded.hidden_size, pairs, budget)
        began = time.perf_counter()
        groups = run_pass(loaded, source, indices, plan if with_stats else None, how.batch_size, token_fraction,
                          progress, how.decode_workers)
        meta = {
            "model": ref.name, "source": loaded.source, **loaded.describe(),
            "dataset": source.name, "split": split, "n": n, "seed": seed,
            "num_blocks": loaded.num_blocks, "hidden_size": loaded.hidden_size,
            "num_params": loaded.num_params(),
            "block_params": [loaded.block_params(k) for k in range(1, loaded.num_blocks + 1)],
            "label_names": source.label_names, "token_fraction": token_fraction,
            "stats": None if not with_stats else {
                "kind": "all-pairs" if pairs is None else "windows" if stats_window else "ranges",
                "window": stats_window, "bytes": stats_bytes(loaded.num_blocks + 1, loaded.hidden_size, pairs)},
            "seconds": time.perf_counter() - began, "workers": here.size, "threads": torch.get_num_threads(),
        }
        groups["reps"].update(labels=source.labels[indices], indices=indices.astype(np.int64))
        if here.is_main:  # one writer per group; the other ranks hold the same result in memory
            meta = cache.put(keys[-1], groups, meta).meta
        return _extraction(keys[-1], False, meta, groups["reps"], groups.get("stats"), source,
                           indices, cache.damaged[seen:])

    # One pass per key across threads and processes: a second asker waits, then reads the stored entry.
    # Under a launcher only rank 0 takes the key's lock; the whole group computes or reads together.
    return single_flight(cache, keys[-1], lookup, compute, progress)


def compute_dtype(ref, device: str) -> str:
    """The name of the dtype the model computes in: a loaded model's own, else its family's on ``device``."""
    if ref.loaded is not None:
        dtype = next(ref.loaded.model.parameters()).dtype
    else:
        dtype = adapter_class(ref.info.family).compute_dtype(device)
    return str(dtype).removeprefix("torch.")


def check_modality(modality: str, source: Source, model: str) -> None:
    """One sentence when a text model is given images or an image model texts."""
    if modality != source.modality:
        raise RBAError(modality_mismatch(model, modality, source.name, source.modality))


def _extraction(key, hit, meta, reps, stats, source, indices, notes) -> Extraction:
    token_stats = TokenStats.from_arrays(stats) if stats is not None else None
    return Extraction(key, hit, meta, reps["pooled"], reps["final"], source.labels[indices], indices,
                      token_stats, stats.get("fit_residual") if stats is not None else None, notes,
                      stats.get("block_influence") if stats is not None else None, source)
