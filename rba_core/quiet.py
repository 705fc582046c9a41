"""Which library messages are noise for this tool, and silencing exactly those (real warnings stay).

transformers 5 logs a "LOAD REPORT" whenever a checkpoint's keys differ from the model class. Loading
a backbone from a classification checkpoint always leaves its head (``classifier.*``) and often the
pooler (``pooler.dense.*``) UNEXPECTED: expected here, since the tool uses the final-norm CLS token.
A report that lists MISSING, MISMATCH or CONVERSION rows (weights newly initialised or not loaded)
is a real warning and is kept.

transformers also draws its own progress bars ("Loading weights", "Writing model shards") on every load
and save: the tool reports its own progress, so they are switched off while it loads or saves
(:func:`no_library_bars`). torch's ONNX exporter says that torchvision's detection operators are
skipped (torchvision is optional, and no model here uses them) and passes on a deprecation warning of
its own pytree code (``LeafSpec``): :func:`quiet_onnx_export` drops exactly those during an export.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def no_library_bars() -> Iterator[None]:
    """transformers' own progress bars off for the block (restored after it when they were on)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
LEAF_SPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class SkippedTorchvisionOps(logging.Filter):
    """Drops "torchvision is not installed. Skipping torchvision::nms" and its siblings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


@contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """Around ``torch.onnx.export``: without the skipped-torchvision notes and pytree's LeafSpec warning."""
    logger, notes = logging.getLogger(ONNX_REGISTRATION_LOGGER), SkippedTorchvisionOps()
    logger.addFilter(notes)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAF_SPEC_WARNING, category=FutureWarning)
            yield
    finally:
        logger.removeFilter(notes)
