"""Command line: ``rba analyze|approximate|table|search|export ...`` (also ``python -m rba_core ...``) writing
the results as JSON (``--json FILE``, or ``--json -`` for stdout; without it a short summary; ``table`` writes
CSV, Markdown or JSON; ``export`` writes a folder). Progress goes to stderr; Ctrl-C or SIGTERM stops with one
sentence and exit status 130."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from rba_core.errors import RBAError
from rba_core.maps import HYPERS, MAPS, MapParams
from rba_core.progress import Cancelled, Tracker
from rba_core.registry import DATASET_ALIASES, DEFAULT_MAX_LENGTH, DEFAULT_SEQ_LEN, MODELS


DATASET_HELP = (f"alias ({', '.join(DATASET_ALIASES)}), folder (images, parquet/CSV/JSONL files or shards, WebDataset "
                "tar shards), shard pattern (shards-{000000..000009}.tar, {split}-{0..3}.tar), or stream:ALIAS, "
                "stream:HUB_ID or stream:FOLDER (the first n after a seeded shuffle buffer)")
DECODE_HELP = ("processes that decode and preprocess the samples of every pass, evaluation and search (default 0 "
               "on CPU, min(8, CPUs) on a GPU)")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got '{text}'")
    return int(text)


LABEL_MAP_HELP = ("JSON {dataset class: head class} (names or indices) matching the dataset's classes to the "
                  "model's own classifier head, for head_accuracy when the names do not match")
#: What the ``--help`` page says the tool does: every subcommand is listed.
DESCRIPTION = ("Find redundant transformer blocks and replace them by linear maps. Subcommands: analyze (Block "
               "Redundancy, similarity, fit residuals), approximate (replace block ranges by maps and evaluate), "
               "table (rows like the paper's Tables 1 and 2), search (rank ranges by measured error), export "
               "(write the approximated model) eval (lm-eval tasks on a causal LM and its approximation) and plan (remove blocks step by step to a budget). Results go to --json FILE ('-': stdout) or a short summary; "
               "progress goes to stderr; Ctrl-C or SIGTERM stops with one sentence and exit status 130.")
#: How the tool is invoked, for its usage lines: ``rba`` as the console script, else through the module.
MODULE_PROG, SCRIPT_PROG = "python -m rba_core", "rba"


def _parser(prog: str = MODULE_PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True,
                        help=f"alias ({', '.join(MODELS)}), hub id, folder, or GGUF file (or a folder holding one)")
    common.add_argument("--dataset", required=True, help=DATASET_HELP)
    common.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="text models: truncate texts to this many tokens")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help="causal LMs on a text (WikiText-2, C4, .txt file or folder): tokens per window")
    common.add_argument("--json", type=Path, help="where to write the results as JSON ('-': stdout); "
                        "without it a short summary is printed")
    common.add_argument("--cache-dir", type=Path, help="cache folder (default $RBA_CACHE_DIR or cache/)")
    common.add_argument("--decode-workers", type=_count, help=DECODE_HELP)
    analyze = sub.add_parser("analyze", parents=[common], help="Block Redundancy, similarity and fit residuals")
    analyze.add_argument("--n", type=int, required=True, help="number of sampled images or texts")
    analyze.add_argument("--split", default="train", choices=("train", "test"))
    analyze.add_argument("--stats-window", type=int, help="keep token statistics for windows of N blocks only "
                         "(hs[i]ᵀhs[i] and hs[i]ᵀhs[i+N]) instead of all pairs")
    analyze.add_argument("--stats-budget-gb", type=float, help="memory the token statistics may use "
                         "(default a quarter of the free RAM or GPU memory)")
    analyze.add_argument("--window", type=int, action="append",
                         help="angular distance between block outputs l and l+N (repeatable; default 1)")
    approx = sub.add_parser("approximate", parents=[common], help="replace block ranges by linear maps")
    approx.add_argument("--fit-n", type=int, required=True, help="train samples (images or texts) used to fit the maps")
    approx.add_argument("--eval-n", type=int, required=True, help="test samples used to evaluate")
    approx.add_argument("--range", nargs=2, type=int, action="append", required=True, metavar=("I", "J"),
                        help="remove blocks I+1..J, mapping block output I to J (repeatable)")
    _add_map_options(approx)
    approx.add_argument("--probe", action="store_true", help="also train the linear probe (3 seeds)")
    _add_heal_options(approx)
    approx.add_argument("--label-map", type=Path, help=LABEL_MAP_HELP)
    approx.add_argument("--no-latency", dest="latency", action="store_false",
                        help="do not time the original and approximated models (latency_ms_per_image is null)")
    _add_table_and_search(sub, common)
    from rba_core.cli_eval import add_eval_parser

    add_eval_parser(sub, _add_map_options, DECODE_HELP, _count)  # lm-eval tasks
    export = sub.add_parser("export", parents=[common], help="fit the maps and write an export folder "
                            "(--map folded: a plain Hugging Face checkpoint with fewer layers)")
    export.add_argument("--fit-n", type=int, required=True, help="train samples (windows) used to fit the maps")
    export.add_argument("--eval-n", type=int, default=0,
                        help="--map folded: test samples for rba.json (causal LMs on a text: perplexity of "
                        "the original and folded models; otherwise the folded model's final MSE)")
    export.add_argument("--range", nargs=2, type=int, action="append", required=True, metavar=("I", "J"),
                        help="remove blocks I+1..J, mapping block output I to J (repeatable)")
    _add_map_options(export, " (a kind that folds into the weights, such as folded, writes a plain Hugging Face "
                     "checkpoint)")
    export.add_argument("--out", required=True, type=Path, help="the export folder")
    export.add_argument("--onnx", action="store_true", help="image models: also write model.onnx")
    _add_heal_options(export)
    _add_plan(sub, common)
    return parser


def _add_budget(parser: argparse.ArgumentParser, blocks: str) -> None:
    """One budget, required: exactly so many blocks removed (the flag ``blocks``), at most so many parameters (maps
    included) or at most so much estimated latency per sample."""
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(blocks, type=int, help="remove exactly this many blocks")
    budget.add_argument("--max-params", type=int, help="at most this many parameters (maps included)")
    budget.add_argument("--max-latency-ms", type=float, help="at most this estimated latency per sample")


def _add_plan(sub, common: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand (:mod:`rba_core.ops.plan`)."""
    plan = sub.add_parser("plan", parents=[common], help="remove blocks step by step until a budget is met "
                          "(greedy, window or shortgpt), measured by perplexity or final MSE")
    plan.add_argument("--fit-n", type=int, required=True, help="train samples (windows) the maps are fitted on")
    plan.add_argument("--eval-n", type=int, required=True, help="test samples every candidate and step is measured on")
    _add_budget(plan, "--remove-blocks")
    _add_heal_options(plan)
    plan.add_argument("--strategy", default="greedy", choices=("greedy", "window", "shortgpt"),
                      help="greedy: one measured range at a time, statistics re-collected on the cut model (default); "
                      "window: the best contiguous window; shortgpt: the blocks of lowest Block Influence, skipped")
    plan.add_argument("--metric", choices=("perplexity", "mse"),
                      help="what candidates and steps are judged by (default perplexity for a causal LM on a "
                      "language-model text, else final-representation MSE)")
    plan.add_argument("--max-size", type=int, default=1, help="greedy: the most blocks one step removes")
    plan.add_argument("--top-k", type=int, default=8, help="candidates measured per step (those of lowest Block "
                      "Influence between their end states); 0: all")
    plan.add_argument("--out", type=Path, help="also write the plan's model here (a plain checkpoint when every "
                      "step folds or skips, else the compressed format)")
    _add_map_options(plan)


