"""The map kind ``folded`` in approximate / search / table, and how well the cheap scores predict the
measured search (issue 8). Tiny random decoders; every number is checked against an independent side:
the model that ``fold.folded_model`` builds, numpy's lstsq on the model's own MLP output, the
approximated model of ``approximate``, and scipy's Spearman on scores recomputed from ``analyze``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_decoders import SEQ, TEXTS, _prose, decoders  # noqa: F401  (fixture)
from test_fold import _own_m_and_states

from rba_core.ops.analysis import analyze, approximate
from rba_core.ops.run import lm_dataset
from rba_core.passes.approx import approximate_encoder, count_params
from rba_core.cache import Cache
from rba_core.cli import main
from rba_core.data import open_dataset, sample_indices
from rba_core.errors import RBAError
from rba_core.store.export import save_compressed
from rba_core.passes.fold import fold_pass, fold_statistics, folded_encoder
from rba_core.maps import MAPS, fit_map
from rba_core.models import load_encoder
from rba_core.ops.search import search


@pytest.fixture(scope="module")
def lm_text(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("lm-text")
    (folder / "train.txt").write_text(_prose(0, 300))
    (folder / "test.txt").write_text(_prose(1, 200))
    return str(folder)


@pytest.mark.parametrize("family, side", [("llama", "right"), ("gpt2", "left")])
def test_the_folded_map_kind_is_the_folded_model(family, side, decoders):  # noqa: F811
    """ApproximatedEncoder with folded maps (m captured by a hook at run time) == the model with T folded
    into block i's weights and blocks i+1..j deleted; and it adds no parameter."""
    enc = load_encoder(decoders(family, side), device="cpu")
    inputs = enc.preprocess(TEXTS)
    ranges = [(1, 2), (3, 4)]
    stats = fold_statistics(enc, [inputs], ranges)
    net = approximate_encoder(enc, stats, ranges, "folded")
    folded = folded_encoder(enc, {rng: s.fit() for rng, s in stats.items()})
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = net.last_hidden(**inputs), folded.hidden_states(inputs)[0][-1]
        torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(**inputs), folded.final(theirs, mask), rtol=1e-4, atol=1e-5)
    assert count_params(net) == folded.num_params() == enc.num_params() - enc.block_params(2) - enc.block_params(4)
    assert MAPS["folded"].added_params(enc.hidden_size) == 0
    # bfloat16 states (decoders on CUDA): the map computes in float32 and returns the states' dtype
    step = next(m for m in net.maps if m.kind == "folded")
    h, m = torch.randn(2, 3, enc.hidden_size), torch.randn(2, 3, enc.hidden_size)
    out = step(h.bfloat16(), m.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), step(h.bfloat16().float(), m.bfloat16().float()), rtol=1e-2, atol=1e-2)
    with pytest.raises(RBAError, match="plain checkpoint"):  # not as map modules: they belong in the weights
        save_compressed(net, "unused")
    assert not any(enc.blocks[0].get_submodule("mlp." + ("c_proj" if family == "gpt2" else "down_proj"))
                   ._forward_hooks.values())  # no hook left behind on the shared model


