"""Open a dataset split as labelled samples, images or texts (hub, parquet/CSV/JSONL folder, image folder,
digits), and sample it."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from rba_core.errors import RBAError
from rba_core.hub import require_available
from rba_core.registry import (DATA_DIR_ENV, DATASET_ALIASES, DatasetInfo, dataset_info, is_stream, local_dataset_dir,
                               stream_spec, stream_target)
from rba_core.data.source import (no_columns, IMAGE_COLUMNS, IMAGE_SUFFIXES, LABEL_COLUMNS, ROW_GROUPS_HELD, SHARD_SUFFIX, SPLITS, Source, TABLE_SUFFIXES, UNITS, check_split, decode_image, label_array, pick_column, sample_indices, split_files, stat_fingerprint, text_columns)

def _text_source(name: str, split: str, table, text_cols: tuple[str, ...], label_col: str | None,
                 names: list[str] | None, fingerprint: dict) -> Source:
    """A text split held in memory (texts are small): one column, or a pair of columns."""
    columns = [table.column(c).to_pylist() for c in text_cols]
    texts = columns[0] if len(columns) == 1 else list(zip(*columns))
    labels, label_names = label_array(name, split, len(texts), None if label_col is None else
                                  table.column(label_col).to_numpy(zero_copy_only=False), names)
    load = lambda idx: [texts[i] for i in idx]  # noqa: E731
    fingerprint = {**fingerprint, "text": list(text_cols), "label": label_col}
    return Source(name, split, labels, label_names, fingerprint, load, "text")


def _table_source(name: str, paths: Sequence[Path], split: str, info: DatasetInfo | None) -> Source:
    """CSV or JSONL files of texts (tables of images come as parquet), shards read one after the other."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    tables = []
    for path in paths:
        try:
            tables.append(pcsv.read_csv(path) if path.suffix == ".csv" else pjson.read_json(path))
        except Exception as exc:
            raise RBAError(f"Cannot read '{path}' ({exc.__class__.__name__}); is it valid "
                           f"{'CSV' if path.suffix == '.csv' else 'JSON Lines'}?") from None
    table = _concat(tables, paths)
    text_cols = text_columns(table.column_names, info and info.text_columns)
    if text_cols is None:
        raise no_columns(name, table.column_names)
    label_col = pick_column(table.column_names, info and info.label_column, LABEL_COLUMNS)
    return _text_source(name, split, table, text_cols, label_col, None, {"table": stat_fingerprint(paths)})


def _concat(tables: list, paths: Sequence[Path]):
    """One table from the shards' tables, which must have the same columns (numeric types may widen)."""
    import pyarrow as pa

    for path, table in zip(paths, tables):
        if set(table.column_names) != set(tables[0].column_names):
            raise RBAError(f"The shard '{path}' has columns {', '.join(table.column_names)} but '{paths[0].name}' has "
                           f"{', '.join(tables[0].column_names)}; give every shard of a split the same columns.")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise RBAError(f"The shards of '{paths[0].parent}' store a column with different types; write every "
                       "shard of a split with the same schema.") from None


