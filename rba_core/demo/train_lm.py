"""Train the small GPT-2-architecture language model that the language-model pages use offline.

Text: the Debian package descriptions of ``../shared/datasets/debian_descriptions`` joined with the
docstrings of Python's standard library (read with ``ast``, no module is imported), written to
``lm-text/train.txt`` and ``lm-text/test.txt`` (every tenth stdlib module and the descriptions'
test split held out). Tokens: bytes (a byte-level BPE without merges, 256 tokens + end-of-text),
so the tokenizer is built offline. Model: 8 blocks, width 64, 0.4 M parameters (about 2 MB).
Seeded; ``training.json`` records the held-out perplexity (windows of 128 bytes) and the time.

    python rba_core/demo/train_lm.py [--steps 200]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tiny-gpt2"
TEXT_DIR = HERE / "lm-text"
DEBIAN = HERE.parents[2] / "shared" / "datasets" / "debian_descriptions"
SEQ_LEN, BATCH, LEARNING_RATE = 128, 16, 3e-3
TRAIN_CHARS = 600_000  # keeps the shipped text and the training time small


def _docstrings(held_out: bool) -> list[str]:
    """Module, class and function docstrings of the standard library, sorted by file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = []
    for number, path in enumerate(files):
        if (number % 10 == 0) != held_out:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.isascii():
                    texts.append(doc)
    return texts


def write_corpus() -> dict[str, str]:
    import pyarrow.parquet as pq

    TEXT_DIR.mkdir(exist_ok=True)
    out = {}
    for split in ("train", "test"):
        debian = pq.read_table(DEBIAN / f"{split}.parquet").column("text").to_pylist()
        text = "\n\n".join(["\n".join(debian), *_docstrings(held_out=split == "test")])
        text = text[: TRAIN_CHARS if split == "train" else TRAIN_CHARS // 5]
        (TEXT_DIR / f"{split}.txt").write_text(text, encoding="utf-8")
        out[split] = text
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (batches of 16 windows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    if not __package__:  # run as a script path: make the repository root importable
        sys.path.insert(0, str(HERE.parents[1]))
    from rba_core.data.lm_data import token_windows

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    texts = write_corpus()
    tokenizer = byte_tokenizer()
    train = torch.from_numpy(token_windows(tokenizer, texts["train"], SEQ_LEN + 1))
    test = torch.from_numpy(token_windows(tokenizer, texts["test"], SEQ_LEN))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=8, n_head=4,
                        bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    began = time.perf_counter()
    for steps in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (BATCH,), generator=gen)]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if steps % 50 == 0:
            print(f"step {steps} loss {loss.item():.3f}", file=sys.stderr)
    seconds = time.perf_counter() - began
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=test[s : s + 32], labels=test[s : s + 32]).loss.item() * len(test[s : s + 32])
                  for s in range(0, len(test), 32)]
    perplexity = math.exp(sum(losses) / len(test))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {"seed": args.seed, "steps": steps, "batch": BATCH, "seq_len": SEQ_LEN, "train_seconds": round(seconds, 1),
              "train_tokens": int(train.numel()), "test_windows": len(test), "test_perplexity": round(perplexity, 3),
              "params": sum(p.numel() for p in model.parameters()), "torch_version": torch.__version__}
    (args.out / "training.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record), file=sys.stderr)


def byte_tokenizer():
    """Byte-level BPE without merges: ids 0..255 are bytes, 256 is end-of-text (also padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


if __name__ == "__main__":
    main()
