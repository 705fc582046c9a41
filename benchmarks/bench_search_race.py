"""Benchmark (issue 9): the measured search as a race against the exhaustive search.

    python benchmarks/bench_search_race.py [--eval-n 64] [--fit-n 64] [--model digits-ViT --dataset digits]

Default: a random-weight ViT-S (224 px) on real CIFAR-10, all 78 ranges of its 12 blocks. The fit
and evaluation extractions run first (cached, as after `analyze`); then the race (default search)
and the exhaustive search (every candidate on every evaluation image) run on the same cache. It
reports the time to the first ranking (end of the race's first round) and to the final one, in
seconds and in units of one original forward pass over the evaluation images, and whether the
top 5 agree (ranges and MSEs).
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-n", type=int, default=64)
    parser.add_argument("--fit-n", type=int, default=64)
    parser.add_argument("--model", help="alias or folder (default: a random ViT-S)")
    parser.add_argument("--dataset", help="alias or folder (default: CIFAR-10 from ../shared/datasets)")
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "search_race.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or common.vit_s_folder(Path(tmp) / "vit-s")
        dataset = args.dataset or common.dataset()
        encoder = load_encoder(model, "cpu")
        cache = Cache(Path(tmp) / "cache")
        began = time.perf_counter()
        extract(model, dataset, args.fit_n, 0, "train", cache=cache, encoder=encoder)
        ev_began = time.perf_counter()
        extract(model, dataset, args.eval_n, 0, "test", with_stats=False, cache=cache, encoder=encoder)
        eval_pass = time.perf_counter() - ev_began
        load_before = os.getloadavg()
        rounds = []
        began = time.perf_counter()
        race = search(model, dataset, args.fit_n, args.eval_n, 0, cache=cache, encoder=encoder,
                      on_round=lambda rows, s: rounds.append({**s, "wall_seconds": time.perf_counter() - began,
                                                              "top5": [r["range"] for r in rows[:5]]}))
        race_seconds = time.perf_counter() - began
        began = time.perf_counter()
        full = search(model, dataset, args.fit_n, args.eval_n, 0, cache=cache, encoder=encoder, exhaustive=True)
        full_seconds = time.perf_counter() - began
        load_after = os.getloadavg()
    top = lambda result: [(r["range"], r["mse_final"]) for r in result["candidates"][:5]]  # noqa: E731
    result = {
        "machine": common.machine(), "load_average_1min": [load_before[0], load_after[0]],
        "model": args.model or "random ViT-S (224 px)", "dataset": args.dataset or "CIFAR-10",
        "fit_n": args.fit_n, "eval_n": args.eval_n, "candidates": full["evaluated"],
        "eval_forward_pass_seconds": eval_pass,
        "race": {"first_ranking_seconds": rounds[0]["wall_seconds"], "final_seconds": race_seconds,
                 "first_ranking_in_forward_passes": rounds[0]["wall_seconds"] / eval_pass,
                 "final_in_forward_passes": race_seconds / eval_pass, "rounds": rounds},
        "exhaustive": {"seconds": full_seconds, "in_forward_passes": full_seconds / eval_pass},
        "speed_up_final": full_seconds / race_seconds,
        "speed_up_first_ranking": full_seconds / rounds[0]["wall_seconds"],
        "top5_agree": top(race) == top(full), "top5_race": top(race), "top5_exhaustive": top(full),
        "first_round_top5_overlap": len(set(rounds[0]["top5"]) & {r for r, _ in top(full)}),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