def _add_map_options(parser: argparse.ArgumentParser, more: str = "") -> None:
    """``--map`` and every map kind's hyperparameters, from their declarations (:data:`rba_core.maps.MAPS`)."""
    parser.add_argument("--map", default="linear", choices=list(MAPS),
                        help="; ".join(kind.label for kind in MAPS.values()) + more)
    for hyper in HYPERS:
        parser.add_argument(f"--{hyper.name.replace('_', '-')}", type=hyper.type, default=hyper.default,
                            help=hyper.help)


def _add_heal_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heal", type=int, metavar="STEPS", help="after replacing, fine-tune the maps this many "
                        "steps on the fit samples to match the original model (distillation; the original is kept)")
    parser.add_argument("--heal-lora", type=int, default=0, metavar="R", help="--heal: also LoRA adapters of rank "
                        "R on the kept blocks after the first range, merged into the weights afterwards")
    parser.add_argument("--heal-lr", type=float, default=1e-4, help="--heal: Adam's learning rate")


def _heal_plan(args: argparse.Namespace):
    if args.heal is None:
        return None
    from rba_core.ops.heal import HealPlan

    return HealPlan(args.heal, args.heal_lora, args.heal_lr)


def _map_params(args: argparse.Namespace) -> MapParams:
    return MapParams(**{hyper.name: getattr(args, hyper.name) for hyper in HYPERS})


