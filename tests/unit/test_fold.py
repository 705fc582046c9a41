"""Folded maps: T equals lstsq on (m, hs[j] - r) from the model's own forward, and the folded folder
loads with plain transformers in a process that never imports rba_core, with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_decoders import TEXTS, _delete_layers, decoders  # noqa: F401  (fixture)

from rba_core.errors import RBAError
from rba_core.fold import check_foldable, fold_statistics, folded_encoder
from rba_core.models import load_encoder

MLP_OUT = {"llama": "mlp.down_proj", "qwen2": "mlp.down_proj", "gpt2": "mlp.c_proj"}


def _own_m_and_states(folder: str, enc, inputs, i: int):
    """m of block i (a hook on the model's own MLP output layer, in a separately loaded copy) and hs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.base_model.h if hasattr(model.base_model, "h") else model.base_model.layers
    seen = {}
    handle = layers[i - 1].get_submodule(MLP_OUT[enc.family]).register_forward_hook(
        lambda _m, _in, out: seen.__setitem__("m", out))
    with torch.no_grad():
        out = model(**inputs, position_ids=enc.position_ids(inputs), output_hidden_states=True, use_cache=False)
    handle.remove()
    return seen["m"], out.hidden_states


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_folded_map_equals_lstsq_on_the_mlp_output(family, decoders):  # noqa: F811
    folder = decoders(family, "left")
    enc = load_encoder(folder, device="cpu")
    inputs = enc.preprocess(TEXTS)
    stats = fold_statistics(enc, [inputs], [(1, 3)])[(1, 3)]
    m, hs = _own_m_and_states(folder, enc, inputs, 1)
    mask = inputs["attention_mask"].bool()
    m_rows = m[mask].double().numpy()
    target = (hs[3][mask] - hs[1][mask]).double().numpy() + m_rows  # hs[j] - r, r = hs[i] - m
    expected = np.linalg.lstsq(m_rows, target, rcond=None)[0]
    assert stats.count == int(mask.sum())
    # float32 products summed in float64: T agrees to float32 precision and is as good a fit.
    got = stats.fit()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    residual = lambda t: np.sum((m_rows @ t - target) ** 2)  # noqa: E731
    assert residual(got) <= residual(expected) * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_checkpoint_loads_without_rba_core_and_matches(family, decoders, tmp_path):  # noqa: F811
    from rba_core.export import save_folded

    folder = decoders(family, "right")
    enc = load_encoder(folder, device="cpu")
    inputs = enc.preprocess(TEXTS)
    ranges = [(1, 2), (3, 4)] if family == "llama" else [(1, 3)]
    stats = fold_statistics(enc, [inputs], ranges)
    maps = {rng: s.fit() for rng, s in stats.items()}
    folded = folded_encoder(enc, maps)
    assert folded.num_blocks == 4 - sum(j - i for i, j in ranges) and enc.num_blocks == 4
    with torch.no_grad():
        ours = folded.logits(folded.hidden_states(inputs)[0][-1])
    save_folded(folded, tmp_path / "out", {"ranges": ranges})
    np.save(tmp_path / "ids.npy", inputs["input_ids"].numpy())
    np.save(tmp_path / "mask.npy", inputs["attention_mask"].numpy())
    script = f"""
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()
ids, mask = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r})), torch.from_numpy(np.load({str(tmp_path / 'mask.npy')!r}))
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
np.save({str(tmp_path / 'logits.npy')!r}, logits.numpy())
assert "rba_core" not in sys.modules
print(model.config.num_hidden_layers)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == folded.num_blocks
    theirs = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(theirs[mask], ours[mask], rtol=1e-4, atol=1e-5)
    record = json.loads((tmp_path / "out" / "rba.json").read_text())
    assert record["ranges"] == [list(r) for r in ranges]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config.get("layer_types") or [0] * folded.num_blocks) == folded.num_blocks


def test_ranges_that_cannot_fold_are_one_sentence(decoders):  # noqa: F811
    gemma = load_encoder(decoders("gemma2"), device="cpu")
    with pytest.raises(RBAError, match="cannot be folded"):
        check_foldable(gemma, [(1, 3)])
    llama = load_encoder(decoders("llama"), device="cpu")
    for ranges, words in (([(0, 2)], "starts at the embeddings"), ([(0, 4)], "remove every layer"),
                          ([(1, 2), (2, 3)], "merge the two ranges")):
        with pytest.raises(RBAError, match=words):
            check_foldable(llama, ranges)


def test_cli_export_folded_writes_a_plain_checkpoint_with_perplexities(decoders, tmp_path):  # noqa: F811
    from test_decoders import _prose

    from rba_core.cli import main

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt").write_text(_prose(0, 200))
    (tmp_path / "text" / "test.txt").write_text(_prose(1, 100))
    out = tmp_path / "folded"
    common = ["--model", decoders("qwen2"), "--dataset", str(tmp_path / "text"), "--seq-len", "16", "--seed", "0",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["export", *common, "--fit-n", "20", "--eval-n", "6", "--range", "1", "3", "--map", "folded",
                 "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((out / "rba.json").read_text())
    assert record["layers"] == {"original": 4, "folded": 2} and set(record["perplexity"]) == {"original", "folded"}
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert record["params"]["original"] - record["params"]["folded"] == sum(
        p.numel() for b in load_encoder(decoders("qwen2"), device="cpu").blocks[1:3] for p in b.parameters())
    # folding into a model whose blocks cannot take it is one sentence, exit 2
    assert main(["export", *common[:1], decoders("gemma2"), *common[2:], "--fit-n", "4", "--range", "1", "3",
                 "--map", "folded", "--out", str(tmp_path / "no")]) == 2
    # the other maps keep the rba-compressed folder
    assert main(["export", *common, "--fit-n", "8", "--range", "1", "3", "--map", "linear",
                 "--out", str(tmp_path / "linear")]) == 0
    assert json.loads((tmp_path / "linear" / "rba.json").read_text())["format"] == "rba-compressed"
