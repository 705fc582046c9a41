"""How long a forward pass takes per image, measured so that the number can be trusted.

One timing on a shared machine is noise (the same model measured 56, 5.3, 0.8 and 5.1 ms per image
on four runs). :func:`measure` therefore warms every forward up, then times them interleaved on the
same inputs (round after round, alternating the order, so that drift hits all alike) until the
relative spread of each is under ``target_spread`` or ``budget_s`` seconds are used, and reports
the median with the interquartile range as its spread.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

#: Relative spread aimed at: (p75 - p25) / median of the timed runs.
TARGET_SPREAD = 0.05
#: Seconds of timed runs after which the measurement stops even above the target.
BUDGET_S = 5.0
MIN_REPEATS, MAX_REPEATS, WARMUP = 5, 200, 1
#: Images per timed run: enough for per-image numbers, few enough to repeat a large model on a CPU.
BATCH = 8
#: Part of the cache key of every stored measurement: changes when the method changes.
METHOD = "interleaved median, IQR spread (v1)"


def summarise(seconds: list[float], items: int, target_spread: float = TARGET_SPREAD) -> dict:
    """Median and spread in ms per image of timed runs over ``items`` inputs each.

    Returns ``median``, ``low`` and ``high`` (25th and 75th percentiles), ``repeats``, ``images`` (per run),
    ``relative_spread`` ((high - low) / median), ``target_spread`` and ``converged`` (spread <= target).
    """
    low, median, high = (1000.0 * float(v) / items for v in np.percentile(seconds, [25, 50, 75]))
    spread = (high - low) / median if median > 0 else float("inf")
    return {"median": median, "low": low, "high": high, "repeats": len(seconds), "images": items,
            "relative_spread": spread, "target_spread": target_spread, "converged": bool(spread <= target_spread)}


@torch.inference_mode()
def measure(forwards: Mapping[str, Callable[..., Any]], inputs: Mapping[str, torch.Tensor], *,
            target_spread: float = TARGET_SPREAD, budget_s: float = BUDGET_S, min_repeats: int = MIN_REPEATS,
            max_repeats: int = MAX_REPEATS, warmup: int = WARMUP) -> dict[str, dict]:
    """ms per sample of each named forward on ``inputs`` (the model's own input tensors, called as
    ``forward(**inputs)``), timed interleaved; see :func:`summarise`.

    Every forward runs ``warmup`` times untimed first. Then rounds run each forward once (order
    alternating) until, after ``min_repeats`` rounds, every relative spread is within
    ``target_spread`` or the timed runs have used ``budget_s`` seconds, or after ``max_repeats`` rounds.
    """
    first = next(iter(inputs.values()))
    items = len(first)
    sync = torch.cuda.synchronize if first.is_cuda else (lambda: None)
    names = list(forwards)
    for _ in range(warmup):
        for name in names:
            forwards[name](**inputs)
    times: dict[str, list[float]] = {name: [] for name in names}
    used = 0.0
    for round_ in range(max_repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            sync()
            began = time.perf_counter()
            forwards[name](**inputs)
            sync()
            times[name].append(time.perf_counter() - began)
            used += times[name][-1]
        if round_ + 1 >= min_repeats and (used >= budget_s or all(
                summarise(t, items, target_spread)["converged"] for t in times.values())):
            break
    return {name: summarise(t, items, target_spread) for name, t in times.items()}


#: What a latency change reads when the spreads of the two measurements overlap.
NO_DIFFERENCE = "no measurable difference"


def measurable(before: dict, after: dict) -> bool:
    """Whether two measurements differ by more than their spread: their 25th–75th percentile ranges are apart."""
    return after["high"] < before["low"] or after["low"] > before["high"]


def change(before: dict, after: dict) -> str:
    """``after`` against ``before`` as the pages and the CLI write it: "-33.1%", or "no measurable difference"
    when their 25th–75th percentile ranges overlap (the machine's noise is larger than the difference)."""
    return f"{after['median'] / before['median'] - 1:+.1%}" if measurable(before, after) else NO_DIFFERENCE


def describe(measured: dict) -> str:
    """"0.82 ms (0.80–0.85, 40 runs)": a measurement as the pages and the CLI summary write it."""
    return f"{measured['median']:.3g} ms ({measured['low']:.3g}–{measured['high']:.3g}, {measured['repeats']} runs)"
