"""How far long work got and how it stops: the progress callback type, the stop exception, the stop sentence.

Long work in the core reports ``progress(done, total)`` after each batch. A caller stops it by
raising from that callback (:class:`Cancelled`, or any exception: Ctrl-C's KeyboardInterrupt,
Streamlit's rerun); results reach the cache only after their loop has finished, so a stopped
computation stores nothing partial and the next request computes it afresh.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int], None]

#: Stages whose progress counts something other than images (the search counts candidate runs).
_STAGE_UNITS = {"Measured search": "candidate runs"}


class Cancelled(Exception):
    """Raised by a progress callback to stop the computation; nothing partial is stored.

    Deliberately not an :class:`~rba_core.errors.RBAError`: stopping is the user's wish, not a mistake.
    """


def stage_unit(stage: str, samples: str = "images") -> str:
    """What a stage's progress counts: the dataset's ``samples`` ("images", "texts") unless the stage
    names something else."""
    return next((unit for prefix, unit in _STAGE_UNITS.items() if stage.startswith(prefix)), samples)


def stopped_sentence(done: int, total: int, unit: str = "images", cause: str = "", waiting: bool = False) -> str:
    """The one sentence that reports a stop, e.g. "Stopped after 12 of 40 images; nothing partial was stored.";
    ``cause`` (" by ...") says who stopped it. ``waiting``: this asker was only waiting for the same computation
    started elsewhere (``done``, ``total``: how far that one got), which goes on."""
    if waiting:
        got = f" (at {done} of {total} {unit})" if total > 0 else ""
        return (f"Stopped waiting for the same computation started elsewhere{got}{cause}; that run goes on and "
                "stores its result in the cache.")
    if total <= 0:
        return f"Stopped before any {unit} were counted{cause}; nothing partial was stored."
    return f"Stopped after {done} of {total} {unit}{cause}; nothing partial was stored."


def duration_text(seconds: float) -> str:
    """A rough duration for an estimate: "under a second", "40 s", "3 min", "1.5 h"."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Tracker:
    """A progress callback that remembers how far the current stage got (``done``, ``total``, ``unit``)
    and forwards each report to ``report``; ``stage(text)`` starts a stage (and picks its unit)."""

    def __init__(self, report: Progress | None = None, on_stage: Callable[[str], None] | None = None,
                 samples: str = "images"):
        self.report, self.on_stage, self.samples = report, on_stage, samples
        self.done, self.total, self.unit = 0, 0, samples
        self.waiting = False  # set when a stop ended a wait for another asker's computation (Cache.waiting)

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.report:
            self.report(done, total)

    def stage(self, text: str) -> None:
        self.done, self.total, self.unit = 0, 0, stage_unit(text, self.samples)
        if self.on_stage:
            self.on_stage(text)

    def stopped(self, cause: str = "") -> str:
        """The stop sentence for where this tracker is now."""
        return stopped_sentence(self.done, self.total, self.unit, cause, self.waiting)
