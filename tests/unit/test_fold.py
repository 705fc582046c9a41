"""Folded maps: T equals lstsq on (m, hs[j] - r) from the model's own forward (hs[0] and hs[j] for a
range from the embeddings), the folded model's own forward gives the approximation it claims, and
the folded folder loads with plain transformers in a process that never imports rba_core, with the
same outputs. Decoders, and the pre-LN encoders (ViT with a classification head, DINOv2 with layer
scales, CLIP, ModernBERT)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from test_decoders import TEXTS, _delete_layers, decoders  # noqa: F401  (fixture)
from test_families import TRAIN_TEXTS, _layer_list, _own_final, _own_states, _perturb_norms, _real, save_family_model

from rba_core.errors import RBAError
from rba_core.passes.fold import check_foldable, fold_statistics, folded_encoder
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
    from rba_core.store.export import save_folded

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
    assert check_foldable(gemma, [(0, 2)]) == [(0, 2)]  # its (scaled) token embeddings take the map
    llama = load_encoder(decoders("llama"), device="cpu")
    for ranges, words in (([(0, 4)], "remove every layer"), ([(1, 2), (2, 3)], "merge the two ranges")):
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


# --- pre-LN encoders, and ranges that start at the embeddings ---------------------------------------

RNG = np.random.default_rng(0)
IMAGES = [Image.fromarray((RNG.random((28 + k, 32, 3)) * 220 + 10).astype(np.uint8)) for k in range(5)]
#: inside a block, the linear layer whose output is the MLP's (read from transformers' modeling files)
ENCODER_MLP_OUT = {"vit": "mlp.fc2", "dinov2": "mlp.fc2", "clip": "mlp.fc2", "modernbert": "mlp.Wo"}


def _vit_with_head(folder: Path) -> Path:
    """A tiny ViT image classifier (3 labels): its folded export keeps the head."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY, num_labels=3))
    _perturb_norms(model, 0)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _dinov2_with_layer_scale(folder: Path) -> Path:
    """A tiny DINOv2 whose layer scales λ are random (0.2..1.5 per channel), not the default 1."""
    from transformers import Dinov2Config, Dinov2Model, ViTImageProcessor

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY, layerscale_value=0.5))
    _perturb_norms(model, 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lambda1"):
                param.uniform_(0.2, 1.5)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _modernbert_with_larger_mlp_outputs(folder: Path) -> Path:
    """test_families' tiny ModernBERT with its MLP output layers scaled up 20x: freshly initialised ones
    write outputs about 1e-3 of the residual stream (trained ones do not), so the fit's float32
    products would lose the few digits in which hs[j] and hs[i] differ."""
    from transformers import ModernBertModel

    save_family_model(folder, "modernbert")
    model = ModernBertModel.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.Wo.weight.mul_(20.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """``get(name)``: the folder of a tiny saved model (``vit`` has a classification head, ``dinov2``
    random layer scales, ``modernbert`` larger MLP outputs; the others as test_families builds them)."""
    root, made = tmp_path_factory.mktemp("fold-encoders"), {}
    builders = {"vit": _vit_with_head, "dinov2": _dinov2_with_layer_scale,
                "modernbert": _modernbert_with_larger_mlp_outputs}

    def get(name: str) -> str:
        if name not in made:
            build = builders.get(name, lambda folder: save_family_model(folder, name))
            made[name] = str(build(root / name))
        return made[name]

    return get


def _inputs(enc):
    return enc.preprocess(IMAGES if enc.modality == "image" else TRAIN_TEXTS)  # enough tokens for a well-posed fit


def _own_m(family: str, model, inputs, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """m of block i from the model's own forward (a hook on its MLP output layer, times DINOv2's λ)
    and the model's own hs[0..L]."""
    block = _layer_list(family, model)[i - 1]
    seen = {}
    handle = block.get_submodule(ENCODER_MLP_OUT[family]).register_forward_hook(
        lambda _m, _in, out: seen.__setitem__("m", out))
    try:
        hs, _ = _own_states(family, model, inputs)
    finally:
        handle.remove()
    scale = getattr(getattr(block, "layer_scale2", None), "lambda1", None)
    return (seen["m"] if scale is None else seen["m"] * scale.detach()), hs


def _claimed(enc, inputs, hidden: torch.Tensor, j: int) -> torch.Tensor:
    """What a folded range ending at block j claims: ``hidden`` (hs[i] with m replaced by m·T) run
    through blocks j+1..L of the original model by hand, then its final representation."""
    with torch.no_grad():
        _, ctx = enc.hidden_states(inputs)
        return enc.final(enc.run_blocks(hidden, j + 1, enc.num_blocks, ctx), enc.token_mask(inputs))


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "modernbert"])
def test_encoder_fold_equals_lstsq_and_gives_the_approximation_it_claims(family, encoders):
    from transformers import AutoModel

    enc = load_encoder(encoders(family), device="cpu")
    inputs = _inputs(enc)
    i, j = 1, 3
    stats = fold_statistics(enc, [inputs], [(i, j)])[(i, j)]
    m, hs = _own_m(family, AutoModel.from_pretrained(encoders(family)).eval(), inputs, i)
    m_rows, target = _real(m, inputs).double().numpy(), (_real(hs[j] - hs[i] + m, inputs)).double().numpy()
    expected = np.linalg.lstsq(m_rows, target, rcond=None)[0]
    got = stats.fit()
    assert stats.count == len(m_rows)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    residual = lambda t: np.sum((m_rows @ t - target) ** 2)  # noqa: E731
    assert residual(got) <= residual(expected) * (1 + 1e-5) + 1e-12
    # The folded model's own forward gives hs[i] - m + m·T run through blocks j+1..L.
    folded = folded_encoder(enc, {(i, j): got})
    t = torch.as_tensor(got, dtype=torch.float32)
    claimed = _claimed(enc, inputs, hs[i] - m + m @ t, j)
    with torch.no_grad():
        own = _own_final(family, folded.model(**inputs), inputs)
    torch.testing.assert_close(own, claimed, rtol=1e-4, atol=1e-5)
    assert folded.num_blocks == enc.num_blocks - (j - i) and folded.model.config.num_hidden_layers == 2
    assert enc.num_blocks == 4  # the source is untouched
    if family == "dinov2":  # λ went into the MLP output layer
        assert torch.equal(folded.blocks[i - 1].layer_scale2.lambda1, torch.ones(enc.hidden_size))
        assert not torch.equal(enc.blocks[i - 1].layer_scale2.lambda1, torch.ones(enc.hidden_size))


@pytest.mark.parametrize("family", ["vit", "dinov2", "gpt2"])
def test_a_range_from_the_embeddings_folds_into_them(family, encoders, decoders):  # noqa: F811
    """0→2: T = lstsq(hs[0], hs[2]) folded into the embedding weights gives blocks 3..L run on hs[0]·T;
    GPT-2's tied LM head is untied and keeps the original matrix."""
    enc = load_encoder(decoders(family) if family == "gpt2" else encoders(family), device="cpu")
    inputs = _inputs(enc) if family != "gpt2" else enc.preprocess(TEXTS)
    stats = fold_statistics(enc, [inputs], [(0, 2)])[(0, 2)]
    with torch.no_grad():
        hs, _ = enc.hidden_states(inputs)
    x, y = _real(hs[0], inputs).double().numpy(), _real(hs[2], inputs).double().numpy()
    expected = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(stats.fit(), expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    folded = folded_encoder(enc, {(0, 2): stats.fit()})
    t = torch.as_tensor(stats.fit(), dtype=torch.float32)
    hidden = enc.run_blocks(hs[0] @ t, 3, 4, enc.hidden_states(inputs)[1])
    with torch.no_grad():
        if family == "gpt2":
            own = folded.model(**inputs, position_ids=enc.position_ids(inputs)).logits
            mask = inputs["attention_mask"].bool()
            torch.testing.assert_close(own[mask], enc.logits(hidden)[mask], rtol=1e-4, atol=1e-5)
            assert enc.lm_head.weight is enc.stem()["embed"].weight  # the source stays tied
            assert torch.equal(folded.lm_head.weight, enc.lm_head.weight)
            assert folded.model.config.tie_word_embeddings is False
        else:
            own = _own_final(family, folded.model(**inputs), inputs)
            torch.testing.assert_close(own, enc.final(hidden, None), rtol=1e-4, atol=1e-5)


def test_folded_encoders_load_without_rba_core_and_match(encoders, decoders, tmp_path):  # noqa: F811
    """Each export loads with plain transformers in a process that never imports rba_core (the ViT
    classifier with its head, the others with AutoModel; GPT-2 folded into its tied embeddings)."""
    from rba_core.store.export import save_folded

    cases = {"vit": [(0, 1), (2, 3)], "dinov2": [(1, 3)], "clip": [(1, 3)], "modernbert": [(2, 4)], "gpt2": [(0, 2)]}
    expected = {}
    for family, ranges in cases.items():
        enc = load_encoder(decoders(family) if family == "gpt2" else encoders(family), device="cpu")
        inputs = enc.preprocess(TEXTS) if family == "gpt2" else _inputs(enc)
        folded = folded_encoder(enc, {rng: s.fit() for rng, s in fold_statistics(enc, [inputs], ranges).items()})
        with torch.no_grad():
            hs, _ = folded.hidden_states(inputs)
            final = folded.final(hs[-1], folded.token_mask(inputs))
        if family == "gpt2":
            final = folded.logits(hs[-1])
        elif family == "vit":  # the source's own head on the folded final representation
            from transformers import ViTForImageClassification

            final = ViTForImageClassification.from_pretrained(encoders("vit")).classifier(final)
        save_folded(folded, tmp_path / family, {"ranges": ranges})
        torch.save(dict(inputs), tmp_path / f"{family}-inputs.pt")
        expected[family] = (final, folded.num_blocks, inputs.get("attention_mask"))
    script = f"""
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification
root = {str(tmp_path)!r}
for family in {list(cases)!r}:
    inputs = torch.load(f"{{root}}/{{family}}-inputs.pt")
    loader = {{"vit": AutoModelForImageClassification, "gpt2": AutoModelForCausalLM}}.get(family, AutoModel)
    model = loader.from_pretrained(f"{{root}}/{{family}}").eval()
    with torch.no_grad():
        if family == "gpt2":
            mask = inputs["attention_mask"]
            out = model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        else:
            out = model(**inputs)
            pooled = {{"vit": "logits", "dinov2": "pooler_output", "clip": "pooler_output"}}.get(family)
            out = getattr(out, pooled) if pooled else out.last_hidden_state[:, 0]
    torch.save((out, model.config.num_hidden_layers), f"{{root}}/{{family}}-out.pt")
assert "rba_core" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    for family, (final, layers, mask) in expected.items():
        theirs, their_layers = torch.load(tmp_path / f"{family}-out.pt")
        assert their_layers == layers, family
        if family == "gpt2":
            theirs, final = theirs[mask.bool()], final[mask.bool()]
        torch.testing.assert_close(theirs, final, rtol=1e-4, atol=1e-5, msg=lambda m, f=family: f"{f}: {m}")
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["tie_word_embeddings"] is False


def _one_sentence(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text.count(". ") == 0 and text.endswith("."), text
    return text


def test_encoders_that_cannot_fold_say_why_in_one_sentence(encoders):
    clip = load_encoder(encoders("clip"), device="cpu")
    with pytest.raises(RBAError) as error:
        check_foldable(clip, [(0, 2)])
    assert "pre_layrnorm" in _one_sentence(error) and "start the range at block 1" in str(error.value)
    assert check_foldable(clip, [(1, 2)]) == [(1, 2)]
    modernbert = load_encoder(encoders("modernbert"), device="cpu")
    with pytest.raises(RBAError, match="LayerNorm") as error:
        check_foldable(modernbert, [(0, 2)])
    _one_sentence(error)
    bert = load_encoder(encoders("bert"), device="cpu")
    for ranges in ([(1, 3)], [(0, 2)]):
        with pytest.raises(RBAError, match="post-LN") as error:
            check_foldable(bert, ranges)
        assert "--map linear" in _one_sentence(error)


def test_cli_export_folded_image_model_records_the_final_mse(encoders, image_folder, tmp_path):
    """``export --map folded`` on an image classifier: a plain folder with the head, and rba.json's
    final MSE equals the one plain transformers measures on the same evaluation images."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from rba_core.cli import main
    from rba_core.data import open_dataset, sample_indices

    out = tmp_path / "folded"
    assert main(["export", "--model", encoders("vit"), "--dataset", image_folder, "--fit-n", "8", "--eval-n", "6",
                 "--seed", "0", "--range", "0", "2", "--map", "folded", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    record = json.loads((out / "rba.json").read_text())
    assert record["layers"] == {"original": 4, "folded": 2} and record["data"]["eval_n"] == 6
    test = open_dataset(image_folder, "test")
    images = test.items(sample_indices(len(test), 6, 0, "test", test.unit))
    pixels = AutoImageProcessor.from_pretrained(encoders("vit"), backend="pil")(images=images, return_tensors="pt")
    finals = []
    for folder in (encoders("vit"), out):
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            finals.append(model.vit(pixels["pixel_values"]).last_hidden_state[:, 0].double())
    assert record["mse_final"] > 0
    np.testing.assert_allclose(record["mse_final"], float(((finals[0] - finals[1]) ** 2).mean()), rtol=1e-4)
