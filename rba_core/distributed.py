"""Data-parallel work on torch.distributed: the group from the launcher's environment, each rank's share
of the samples, exact sums across ranks, per-sample rows gathered in sample order, and one cache
writer (rank 0) for the group.

A launcher (``torchrun``, ``accelerate launch``, Slurm's ``srun`` through torchrun) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE`` > 1 the
group is initialised from them (NCCL when CUDA is present, gloo otherwise), otherwise everything
here is the single-process identity. Sums are reduced in float64 and rows are placed by their
sample position, so a group computes what one process computes.

Failures: every collective step first exchanges each rank's status, so an error on one rank fails
every rank with one sentence naming it (:class:`WorkerFailed`); a rank that dies makes the next
collective fail on the others (or time out after ``$RBA_DIST_TIMEOUT_S``, default 1800 s, instead
of hanging). Rank 0 stores results only after every collective has succeeded, so nothing partial
reaches the cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from rba_core.errors import RBAError

TIMEOUT_ENV = "RBA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")

# What rank 0 tells the others about a cached result.
_HIT, _COMPUTE, _FAILED = 0, 1, 2


class WorkerFailed(RBAError):
    """One rank's error, raised on every rank of the group (rank 0 reports it; the others stay quiet)."""


@dataclass(frozen=True)
class World:
    """This process's place in the group: ``rank`` of ``size`` (size 1: no group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    @property
    def device(self) -> str | None:
        """The device this rank computes on: its own GPU under NCCL, else the default."""
        return f"cuda:{self.local_rank}" if self.size > 1 and self.backend == "nccl" else None

    def share(self, n: int, unit: int = 1) -> np.ndarray:
        """Positions 0..n-1 this rank computes: a fixed contiguous slice of whole ``unit``s of positions
        (shares differ by at most one unit), so every unit is computed by one rank in one piece."""
        units = np.array_split(np.arange(-(-n // unit)), self.size)[self.rank]
        return np.arange(units[0] * unit, min(n, (units[-1] + 1) * unit)) if len(units) else np.arange(0)

    # Collective steps. Each is the identity for a single process.

    @contextmanager
    def all_or_none(self, what: str) -> Iterator[None]:
        """Run this rank's part of ``what``; then every rank learns whether every rank succeeded, and a
        failure anywhere raises :class:`WorkerFailed` naming the rank(s) on every rank."""
        if self.size == 1:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:  # Ctrl-C and SIGTERM pass: they stop this rank, the others see it gone
            error = exc
        statuses: list = [None] * self.size
        _collective(lambda: torch.distributed.all_gather_object(statuses, None if error is None else str(error)))
        failed = [(rank, text) for rank, text in enumerate(statuses) if text is not None]
        if failed:
            rank, text = failed[0]
            others = f" (and rank {', '.join(str(r) for r, _ in failed[1:])})" if len(failed) > 1 else ""
            raise WorkerFailed(f"Worker rank {rank}{others} of {self.size} failed during {what}: {text} "
                               "Nothing was stored.") from error

    def sum(self, tensors: list[torch.Tensor]) -> None:
        """Add each tensor (float64) over the ranks, in place."""
        if self.size == 1:
            return
        for tensor in tensors:
            moved = tensor.to(self._comm_device)
            _collective(lambda: torch.distributed.all_reduce(moved))
            tensor.copy_(moved)

    def gather_rows(self, local: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
        """The (n, ...) array whose row ``positions[k]`` is ``local[k]``, from every rank's rows: each
        rank pads its rows to the largest share, all ranks gather, rows are placed by position."""
        if self.size == 1:
            return local
        device = self._comm_device
        sizes = torch.tensor([len(positions)], dtype=torch.int64, device=device)
        _collective(lambda: torch.distributed.all_reduce(sizes, torch.distributed.ReduceOp.MAX))
        width = int(sizes.item())
        padded = torch.zeros((width, *local.shape[1:]), dtype=torch.from_numpy(local).dtype, device=device)
        padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local)).to(device)
        where = torch.full((width,), -1, dtype=torch.int64, device=device)
        where[: len(positions)] = torch.from_numpy(np.asarray(positions, np.int64)).to(device)
        rows = [torch.empty_like(padded) for _ in range(self.size)]
        places = [torch.empty_like(where) for _ in range(self.size)]
        _collective(lambda: torch.distributed.all_gather(rows, padded))
        _collective(lambda: torch.distributed.all_gather(places, where))
        out = np.empty((n, *local.shape[1:]), local.dtype)
        for block, place in zip(rows, places):
            keep = place >= 0
            out[place[keep].cpu().numpy()] = block[keep].cpu().numpy()
        return out

    def gather_objects(self, value) -> list:
        """Every rank's picklable ``value``, in rank order (small things: per-candidate errors)."""
        if self.size == 1:
            return [value]
        values: list = [None] * self.size
        _collective(lambda: torch.distributed.all_gather_object(values, value))
        return values

    def from_main(self, value):
        """Rank 0's picklable ``value`` on every rank (so that every rank decides alike)."""
        return self.gather_objects(value)[0]

    def _tell(self, flag: int) -> int:
        """Rank 0's ``flag`` on every rank."""
        value = torch.tensor([flag], dtype=torch.int64, device=self._comm_device)
        _collective(lambda: torch.distributed.broadcast(value, 0))
        return int(value.item())

    @property
    def _comm_device(self) -> str:
        return self.device or "cpu"