def _parquet_source(name: str, paths: Sequence[Path], split: str, info: DatasetInfo | None) -> Source:
    """Parquet shards of one split (``train.parquet``, or ``train-00000-of-00042.parquet`` ...), read as
    one table in file order. Only the footers and the label column are read up front; images are read
    one row group at a time when a sample needs them, so a dataset far larger than memory works."""
    import pyarrow.parquet as pq

    def unreadable(path: Path, exc: Exception) -> RBAError:
        return RBAError(f"Cannot read '{path}' ({exc}); is it a valid parquet file?")

    metas = []
    for path in paths:
        try:
            metas.append(pq.read_metadata(path))
        except Exception as exc:
            raise unreadable(path, exc) from None
    schema = metas[0].schema.to_arrow_schema()
    columns = schema.names
    label_col = pick_column(columns, info and info.label_column, LABEL_COLUMNS)
    hf = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
    names = hf.get("info", {}).get("features", {}).get(label_col, {}).get("names") if label_col else None
    image_col = pick_column(columns, info and info.image_column, IMAGE_COLUMNS)
    text_cols = text_columns(columns, info and info.text_columns)
    if image_col is None and text_cols is None:
        raise no_columns(name, columns)
    wanted = list(text_cols or (image_col,)) + ([label_col] if label_col else [])
    for path, meta in zip(paths, metas):
        missing = set(wanted) - set(meta.schema.to_arrow_schema().names)
        if missing:
            raise RBAError(f"The parquet shard '{path}' lacks column(s) {', '.join(sorted(missing))} that "
                           f"'{paths[0].name}' has; give every shard of a split the same columns.")
    fingerprint = {"parquet": stat_fingerprint(paths)}
    if image_col is None:
        tables = []
        for path in paths:
            try:
                tables.append(pq.read_table(path, columns=wanted))
            except Exception as exc:
                raise unreadable(path, exc) from None
        return _text_source(name, split, _concat(tables, paths), text_cols, label_col, names, fingerprint)
    values = []
    for path, meta in zip(paths, metas):
        if label_col:
            try:
                values.append(pq.ParquetFile(path, metadata=meta).read(columns=[label_col]).column(0).to_numpy())
            except Exception as exc:
                raise unreadable(path, exc) from None
    labels, label_names = label_array(name, split, sum(m.num_rows for m in metas),
                                  np.concatenate(values) if label_col else None, names)
    # Every row group of every shard, in order, and the index of its first row.
    groups = [(f, g) for f, meta in enumerate(metas) for g in range(meta.num_row_groups)]
    starts = np.cumsum([0] + [metas[f].row_group(g).num_rows for f, g in groups])

    @lru_cache(maxsize=ROW_GROUPS_HELD)
    def row_group(number: int):  # read on first use (a cache hit needs only the labels), one at a time
        f, g = groups[number]
        try:
            return pq.ParquetFile(paths[f], metadata=metas[f]).read_row_group(g, columns=[image_col]).column(0)
        except Exception as exc:
            raise unreadable(paths[f], exc) from None

    def load(idx: Sequence[int]) -> list[Image.Image]:
        numbers = np.searchsorted(starts, idx, side="right") - 1
        return [decode_image(row_group(int(g))[int(i - starts[g])].as_py(), paths[groups[g][0]], i)
                for i, g in zip(idx, numbers)]

    return Source(name, split, labels, label_names, {**fingerprint, "image": image_col, "label": label_col}, load)


def _image_folder_source(name: str, folder: Path, split: str) -> Source:
    """Class-per-sub-folder images; ``train/`` and ``test/`` sub-folders are used when present,
    otherwise a fixed hash split sends one file in five to ``test``."""
    root = folder / split if (folder / split).is_dir() else folder
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in SPLITS)
    files, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if root is folder:
                bucket = int(hashlib.sha1(f"{cls}/{path.name}".encode()).hexdigest(), 16) % 5
                if (bucket == 0) != (split == "test"):
                    continue
            files.append(path)
            labels.append(label)
    if not files:
        raise RBAError(
            f"No images found for the {split} split of '{folder}': use one sub-folder of images "
            "per class, or a folder with train.parquet and test.parquet."
        )

    def load(idx: Sequence[int]) -> list[Image.Image]:
        return [decode_image(files[i].read_bytes(), files[i], i) for i in idx]

    fingerprint = {"folder": stat_fingerprint(files)}
    return Source(name, split, np.asarray(labels, np.int64), classes, fingerprint, load)


