"""WebDataset shards: tar files whose members ``<key>.<ext>`` group into samples (``0001.jpg`` +
``0001.cls``), read with the standard library's :mod:`tarfile`.

Each shard is indexed once (every sample's member offsets and its label), and the index is kept in
``.index/`` of the default cache folder (``$RBA_CACHE_DIR`` or ``cache/``), keyed by the shard's path, size and modification time; a sample is then
read by seeking to its offset, so a seeded sample touches only the shards that hold it.

Samples: the first of ``.jpg .jpeg .png .webp`` (an image) or else ``.txt`` (a text); labels: ``.cls``
(an integer), or ``.json`` with ``label`` or ``cls``; -1 when a sample has neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Sequence

from rba_core.errors import RBAError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
INDEX_FORMAT = 1
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shards-{000000..000009}.tar`` -> the ten names, zero-padded as written (several ranges multiply)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.groups()
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for k in range(int(first), int(last) + 1) for name in expand_braces(f"{head}{k:0{width}d}{tail}")]


def _split_of(key: str) -> str:
    """The fixed split of a sample in shards not named by split: one key in five goes to ``test``."""
    return "test" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 == 0 else "train"


def index_shard(path: Path) -> list[dict]:
    """Every sample of one shard, in order: ``{"key", "members": {ext: [offset, size]}, "label"}``,
    from the on-disk index when the shard is unchanged, else by reading its headers once."""
    from rba_core.cache import cache_root

    stat = path.stat()
    fingerprint = hashlib.sha256(f"{INDEX_FORMAT}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    stored = cache_root() / ".index" / f"{fingerprint.hexdigest()}.json"
    try:
        return json.loads(stored.read_text())
    except (OSError, ValueError):
        pass
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: members are read by their offsets
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")  # WebDataset: the key ends at the basename's first dot
                key = f"{folder}/{key}" if folder else key
                sample = samples.setdefault(key, {"key": key, "members": {}, "label": -1})
                sample["members"][ext.lower()] = [member.offset_data, member.size]
                if ext.lower() in ("cls", "json"):
                    sample["label"] = _label(tar.extractfile(member).read(), ext.lower(), path, key)
    except (tarfile.TarError, OSError) as exc:
        raise RBAError(f"Cannot read the shard '{path}' ({exc}); is it an uncompressed tar file?") from None
    index = list(samples.values())
    try:  # written atomically; an index that cannot be stored is rebuilt next time
        stored.parent.mkdir(parents=True, exist_ok=True)
        temporary = stored.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(index))
        temporary.replace(stored)
    except OSError:
        pass
    return index


def _label(data: bytes, ext: str, path: Path, key: str) -> int:
    try:
        value = json.loads(data) if ext == "json" else int(data.decode().strip())
        if isinstance(value, dict):
            value = value.get("label", value.get("cls", -1))
        return int(value)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise RBAError(f"Sample '{key}' of '{path}' has a label that is not an integer in its .{ext} member; "
                       "write the class index as a number.") from None


def shard_samples(paths: Sequence[Path], split: str | None) -> tuple[list[tuple[int, dict]], str]:
    """The (shard number, sample) pairs of a split, and the modality; ``split`` None keeps every sample,
    else the samples whose key hashes to ``split``."""
    chosen, modality = [], None
    for number, path in enumerate(paths):
        for sample in index_shard(path):
            kinds = sample["members"]
            found = "image" if any(e in kinds for e in IMAGE_EXTENSIONS) else "text" if TEXT_EXTENSION in kinds else None
            if found is None:
                continue  # a sample with neither image nor text (e.g. metadata only) is not a sample
            modality = modality or found
            if split is None or _split_of(sample["key"]) == split:
                chosen.append((number, sample))
    if modality is None:
        raise RBAError(f"The shards {paths[0].name} ... {paths[-1].name} hold no image "
                       f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) or .txt members; write samples as "
                       "<key>.jpg (or .txt) with <key>.cls labels.")
    return chosen, modality


def read_member(path: Path, sample: dict, modality: str) -> bytes:
    """The bytes of a sample's image (or text) member, read at its offset."""
    kinds = sample["members"]
    ext = next(e for e in IMAGE_EXTENSIONS if e in kinds) if modality == "image" else TEXT_EXTENSION
    if ext not in kinds:
        raise RBAError(f"Sample '{sample['key']}' of '{path}' has no .{ext} member while the others do; "
                       "give every sample the same kinds of members.")
    offset, size = kinds[ext]
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)
