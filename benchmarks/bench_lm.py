"""Language-model benchmark: the pass of a random 16-layer D=1024 Llama on real local text vs a plain forward.

    python benchmarks/bench_lm.py [--n 64] [--seq-len 256] [--batch 8] [--window 4]

Model: a random-weight Llama (16 layers, hidden 1024, MLP 2816, 16 heads), saved with the demo
GPT's byte tokenizer (vocabulary 257) so that it reads ``demo-text`` (Debian package descriptions and
Python docstrings, shipped with the package). Reports tokens/s of ``model.model(**batch)`` (the
plain decoder forward, no LM head) and of the pass with window statistics (Gram of hs[i] and
cross-Gram with hs[i+n]) on the same windows, best of ``--repeats`` runs, the two timed in turn.
The pass ends with one-off solves (the fit residual of every kept range, stored with the entry),
whose time does not grow with the number of windows; it is reported on its own as well.

With ``--export I J`` it also folds range I→J (``export --map folded``, fitted on ``--n`` windows) and
reports the plain checkpoint's size and the latency of plain ``AutoModelForCausalLM`` forwards
(logits of one batch), original vs folded, timed in turn.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import common
from rba_core.ops.run import lm_dataset
from rba_core.data import open_dataset, sample_indices
from rba_core.passes.extract import run_pass
from rba_core.models import load_encoder
from rba_core.registry import MODELS
from rba_core.maps import fit_residual_matrix
from rba_core.measures.stats import StatsPlan, TokenStats, planned_pairs, stats_bytes


def llama_folder(folder: Path) -> str:
    """Save the random Llama with the demo GPT's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(MODELS["demo-GPT"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def export_report(folder: str, source, args, tmp: Path) -> dict:
    """Fold ``args.export`` into a plain checkpoint; its size and plain-transformers latency vs the original's."""
    from transformers import AutoModelForCausalLM

    from rba_core.ops.analysis import export
    from rba_core.cache import Cache

    out = tmp / "folded"
    record = export(folder, "demo-text", args.n, 0, [tuple(args.export)], "folded", out, eval_n=args.batch,
                    seq_len=args.seq_len, cache=Cache(tmp / "cache"))
    ids = torch.as_tensor(np.stack(source.items(range(args.batch))))
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("original", folder), ("folded", out))}
    seconds = {name: float("inf") for name in models}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # in turn; the first round warms up
            for name, model in models.items():
                seconds[name] = min(seconds[name], common.best_seconds(lambda: model(input_ids=ids), 1))
    size = lambda path: sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))  # noqa: E731
    return {"range": args.export, "layers": record["layers"], "params": record["params"],
            "perplexity": record.get("perplexity"),
            "weights_bytes": {"original": size(folder), "folded": size(out)},
            "batch_latency_s": seconds, "speed_up": seconds["original"] / seconds["folded"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--export", type=int, nargs=2, metavar=("I", "J"), help="also fold range I→J and time it")
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "lm.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = llama_folder(Path(tmp) / "llama")
        encoder = load_encoder(folder, "cpu")
        source = open_dataset(lm_dataset(folder, "demo-text", args.seq_len), "train")
        exported = export_report(folder, source, args, Path(tmp)) if args.export else None
    indices = sample_indices(len(source), args.n, 0)
    pairs = planned_pairs(encoder.num_blocks + 1, args.window)
    windows = [source.items(indices[s : s + args.batch]) for s in range(0, args.n, args.batch)]

    def plain() -> None:
        with torch.inference_mode():
            for batch in windows:
                encoder.model.model(**encoder.preprocess(batch))

    run_pass(encoder, source, indices[: args.batch], StatsPlan(pairs), args.batch)  # warm-up
    seconds = {"plain_forward": float("inf"), "pass_window_stats": float("inf")}
    for _ in range(args.repeats):  # in turn, so that a busy spell of the machine hits both
        seconds["plain_forward"] = min(seconds["plain_forward"], common.best_seconds(plain, 1))
        seconds["pass_window_stats"] = min(seconds["pass_window_stats"], common.best_seconds(
            lambda: run_pass(encoder, source, indices, StatsPlan(pairs), args.batch), 1))
    stats = TokenStats.from_arrays(run_pass(encoder, source, indices[: args.batch], StatsPlan(pairs), args.batch)["stats"])
    seconds["one_off_solves"] = common.best_seconds(lambda: fit_residual_matrix(stats), 1)
    tokens = args.n * args.seq_len
    result = {"n_windows": args.n, "seq_len": args.seq_len, "batch": args.batch, "window": args.window,
              "threads": torch.get_num_threads(), "seconds": seconds,
              "tokens_per_s": {k: tokens / seconds[k] for k in ("plain_forward", "pass_window_stats")},
              "pass_vs_plain": seconds["plain_forward"] / seconds["pass_window_stats"],
              "streaming_vs_plain": seconds["plain_forward"] / (seconds["pass_window_stats"] - seconds["one_off_solves"]),
              "stats_bytes": {"windows": stats_bytes(encoder.num_blocks + 1, encoder.hidden_size, pairs),
                              "all_pairs": stats_bytes(encoder.num_blocks + 1, encoder.hidden_size)},
              "export": exported, "machine": common.machine()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