def test_fold_pass_fits_lstsq_on_the_fit_windows_and_is_cached(decoders, lm_text, tmp_path):  # noqa: F811
    folder = decoders("qwen2")
    data = lm_dataset(folder, lm_text, SEQ)
    cache = Cache(tmp_path)
    stats = fold_pass(folder, data, 6, 0, [[(1, 3)]], cache=cache)
    t = fit_map(stats, (1, 3), "folded").weight.double().numpy()
    # The independent side: the model's own forward (a separately loaded copy) on the windows extract samples.
    source = open_dataset(data, "train")
    ids = torch.as_tensor(np.stack(source.items(sample_indices(len(source), 6, 0, "train", source.unit))))
    enc = load_encoder(folder, device="cpu")
    m, hs = _own_m_and_states(folder, enc, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1)
    rows = lambda x: x.reshape(-1, x.shape[-1]).double().numpy()  # noqa: E731
    target = rows(hs[3]) - rows(hs[1]) + rows(m)  # hs[j] - r, r = hs[i] - m
    expected = np.linalg.lstsq(rows(m), target, rcond=None)[0]
    np.testing.assert_allclose(t, expected, rtol=0, atol=2e-3 * np.abs(expected).max())

    def refuse():
        raise AssertionError("a stored pass must not load the model")

    again = fold_pass(folder, data, 6, 0, [[(1, 3)]], cache=cache, encoder=refuse)
    np.testing.assert_array_equal(again[(1, 3)].mm, stats[(1, 3)].mm)
    assert again[(1, 3)].count == stats[(1, 3)].count == ids.numel()
    fold_pass(folder, data, 6, 0, [[(1, 2)], [(2, 3)]], cache=cache)  # one stored entry for both ranges
    with pytest.raises(RBAError, match="would fold into block 2"):  # grouped in one set: checked on a hit too
        fold_pass(folder, data, 6, 0, [[(1, 2), (2, 3)]], cache=cache, encoder=refuse)
    gemma = decoders("gemma2")
    with pytest.raises(RBAError, match="cannot be folded"):
        fold_pass(gemma, lm_dataset(gemma, lm_text, SEQ), 6, 0, [[(1, 3)]], cache=cache)


@pytest.fixture(scope="module")
def folded_searches(decoders, lm_text, tmp_path_factory):  # noqa: F811
    """The race and the exhaustive folded search, with pairs, on a tiny Llama."""
    cache = Cache(tmp_path_factory.mktemp("cache"))
    common = dict(kind="folded", pairs=True, seq_len=SEQ, cache=cache, top_k=2)
    return {exhaustive: search(decoders("llama"), lm_text, 8, 24, 0, exhaustive=exhaustive, **common)
            for exhaustive in (False, True)}, cache


def test_folded_search_ranks_as_exhaustive_and_as_approximate(folded_searches, decoders, lm_text):  # noqa: F811
    (searched, cache), folder = folded_searches, decoders("llama")
    race, full = searched[False], searched[True]
    assert race["map"] == full["map"] == "folded"
    # i = 0 folds into the decoder's token embeddings: those candidates are searched too.
    assert any(r[0] == 0 for row in full["candidates"] for r in row["ranges"])
    best = [row["range"] for row in full["candidates"][:2]]
    assert [row["range"] for row in race["candidates"][:2]] == best
    for a, b in zip(race["candidates"][:2], full["candidates"][:2]):
        assert a["mse_final"] == pytest.approx(b["mse_final"], rel=1e-6)
    # The search's own application of folded maps (first and second ranges) == the approximated model.
    pair = next(row for row in full["candidates"] if len(row["ranges"]) == 2)
    for row in (full["candidates"][0], pair):
        res = approximate(folder, lm_text, 8, 24, 0, row["ranges"], "folded", seq_len=SEQ, cache=cache)
        assert res["mse_final"] == pytest.approx(row["mse_final"], rel=1e-4)
        assert res["params"]["approximated"] == row["params"]  # no added parameters, as the search counts
        assert res["perplexity"]["approximated"] > 1 and 0 <= res["top1_agreement"]["approximated"] <= 1


