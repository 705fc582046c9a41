"""Benchmarks 1 and 2: extraction throughput vs the matmul bound, and the cost of the statistics.

    python benchmarks/bench_extract.py [--n 64] [--batch 32]

Runs the streaming pass on real CIFAR-10 images with a random-weight ViT-S at 224 px three
times (no statistics; statistics over every token; over half the patch tokens) and reports
images/s, the fraction of the matmul-rate bound (measured in the same run), the overhead of
the statistics, and what token subsampling does to the maps T.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from rba_core.approx import fit_map
from rba_core.data import open_dataset, sample_indices
from rba_core.extract import run_pass
from rba_core.models import load_encoder
from rba_core.stats import TokenStats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "extract.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        encoder = load_encoder(common.vit_s_folder(Path(tmp) / "vit-s"), "cpu")
    source = open_dataset(common.dataset(), "train")
    indices = sample_indices(len(source), args.n, 0)
    run_pass(encoder, source, indices[: args.batch], False, args.batch)  # warm-up
    rate = common.matmul_gflops()
    flops = common.vit_flops_per_image(384, 12, 1536, 224, 16)
    seconds, stats = {}, {}
    for name, with_stats, fraction in (("plain", False, 1.0), ("stats", True, 1.0), ("stats_half", True, 0.5)):
        began = time.perf_counter()
        groups = run_pass(encoder, source, indices, with_stats, args.batch, fraction)
        seconds[name] = time.perf_counter() - began
        if with_stats:
            stats[name] = TokenStats.from_arrays(groups["stats"])
    rate_after = common.matmul_gflops()
    bound = min(rate, rate_after) * 1e9 / flops  # images/s if every FLOP ran at the GEMM rate
    throughput = args.n / seconds["plain"]
    drift = []
    for i, j in ((0, 12), (2, 6), (8, 10)):
        full, half = (fit_map(stats[k], (i, j)).weight.numpy() for k in ("stats", "stats_half"))
        drift.append(float(np.linalg.norm(half - full) / np.linalg.norm(full)))
    result = {
        "machine": common.machine(), "n": args.n, "batch": args.batch,
        "matmul_gflops": [rate, rate_after], "model_gflops_per_image": flops / 1e9,
        "images_per_s": throughput, "bound_images_per_s": bound,
        "fraction_of_bound": throughput / bound,
        "stats_overhead": seconds["stats"] / seconds["plain"] - 1,
        "stats_half_overhead": seconds["stats_half"] / seconds["plain"] - 1,
        "half_tokens_T_relative_change": drift, "seconds": seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