def _collective(step: Callable[[], object]) -> None:
    """Run one collective step; a lost or timed-out peer becomes one sentence."""
    try:
        step()
    except RBAError:
        raise
    except Exception as exc:
        rank = torch.distributed.get_rank()
        raise WorkerFailed(f"Worker rank {rank} lost contact with the group (another worker was killed, failed "
                           f"or timed out after {_timeout_s()} s: {str(exc).splitlines()[0][:200]}); "
                           "nothing was stored.") from None


def _timeout_s() -> int:
    return int(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


def world() -> World:
    """The group this process belongs to, initialised on first use from the launcher's environment."""
    size = int(os.environ.get("WORLD_SIZE") or 1)
    if size <= 1:
        return World()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise RBAError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set; start the run with "
                           "torchrun, accelerate launch or srun (see README, Scaling out).")
        here = World(int(os.environ["RANK"]), size, local_rank)
        if here.backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(here.backend, timeout=timedelta(seconds=_timeout_s()))
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def run_group(args: list[str], processes: int, cache_root: Path | str, progress=None) -> None:
    """Run ``python -m rba_core ARGS`` as ``processes`` workers on this machine (torchrun, gloo or NCCL)
    storing into ``cache_root``, and wait for it, forwarding rank 0's progress (the cache's progress
    file of the computation it holds) to ``progress``. An exception while waiting (a stop: the
    callback raises) terminates the whole process group, which then stores nothing; a failed group
    raises :class:`RBAError` with its error sentence."""
    locks = Path(cache_root) / ".locks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "rba_core", "--", *args, "--cache-dir", str(cache_root)]
    began = time.time()
    with tempfile.TemporaryFile("w+") as log:
        group = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True)
        try:
            shown = (0, 0)
            while group.poll() is None:
                for path in locks.glob("*.progress") if locks.is_dir() else []:
                    try:
                        if path.stat().st_mtime >= began:
                            done, total = (int(v) for v in path.read_text().split())  # may be mid-write
                            shown = (done, total)
                    except (OSError, ValueError):
                        pass
                if progress:
                    progress(*shown)  # also every poll, so that a stop is noticed
                time.sleep(0.3)
        except BaseException:
            _terminate(group)
            raise
        if group.returncode != 0:
            log.seek(0)
            errors = [line[len("error: "):].strip() for line in log if line.startswith("error: ")]
            errors.sort(key=lambda e: e.startswith("[rank "))  # rank 0's sentence first
            raise RBAError(errors[0] if errors else f"The {processes} worker processes failed (exit status "
                           f"{group.returncode}); run the same request from a terminal with torchrun to see why.")


def _terminate(group: subprocess.Popen) -> None:
    """SIGTERM to the launcher and its workers (their own process group), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(group.pid, sig)
            group.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if group.poll() is not None:
                return


def close() -> None:
    """Leave the group, if this process joined one (at the end of a launched run).

    Every rank first waits for the others (rank 0 may still be writing the cache): a rank that tore its
    gloo context down while a peer was still talking to it could abort at exit ("terminate called
    without an active exception"). A peer that already failed is not waited for long."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:  # a peer is gone: nothing left to wait for
            pass
        dist.destroy_process_group()


def single_flight(cache, key: str, lookup: Callable[[], T | None], compute: Callable[[object], T],
                  progress=None) -> T:
    """:meth:`rba_core.cache.Cache.single_flight` for a group: rank 0 alone takes the key's lock, looks
    up and stores; it tells the others whether the result is stored (they read it, so a multi-node
    group needs a shared cache folder) or is to be computed (every rank runs ``compute``, whose
    collective steps make one result; ``compute`` stores only on rank 0)."""
    here = world()
    if here.size == 1:
        return cache.single_flight(key, lookup, compute, progress)
    if not here.is_main:
        flag = here._tell(_HIT)  # the value sent is rank 0's; ours is ignored
        if flag == _FAILED:
            raise WorkerFailed("Worker rank 0 failed before the pass (see its message); nothing was stored.")
        if flag == _COMPUTE:
            return compute(None)
        found = lookup()
        if found is None:
            raise RBAError(f"Worker rank {here.rank} cannot read the cache entry rank 0 found in {cache.root}: put "
                           "the cache folder (RBA_CACHE_DIR) on storage every node shares.")
        return found
    told = False

    def compute_together(shared_progress) -> T:
        nonlocal told
        here._tell(_COMPUTE)
        told = True
        return compute(shared_progress)

    try:
        result = cache.single_flight(key, lookup, compute_together, progress)
    except BaseException:
        if not told:
            here._tell(_FAILED)
        raise
    if not told:
        here._tell(_HIT)
    return result
