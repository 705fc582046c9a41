"""The streaming pass: run the encoder once over sampled images and cache what every view needs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from rba_core.approx import fit_residual_matrix
from rba_core.cache import Cache, make_key
from rba_core.data import ImageSource, open_dataset, sample_indices
from rba_core.models import Encoder, load_encoder, model_fingerprint
from rba_core.progress import Progress
from rba_core.stats import StatsAccumulator, TokenStats


@dataclass
class Extraction:
    """Cached result of one pass. ``cls``: (L+1, N, D) CLS of every block output; ``final``: (N, D)."""

    key: str
    hit: bool
    meta: dict
    cls: np.ndarray
    final: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    token_stats: TokenStats | None = field(repr=False)
    fit_residual: np.ndarray | None = None  # (L+1, L+1), stored with the statistics
    notes: list[str] = field(default_factory=list)  # e.g. a damaged cache entry recomputed

    @property
    def num_blocks(self) -> int:
        return self.cls.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.cls.shape[2]

    @property
    def label_names(self) -> list[str]:
        return self.meta["label_names"]

    def stats(self) -> TokenStats:
        """The token statistics; only extractions made ``with_stats`` have them."""
        if self.token_stats is None:
            raise ValueError(f"extraction {self.key[:12]} was made without token statistics")
        return self.token_stats


def extraction_key(model: str, source: ImageSource, indices: np.ndarray, with_stats: bool,
                   token_fraction: float) -> str:
    """Cache key: every input that changes the stored arrays (not the batch size or device)."""

    return make_key({
        "kind": "extraction",
        "model": model_fingerprint(model),
        "dataset": source.fingerprint,
        "split": source.split,
        "indices": indices.tolist(),
        "stats": with_stats,
        "token_fraction": token_fraction if with_stats else None,
        "dtype": "float32",
    })


def _token_rows(batch: int, tokens: int, fraction: float, gen: torch.Generator) -> torch.Tensor | None:
    """Random patch tokens kept for the statistics (CLS always kept); None keeps all."""
    if fraction >= 1.0:
        return None
    keep = max(1, round((tokens - 1) * fraction))
    rows = [torch.zeros(1, dtype=torch.long)]
    rows += [1 + torch.randperm(tokens - 1, generator=gen)[:keep]]
    per_image = torch.cat(rows)
    return (torch.arange(batch)[:, None] * tokens + per_image[None, :]).flatten()


@torch.inference_mode()
def run_pass(encoder: Encoder, source: ImageSource, indices: np.ndarray, with_stats: bool,
             batch_size: int = 32, token_fraction: float = 1.0,
             progress: Progress | None = None) -> dict[str, dict[str, np.ndarray]]:
    """One forward pass over ``indices``; returns array groups ``reps`` and (optionally) ``stats``."""
    n, states, d = len(indices), encoder.num_blocks + 1, encoder.hidden_size
    cls = np.empty((states, n, d), np.float32)
    final = np.empty((n, d), np.float32)
    acc = StatsAccumulator(states, d, encoder.device) if with_stats else None
    gen = torch.Generator().manual_seed(0)
    batches = [indices[start : start + batch_size] for start in range(0, n, batch_size)]
    load = lambda batch: encoder.preprocess(source.images(batch))  # noqa: E731
    # Decode and preprocess the next batch in a thread while the model runs (PIL and numpy
    # release the GIL), so image handling stays off the critical path.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0])
        for number, batch in enumerate(batches):
            pixels = pending.result()
            if number + 1 < len(batches):
                pending = pool.submit(load, batches[number + 1])
            stop = number * batch_size + len(batch)
            _forward_batch(encoder, pixels, stop - len(batch), cls, final, acc, token_fraction, gen)
            if progress:
                progress(stop, n)
    groups = {"reps": {"cls": cls, "final": final}}
    if acc is not None:
        stats = acc.result()
        groups["stats"] = stats.to_arrays()
        # Stored once here so that reopening an analysis costs no solves.
        groups["stats"]["fit_residual"] = fit_residual_matrix(stats)
    return groups


def _forward_batch(encoder: Encoder, pixels: torch.Tensor, start: int, cls: np.ndarray, final: np.ndarray,
                   acc: StatsAccumulator | None, token_fraction: float, gen: torch.Generator) -> None:
    """Run one batch through every block, store its CLS rows and add it to the statistics."""
    stop = start + len(pixels)
    hidden = encoder.embed(pixels)
    hs = [hidden]
    for k in range(1, encoder.num_blocks + 1):
        hs.append(encoder.run_blocks(hs[-1], k, k))
    cls[:, start:stop] = torch.stack([h[:, 0] for h in hs]).cpu().numpy()
    final[start:stop] = encoder.final_cls(hs[-1]).cpu().numpy()
    if acc is not None:
        b, t, _ = hidden.shape
        rows = _token_rows(b, t, token_fraction, gen)
        acc.add(hs, None if rows is None else rows.to(hidden.device))


def extract(model: str, dataset: str, n: int, seed: int = 0, split: str = "train", *,
            with_stats: bool = True, token_fraction: float = 1.0, batch_size: int = 32,
            cache: Cache | None = None, progress: Progress | None = None,
            device: str | None = None,
            encoder: Encoder | Callable[[], Encoder] | None = None) -> Extraction:
    """Per-block CLS, final representations and (optionally) token statistics, from the cache
    when present; otherwise one streaming pass. A cache hit never loads the model.

    ``encoder`` may be a loaded encoder or a function that loads one (called only on a miss).
    """
    cache = cache or Cache()
    seen = len(cache.damaged)
    source = open_dataset(dataset, split)
    indices = sample_indices(len(source), n, seed, split)
    # An entry with statistics also serves a request without them; the last key is the one stored.
    keys = [extraction_key(model, source, indices, True, token_fraction)]
    if not with_stats:
        keys.append(extraction_key(model, source, indices, False, token_fraction))

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
        loaded = encoder() if callable(encoder) else encoder or load_encoder(model, device)
        began = time.perf_counter()
        groups = run_pass(loaded, source, indices, with_stats, batch_size, token_fraction, progress)
        meta = {
            "model": model, "source": loaded.source, "family": loaded.family,
            "dataset": dataset, "split": split, "n": n, "seed": seed,
            "num_blocks": loaded.num_blocks, "hidden_size": loaded.hidden_size,
            "num_params": loaded.num_params(),
            "block_params": [loaded.block_params(k) for k in range(1, loaded.num_blocks + 1)],
            "label_names": source.label_names, "token_fraction": token_fraction,
            "seconds": time.perf_counter() - began,
        }
        groups["reps"].update(labels=source.labels[indices], indices=indices.astype(np.int64))
        entry = cache.put(keys[-1], groups, meta)
        return _extraction(keys[-1], False, entry.meta, groups["reps"], groups.get("stats"), source,
                           indices, cache.damaged[seen:])

    # One pass per key across threads and processes: a second asker waits, then reads the stored entry.
    return cache.single_flight(keys[-1], lookup, compute, progress)


def _extraction(key, hit, meta, reps, stats, source, indices, notes) -> Extraction:
    token_stats = TokenStats.from_arrays(stats) if stats is not None else None
    return Extraction(key, hit, meta, reps["cls"], reps["final"], source.labels[indices], indices,
                      token_stats, stats.get("fit_residual") if stats is not None else None, notes)
