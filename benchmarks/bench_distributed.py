"""Benchmark (issue 9): 1 process × 2 threads against 2 gloo worker processes × 1 thread (torchrun).

    python benchmarks/bench_distributed.py [--n 32]

A random-weight ViT-S (224 px) and real CIFAR-10 images; `analyze` (the pass with all-pairs token
statistics) runs once as one process with 2 threads, once under `torchrun --standalone
--nproc-per-node 2` with 1 thread per worker, each into its own empty cache. Reports the wall time
of each command (start-up included), the pass time stored in the entry, and the largest
relative difference between the two results (BR, cosine, CKA, fit residual, every affine T).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from rba_core.cache import Cache
from rba_core.passes.extract import extract
from rba_core.maps import fit_map


def _run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.ROOT)}
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=common.ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def _largest_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for name in ("block_redundancy", "cosine", "cka", "fit_residual"):
        x, y = np.array(a[name], float), np.array(b[name], float)
        worst = max(worst, float(np.nanmax(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "distributed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, dataset = common.vit_s_folder(Path(tmp) / "vit-s"), common.dataset()
        request = ["analyze", "--model", model, "--dataset", dataset, "--n", str(args.n)]
        runs = {}
        load_before = os.getloadavg()
        for name, launch, threads in (
                ("1 process x 2 threads", [sys.executable, "-m", "rba_core"], 2),
                ("2 gloo workers x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2", "-m", "rba_core", "--"], 1)):
            folder = Path(tmp) / name.replace(" ", "_")
            out = folder / "analysis.json"
            wall = _run([*launch, *request, "--cache-dir", str(folder), "--json", str(out)], threads)
            result = json.loads(out.read_text())
            entry = Cache(folder).get(result["cache"]["key"])
            runs[name] = {"wall_seconds": wall, "pass_seconds": entry.meta["seconds"], "workers": result["workers"],
                          "result": result, "extraction": extract(model, dataset, args.n, cache=Cache(folder))}
        load_after = os.getloadavg()
        one, two = runs.values()
        t_diff = 0.0
        for i in range(one["extraction"].num_blocks + 1):
            for j in range(i + 1, one["extraction"].num_blocks + 1):
                t1, t2 = (fit_map(r["extraction"].stats(), (i, j), "affine").weight.numpy() for r in (one, two))
                t_diff = max(t_diff, float(np.abs(t1 - t2).max() / np.abs(t1).max()))
    report = {
        "machine": common.machine(), "load_average_1min": [load_before[0], load_after[0]], "n": args.n,
        "same_cache_key": one["result"]["cache"]["key"] == two["result"]["cache"]["key"],
        "largest_relative_difference_metrics": _largest_difference(two["result"], one["result"]),
        "largest_relative_difference_T": t_diff,
        **{name: {k: v for k, v in r.items() if k not in ("result", "extraction")} for name, r in runs.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
