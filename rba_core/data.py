"""Open a dataset split as labelled PIL images (hub, parquet folder, image folder, digits) and sample it."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from rba_core.errors import RBAError
from rba_core.hub import require_available
from rba_core.registry import DATA_DIR_ENV, DatasetInfo, dataset_info, local_dataset_dir

SPLITS = ("train", "test")
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "class")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSource:
    """One split of a dataset: labels in memory, images decoded on demand."""

    name: str
    split: str
    labels: np.ndarray  # (N,) int64; -1 where the dataset has no labels
    label_names: list[str]
    fingerprint: dict  # identifies the content, for cache keys
    _load: Callable[[Sequence[int]], list[Image.Image]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        """Decode the images at ``indices`` as RGB (grayscale is converted)."""
        return [im.convert("RGB") for im in self._load([int(i) for i in indices])]


#: What the samples of each split are for, and the setting that chooses how many: errors name them.
SAMPLE_ROLES = {"train": ("samples n (train split)", "samples n"),
                "test": ("evaluation samples (test split)", "the evaluation samples")}


def sample_indices(total: int, n: int, seed: int, split: str | None = None) -> np.ndarray:
    """A seeded random subset of ``n`` distinct indices in ``range(total)``, sorted; ``split`` names the
    samples' role in the error when there are too few images."""
    role, setting = SAMPLE_ROLES.get(split, ("samples", "n"))
    if n <= 0:
        raise RBAError(f"The number of {role} must be positive, got {n}.")
    if n > total:
        raise RBAError(f"Asked for {n} {role} but the {split or 'chosen'} split has only {total} images; "
                       f"lower {setting} to at most {total}.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise RBAError(f"Unknown split '{split}': use one of {', '.join(SPLITS)}.")


def _pick(columns: Sequence[str], preferred: str | None, candidates: Sequence[str]) -> str | None:
    if preferred in columns:
        return preferred
    return next((c for c in candidates if c in columns), None)


def _decode(value: dict | bytes, file: Path, index: int) -> Image.Image:
    """The image in ``value``: sample ``index`` of the split, stored in ``file`` (named if it cannot be decoded)."""
    data = value["bytes"] if isinstance(value, dict) else value
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for bad bytes
        reason = re.sub(r"\s*<[^>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__
        raise RBAError(f"Sample {index} ('{file}') cannot be decoded as an image ({reason}); "
                       "replace or remove that image.") from None
    return image


def _stat_fingerprint(paths: Sequence[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        sha.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return sha.hexdigest()


def _parquet_source(name: str, path: Path, split: str, info: DatasetInfo | None) -> ImageSource:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    columns = schema.names
    image_col = _pick(columns, info and info.image_column, IMAGE_COLUMNS)
    if image_col is None:
        raise RBAError(
            f"Dataset '{name}' has no image column (looked for {', '.join(IMAGE_COLUMNS)}; "
            f"it has {', '.join(columns)}); rename the image column to 'image'."
        )
    label_col = _pick(columns, info and info.label_column, LABEL_COLUMNS)
    try:
        parquet = pq.ParquetFile(path)
        rows = parquet.metadata.num_rows
        labels = parquet.read(columns=[label_col]).column(0).to_numpy() if label_col else None
    except Exception as exc:
        raise RBAError(f"Cannot read '{path}' ({exc}); is it a valid parquet file?") from None
    if rows == 0:
        raise RBAError(f"The {split} split of '{name}' is empty; add images or pick another dataset.")
    label_names: list[str] = []
    if label_col:
        labels = labels.astype(np.int64)
        meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        label_names = meta.get("info", {}).get("features", {}).get(label_col, {}).get("names", [])
        label_names = label_names or [str(v) for v in range(int(labels.max()) + 1)]
    else:
        labels = np.full(rows, -1, dtype=np.int64)
    @lru_cache(maxsize=1)
    def image_column():  # read on first use: a cache hit needs only the labels
        return parquet.read(columns=[image_col]).column(0)

    load = lambda idx: [_decode(image_column()[i].as_py(), path, i) for i in idx]  # noqa: E731
    fingerprint = {"parquet": _stat_fingerprint([path]), "image": image_col, "label": label_col}
    return ImageSource(name, split, labels, label_names, fingerprint, load)


def _parquet_file(folder: Path, split: str) -> Path | None:
    for pattern in (f"{split}.parquet", f"{split}-*.parquet", f"data/{split}-*.parquet"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def _image_folder_source(name: str, folder: Path, split: str) -> ImageSource:
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
        return [_decode(files[i].read_bytes(), files[i], i) for i in idx]

    fingerprint = {"folder": _stat_fingerprint(files)}
    return ImageSource(name, split, np.asarray(labels, np.int64), classes, fingerprint, load)


def _folder_source(name: str, folder: Path, split: str, info: DatasetInfo | None) -> ImageSource:
    parquet = _parquet_file(folder, split)
    if parquet is not None:
        return _parquet_source(name, parquet, split, info)
    if any(folder.glob("*.parquet")):
        raise RBAError(f"'{folder}' has no {split}.parquet; provide train.parquet and test.parquet.")
    return _image_folder_source(name, folder, split)


def _digits_source(split: str) -> ImageSource:
    from rba_core.demo.digits import load_digits_split

    images, labels, names = load_digits_split(split)
    load = lambda idx: [images[i] for i in idx]  # noqa: E731
    return ImageSource("digits", split, labels, names, {"sklearn": "digits", "split": split}, load)


def _hub_source(info: DatasetInfo, split: str) -> ImageSource:
    require_available(datasets=[info.alias])  # offline and not cached: one sentence at once, no retries
    try:
        import datasets

        dataset = datasets.load_dataset(info.hub_id, split=split)
    except Exception as exc:  # network, missing repo, auth: all need the same advice
        raise RBAError(
            f"Dataset '{info.alias}' ({info.hub_id}) cannot be loaded from the hub ({exc.__class__.__name__}); "
            f"connect to the internet, or set {DATA_DIR_ENV} to a folder with a local copy "
            f"({info.local_name}/train.parquet, {info.local_name}/test.parquet)."
        ) from None
    labels = np.asarray(dataset[info.label_column], np.int64)
    names = list(getattr(dataset.features[info.label_column], "names", None) or [])
    load = lambda idx: list(dataset.select(idx)[info.image_column])  # noqa: E731
    fingerprint = {"hub": info.hub_id, "fingerprint": dataset._fingerprint}
    return ImageSource(info.alias, split, labels, names, fingerprint, load)


def open_dataset(name: str, split: str = "train") -> ImageSource:
    """Open a dataset alias (local copy under ``$RBA_DATA_DIR`` first, then the hub) or folder."""
    _check_split(split)
    info = dataset_info(name)
    if info is not None:
        if info.hub_id == "sklearn:digits":
            return _digits_source(split)
        local = local_dataset_dir(info)
        if local is not None:
            return _folder_source(info.alias, local, split, info)
        return _hub_source(info, split)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _folder_source(str(folder), folder, split, None)
    if name.strip().startswith((".", "/", "~")) or "/" in name:
        raise RBAError(f"The dataset folder '{folder}' does not exist; check the path, or pick a listed dataset.")
    raise RBAError(
        f"Unknown dataset '{name}': use an alias (MNIST, Fashion-MNIST, CIFAR-10, "
        "CIFAR-100-coarse, CIFAR-100-fine, digits) or a folder of parquet files or class folders."
    )