def _add_table_and_search(sub, common: argparse.ArgumentParser) -> None:
    """The ``table`` and ``search`` subcommands."""
    table = sub.add_parser("table", help="rows like the paper's Tables 1 and 2 (approximated and skipped ranges)")
    table.add_argument("--model", required=True, help="alias, hub id, folder or GGUF file")
    table.add_argument("--dataset", required=True, action="append", help=DATASET_HELP + " (repeatable)")
    table.add_argument("--fit-n", type=int, required=True, help="train samples (images or texts) used to fit the maps")
    table.add_argument("--eval-n", type=int, required=True, help="test samples used to evaluate")
    table.add_argument("--seed", type=int, default=0)
    table.add_argument("--ranges", default="paper",
                       help="comma-separated rows: paper, all-consecutive or I:J ('+' joins ranges of one row)")
    _add_map_options(table)
    table.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="text models: truncate texts to this many tokens")
    table.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                       help="causal LMs on a text (WikiText-2, C4, .txt file or folder): tokens per window")
    table.add_argument("--out", required=True, type=Path, help="FILE.csv, FILE.md or FILE.json")
    table.add_argument("--label-map", type=Path, help=LABEL_MAP_HELP)
    table.add_argument("--tasks", help="causal LMs: comma-separated lm-eval tasks scored on every row (as eval)")
    table.add_argument("--limit", type=float, help="--tasks: documents per task (below 1: that fraction)")
    table.add_argument("--include-path", type=Path, help="--tasks: a folder of lm-eval task YAML files")
    table.add_argument("--cache-dir", type=Path, help="cache folder (default $RBA_CACHE_DIR or cache/)")
    table.add_argument("--decode-workers", type=_count, help=DECODE_HELP)
    search = sub.add_parser("search", parents=[common], help="rank ranges by measured final-representation MSE")
    search.add_argument("--fit-n", type=int, required=True, help="train samples (images or texts) used to fit the maps")
    search.add_argument("--eval-n", type=int, required=True, help="test samples the MSE is measured on")
    _add_budget(search, "--blocks")
    search.add_argument("--pairs", action="store_true", help="also try pairs of disjoint ranges")
    search.add_argument("--top-k", type=int, default=5, help="the head of the ranking the race measures on "
                        "every evaluation sample (the rest may leave early)")
    search.add_argument("--exhaustive", action="store_true", help="measure every candidate on every sample "
                        "instead of the race (slower; the same top-k)")
    search.add_argument("--probe-top", type=int, default=0, help="train the probe for the best K candidates")
    _add_map_options(search)
    search.add_argument("--metric", default="mse", choices=("mse", "head-accuracy"),
                        help="rank by measured final MSE (default) or by the top-1 accuracy of the model's own "
                        "classifier head (each candidate evaluated as approximate evaluates it)")
    search.add_argument("--label-map", type=Path, help=LABEL_MAP_HELP)


