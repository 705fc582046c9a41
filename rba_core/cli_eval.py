"""The ``eval`` subcommand: lm-eval tasks on a causal LM and its approximation (:mod:`rba_core.ops.downstream`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rba_core.registry import DEFAULT_MAX_LENGTH, DEFAULT_SEQ_LEN



def add_eval_parser(sub, add_map_options, decode_help: str, count) -> None:
    """The ``eval`` parser; ``add_map_options(parser)`` adds ``--map`` and the kinds' hyperparameters."""
    from rba_core.ops.downstream import DEBIAN_TASK, DEFAULT_DATASET, INSTALL

    ev = sub.add_parser("eval", help="lm-eval tasks on a causal LM and on its approximation (needs lm-eval: "
                        f"{INSTALL})")
    ev.add_argument("--model", required=True, help="causal LM: alias, hub id, folder (an exported one too) or "
                    "GGUF file")
    ev.add_argument("--tasks", required=True, help=f"comma-separated lm-eval tasks, groups or tags (shipped and "
                    f"offline: {DEBIAN_TASK})")
    ev.add_argument("--include-path", type=Path, help="a folder of lm-eval task YAML files (lm-eval's own option)")
    ev.add_argument("--limit", type=float, help="documents per task (a number below 1: that fraction)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's own)")
    ev.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    ev.add_argument("--log-documents", action="store_true", help="also write every document's log-likelihood of "
                    "each choice, per model (loglikelihood tasks), in the JSON's documents")
    ev.add_argument("--range", nargs=2, type=int, action="append", metavar=("I", "J"),
                    help="remove blocks I+1..J, mapping block output I to J (repeatable; none: the original only)")
    add_map_options(ev)
    ev.add_argument("--dataset", help=f"what the maps are fitted on (default {DEFAULT_DATASET}), as for approximate")
    ev.add_argument("--fit-n", type=int, default=64, help="windows (or texts) the maps are fitted on (default 64)")
    ev.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per fit window")
    ev.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                    help="texts of a labelled text dataset: truncation")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", type=Path, help="where to write the results as JSON ('-': stdout); "
                    "without it a short summary is printed")
    ev.add_argument("--cache-dir", type=Path, help="cache folder (default $RBA_CACHE_DIR or cache/)")
    ev.add_argument("--decode-workers", type=count, help=decode_help)


def run_eval(args: argparse.Namespace, cache, progress, stage, params) -> dict:
    """``eval``'s record; ``params``: the maps' hyperparameters (:class:`rba_core.maps.MapParams`)."""
    from rba_core.ops.downstream import evaluate

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    return evaluate(args.model, args.tasks, dataset=args.dataset, fit_n=args.fit_n, seed=args.seed,
                    seq_len=args.seq_len, ranges=args.range or (), kind=args.map,
                    map_params=params, limit=limit, num_fewshot=args.num_fewshot,
                    include_path=args.include_path, batch_size=args.batch_size, max_length=args.max_length,
                    log_documents=args.log_documents,
                    cache=cache, progress=progress, on_stage=stage)
