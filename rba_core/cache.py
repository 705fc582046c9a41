"""Content-addressed on-disk cache: sha256 keys, atomic writes, checksums verified on read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import xxhash

CACHE_DIR_ENV = "RBA_CACHE_DIR"
FORMAT_VERSION = 2
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$RBA_CACHE_DIR``, else ``cache/`` next to the package."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(__file__).resolve().parent.parent / "cache")


def make_key(spec: dict) -> str:
    """sha256 of the sorted JSON of everything that changes a result."""
    text = json.dumps({**spec, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum(path: Path) -> str:
    """xxh3-128 of a file: catches damage at memory speed (entries can be hundreds of MB)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CacheEntry:
    """A stored result: ``meta`` (JSON) and named groups of arrays loaded (and verified) lazily."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta

    @property
    def key(self) -> str:
        return self.folder.name

    def has(self, group: str) -> bool:
        return group in self.meta["files"]

    def load(self, group: str) -> dict[str, np.ndarray]:
        """Arrays of one group; raises :class:`CorruptEntry` when the file is damaged."""
        from safetensors.numpy import load_file

        path = self.folder / f"{group}.safetensors"
        if not path.is_file() or _checksum(path) != self.meta["files"][group]:
            raise CorruptEntry(f"{path} is missing or does not match its checksum")
        return load_file(str(path))


class CorruptEntry(Exception):
    """A cache entry whose files are damaged; the caller drops it and recomputes."""


class Cache:
    """Entries live in ``root/<key>/`` with ``meta.json`` and one safetensors file per group."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else cache_root()
        self.damaged: list[str] = []  # reasons for entries dropped by this instance

    def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key``, or None; a damaged entry is reported, removed and missed."""
        folder = self.root / key
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            assert isinstance(meta.get("files"), dict)
        except (OSError, ValueError, AssertionError):
            self.discard(key, "meta.json is unreadable")
            return None
        return CacheEntry(folder, meta)

    def load(self, key: str, group: str) -> dict[str, np.ndarray] | None:
        """Verified arrays of one group, or None (damaged entries are removed)."""
        entry = self.get(key)
        if entry is None or not entry.has(group):
            return None
        try:
            return entry.load(group)
        except (CorruptEntry, OSError, ValueError) as exc:
            self.discard(key, str(exc))
            return None

    def put(self, key: str, groups: dict[str, dict[str, np.ndarray]], meta: dict) -> CacheEntry:
        """Write an entry atomically; if another writer got there first, keep theirs."""
        from safetensors.numpy import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            files = {}
            for group, arrays in groups.items():
                path = tmp / f"{group}.safetensors"
                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
                files[group] = _checksum(path)
            (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=1))
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # another process stored the same key first; theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(key)

    def discard(self, key: str, reason: str) -> None:
        """Remove a damaged entry, saying why."""
        log.warning("cache entry %s is damaged (%s); recomputing it", key, reason)
        self.damaged.append(f"cache entry {key[:12]} was damaged ({reason}) and is recomputed")
        shutil.rmtree(self.root / key, ignore_errors=True)
