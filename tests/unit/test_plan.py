"""Compression plans to a budget (``rba_core.ops.plan``, ``plan`` on the command line), on the demo models.

Each check is against an independent computation: the exported folder's perplexity with plain transformers,
ShortGPT's Block Influence from the model's own hidden states, a later greedy map against ``numpy.linalg.lstsq``
on the states of the model the earlier step produced (run block by block by hand), and the compressed export's
final MSE against the original model's own forward.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rba_core.cache import Cache
from rba_core.cli import main
from rba_core.data import open_sample
from rba_core.errors import RBAError
from rba_core.ops.plan import export_plan, plan
from rba_core.ops.run import lm_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LM = dict(model="demo-GPT", dataset="demo-text", fit_n=32, eval_n=16, seed=0, seq_len=128)


def _windows(split: str, n: int) -> torch.Tensor:
    source, indices = open_sample(lm_dataset("demo-GPT", "demo-text", LM["seq_len"]), split, n, 0)
    return torch.as_tensor(np.stack(source.items(indices)), dtype=torch.long)


def _perplexity(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    return math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(tmp_path_factory.mktemp("plan-cache"))


@pytest.fixture(scope="module")
def folded_plans(cache):
    return {strategy: plan(**LM, remove_blocks=2, strategy=strategy, kind="folded", cache=cache)
            for strategy in ("greedy", "window")}


def test_greedy_is_no_worse_than_the_best_window(folded_plans):
    greedy, window = folded_plans["greedy"], folded_plans["window"]
    assert greedy.final["metric"] <= window.final["metric"] * (1 + 1e-9)
    assert [s["blocks_removed"] for s in greedy.steps] == [1, 2] and len(window.steps) == 1
    for result in folded_plans.values():
        assert result.final["blocks"] == {"original": 8, "approximated": 6}
        assert sum(j - i for i, j in result.final["ranges"]) == 2
        low, high = result.final["interval"]
        assert low <= result.final["metric"] <= high
        assert result.original["metric"] == pytest.approx(_perplexity(_original_model(), _windows("test", 16)),
                                                          rel=1e-4)


def _original_model():
    from transformers import AutoModelForCausalLM

    from rba_core.registry import DEMO_LM_DIR

    return AutoModelForCausalLM.from_pretrained(str(DEMO_LM_DIR), dtype=torch.float32).eval()


def test_folded_export_loads_with_plain_transformers_and_reproduces_the_perplexity(folded_plans, tmp_path):
    from transformers import AutoModelForCausalLM

    result = folded_plans["greedy"]
    assert result.plain_checkpoint
    record = export_plan(result, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 6 and record["layers"] == {"original": 8, "folded": 6}
    assert _perplexity(model, _windows("test", 16)) == pytest.approx(result.final["metric"], rel=1e-4)
    written = json.loads((tmp_path / "out" / "rba.json").read_text())
    assert written["plan"]["strategy"] == "greedy" and len(written["plan"]["steps"]) == 2


def test_shortgpt_skips_the_blocks_of_lowest_block_influence(cache):
    result = plan(**LM, remove_blocks=2, strategy="shortgpt", cache=cache)
    model = _original_model()
    with torch.no_grad():
        hs = model(input_ids=_windows("train", 32), output_hidden_states=True).hidden_states
    influence = [float((1 - F.cosine_similarity(a.flatten(0, 1).double(), b.flatten(0, 1).double(), dim=-1)).mean())
                 for a, b in zip(hs, hs[1:])]
    assert sorted(result.final["removed_blocks"]) == sorted(int(k) + 1 for k in np.argsort(influence)[:2])
    assert result.map == "identity" and result.final["metric"] == result.final["skip"]["metric"]
    # skipping is a plain checkpoint too: the blocks are deleted
    assert result.plain_checkpoint and result.compressed.num_blocks == 6


def test_greedy_fits_later_maps_on_the_states_the_earlier_cuts_produce(cache):
    """Linear maps: the second step's map is least squares on the fit tokens of the model after the first step."""
    result = plan(**LM, remove_blocks=2, strategy="greedy", kind="linear", cache=cache)
    first, second = (tuple(s["original_range"]) for s in result.steps)
    assert second[0] >= first[1], "this check needs the second cut after the first"
    net = result.compressed
    maps = dict(zip(net.ranges, net.maps))
    model = _original_model()
    ids = _windows("train", 32)
    blocks = model.transformer.h
    with torch.no_grad():  # GPT-2 by hand: hs[0] = wte + wpe, then the blocks, the first cut's map in their place
        hidden = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        states, k = {0: hidden}, 0
        assert torch.allclose(blocks[0](hidden)[0] if isinstance(blocks[0](hidden), tuple) else blocks[0](hidden),
                              reference[1], atol=1e-5)
        while k < len(blocks):
            if k == first[0]:
                hidden, k = hidden @ maps[first].weight, first[1]
            else:
                out = blocks[k](hidden)
                hidden, k = (out[0] if isinstance(out, tuple) else out), k + 1
            states[k] = hidden
    x, y = (states[k].reshape(-1, states[k].shape[-1]).double().numpy() for k in second)
    expected = np.linalg.lstsq(x, y, rcond=None)[0]
    got = maps[second].weight.double().numpy()
    np.testing.assert_allclose(x @ got, x @ expected, atol=1e-3 * np.abs(y).max())


