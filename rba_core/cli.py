"""Command line: ``python -m rba_core analyze|approximate ...`` writing the results as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rba_core.errors import RBAError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rba_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="alias (ViT-S, ViT-B, DiNO-S, DiNO-B, DEiT-S, digits-ViT), hub id or folder")
    common.add_argument("--dataset", required=True, help="alias (MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100-coarse, CIFAR-100-fine, digits) or folder")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", required=True, type=Path, help="where to write the results")
    common.add_argument("--cache-dir", type=Path, help="cache folder (default $RBA_CACHE_DIR or cache/)")
    analyze = sub.add_parser("analyze", parents=[common], help="Block Redundancy, similarity and fit residuals")
    analyze.add_argument("--n", type=int, required=True, help="number of sampled images")
    analyze.add_argument("--split", default="train", choices=("train", "test"))
    approx = sub.add_parser("approximate", parents=[common], help="replace block ranges by linear maps")
    approx.add_argument("--fit-n", type=int, required=True, help="train images used to fit the maps")
    approx.add_argument("--eval-n", type=int, required=True, help="test images used to evaluate")
    approx.add_argument("--range", nargs=2, type=int, action="append", required=True, metavar=("I", "J"),
                        help="remove blocks I+1..J, mapping block output I to J (repeatable)")
    approx.add_argument("--map", default="linear", choices=("linear", "affine", "ridge", "identity"))
    approx.add_argument("--ridge", type=float, default=1e-2, help="λ for --map ridge")
    approx.add_argument("--probe", action="store_true", help="also train the linear probe (3 seeds)")
    return parser


def _progress():
    from tqdm import tqdm

    bar = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar or bar["bar"].total != total or done < bar["bar"].n:
            bar.get("bar") and bar["bar"].close()
            bar["bar"] = tqdm(total=total, unit="img", file=sys.stderr)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar.pop("bar").close()

    return update


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rba_core.analysis import analyze, approximate
    from rba_core.cache import Cache

    cache = Cache(args.cache_dir)
    try:
        if args.command == "analyze":
            results = analyze(args.model, args.dataset, args.n, args.seed, args.split,
                              cache=cache, progress=_progress())
        else:
            results = approximate(args.model, args.dataset, args.fit_n, args.eval_n, args.seed, args.range,
                                  args.map, ridge=args.ridge, probe=args.probe, cache=cache,
                                  progress=_progress(), on_stage=lambda s: print(s, file=sys.stderr))
            results.pop("final")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    except RBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in results.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0