def _folder_source(name: str, folder: Path, split: str, info: DatasetInfo | None) -> Source:
    tables = split_files(folder, split)
    if tables:
        read = {".parquet": _parquet_source, SHARD_SUFFIX: _shards_source}.get(tables[0].suffix, _table_source)
        return read(name, tables, split, info)
    shards = sorted(folder.glob(f"*{SHARD_SUFFIX}"))
    if shards:  # shards not named by split: one sample in five (by key) is in the test split
        return _shards_source(name, shards, split, info, by_key=True)
    if any(next(folder.glob(f"*{suffix}"), None) for suffix in TABLE_SUFFIXES):
        raise RBAError(f"'{folder}' has no {split} file; provide {split}.parquet (or .csv, .jsonl) next to the "
                       "other split.")
    return _image_folder_source(name, folder, split)


def _shards_source(name: str, paths: Sequence[Path], split: str, info: DatasetInfo | None,
                   by_key: bool = False) -> Source:
    """WebDataset tar shards of one split (``by_key``: the shards hold both splits, told apart by key)."""
    from rba_core.data.tar_shards import read_member, shard_samples

    chosen, modality = shard_samples(paths, split if by_key else None)
    values = [sample["label"] for _, sample in chosen]
    labels, names = label_array(name, split, len(chosen), values if any(v >= 0 for v in values) else None, None)

    def load(idx: Sequence[int]) -> list:
        out = []
        for i in idx:
            number, sample = chosen[i]
            data = read_member(paths[number], sample, modality)
            out.append(decode_image(data, paths[number], i) if modality == "image" else data.decode("utf-8"))
        return out

    fingerprint = {"shards": stat_fingerprint(paths), "by_key": by_key}
    return Source(name, split, labels, names, fingerprint, load, modality)


