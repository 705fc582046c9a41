"""The block adapter reproduces the Hugging Face forward pass exactly and leaves the model untouched."""

import pytest
import torch
from conftest import build_tiny_model

from rba_core.ops.analysis import approximate
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.passes.extract import extract
from rba_core.models import load_encoder

FAMILIES = ("vit", "deit", "dinov2")
MODEL_CLASSES = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model"}


@pytest.fixture(scope="module")
def encoders(tiny_models):
    return {fam: load_encoder(tiny_models[fam], device="cpu") for fam in FAMILIES}


@pytest.fixture(scope="module")
def pixels(encoders, image_folder):
    images = open_dataset(image_folder, "train").items(range(5))
    return {fam: enc.preprocess(images) for fam, enc in encoders.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_saved_weights_through_from_pretrained(family, encoders, tiny_models):
    enc = encoders[family]
    assert enc.family == family
    assert type(enc.model).__name__ == MODEL_CLASSES[family]
    assert not enc.model.training
    assert enc.num_blocks == 4 and enc.hidden_size == 32
    # The same random model, rebuilt in memory: every loaded weight is the saved one
    # (nothing newly initialised or left out), in float32.
    expected = build_tiny_model(family).state_dict()
    state = enc.model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_accounting(family, encoders):
    enc = encoders[family]
    blocks = sum(enc.block_params(k) for k in range(1, enc.num_blocks + 1))
    rest = sum(p.numel() for p in enc.model.embeddings.parameters())
    rest += sum(p.numel() for p in enc.final_norm.parameters())
    assert blocks + rest == enc.num_params() == sum(p.numel() for p in enc.model.parameters())
    assert len({enc.block_params(k) for k in range(1, enc.num_blocks + 1)}) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_run_blocks_reproduces_hidden_states(family, encoders, pixels):
    enc, px = encoders[family], pixels[family]
    assert px["pixel_values"].shape == (5, 3, 32, 32)
    with torch.no_grad():
        out = enc.model(**px, output_hidden_states=True)
        hs = out.hidden_states
        L = enc.num_blocks
        assert len(hs) == L + 1
        ours, ctx = enc.hidden_states(px)
        torch.testing.assert_close(ours[0], hs[0], rtol=0, atol=1e-6)
        for k in range(1, L + 1):
            torch.testing.assert_close(ours[k], hs[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.final(ours[L], enc.token_mask(px)),
                                   out.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
        # Starting from any block output reaches the same later outputs.
        for start in range(1, L):
            for end in range(start + 1, L + 1):
                torch.testing.assert_close(enc.run_blocks(hs[start], start + 1, end, ctx), hs[end],
                                           rtol=1e-5, atol=1e-5)
        # The final norm is really applied (hs[L] is before it).
        assert not torch.allclose(enc.final(hs[L], None), hs[L][:, 0])


def _hooks(model: torch.nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            if getattr(module, kind, None):
                found.append(f"{name}.{kind}")
    return found


@pytest.mark.parametrize("family", ("vit", "dinov2"))
def test_no_hooks_and_no_mutation_after_extract_and_approximate(family, tiny_models, image_folder,
                                                               tmp_path):
    # A fresh model: calling it with output_hidden_states=True (as other tests do) makes
    # transformers itself install output-capturing hooks.
    enc = load_encoder(tiny_models[family], device="cpu")
    assert _hooks(enc.model) == []
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    cache = Cache(tmp_path)
    extract(tiny_models[family], image_folder, 6, cache=cache, encoder=enc)
    approximate(tiny_models[family], image_folder, 6, 4, 0, [(1, 3)], "affine", cache=cache,
                encoder=enc)
    assert _hooks(enc.model) == []
    after = enc.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in enc.model.parameters())
    assert len(enc.blocks) == 4
