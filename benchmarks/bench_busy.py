"""The paper's table on the demo, on a quiet machine and while a second process keeps one core busy.

Runs ``python -m rba_core table --model digits-ViT --dataset digits --fit-n 256 --eval-n 256 --ranges paper``
with a fresh cache each time, as a new user would, and records its wall time, the load average and the CPU
time of the run. ``--busy`` starts ``python -c 'while True: pass'`` first (one core busy) and stops it after.
``--checkout PATH`` runs the command from another checkout (for a before/after comparison on the same machine).

    python benchmarks/bench_busy.py [--busy] [--checkout ../main] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["table", "--model", "digits-ViT", "--dataset", "digits", "--fit-n", "256", "--eval-n", "256",
           "--ranges", "paper"]


def run_table(checkout: Path) -> dict:
    """One run with a fresh cache; wall seconds, the run's CPU seconds, the 1-minute load before it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # No bytecode written into the checkout (it may be another engineer's), the same for every checkout.
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(checkout), PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "rba_core", *COMMAND, "--out", f"{tmp}/table.md",
                              "--cache-dir", f"{tmp}/cache"], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    stages = [line for line in run.stderr.splitlines() if line.startswith(("Table:", "The other"))]
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_1min_before": round(load, 2), "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--busy", action="store_true", help="keep one core busy with a second process")
    parser.add_argument("--checkout", type=Path, default=ROOT)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        time.sleep(1.0 if spinner else 0.0)  # the spinner is running before the table starts
        runs = [run_table(args.checkout.resolve()) for _ in range(args.repeats)]
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    result = {"checkout": str(args.checkout.resolve()), "busy": args.busy, "cores": len(os.sched_getaffinity(0)),
              "when": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    name = f"busy-{'busy' if args.busy else 'quiet'}-{args.checkout.resolve().name}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
