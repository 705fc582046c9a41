"""How many threads torch computes with: the cores this process may use, shared fairly, chosen once at start.

torch starts one intra-op thread per core and assumes the cores are its own. When they are not (two
launched workers on one machine, or other work running), its threads wait for each other at every
parallel step and long work slows far more than the load explains. :func:`configure_threads` gives
torch, unless the user chose a count (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``):

- under a launcher (``LOCAL_WORLD_SIZE`` workers on this machine: torchrun, accelerate): the cores ÷ the
  local workers;
- otherwise the cores that are free at start: those this process may run on (``sched_getaffinity``, at
  most the physical cores) less the ones other work keeps busy (measured over a fifth of a second from
  ``/proc/stat``, else the 1-minute load average);

never fewer than 1. Launchers set ``OMP_NUM_THREADS`` for their workers themselves (torchrun to 1), so
under a launcher the user's choice is read from the environment the launcher itself was started with.
The core never calls this at import: the command line and the dashboard do, so a notebook keeps its own
setting.
"""

from __future__ import annotations

import os
import time

#: Variables through which a user chooses the thread count (torch reads them when it starts).
USER_THREADS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SAMPLE_S = 0.2


def plan_threads(cores: int, local_workers: int = 1, busy: float = 0.0) -> int:
    """Threads for one process: ``cores`` ÷ ``local_workers`` under a launcher, else the ``cores`` not ``busy``
    (rounded), never fewer than 1."""
    if local_workers > 1:
        return max(1, cores // local_workers)
    return max(1, min(cores, int(cores - busy + 0.5)))


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_share(cpus: int) -> int:
    """``cpus`` logical CPUs counted as physical cores (hyperthread siblings share one), at least 1."""
    try:
        import psutil

        logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
    except Exception:  # psutil is optional
        return cpus
    return max(1, cpus * physical // logical) if logical and physical else cpus


def _cpu_times(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    busy = total = 0.0
    wanted = set(cpus)
    for fields in lines:
        if int(fields[0][3:]) in wanted:
            values = [float(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return busy, total


def busy_cores(cpus: list[int], seconds: float = SAMPLE_S) -> float:
    """How many of ``cpus`` other work keeps busy now (this process sleeps while it measures)."""
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(seconds)
        after = _cpu_times(cpus)
        if after is not None and after[1] > before[1]:
            return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])
    try:
        return min(float(len(cpus)), os.getloadavg()[0])
    except OSError:
        return 0.0


def _launcher_environment() -> dict[str, str] | None:
    """The environment the launcher of this worker was started with (its parent's initial one), or None."""
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)


def local_workers() -> int:
    """How many workers a launcher runs on this machine (1 without one)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def user_chose_threads() -> bool:
    """Whether the user set the thread count: in this process's environment, or under a launcher in the one
    the launcher was started with (the launcher sets ``OMP_NUM_THREADS`` for its workers itself)."""
    environment = (_launcher_environment() if local_workers() > 1 else None) or os.environ
    return any(environment.get(name) for name in USER_THREADS_ENV)


def configure_threads() -> int:
    """Give torch the planned thread count unless the user chose one; returns the count torch now uses."""
    import torch

    if not user_chose_threads():
        cpus = usable_cores()
        workers = local_workers()
        cores = physical_share(len(cpus))
        torch.set_num_threads(plan_threads(cores, workers, 0.0 if workers > 1 else busy_cores(cpus)))
    return torch.get_num_threads()
