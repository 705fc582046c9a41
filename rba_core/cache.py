"""Content-addressed on-disk cache: sha256 keys, one computation per key, atomic and crash-safe writes,
checksums verified on read, and the listing and deleting the cache page shows.

Layout under the root (``$RBA_CACHE_DIR`` or ``cache/``)::

    <key>/meta.json, <key>/<group>.safetensors    a stored entry
    <key>/meta.json, <key>/<files>                a stored folder (a dequantised GGUF model), checksums in meta.json
    .locks/<key>.lock, .locks/<key>.progress      the single-flight lock of a key being computed
    .tmp-<random>/, .tmp-<random>.lock            an entry being written, and its writer's lock

Locks are ``fcntl.flock`` locks: they belong to an open file, so they serialise threads, tabs and
processes alike and die with the process that held them; a crashed writer never blocks anyone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import xxhash

from rba_core.progress import Progress

CACHE_DIR_ENV = "RBA_CACHE_DIR"
FORMAT_VERSION = 3
TMP_PREFIX = ".tmp-"
LOCKS = ".locks"
STALE_AFTER_S = 24 * 3600  # a temporary folder without a lock file is a dead writer's after a day
WAIT_POLL_S = 0.2
WAITING = "Waiting for the same computation started elsewhere (another tab, session or process); " \
          "its result will be read from the cache."
log = logging.getLogger(__name__)
T = TypeVar("T")


_ROOT: ContextVar[Path | None] = ContextVar("rba_cache_root", default=None)


def cache_root() -> Path:
    """The folder :func:`using_root` chose for this context, else ``$RBA_CACHE_DIR``, else ``cache/`` next to
    the package."""
    return _ROOT.get() or Path(os.environ.get(CACHE_DIR_ENV) or Path(__file__).resolve().parent.parent / "cache")


@contextmanager
def using_root(root: Path | str | None) -> Iterator[None]:
    """Make ``root`` (when given) the default cache folder inside the block, for what opens a cache of its
    own (a GGUF file's plain checkpoint): the CLI's ``--cache-dir``."""
    token = _ROOT.set(Path(root)) if root else None
    try:
        yield
    finally:
        if token is not None:
            _ROOT.reset(token)


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


def _try_lock(path: Path, create: bool = True) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None when another holder has it
    (or, with ``create=False``, when the file does not exist).

    A holder that finishes unlinks its lock file while still holding it, so a lock taken on a file
    that is no longer the one at ``path`` is stale: it is dropped and the current file is tried.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)
        if not create:
            return None


def _release(fd: int, path: Path) -> None:
    """Unlink a held lock file, then release it (in this order, see :func:`_try_lock`)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def remove_stale_temporaries(root: Path, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove ``.tmp-*`` folders whose writer is gone: their lock is not held, or (no lock file) they
    are older than ``max_age_s``. A folder whose writer is alive is never touched. Returns the names removed."""
    try:
        names = [e.name for e in os.scandir(root) if e.name.startswith(TMP_PREFIX)]
    except OSError:
        return []
    removed, now = [], time.time()
    for name in names:
        if name.endswith(".lock"):
            continue
        folder, lock = root / name, root / f"{name}.lock"
        fd = _try_lock(lock, create=False)
        if fd is None:
            if lock.exists():
                continue  # a live writer holds it
            try:
                if now - folder.stat().st_mtime < max_age_s:
                    continue  # a writer that is starting or finishing
            except OSError:
                continue
            shutil.rmtree(folder, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            _release(fd, lock)
        removed.append(name)
    for name in names:  # lock files of writers killed before they made their folder
        lock = root / name
        if name.endswith(".lock") and not (root / name[: -len(".lock")]).exists():
            try:
                old = now - lock.stat().st_mtime > 60
            except OSError:
                continue
            fd = _try_lock(lock, create=False) if old else None
            if fd is not None:
                _release(fd, lock)
    if removed:
        log.info("removed %d stale temporary cache folders in %s", len(removed), root)
    return removed


def remove_stale_locks(root: Path) -> list[str]:
    """Remove the single-flight files of askers that died (SIGKILL, a crash): a ``.locks/<key>.lock`` whose
    lock nobody holds, and a ``<key>.progress`` without its lock file. A live holder's files are never
    touched. Returns the keys cleaned."""
    locks = root / LOCKS
    try:
        names = [e.name for e in os.scandir(locks)]
    except OSError:
        return []
    cleaned = []
    for name in names:
        key, _, suffix = name.rpartition(".")
        if suffix == "lock":
            fd = _try_lock(locks / name, create=False)
            if fd is None:
                continue  # a live holder, or already gone
            (locks / f"{key}.progress").unlink(missing_ok=True)  # in the order a holder itself cleans up
            _release(fd, locks / name)
            cleaned.append(key)
        elif suffix == "progress" and f"{key}.lock" not in names and not (locks / f"{key}.lock").exists():
            (locks / name).unlink(missing_ok=True)
            cleaned.append(key)
    if cleaned:
        log.info("removed the single-flight files of %d dead computations in %s", len(cleaned), locks)
    return cleaned


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry as the cache page lists it; ``size`` in bytes, ``created`` a Unix time."""

    key: str
    kind: str
    model: str
    dataset: str
    split: str
    n: int | None
    size: int
    created: float
    workers: int = 1  # processes that computed it (ranks of a torchrun, srun or accelerate job)


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
    """Entries live in ``root/<key>/`` with ``meta.json`` and one safetensors file per group.

    ``on_wait(sentence)`` is told when this asker waits for a computation another asker holds;
    ``wait=False`` never waits (for readers whose computation only says "not stored").
    Opening a cache removes the temporary folders of writers that died, and the lock and progress files of
    askers that died.
    """

    def __init__(self, root: Path | str | None = None, *, on_wait: Callable[[str], None] | None = None,
                 wait: bool = True):
        self.root = Path(root) if root else cache_root()
        self.damaged: list[str] = []  # reasons for entries dropped by this instance
        self.on_wait, self.wait = on_wait, wait
        self.waiting = False  # True while this asker waits for a computation another asker holds
        self.seen: tuple[int, int] | None = None  # how far that computation had got, when last read
        remove_stale_temporaries(self.root)
        remove_stale_locks(self.root)

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

    @contextmanager
    def _writing(self) -> Iterator[tuple[Path, int]]:
        """A fresh ``.tmp-*`` folder under the root, its writer's lock held until it is renamed or removed;
        yields the folder and the file mode the umask gives (safetensors writes 0600 files)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = TMP_PREFIX + secrets.token_hex(8)
        lock = self.root / f"{name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            folder = self.root / name
            os.mkdir(folder, 0o777)  # the umask applies, as for any folder the user makes
            try:
                yield folder, os.fstat(fd).st_mode & 0o777
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # already gone when it was renamed
        finally:
            _release(fd, lock)

    def put(self, key: str, groups: dict[str, dict[str, np.ndarray]], meta: dict) -> CacheEntry:
        """Write an entry atomically; if another writer got there first, keep theirs."""
        from safetensors.numpy import save_file

        with self._writing() as (tmp, mode):
            files = {}
            for group, arrays in groups.items():
                path = tmp / f"{group}.safetensors"
                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
                os.chmod(path, mode)
                files[group] = _checksum(path)
            (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=1))
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # another process stored the same key first; theirs is as good
                pass
        return self.get(key)

    def put_folder(self, key: str, write: Callable[[Path], dict | None], meta: dict) -> CacheEntry:
        """Write an entry whose files ``write(folder)`` makes (a model checkpoint, say) atomically; what it
        returns joins ``meta``. Its ``meta.json`` keeps a checksum of every file, which :meth:`folder` verifies."""
        with self._writing() as (tmp, mode):
            meta = {**meta, **(write(tmp) or {})}
            checksums = {}
            for path in sorted(tmp.iterdir()):
                os.chmod(path, mode)
                checksums[path.name] = _checksum(path)
            (tmp / "meta.json").write_text(json.dumps({**meta, "files": {}, "checksums": checksums}, indent=1))
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # another process stored the same key first; theirs is as good
                pass
        return self.get(key)

    def folder(self, key: str) -> Path | None:
        """The folder of an entry :meth:`put_folder` wrote, when every file matches its checksum; None when
        there is none (a damaged one is reported and removed)."""
        entry = self.get(key)
        if entry is None:
            return None
        checksums = entry.meta.get("checksums")
        try:
            intact = isinstance(checksums, dict) and all(
                _checksum(entry.folder / name) == value for name, value in checksums.items())
        except OSError:
            intact = False
        if not intact:
            self.discard(key, "its files do not match their checksums")
            return None
        return entry.folder

    def discard(self, key: str, reason: str) -> None:
        """Remove a damaged entry; the sentence saying why joins :attr:`damaged` (the CLI prints it as a note,
        the pages as a warning), so it is not logged as a warning as well."""
        log.info("cache entry %s is damaged (%s); removed it", key, reason)  # the caller shows self.damaged
        self.damaged.append(f"cache entry {key[:12]} was damaged ({reason}) and was removed.")
        shutil.rmtree(self.root / key, ignore_errors=True)

    # One computation per key.

    def single_flight(self, key: str, lookup: Callable[[], T | None], compute: Callable[[Progress | None], T],
                      progress: Progress | None = None) -> T:
        """``lookup()`` when the result is stored; otherwise ``compute(progress)``, run by one asker at a
        time across threads, tabs and processes. Another asker of the same key waits (reporting
        ``on_wait`` and the holder's progress to its own ``progress``), then finds the stored result with
        ``lookup()``. ``compute`` stores its result before it returns; an exception in it (a stop, an
        error) stores nothing and releases the key."""
        found = lookup()
        if found is not None or not self.wait:
            return found if found is not None else compute(progress)
        locks = self.root / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        lock, shared = locks / f"{key}.lock", locks / f"{key}.progress"
        fd = self._acquire(lock, shared, progress)
        try:
            found = lookup()  # stored by the asker we waited for
            if found is not None:
                return found
            return compute(_sharing(shared, progress))
        finally:
            shared.unlink(missing_ok=True)
            _release(fd, lock)

    def _acquire(self, lock: Path, shared: Path, progress: Progress | None) -> int:
        """Hold ``lock``, waiting (and forwarding the holder's progress) while another asker has it."""
        told, last = False, None
        while (fd := _try_lock(lock)) is None:
            self.waiting = True  # a stop now ends only this wait (it stays True then, for the stop sentence)
            try:
                done, total = (int(v) for v in shared.read_text().split())
                self.seen = (done, total)  # before the wait is told: a stop right after it knows how far the other got
            except (OSError, ValueError):
                done = total = None
            if not told and self.on_wait:
                self.on_wait(WAITING)
            told = True
            if progress and total is not None and (done, total) != last:
                progress(done, total)
                last = (done, total)
            time.sleep(WAIT_POLL_S)
        self.waiting = False
        return fd

    # What the cache page shows and does.

    def entries(self) -> list[EntryInfo]:
        """Every stored entry, newest first, described from its ``meta.json`` (unreadable ones as "damaged")."""
        out = []
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
                created = (folder / "meta.json").stat().st_mtime
            except (OSError, ValueError):
                meta, created = {}, folder.stat().st_mtime
            files = meta.get("files", {})
            kind = meta.get("kind") or ("pass" if "reps" in files else "approximated run" if "final" in files
                                        else "damaged")
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            out.append(EntryInfo(folder.name, kind, str(meta.get("model", "")), str(meta.get("dataset", "")),
                                 str(meta.get("split", "")), meta.get("n"), size, created, int(meta.get("workers", 1))))
        return sorted(out, key=lambda e: e.created, reverse=True)

    def delete(self, key: str) -> bool:
        """Remove one entry (at once for readers: it is renamed away, then deleted); False if absent."""
        with self._writing() as (tmp, _):
            try:
                os.rename(self.root / key, tmp)  # replaces the empty temporary folder
            except OSError:
                return False
        return True

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        return sum(self.delete(entry.key) for entry in self.entries())


def _sharing(shared: Path, progress: Progress | None) -> Progress:
    """``progress`` that also writes ``done total`` to ``shared`` for askers waiting on the same key."""

    def report(done: int, total: int) -> None:
        try:
            shared.write_text(f"{done} {total}")
        except OSError:
            pass  # waiters then see no progress; the computation itself is unaffected
        if progress:
            progress(done, total)

    return report
