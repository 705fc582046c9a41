"""Benchmark 3: all-pairs maps from the token statistics vs the naive way, at N=512.

    python benchmarks/bench_maps.py [--n 512]

The naive way (the paper's released code) stacks every token of both block outputs and calls
``torch.linalg.lstsq`` per pair. One pass over N real CIFAR-10 images with a random ViT-S
writes both inputs to a temporary folder; each method then runs in its own process so that
its peak memory (ru_maxrss above the process's baseline) and time are its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common
from rba_core.maps import all_pair_maps
from rba_core.data import open_dataset, sample_indices
from rba_core.models import load_encoder
from rba_core.measures.stats import StatsAccumulator, TokenStats


def _reset_peak() -> float:
    """Reset this process's peak RSS (Linux clear_refs 5) and return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


def _peak_above(base: float) -> float:
    return _status_mb("VmHWM") - base


@torch.inference_mode()
def prepare(folder: Path, n: int, batch: int = 32) -> None:
    """One pass: token statistics to stats.npz, every token of every block output to tokens.npy."""
    encoder = load_encoder(common.vit_s_folder(folder / "vit-s"), "cpu")
    source = open_dataset(common.dataset(), "train")
    indices = sample_indices(len(source), n, 0)
    states, d = encoder.num_blocks + 1, encoder.hidden_size
    acc, tokens = StatsAccumulator(states, d, "cpu"), None
    for start in range(0, n, batch):
        hs, _ = encoder.hidden_states(encoder.preprocess(source.items(indices[start : start + batch])))
        acc.add(hs)
        if tokens is None:
            t = hs[0].shape[1]
            tokens = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.float32, (states, n * t, d))
        rows = slice(start * t, (start + len(hs[0])) * t)
        tokens[:, rows] = torch.stack(hs).flatten(1, 2).numpy()
    tokens.flush()
    np.savez(folder / "stats.npz", **acc.result().to_arrays())


def run_stats(folder: Path) -> dict:
    base = _reset_peak()
    began = time.perf_counter()
    stats = TokenStats.from_arrays(dict(np.load(folder / "stats.npz")))
    maps = {i: m.astype(np.float32) for i, m in all_pair_maps(stats)}
    seconds = time.perf_counter() - began
    np.savez(folder / "maps_stats.npz", **{str(i): m for i, m in maps.items()})
    return {"seconds": seconds, "peak_mb": _peak_above(base)}


def run_naive(folder: Path) -> dict:
    base = _reset_peak()
    began = time.perf_counter()
    tokens = torch.from_numpy(np.load(folder / "tokens.npy"))  # every token in memory, as the paper's code
    states = tokens.shape[0]
    maps = {i: torch.cat([torch.linalg.lstsq(tokens[i], tokens[j]).solution for j in range(i + 1, states)], 1)
            for i in range(states - 1)}
    seconds = time.perf_counter() - began
    peak = _peak_above(base)
    np.savez(folder / "maps_naive.npz", **{str(i): m.numpy() for i, m in maps.items()})
    return {"seconds": seconds, "peak_mb": peak}


REFERENCE_PAIRS = ((0, 1), (1, 2), (2, 6), (5, 9), (8, 10), (1, 12))


def compare(folder: Path) -> dict:
    """Both methods' maps against an independent float64 ``numpy.linalg.lstsq`` on the stacked
    tokens (for a few pairs; it takes seconds each), and both fit residuals for every pair.

    ``torch.linalg.lstsq`` in float32 (the naive way) cuts singular values below
    eps·max(m, n) ≈ 0.012 of the largest by default, i.e. it truncates whenever cond(hs[i]) > ~80,
    so its T may differ from the least-squares T; the residuals show which one fits better.
    """
    stats = TokenStats.from_arrays(dict(np.load(folder / "stats.npz")))
    ours, naive = np.load(folder / "maps_stats.npz"), np.load(folder / "maps_naive.npz")
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    d = stats.hidden_size

    def pick(maps, i, j):
        return maps[str(i)][:, (j - i - 1) * d:(j - i) * d].astype(np.float64)

    def residual(t, i, j):
        target = np.trace(stats.gram(j, j))
        return float((target - 2 * np.sum(t * stats.gram(i, j)) + np.sum(t * (stats.gram(i, i) @ t))) / target)

    out = {"vs_float64_lstsq": {}, "residual_ours_minus_naive": {}}
    for i, j in REFERENCE_PAIRS:
        ref = np.linalg.lstsq(tokens[i].astype(np.float64), tokens[j].astype(np.float64), rcond=None)[0]
        out["vs_float64_lstsq"][f"{i}->{j}"] = {
            name: float(np.linalg.norm(pick(maps, i, j) - ref) / np.linalg.norm(ref))
            for name, maps in (("ours", ours), ("naive", naive))}
    for i in range(stats.num_blocks):
        for j in range(i + 1, stats.num_blocks + 1):
            out["residual_ours_minus_naive"][f"{i}->{j}"] = residual(pick(ours, i, j), i, j) - residual(pick(naive, i, j), i, j)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--part", choices=("stats", "naive"))
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "maps.json")
    args = parser.parse_args()
    if args.part:
        print(json.dumps((run_stats if args.part == "stats" else run_naive)(args.folder)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args.n)
        parts = {}
        for part in ("stats", "naive"):
            out = subprocess.run([sys.executable, __file__, "--part", part, "--folder", tmp],
                                 check=True, capture_output=True, text=True).stdout
            parts[part] = json.loads(out.strip().splitlines()[-1])
        diff = compare(folder)
    result = {
        "machine": common.machine(), "n": args.n, **parts,
        "speedup": parts["naive"]["seconds"] / parts["stats"]["seconds"],
        "memory_ratio": parts["naive"]["peak_mb"] / parts["stats"]["peak_mb"],
        "T_relative_difference_vs_float64_lstsq": diff["vs_float64_lstsq"],
        "max_residual_ours_minus_naive": max(diff["residual_ours_minus_naive"].values()),
        "min_residual_ours_minus_naive": min(diff["residual_ours_minus_naive"].values()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
