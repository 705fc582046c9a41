"""Maps trained by gradient descent (issue 16, part 1): cosine, mlp, deep-mlp, as plug-in kinds."""

import json

import numpy as np
import pytest
import torch

import rba_core
from rba_core.ops.analysis import approximate, export, fit_range_maps
from rba_core.cache import Cache
from rba_core.data import open_dataset, open_sample
from rba_core.maps import MAPS, MapParams, tokens_per_sample
from rba_core.models import load_encoder
from rba_core.passes.range_pass import range_statistics
from rba_core.ops.run import Run

FIT_N, EVAL_N = 64, 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(tmp_path_factory.mktemp("trained"))


def test_token_samples_are_the_seeded_tokens_of_each_sample(cache):
    """Each fit sample's rows are the tokens a generator seeded with its index picks, whatever the batching:
    checked against the demo ViT's own hidden states of each sample run alone."""
    per_sample = 5
    stats = range_statistics("digits-ViT", "digits", 12, 0, [(1, 3)], samples=per_sample, cache=cache)
    encoder = load_encoder("digits-ViT", device="cpu")
    source, indices = open_sample("digits", "train", 12, 0)
    rows = {1: [], 3: []}
    for index in indices:
        with torch.no_grad():
            hs, _ = encoder.hidden_states(encoder.preprocess(source.items([index])))
        chosen = torch.randperm(hs[0].shape[1], generator=torch.Generator().manual_seed(int(index)))[:per_sample]
        for k in rows:
            rows[k].append(hs[k][0, chosen.sort().values].numpy())
    for k in rows:
        np.testing.assert_allclose(stats.samples.states[k], np.concatenate(rows[k]), rtol=1e-5, atol=1e-5)
    assert list(stats.samples.sample) == [i for i in indices for _ in range(per_sample)]
    assert stats.samples.held_out().sum() == per_sample * len(indices[::10])


def test_mlp_beats_linear_where_linear_leaves_error_and_is_cached_and_deterministic(cache, tmp_path, monkeypatch):
    """digits-ViT, range 1→4: the linear map leaves a final MSE of about 0.3; the mlp translator lowers it."""
    linear = approximate("digits-ViT", "digits", FIT_N, EVAL_N, 0, [(1, 4)], cache=cache, latency=False)
    mlp = approximate("digits-ViT", "digits", FIT_N, EVAL_N, 0, [(1, 4)], "mlp", cache=cache, latency=False)
    assert mlp.mse_final < 0.8 * linear.mse_final
    report = mlp.map_params["training"][0]
    assert report["range"] == [1, 4] and report["val_loss"] < report["initial_val_loss"] and report["steps"] > 0
    assert {"train_lr", "train_steps", "train_tokens"} <= set(mlp.map_params)
    d = 64
    assert mlp.params["approximated"] - linear.params["approximated"] == MAPS["mlp"].added_params(d) - d * d
    # the trained map is stored: asking again trains nothing
    import rba_core.maps.training

    monkeypatch.setattr(rba_core.maps.training, "train", lambda *a, **k: pytest.fail("trained again"))
    again = approximate("digits-ViT", "digits", FIT_N, EVAL_N, 0, [(1, 4)], "mlp", cache=cache, latency=False)
    assert again.mse_final == mlp.mse_final
    monkeypatch.undo()
    # a fresh cache trains the same map again (seeded; deterministic on CPU)
    fresh = approximate("digits-ViT", "digits", FIT_N, EVAL_N, 0, [(1, 4)], "mlp", cache=Cache(tmp_path / "fresh"),
                        latency=False)
    assert fresh.mse_final == mlp.mse_final and fresh.map_params == mlp.map_params


def test_deep_mlp_exports_in_the_compressed_format_and_loads_back(cache, tmp_path):
    params = MapParams(train_steps=60)
    record = export("digits-ViT", "digits", FIT_N, 0, [(1, 4)], "deep-mlp", tmp_path / "deep", map_params=params,
                    cache=cache)
    assert record["ranges"][0]["map"] == "deep-mlp" and "val_loss" in record["ranges"][0]["training"]
    loaded = rba_core.load_compressed(tmp_path / "deep")
    run = Run("digits-ViT", "digits", FIT_N, cache=cache)
    _, maps = fit_range_maps(run, [(1, 4)], "deep-mlp", params)
    from rba_core.passes.approx import ApproximatedEncoder

    net = ApproximatedEncoder(run.lazy(), [(1, 4)], maps).eval()
    images = open_dataset("digits", "test").items(range(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded.preprocess(images)), net(**run.lazy().preprocess(images)),
                                   rtol=1e-5, atol=1e-5)


def test_cosine_trains_on_the_fold_target_and_exports_a_plain_checkpoint(cache, tmp_path):
    """demo-GPT, range 3→5: the cosine map is trained from the folded least-squares map and folds like it."""
    params = MapParams(train_steps=40)
    result = approximate("demo-GPT", "demo-text", 16, 8, 0, [(3, 5)], "cosine", map_params=params, seq_len=64,
                         cache=cache, latency=False)
    report = result.map_params["training"][0]
    assert report["val_loss"] <= report["initial_val_loss"] and report["rows"]["train"] > 0
    assert result.params["approximated"] < result.params["original"]  # no added parameters: it folds
    record = export("demo-GPT", "demo-text", 16, 0, [(3, 5)], "cosine", tmp_path / "cos", map_params=params,
                    eval_n=8, seq_len=64, cache=cache)
    assert record["map"] == "cosine" and record["layers"]["folded"] == record["layers"]["original"] - 2
    assert record["perplexity"]["folded"] == pytest.approx(result.perplexity["approximated"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cos")
    assert model.config.num_hidden_layers == record["layers"]["folded"]
    assert json.loads((tmp_path / "cos" / "rba.json").read_text())["training"][0]["range"] == [3, 5]


def test_trained_kinds_declare_their_budget():
    assert tokens_per_sample(MapParams(train_tokens=100), 8) == 13
    assert all(MAPS[k].trained for k in ("cosine", "mlp", "deep-mlp")) and not MAPS["linear"].trained


def test_healing_lowers_the_error_and_the_healed_export_loads_with_plain_transformers(cache, tmp_path):
    """--heal with LoRA on digits-ViT 1→4 (linear map): the final MSE on the evaluation images drops; the original
    model is untouched; a healed folded demo-GPT export is a plain checkpoint that plain transformers loads."""
    from rba_core.ops.heal import HealPlan

    plan = HealPlan(steps=30, lora_rank=4, lr=1e-3)
    result = approximate("digits-ViT", "digits", 32, 16, 0, [(1, 4)], cache=cache, latency=False, heal=plan)
    healing = result.healing
    assert healing["metric"] == "mse_final" and healing["after"] < 0.9 * healing["before"]
    assert healing["before"] == pytest.approx(result.mse_final, rel=1e-4)  # the unhealed model's own MSE
    again = approximate("digits-ViT", "digits", 32, 16, 0, [(1, 4)], cache=cache, latency=False, heal=plan)
    assert again.healing == healing  # stored
    record = export("demo-GPT", "demo-text", 16, 0, [(3, 5)], "folded", tmp_path / "healed", eval_n=8, seq_len=64,
                    cache=cache, heal=HealPlan(steps=5, lora_rank=2, lr=1e-3))
    assert record["healing"]["metric"] == "perplexity"
    assert record["perplexity"]["folded"] == pytest.approx(record["healing"]["after"], rel=1e-3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert model.config.num_hidden_layers == 6 and not any("lora" in n for n, _ in model.named_parameters())