class _Bar:
    """A tqdm progress bar on stderr per stage (a new one when the count restarts); ``unit()`` names the items.
    Windows of a language-model text are shown as their ``seq_len`` tokens each (tokens/s and an ETA)."""

    def __init__(self, unit=lambda: "images", seq_len: int = 1):
        self.unit, self.seq_len, self.bar = unit, seq_len, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total or done < self.bar.n:
            self.close()
            tokens = self.unit() == "windows"
            self.bar = tqdm(total=total, unit=" tokens" if tokens else f" {self.unit()}", file=sys.stderr,
                            unit_scale=self.seq_len if tokens else False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _budget(args: argparse.Namespace) -> int | None:
    return int(args.stats_budget_gb * 1e9) if args.stats_budget_gb else None


def _main_rank() -> bool:
    """False on ranks 1.. of a launched group: only rank 0 reports progress and writes the results."""
    return int(os.environ.get("RANK") or 0) == 0


#: Said when a launcher's SIGTERM stopped this worker: launchers stop the whole group when one worker fails.
BY_LAUNCHER = " by the launcher, which stops every worker when one fails or is killed (its summary names the rank)"
_terminated: list[bool] = []


def _stop_on_sigterm(signum, frame):
    _terminated.append(True)
    raise KeyboardInterrupt  # stop exactly as Ctrl-C does


def main(argv: list[str] | None = None, prog: str = MODULE_PROG) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # torchrun reads --n as one of its own options unless the module's arguments follow "--",
    # which it then passes on: `torchrun ... -m rba_core -- analyze --n 64 ...`.
    args = _parser(prog).parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main_rank = _main_rank()
    tracker = Tracker(on_stage=lambda s: print(s, file=sys.stderr) if main_rank else None)
    tracker.report = bar = _Bar(lambda: tracker.unit, getattr(args, "seq_len", 1)) if main_rank else None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        return _run(args, tracker)
    except (KeyboardInterrupt, Cancelled):
        if bar:
            bar.close()  # now, or it would draw itself again after the sentence
        if main_rank:  # a launcher stops every rank at once: one sentence is enough
            launched = _terminated and int(os.environ.get("WORLD_SIZE") or 1) > 1
            print(tracker.stopped(BY_LAUNCHER if launched else ""), file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if "rba_core.distributed" in sys.modules:
            sys.modules["rba_core.distributed"].close()


def _run(args: argparse.Namespace, tracker: Tracker) -> int:
    from rba_core.hub import require_available

    try:  # before the heavy imports: a hub model or dataset that cannot be had fails at once
        require_available(args.model, args.dataset if args.command == "table" else [args.dataset] if args.dataset else [])
    except RBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rba_core.threads import configure_threads

    configure_threads()  # the cores free now, or this worker's share of them; the user's OMP_NUM_THREADS wins
    from rba_core.cache import using_root

    with using_root(args.cache_dir):  # also where a GGUF file's plain checkpoint is kept
        return _run_in_cache(args, tracker)


def _request(args: argparse.Namespace, dataset, cache, tracker: Tracker):
    """The :class:`rba_core.ops.run.Run` of the command's arguments: ``analyze`` draws ``--n`` samples of its split,
    the others ``--fit-n`` train and ``--eval-n`` test samples."""
    from rba_core.ops.run import Run

    n = getattr(args, "n", None)
    return Run(args.model, dataset, fit_n=args.fit_n if n is None else n,
               eval_n=getattr(args, "eval_n", 0) if n is None else n, seed=args.seed, max_length=args.max_length,
               seq_len=args.seq_len, cache=cache, progress=tracker,  # the tracker remembers how far each stage got
               on_stage=tracker.stage)


def _run_in_cache(args: argparse.Namespace, tracker: Tracker) -> int:
    from rba_core.ops.analysis import analyze_run, approximate_run
    from rba_core.cache import Cache
    from rba_core.passes.extract import DECODE_WORKERS_ENV
    from rba_core.models import gguf_ready

    if args.decode_workers is not None:  # read by every pass of this run (and of this rank)
        os.environ[DECODE_WORKERS_ENV] = str(args.decode_workers)

    cache = Cache(args.cache_dir, on_wait=lambda s: print(s, file=sys.stderr))
    try:
        from rba_core.data import dataset_unit

        from rba_core.data.lm_data import is_lm_text

        first = args.dataset[0] if args.command == "table" else args.dataset or "demo-text"  # eval: its default
        tracker.samples = tracker.unit = "windows" if is_lm_text(first) else dataset_unit(first)
        if not gguf_ready(args.model):
            tracker.stage(f"Dequantising {args.model} into the cache as a float32 checkpoint (once per GGUF file)")
        if args.command == "table":
            from rba_core.ops.table import table_format

            table_format(args.out)  # a bad suffix fails before any work
        run = None if args.command == "eval" else _request(args, first, cache, tracker)
        if args.command == "analyze":
            results = analyze_run(run, args.split, windows=args.window or (1,), stats_window=args.stats_window,
                                  stats_budget=_budget(args))
        elif args.command == "table":
            from rba_core.ops.table import table_run, write_table

            tasks = None
            if args.tasks:
                from rba_core.ops.downstream import TaskRequest

                tasks = TaskRequest(args.tasks, int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                                    include_path=args.include_path)
            results = table_run(run, args.dataset, args.ranges, args.map, _map_params(args), args.label_map, tasks)
            if _main_rank():  # one writer under a launcher
                args.json = write_table(results, args.out)
        elif args.command == "search":
            from rba_core.ops.search import SearchPlan, search_run

            results = search_run(run, SearchPlan(
                blocks=args.blocks, max_params=args.max_params, max_latency_ms=args.max_latency_ms, pairs=args.pairs,
                probe_top=args.probe_top, kind=args.map, map_params=_map_params(args), top_k=args.top_k,
                exhaustive=args.exhaustive, metric=args.metric, label_map=args.label_map))
        elif args.command == "eval":
            from rba_core.cli_eval import run_eval

            results = run_eval(args, cache, tracker, tracker.stage, _map_params(args))
        elif args.command == "plan":
            results = _plan(args, run)
        elif args.command == "export":
            from rba_core.ops.analysis import export_run

            results = export_run(run, args.range, args.map, args.out, _map_params(args), args.onnx, _heal_plan(args))
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            results = approximate_run(run, args.range, args.map, _map_params(args), args.probe, args.latency,
                                      args.label_map, _heal_plan(args))
    except (KeyboardInterrupt, Cancelled):
        tracker.waiting = cache.waiting  # only waiting for another run's computation: that one goes on
        if cache.waiting and cache.seen and not tracker.total:  # stopped before its progress was shown
            tracker.done, tracker.total = cache.seen
        raise
    except RBAError as exc:
        from rba_core.distributed import WorkerFailed

        if _main_rank():
            print(f"error: {exc}", file=sys.stderr)
        elif not isinstance(exc, WorkerFailed):  # a group's failure is told once, by rank 0
            print(f"error: [rank {os.environ['RANK']}] {exc}", file=sys.stderr)
        return 2
    if not _main_rank():
        return 0
    for note in results.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    _write(args, results)
    return 0


def _plan(args: argparse.Namespace, run):
    """``plan``: the steps, and the model written to ``--out`` when asked."""
    from rba_core.ops.plan import PlanSpec, export_plan, plan_run

    results = plan_run(run, PlanSpec(
        remove_blocks=args.remove_blocks, max_params=args.max_params, max_latency_ms=args.max_latency_ms,
        strategy=args.strategy, kind=args.map, map_params=_map_params(args), metric=args.metric,
        max_size=args.max_size, top_k=args.top_k or None))
    if args.heal is not None:
        from rba_core.ops.plan import heal_plan

        results = heal_plan(run, results, _heal_plan(args))
    if args.out and _main_rank():
        export_plan(results, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return results


def _write(args: argparse.Namespace, results) -> None:
    """The results as JSON in ``--json`` (``-``: stdout), else a short summary on stdout; the table has
    written itself already, in the format its ``--out`` suffix names."""
    from rba_core.store.report import summarise

    data = results if isinstance(results, dict) else results.to_json()  # export returns its rba.json record
    if args.command == "table":
        print(f"wrote {args.json}", file=sys.stderr)
    elif args.json is None:
        sys.stdout.write(summarise(args.command, data))
    elif str(args.json) == "-":
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
    else:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


def main_exit() -> None:
    """The ``rba`` console script: ``python -m rba_core`` under a shorter name."""
    sys.exit(main(prog=SCRIPT_PROG))