def test_mse_plan_of_an_image_encoder_exports_the_compressed_format(tmp_path):
    """digits-ViT: the plan is judged by final MSE; its linear maps export as rba-compressed, and the loaded folder's
    MSE against the original model's own forward is the reported one."""
    from transformers import AutoModel

    from rba_core.store.export import load_compressed
    from rba_core.registry import resolve_model

    result = plan("digits-ViT", "digits", 64, 32, 0, remove_blocks=2, kind="linear", cache=Cache(tmp_path / "c"))
    assert result.metric == "mse" and not result.plain_checkpoint
    export_plan(result, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    source, indices = open_sample("digits", "test", 32, 0)
    inputs = loaded.preprocess(source.items(indices))
    original = AutoModel.from_pretrained(resolve_model("digits-ViT"), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = original(**inputs).last_hidden_state[:, 0].double()
        ours = loaded(**inputs).double()
    assert ((ours - reference) ** 2).mean().item() == pytest.approx(result.final["metric"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "window", "shortgpt"])
def test_cli_prints_and_writes_the_steps(strategy, tmp_path, capsys, cache):
    common = ["plan", "--model", "demo-GPT", "--dataset", "demo-text", "--fit-n", "32", "--eval-n", "16",
              "--seq-len", "128", "--remove-blocks", "2", "--strategy", strategy, "--map", "folded",
              "--cache-dir", str(cache.root)]
    assert main([*common, "--json", str(tmp_path / "plan.json")]) == 0
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["strategy"] == strategy and written["steps"][-1]["blocks_removed"] == 2
    assert {"metric", "interval", "range_label", "candidates"} <= set(written["steps"][0])
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "step 1:" in printed and "Final:" in printed and "skipped" in printed


@pytest.mark.parametrize("options, sentence", [
    ({}, "Give the plan a budget"),
    ({"remove_blocks": 8}, "Cannot remove 8 blocks"),
    ({"remove_blocks": 2, "strategy": "best"}, "Unknown strategy 'best'"),
    ({"remove_blocks": 2, "kind": "spline"}, "Unknown map 'spline'"),
])
def test_bad_requests_are_one_sentence(options, sentence, cache):
    with pytest.raises(RBAError, match=sentence):
        plan(**LM, cache=cache, **options)


def test_perplexity_of_an_encoder_is_one_sentence(tmp_path, capsys):
    assert main(["plan", "--model", "digits-ViT", "--dataset", "digits", "--fit-n", "16", "--eval-n", "8",
                 "--remove-blocks", "2", "--metric", "perplexity", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: Perplexity needs a causal LM")


def test_plan_curves_draw_one_line_per_strategy(folded_plans):
    from rba_core.store.plots import plan_curves

    plans = {name: result.to_json() for name, result in folded_plans.items()}
    fig = plan_curves(plans)
    assert [t.name for t in fig.data] == ["greedy", "window"]
    greedy = fig.data[0]
    assert list(greedy.x) == [0, 1, 2]
    assert list(greedy.y) == [plans["greedy"]["original"]["metric"]] + [s["metric"] for s in plans["greedy"]["steps"]]
    assert list(fig.data[1].x) == [0, 2]
    assert greedy.error_y.arrayminus[-1] == pytest.approx(plans["greedy"]["final"]["metric"]
                                                          - plans["greedy"]["final"]["interval"][0])


def test_a_budget_no_plan_meets_is_one_sentence(cache):
    with pytest.raises(RBAError, match="No plan meets this budget"):
        plan(**LM, max_params=1000, cache=cache)


def test_a_trained_kind_plans_and_folds(cache, tmp_path):
    """--map cosine (trained with Adam, folds): the plan's maps come from the analysis's trained fits, grouped so
    that every group folds together, and the export is a plain checkpoint with the reported perplexity."""
    from transformers import AutoModelForCausalLM

    from rba_core.maps import MapParams

    result = plan(**{**LM, "eval_n": 8}, remove_blocks=1, kind="cosine", top_k=3, cache=cache,
                  map_params=MapParams(train_steps=20))
    assert result.plain_checkpoint and len(result.steps[0]["candidates"]) == 3
    export_plan(result, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert _perplexity(model, _windows("test", 8)) == pytest.approx(result.final["metric"], rel=1e-4)


def test_a_healed_plan_exports_a_plain_checkpoint_with_the_healed_perplexity(cache, tmp_path):
    """plan --heal: the cut model is healed against the original (LoRA on its blocks, merged); healing starts from
    exactly the planned model, and the healed export is a plain checkpoint whose perplexity with plain transformers
    is the report's ``after``."""
    from transformers import AutoModelForCausalLM

    from rba_core.ops.heal import HealPlan
    from rba_core.ops.plan import heal_plan
    from rba_core.ops.run import Run

    run = Run(LM["model"], LM["dataset"], LM["fit_n"], LM["eval_n"], 0, seq_len=LM["seq_len"], cache=cache)
    result = plan(**LM, remove_blocks=2, strategy="greedy", kind="folded", cache=cache)
    planned = result.final["metric"]
    healed = heal_plan(run, result, HealPlan(steps=5, lora_rank=2, lr=1e-3))
    assert healed.healing["before"] == pytest.approx(planned, rel=1e-3)
    assert healed.to_json()["healing"]["metric"] == "perplexity"
    record = export_plan(healed, tmp_path / "healed")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "healed"), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 6 and record["healing"] == healed.healing
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert _perplexity(model, _windows("test", 16)) == pytest.approx(healed.healing["after"], rel=1e-3)
