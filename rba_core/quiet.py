"""Which library messages are noise for this tool, and silencing exactly those (real warnings stay).

transformers 5 logs a "LOAD REPORT" whenever a checkpoint's keys differ from the model class. Loading
a backbone from a classification checkpoint always leaves its head (``classifier.*``) and often the
pooler (``pooler.dense.*``) UNEXPECTED: expected here, since the tool uses the final-norm CLS token.
A report that lists MISSING, MISMATCH or CONVERSION rows (weights newly initialised or not loaded)
is a real warning and is kept.
"""

from __future__ import annotations

import logging

LOAD_REPORT_LOGGER = "transformers.modeling_utils"  # transformers.utils.loading_report logs through it
_REAL_PROBLEMS = ("MISSING", "MISMATCH", "CONVERSION")


class UnusedHeadReport(logging.Filter):
    """Drops load reports whose only rows are UNEXPECTED keys (an unused head or pooler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "LOAD REPORT" not in text or any(word in text for word in _REAL_PROBLEMS)


def silence_library_noise() -> None:
    """Install the filters (idempotent); :func:`rba_core.models.load_encoder` calls it."""
    logger = logging.getLogger(LOAD_REPORT_LOGGER)
    if not any(isinstance(f, UnusedHeadReport) for f in logger.filters):
        logger.addFilter(UnusedHeadReport())
