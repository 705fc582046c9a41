"""Benchmark 4: reopening a cached analysis vs computing it.

    python benchmarks/bench_cache.py [--n 256]

Cold: ``analyze`` with an empty cache (one streaming pass with statistics, then every metric).
Warm: the same call again: verified cache read plus the metrics, no model load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common
from rba_core.ops.analysis import analyze
from rba_core.cache import Cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "cache.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, cache = common.vit_s_folder(Path(tmp) / "vit-s"), Cache(Path(tmp) / "cache")
        seconds = {}
        for run in ("cold", "warm"):
            began = time.perf_counter()
            hit = analyze(model, common.dataset(), args.n, 0, cache=cache)["cache"]["hit"]
            seconds[run] = time.perf_counter() - began
            assert hit == (run == "warm")
    result = {"machine": common.machine(), "n": args.n, "seconds": seconds,
              "warm_fraction_of_cold": seconds["warm"] / seconds["cold"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