def _shard_pattern(name: str, split: str) -> list[Path]:
    """The shards a pattern names (``{000000..000009}`` ranges; ``{split}`` becomes the split), all present."""
    from rba_core.data.tar_shards import expand_braces

    paths = [Path(p).expanduser() for p in expand_braces(name.replace("{split}", split))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise RBAError(f"The shard '{missing[0]}' named by '{name}' does not exist"
                       f"{f' (nor {len(missing) - 1} others)' if len(missing) > 1 else ''}; check the pattern.")
    return paths


def _digits_source(split: str) -> Source:
    from rba_core.demo.digits import load_digits_split

    images, labels, names = load_digits_split(split)
    load = lambda idx: [images[i] for i in idx]  # noqa: E731
    return Source("digits", split, labels, names, {"sklearn": "digits", "split": split}, load)


def _hub_source(info: DatasetInfo, split: str) -> Source:
    require_available(datasets=[info.alias])  # offline and not cached: one sentence at once, no retries
    try:
        import datasets

        dataset = datasets.load_dataset(info.hub_id, info.hub_config, split=info.hub_split(split))
    except Exception as exc:  # network, missing repo, auth: all need the same advice
        raise RBAError(
            f"Dataset '{info.alias}' ({info.hub_id}) cannot be loaded from the hub ({exc.__class__.__name__}); "
            f"connect to the internet, or set {DATA_DIR_ENV} to a folder with a local copy "
            f"({info.local_name}/train.parquet, {info.local_name}/test.parquet)."
        ) from None
    names = list(getattr(dataset.features[info.label_column], "names", None) or [])
    fingerprint = {"hub": info.hub_id, "fingerprint": dataset._fingerprint}
    if info.modality == "text":
        return _text_source(info.alias, split, dataset.with_format("arrow")[:], info.text_columns,
                            info.label_column, names, fingerprint)
    labels = np.asarray(dataset[info.label_column], np.int64)
    load = lambda idx: list(dataset.select(idx)[info.image_column])  # noqa: E731
    return Source(info.alias, split, labels, names, fingerprint, load)


def _in_memory_source(samples: Sequence, split: str) -> Source:
    """A list of samples (PIL images or texts), or of (sample, label) pairs, as both splits."""
    import xxhash

    if not len(samples):
        raise RBAError("The list of samples is empty; pass at least one image or text.")
    labelled = isinstance(samples[0], tuple) and len(samples[0]) == 2 and isinstance(samples[0][1], (int, np.integer))
    items = [s[0] for s in samples] if labelled else list(samples)
    labels = np.asarray([s[1] for s in samples] if labelled else [-1] * len(items), np.int64)
    modality = "text" if isinstance(items[0], (str, tuple)) else "image"
    digest = xxhash.xxh3_128()
    for item in items:
        digest.update(repr(item).encode() if modality == "text" else item.tobytes())
    digest.update(labels.tobytes())
    names = [str(v) for v in range(int(labels.max()) + 1)] if labelled else []
    load = lambda idx: [items[i] for i in idx]  # noqa: E731
    return Source(f"in-memory ({len(items)} {UNITS[modality]})", split, labels, names,
                  {"memory": digest.hexdigest()}, load, modality)


def dataset_unit(dataset) -> str:
    """What a dataset's samples are called ("images", "texts", or "windows" of a language-model text):
    from the registry for an alias,
    else from the data itself (a folder's labels and columns are read, no image is decoded)."""
    from rba_core.data.lm_data import is_lm_text
    if is_lm_text(dataset):
        return "windows"  # a language-model text: token windows of the model's tokenizer
    if is_stream(dataset):  # not opened here: that would read the stream
        info = dataset_info(stream_target(dataset))
        return UNITS[info.modality] if info else "samples"
    info = dataset_info(dataset) if isinstance(dataset, str) else None
    return UNITS[info.modality] if info else open_dataset(dataset, "train").unit


def open_sample(name, split: str, n: int, seed: int) -> tuple[Source, np.ndarray]:
    """The split and the seeded sample of ``n`` indices in it; a ``stream:`` dataset is read only as far as
    its sample (:mod:`rba_core.data.streaming`)."""
    from rba_core.data.streaming import stream_sample

    check_split(split)
    stream = stream_spec(name)
    if stream:
        return stream_sample(stream, split, n, seed)
    source = open_dataset(name, split)
    return source, sample_indices(len(source), n, seed, split, source.unit)


def open_dataset(name, split: str = "train") -> Source:
    """Open a dataset alias (local copy under ``$RBA_DATA_DIR`` first, then the hub) or folder;
    a list of samples (or of (sample, label) pairs) serves as both splits."""
    check_split(split)
    if hasattr(name, "open_split"):  # language-model windows (rba_core.data.lm_data.LMText)
        return name.open_split(split)
    if not isinstance(name, str):
        return _in_memory_source(name, split)
    if stream_spec(name):
        raise RBAError(f"'{name}' is read as a stream, a sample at a time; ask for a sample of it (analyze, "
                       "approximate, search) rather than the whole split.")
    info = dataset_info(name)
    if info is not None:
        if info.hub_id == "sklearn:digits":
            return _digits_source(split)
        local = local_dataset_dir(info)
        if local is not None:
            return _folder_source(info.alias, local, split, info)
        if info.hub_id is None:
            raise RBAError(f"Dataset '{info.alias}' has no hub copy: set {DATA_DIR_ENV} to a folder holding "
                           f"{info.local_name}/train.parquet and {info.local_name}/test.parquet.")
        return _hub_source(info, split)
    if name.strip().endswith(SHARD_SUFFIX):  # one shard, or a pattern of shards
        shards = _shard_pattern(name.strip(), split)
        return _shards_source(name, shards, split, None, by_key="{split}" not in name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _folder_source(str(folder), folder, split, None)
    if name.strip().startswith((".", "/", "~")) or "/" in name:
        raise RBAError(f"The dataset folder '{folder}' does not exist; check the path, or pick a listed dataset.")
    raise RBAError(
        f"Unknown dataset '{name}': use an alias ({', '.join(DATASET_ALIASES)}) or a folder of parquet, "
        "CSV or JSONL files or of class folders."
    )
