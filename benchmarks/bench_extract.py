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
from rba_core.maps import fit_map
from rba_core.data import open_dataset, sample_indices
from rba_core.passes.extract import run_pass
from rba_core.measures.stats import StatsPlan
from rba_core.models import load_encoder
from rba_core.measures.stats import TokenStats


def _residual(stats: TokenStats, i: int, j: int, t: np.ndarray) -> float:
    """||hs[i] T - hs[j]||² / ||hs[j]||² over every token, from the statistics."""
    target = np.trace(stats.gram(j, j))
    error = target - 2 * np.sum(t * stats.gram(i, j)) + np.sum(t * (stats.gram(i, i) @ t))
    return float(error / target)


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
    run_pass(encoder, source, indices[: args.batch], None, args.batch)  # warm-up
    rate, shaped = common.matmul_gflops(), common.vit_gemm_gflops()
    flops = common.vit_flops_per_image(384, 12, 1536, 224, 16)
    seconds, stats = {}, {}
    for name, with_stats, fraction in (("plain", False, 1.0), ("stats", True, 1.0), ("stats_half", True, 0.5)):
        began = time.perf_counter()
        groups = run_pass(encoder, source, indices, StatsPlan() if with_stats else None, args.batch, fraction)
        seconds[name] = time.perf_counter() - began
        if with_stats:
            stats[name] = TokenStats.from_arrays(groups["stats"])
    rate_after, shaped_after = common.matmul_gflops(), common.vit_gemm_gflops()
    bound = max(rate, rate_after) * 1e9 / flops  # images/s if every FLOP ran at the peak GEMM rate
    shaped_bound = max(shaped, shaped_after) * 1e9 / flops  # ... at the GEMM rate of ViT-S's own shapes
    throughput = args.n / seconds["plain"]
    drift, residuals = [], []
    full_stats = stats["stats"]
    for i, j in ((0, 12), (2, 6), (8, 10)):
        full, half = (fit_map(stats[k], (i, j)).weight.numpy().astype(np.float64) for k in ("stats", "stats_half"))
        drift.append(float(np.linalg.norm(half - full) / np.linalg.norm(full)))
        residuals.append([_residual(full_stats, i, j, t) for t in (full, half)])
    result = {
        "machine": common.machine(), "n": args.n, "batch": args.batch,
        "matmul_gflops": [rate, rate_after], "model_gflops_per_image": flops / 1e9,
        "images_per_s": throughput, "bound_images_per_s": bound,
        "fraction_of_bound": throughput / bound,
        "vit_shaped_gemm_gflops": [shaped, shaped_after], "fraction_of_shaped_bound": throughput / shaped_bound,
        "stats_overhead": seconds["stats"] / seconds["plain"] - 1,
        "stats_half_overhead": seconds["stats_half"] / seconds["plain"] - 1,
        "half_tokens_T_relative_change": drift,
        "half_tokens_fit_residual_on_all_tokens": residuals, "seconds": seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
