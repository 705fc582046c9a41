"""Benchmark (issue 4): how long a measured search over every range of a 12-block ViT-S takes.

    python benchmarks/bench_search.py [--eval-n 32] [--fit-n 64] [--blocks 4] [--target-n 256]

A random-weight ViT-S (224 px, 197 tokens) and real CIFAR-10 images. The fit and evaluation
extractions run first (in real use they are already cached by `analyze`/`approximate`), then:

- a full search: all 78 contiguous ranges, no budget;
- a budgeted search: exactly ``--blocks`` blocks removed, single ranges and pairs of ranges.

The forward and candidate costs are linear in the number of evaluation images (every candidate
runs its suffix blocks on each image once), so they are scaled from ``--eval-n`` to
``--target-n``; the rest (reading the cached extractions, fitting the maps) does not grow with it. The
"compressed forwards" figure is what running every candidate's whole compressed model once over
the same images would cost, estimated from the measured stage times: the search's candidate
time divided by it says how much the cached prefixes save.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import common
from rba_core.cache import Cache
from rba_core.passes.extract import extract
from rba_core.models import load_encoder
from rba_core.ops.search import search


def _summary(result: dict, n: int, target: int) -> dict:
    seconds = result["seconds"]
    compressed = sum(r["latency_ms_per_image_estimate"] for r in result["candidates"]) * n / 1000
    per_image = (seconds["original_forward"] + seconds["candidates"]) / n
    fixed = seconds["total"] - per_image * n  # cached extractions, the maps, the cheap scores
    return {
        "candidates": result["evaluated"], "chunk_size": result["chunk_size"],
        "seconds": seconds, "fixed_seconds": fixed,
        "forward_and_candidates_seconds_per_image": per_image,
        f"extrapolated_total_seconds_at_{target}": fixed + per_image * target,
        "compressed_forwards_seconds_estimate": compressed,
        "candidate_time_over_compressed_forwards": seconds["candidates"] / compressed,
        "spearman": result["spearman"],
        "best": [(r["range"], r["mse_final"]) for r in result["candidates"][:3]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-n", type=int, default=32)
    parser.add_argument("--fit-n", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--target-n", type=int, default=256)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "search.json")
    args = parser.parse_args()
    dataset = common.dataset()
    with tempfile.TemporaryDirectory() as tmp:
        folder = common.vit_s_folder(Path(tmp) / "vit-s")
        encoder = load_encoder(folder, "cpu")
        cache = Cache(Path(tmp) / "cache")
        began = time.perf_counter()
        extract(folder, dataset, args.fit_n, 0, "train", cache=cache, encoder=encoder)
        fit_seconds = time.perf_counter() - began
        began = time.perf_counter()
        extract(folder, dataset, args.eval_n, 0, "test", with_stats=False, cache=cache, encoder=encoder)
        eval_seconds = time.perf_counter() - began
        load_before = os.getloadavg()
        full = search(folder, dataset, args.fit_n, args.eval_n, 0, cache=cache, encoder=encoder)
        budget = search(folder, dataset, args.fit_n, args.eval_n, 0, blocks=args.blocks, pairs=True,
                        cache=cache, encoder=encoder)
        load_after = os.getloadavg()
    result = {
        "machine": common.machine(), "load_average_1min": [load_before[0], load_after[0]],
        "eval_n": args.eval_n, "fit_n": args.fit_n, "target_n": args.target_n,
        "fit_extraction_seconds": fit_seconds, "eval_extraction_seconds": eval_seconds,
        "original_forward_ms_per_image": full["original"]["latency_ms_per_image_estimate"],
        "cached_block_outputs_bytes_at_target_n": 4 * 197 * 384 * 13 * args.target_n,
        "full": _summary(full, args.eval_n, args.target_n),
        f"blocks_{args.blocks}_with_pairs": _summary(budget, args.eval_n, args.target_n),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
