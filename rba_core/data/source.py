"""One split of a dataset as a :class:`Source` (labels in memory, samples read on demand), seeded samples of it,
and what every reader of samples shares: split names, column choices, image decoding, labels, file fingerprints.
The readers (:mod:`rba_core.data`, :mod:`rba_core.data.streaming`, :mod:`rba_core.data.lm_data`) build on it."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from rba_core.errors import RBAError

SPLITS = ("train", "test")
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "class")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Text columns, in order of preference: one text, or a pair read as (text_a, text_b).
TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (("text",), ("sentence",), ("text_a", "text_b"),
                                             ("premise", "hypothesis"), ("sentence1", "sentence2"))
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
#: WebDataset shards (rba_core.data.tar_shards): ``train-000000.tar`` ..., or a pattern ``shards-{000000..000009}.tar``.
SHARD_SUFFIX = ".tar"
UNITS = {"image": "images", "text": "texts"}
#: Row groups of a parquet file's image column held in memory at once: the pass reads sorted
#: samples, so memory holds a few row groups, never the whole column.
ROW_GROUPS_HELD = 4


@dataclass
class Source:
    """One split of a dataset: labels in memory, samples (PIL images or texts) read on demand.

    A text sample is a string, or a (text_a, text_b) pair for pair datasets such as MNLI.
    """

    name: str
    split: str
    labels: np.ndarray  # (N,) int64; -1 where the dataset has no labels
    label_names: list[str]
    fingerprint: dict  # identifies the content, for cache keys
    _load: Callable[[Sequence[int]], list] = field(repr=False)
    modality: str = "image"  # "image" or "text"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def unit(self) -> str:
        """What one sample is called in messages: "images" or "texts"."""
        return UNITS[self.modality]

    def items(self, indices: Sequence[int]) -> list:
        """The samples at ``indices``: RGB images (grayscale is converted), texts, or windows of
        token ids (int64 arrays, :mod:`rba_core.data.lm_data`)."""
        loaded = self._load([int(i) for i in indices])
        if self.modality == "image":
            return [im.convert("RGB") for im in loaded]
        if loaded and isinstance(loaded[0], np.ndarray):
            return loaded
        for index, text in zip(indices, loaded):
            parts = text if isinstance(text, tuple) else (text,)
            if any(not isinstance(p, str) or not p.strip() for p in parts):
                raise RBAError(f"Sample {int(index)} of the {self.split} split of '{self.name}' has an empty "
                               "text; remove empty rows from the dataset.")
        return loaded


#: What the samples of each split are for, and the setting that chooses how many: errors name them.
SAMPLE_ROLES = {"train": ("samples n (train split)", "samples n"),
                "test": ("evaluation samples (test split)", "the evaluation samples")}


def sample_indices(total: int, n: int, seed: int, split: str | None = None, unit: str = "samples") -> np.ndarray:
    """A seeded random subset of ``n`` distinct indices in ``range(total)``, sorted; ``split`` names the
    samples' role and ``unit`` what they are ("images", "texts") in the error when there are too few."""
    role, setting = SAMPLE_ROLES.get(split, ("samples", "n"))
    if n <= 0:
        raise RBAError(f"The number of {role} must be positive, got {n}.")
    if n > total:
        raise RBAError(f"Asked for {n} {role} but the {split or 'chosen'} split has only {total} {unit}; "
                       f"lower {setting} to at most {total}.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise RBAError(f"Unknown split '{split}': use one of {', '.join(SPLITS)}.")


def pick_column(columns: Sequence[str], preferred: str | None, candidates: Sequence[str]) -> str | None:
    if preferred in columns:
        return preferred
    return next((c for c in candidates if c in columns), None)


def decode_image(value: dict | bytes, file: Path, index: int) -> Image.Image:
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


def stat_fingerprint(paths: Sequence[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        sha.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return sha.hexdigest()


def text_columns(columns: Sequence[str], preferred: tuple[str, ...] | None) -> tuple[str, ...] | None:
    for candidate in ((preferred,) if preferred else ()) + TEXT_COLUMNS:
        if all(c in columns for c in candidate):
            return candidate
    return None


def label_array(name: str, split: str, rows: int, values, names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Labels as int64 (-1 where unlabelled) and their names (class indices when unnamed)."""
    if rows == 0:
        raise RBAError(f"The {split} split of '{name}' is empty; add samples or pick another dataset.")
    if values is None:
        return np.full(rows, -1, dtype=np.int64), []
    labels = np.asarray(values).astype(np.int64)
    return labels, list(names or []) or [str(v) for v in range(int(labels.max()) + 1)]


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of one split: ``train.parquet``, or its shards (``train-00000-of-00042.parquet`` ...,
    ``data/train-*.parquet``, ``train/*.parquet``), or the same in CSV or JSON Lines; empty when none."""
    for suffix in (*TABLE_SUFFIXES, SHARD_SUFFIX):
        for pattern in (f"{split}{suffix}", f"{split}-*{suffix}", f"data/{split}-*{suffix}", f"{split}/*{suffix}"):
            found = sorted(folder.glob(pattern))
            if found:
                return found
    return []


def no_columns(name: str, columns: Sequence[str]) -> RBAError:
    return RBAError(
        f"Dataset '{name}' has no image or text column (looked for {', '.join(IMAGE_COLUMNS)} and "
        f"{', '.join('/'.join(c) for c in TEXT_COLUMNS)}; it has {', '.join(columns)}); rename the column "
        "to 'image' or 'text'.")
