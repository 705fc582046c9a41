"""Command line: ``python -m rba_core analyze|approximate|table|search ...`` writing the results as JSON
(``table`` also as CSV or Markdown)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rba_core.errors import RBAError
from rba_core.maps import MAPS, MapParams
from rba_core.registry import DATASETS, MODELS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rba_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help=f"alias ({', '.join(MODELS)}), hub id or folder")
    common.add_argument("--dataset", required=True, help=f"alias ({', '.join(DATASETS)}) or folder")
    common.add_argument("--max-length", type=int, default=128, help="text models: truncate texts to this many tokens")
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
    approx.add_argument("--map", default="linear", choices=list(MAPS), help=_map_help())
    approx.add_argument("--ridge", type=float, default=1e-2, help="λ for --map ridge")
    approx.add_argument("--probe", action="store_true", help="also train the linear probe (3 seeds)")
    _add_table_and_search(sub, common)
    return parser


def _add_table_and_search(sub, common: argparse.ArgumentParser) -> None:
    """The ``table`` and ``search`` subcommands (issue 4)."""
    table = sub.add_parser("table", help="rows like the paper's Tables 1 and 2 (approximated and skipped ranges)")
    table.add_argument("--model", required=True, help="alias, hub id or folder")
    table.add_argument("--dataset", required=True, action="append", help="alias or folder (repeatable)")
    table.add_argument("--fit-n", type=int, required=True, help="train images used to fit the maps")
    table.add_argument("--eval-n", type=int, required=True, help="test images used to evaluate")
    table.add_argument("--seed", type=int, default=0)
    table.add_argument("--ranges", default="paper",
                       help="comma-separated rows: paper, all-consecutive or I:J ('+' joins ranges of one row)")
    table.add_argument("--map", default="linear", choices=list(MAPS), help=_map_help())
    table.add_argument("--max-length", type=int, default=128, help="text models: truncate texts to this many tokens")
    table.add_argument("--ridge", type=float, default=1e-2, help="λ for --map ridge")
    table.add_argument("--out", required=True, type=Path, help="FILE.csv, FILE.md or FILE.json")
    table.add_argument("--cache-dir", type=Path, help="cache folder (default $RBA_CACHE_DIR or cache/)")
    search = sub.add_parser("search", parents=[common], help="rank ranges by measured final-representation MSE")
    search.add_argument("--fit-n", type=int, required=True, help="train images used to fit the maps")
    search.add_argument("--eval-n", type=int, required=True, help="test images the MSE is measured on")
    budget = search.add_mutually_exclusive_group(required=True)
    budget.add_argument("--blocks", type=int, help="remove exactly this many blocks")
    budget.add_argument("--max-params", type=int, help="at most this many parameters (T included)")
    budget.add_argument("--max-latency-ms", type=float, help="at most this estimated latency per image")
    search.add_argument("--pairs", action="store_true", help="also try pairs of disjoint ranges")
    search.add_argument("--probe-top", type=int, default=0, help="train the probe for the best K candidates")
    search.add_argument("--map", default="linear", choices=list(MAPS), help=_map_help())
    search.add_argument("--ridge", type=float, default=1e-2, help="λ for --map ridge")


def _map_help() -> str:
    return "; ".join(kind.label for kind in MAPS.values())


def _progress():
    from tqdm import tqdm

    bar = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar or bar["bar"].total != total or done < bar["bar"].n:
            bar.get("bar") and bar["bar"].close()
            bar["bar"] = tqdm(total=total, unit="sample", file=sys.stderr)
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
            results = analyze(args.model, args.dataset, args.n, args.seed, args.split, max_length=args.max_length,
                              cache=cache, progress=_progress())
        elif args.command == "table":
            from rba_core.table import table, table_format, write_table

            table_format(args.out)  # a bad suffix fails before any work
            results = table(args.model, args.dataset, args.fit_n, args.eval_n, args.seed, args.ranges, args.map,
                            map_params=MapParams(ridge=args.ridge), max_length=args.max_length, cache=cache,
                            progress=_progress(),
                            on_stage=lambda s: print(s, file=sys.stderr))
            args.json = write_table(results, args.out)
        elif args.command == "search":
            from rba_core.search import search

            results = search(args.model, args.dataset, args.fit_n, args.eval_n, args.seed, blocks=args.blocks,
                             max_params=args.max_params, max_latency_ms=args.max_latency_ms, pairs=args.pairs,
                             probe_top=args.probe_top, kind=args.map, map_params=MapParams(ridge=args.ridge),
                             max_length=args.max_length, cache=cache,
                             progress=_progress(), on_stage=lambda s: print(s, file=sys.stderr))
        else:
            results = approximate(args.model, args.dataset, args.fit_n, args.eval_n, args.seed, args.range,
                                  args.map, map_params=MapParams(ridge=args.ridge), probe=args.probe,
                                  max_length=args.max_length, cache=cache,
                                  progress=_progress(), on_stage=lambda s: print(s, file=sys.stderr))
        if args.command != "table":  # the table wrote itself in the format its suffix names
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results.to_json(), indent=1))
    except RBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in results.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main_exit() -> None:
    """The ``rba`` console script: ``python -m rba_core`` under a shorter name."""
    sys.exit(main())