def test_score_agreement_is_spearman_of_each_cheap_score(decoders, lm_text, tmp_path):  # noqa: F811
    """Every single range and pair of a tiny GPT-2, linear maps: each score recomputed from ``analyze``
    of the same fit windows, against scipy's Spearman over the candidates it covers."""
    folder, cache = decoders("gpt2"), Cache(tmp_path)
    result = search(folder, lm_text, 8, 16, 0, pairs=True, exhaustive=True, seq_len=SEQ, cache=cache)
    scores = analyze(folder, lm_text, 8, 0, seq_len=SEQ, windows=(1, 2, 3), cache=cache)
    br, br_all, bi = (np.array(scores[k]) for k in ("block_redundancy", "block_redundancy_all_tokens",
                                                    "block_influence"))
    expected: dict[str, tuple[list, list]] = {}

    def add(name, score, row):
        expected.setdefault(name, ([], []))
        expected[name][0].append(score)
        expected[name][1].append(row["mse_final"])

    for row in result["candidates"]:
        removed = [k for i, j in row["ranges"] for k in range(i + 1, j + 1)]
        add("block_redundancy", -br[np.array(removed) - 1].sum(), row)
        add("block_redundancy_all_tokens", -br_all[np.array(removed) - 1].sum(), row)
        add("fit_residual", sum(scores["fit_residual"][i][j] for i, j in row["ranges"]), row)
        if len(row["ranges"]) == 1:
            (i, j), = row["ranges"]
            if j == i + 1:
                add("block_influence", bi[i], row)
            if str(j - i) in scores["angular_distance"]:
                add(f"angular_distance_n{j - i}", scores["angular_distance"][str(j - i)][i], row)
    agreement = result["score_agreement"]
    assert {"block_influence": 4, "angular_distance_n1": 4, "angular_distance_n2": 3, "angular_distance_n3": 2,
            "block_redundancy": len(result["candidates"])}.items() <= {
        k: v["candidates"] for k, v in agreement.items()}.items()
    for name, (score, measured) in expected.items():
        assert agreement[name]["candidates"] == len(score), name
        if len(score) < 3:
            assert agreement[name]["spearman"] is None
        else:
            assert agreement[name]["spearman"] == pytest.approx(spearmanr(score, measured).statistic, abs=1e-9), name
    assert result["spearman"] == {k: agreement[k]["spearman"] for k in ("block_redundancy", "fit_residual")}
    json.dumps(result.to_json(), allow_nan=False)


def test_cli_search_and_table_take_map_folded(decoders, lm_text, tmp_path, capsys):  # noqa: F811
    llama = decoders("llama")
    common = ["--dataset", lm_text, "--seq-len", str(SEQ), "--cache-dir", str(tmp_path / "cache")]
    assert main(["search", "--model", llama, *common, "--fit-n", "8", "--eval-n", "8", "--blocks", "2",
                 "--map", "folded", "--json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["map"] == "folded" and sorted(row["range"] for row in result["candidates"]) == ["0→2", "1→3", "2→4"]
    assert "score_agreement" in result
    capsys.readouterr()
    assert main(["search", "--model", llama, *common, "--fit-n", "8", "--eval-n", "8", "--blocks", "1"]) == 0
    assert "Spearman ρ of each cheap score with the measured ranking" in capsys.readouterr().out
    # Gemma normalises its MLP output: only 0→j folds (into its embeddings). A search keeps those and notes
    # the rest; a range inside the blocks is one sentence, exit 2.
    gemma = decoders("gemma2")
    assert main(["search", "--model", gemma, *common, "--fit-n", "8", "--eval-n", "8", "--blocks", "1",
                 "--map", "folded", "--json", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    assert [row["range"] for row in result["candidates"]] == ["0→1"]
    assert any("cannot take folded maps and were left out" in note for note in result["notes"])
    capsys.readouterr()
    assert main(["approximate", "--model", gemma, *common, "--fit-n", "8", "--eval-n", "4", "--range", "1", "3",
                 "--map", "folded"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be folded" in errors[0]
    # The table: a labelled text dataset, rows folded into a decoder, no parameter added.
    texts = tmp_path / "texts"
    texts.mkdir()
    for split, count in (("train", 10), ("test", 6)):
        (texts / f"{split}.jsonl").write_text("".join(json.dumps({"text": _prose(k, 8), "label": k % 2}) + "\n"
                                                      for k in range(count)))
    out = tmp_path / "t.json"
    assert main(["table", "--model", llama, "--dataset", str(texts), "--fit-n", "10", "--eval-n", "6",
                 "--ranges", "1:2,2:4", "--map", "folded", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    table = json.loads(out.read_text())
    enc = load_encoder(llama, device="cpu")
    assert table["map"] == "folded" and [row["range"] for row in table["rows"]] == ["original", "1→2", "2→4"]
    assert [row["params"] for row in table["rows"]] == [
        enc.num_params(), enc.num_params() - enc.block_params(2),
        enc.num_params() - enc.block_params(3) - enc.block_params(4)]
    # recomputed from scratch (a fresh cache: new passes, new fold statistics), not read back from the table's
    row = approximate(llama, str(texts), 10, 6, 0, [(2, 4)], "folded", cache=Cache(tmp_path / "fresh"))
    assert table["rows"][2]["mse_final"] == pytest.approx(row["mse_final"], rel=1e-6)
