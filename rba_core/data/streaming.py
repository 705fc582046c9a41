"""Datasets read as a stream (``stream:`` before an alias, hub id or local parquet folder): nothing is
downloaded to disk, and only the samples drawn are kept.

The sample of n is the first n samples of the stream after a seeded shuffle buffer
(``IterableDataset.shuffle(seed, buffer_size)``, which also shuffles the order of the shards), so it is
reproducible for the same seed, n and shards; a hub dataset is read at the commit the hub names now,
which is in the fingerprint. The buffer reads about ``BUFFER_SIZE`` + n encoded samples before the
first comes out; the n drawn are kept in memory, encoded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from rba_core.errors import RBAError
from rba_core.registry import STREAM_PREFIX as PREFIX, stream_target
from rba_core.data.source import (IMAGE_COLUMNS, LABEL_COLUMNS, Source, decode_image, label_array, no_columns, pick_column,
                               text_columns, sample_indices, split_files, stat_fingerprint)

#: Samples held by the shuffle buffer: a sample is drawn among the next this many of the stream.
BUFFER_SIZE = 10_000
#: Shards read at once into the buffer (the library's default). Mixing shards costs a fixed 5 s at the end
#: of each draw (``datasets`` waits for its reader threads); 1 reads shard after shard, with no wait.
INPUT_SHARDS = 10


def _open(target: str, split: str):
    """(IterableDataset, registry entry or None, fingerprint of what is streamed)."""
    import datasets

    from rba_core.registry import dataset_info

    folder = Path(target).expanduser()
    if folder.is_dir():
        files = [p for p in split_files(folder, split) if p.suffix == ".parquet"]
        if not files:
            raise RBAError(f"'{folder}' has no {split} parquet files to stream; provide {split}.parquet or "
                           f"{split}-00000-of-000NN.parquet shards.")
        dataset = datasets.load_dataset("parquet", data_files={split: [str(p) for p in files]}, split=split,
                                        streaming=True)
        return dataset, None, {"files": stat_fingerprint(files)}
    info = dataset_info(target)
    hub_id = info.hub_id if info else target
    if info is not None and (hub_id is None or hub_id.startswith("sklearn:")):
        raise RBAError(f"Dataset '{info.alias}' cannot be streamed (it has no hub copy); drop the '{PREFIX}' prefix.")
    config = info.hub_config if info else None
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(hub_id).sha  # in the key: a new revision is another sample
        if info is not None:
            hub_split = info.hub_split(split)
        elif split == "test":  # an unregistered dataset evaluates on its test split, else its validation split
            names = datasets.get_dataset_split_names(hub_id, config, revision=revision)
            hub_split = "test" if "test" in names else "validation"
        else:
            hub_split = split
        dataset = datasets.load_dataset(hub_id, config, split=hub_split, streaming=True, revision=revision)
    except Exception as exc:  # offline, missing repo, gated: the same advice
        raise RBAError(f"Dataset '{hub_id}' cannot be streamed from the hub ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); connect to the internet "
                       "and log in for gated datasets, or give a local folder.") from None
    return dataset, info, {"hub": hub_id, "config": config, "split": hub_split, "revision": revision}


@lru_cache(maxsize=4)  # the fit and evaluation samples of one request, drawn once per process
def stream_source(name: str, split: str, n: int, seed: int):
    """The first ``n`` samples of the seeded shuffled stream of ``name``'s ``split``, as a :class:`Source`
    of ``n`` samples (encoded images or texts in memory), and fingerprinted by what was asked."""
    import datasets


    sample_indices(n, n, seed, split)  # a non-positive n: the usual sentence
    target = stream_target(name)
    dataset, info, fingerprint = _open(target, split)
    features = dataset.features
    columns = list(features) if features else list(next(iter(dataset)))
    image_col = pick_column(columns, info and info.image_column, IMAGE_COLUMNS)
    text_cols = None if image_col else text_columns(columns, info and info.text_columns)
    if image_col is None and text_cols is None:
        raise no_columns(name, columns)
    label_col = pick_column(columns, info and info.label_column, LABEL_COLUMNS)
    dataset = dataset.select_columns([c for c in (image_col, *(text_cols or ()), label_col) if c])
    if image_col and features and isinstance(features[image_col], datasets.Image):
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))  # keep the bytes; decode in the pass
    rows = []
    for row in dataset.shuffle(seed=seed, buffer_size=BUFFER_SIZE, max_buffer_input_shards=INPUT_SHARDS):
        rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise RBAError(f"Asked for {n} samples but the {split} stream of '{target}' ended after {len(rows)}; "
                       f"lower n to at most {len(rows)}.")
    names = list(getattr(features[label_col], "names", None) or []) if features and label_col else None
    labels, label_names = label_array(name, split, n, [r[label_col] for r in rows] if label_col else None, names)
    fingerprint = {"stream": fingerprint, "seed": seed, "n": n, "buffer": [BUFFER_SIZE, INPUT_SHARDS],
                   "columns": [image_col] if image_col else list(text_cols), "label": label_col}
    if image_col:
        images = [r[image_col] for r in rows]
        load = lambda idx: [decode_image(images[i], Path(target), i) for i in idx]  # noqa: E731
        return Source(name, split, labels, label_names, fingerprint, load)
    texts = [r[text_cols[0]] if len(text_cols) == 1 else tuple(r[c] for c in text_cols) for r in rows]
    return Source(name, split, labels, label_names, fingerprint, lambda idx: [texts[i] for i in idx], "text")


def stream_sample(name: str, split: str, n: int, seed: int):
    """(source, indices): the drawn samples are the whole source, in stream order."""
    return stream_source(name.strip(), split, int(n), int(seed)), np.arange(n)
