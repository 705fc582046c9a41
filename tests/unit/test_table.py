"""The paper-style table: its rows are the `approximate` command's numbers, and rows are cached."""

import csv
import json

import pytest

from rba_core.cache import Cache
from rba_core.cli import main
from rba_core.errors import RBAError
from rba_core.ops.table import parse_rows, preset_rows, render, row_label, table

FIT_N, EVAL_N = 40, 12


def _args(model, dataset, cache_dir):
    return ["--model", model, "--dataset", dataset, "--fit-n", str(FIT_N), "--eval-n", str(EVAL_N),
            "--seed", "0", "--cache-dir", str(cache_dir)]


def test_rows_equal_the_approximate_command(tiny_models, image_folder, tmp_path):
    model = tiny_models["vit"]
    out = tmp_path / "table.json"
    assert main(["table", *_args(model, image_folder, tmp_path / "a"), "--ranges", "1:3,0:1+2:4",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["range"] for r in rows] == ["original", "1→3", "0→1 + 2→4"]
    assert [r["paper"] for r in rows] == ["original", "0 2", "emb 0 + 1 3"]
    for row, ranges in zip(rows[1:], (["1", "3"], ["0", "1", "--range", "2", "4"])):
        # The same settings through the approximate command, with its own empty cache.
        approx = tmp_path / f"approx-{row['range']}.json"
        assert main(["approximate", *_args(model, image_folder, tmp_path / "b"), "--range", *ranges,
                     "--probe", "--json", str(approx)]) == 0
        expected = json.loads(approx.read_text())
        assert row["ranges"] == [[r["start"], r["end"]] for r in expected["ranges"]]
        assert row["blocks_left"] == expected["blocks"]["approximated"]
        assert row["params"] == expected["params"]["approximated"]
        assert row["mse_final"] == pytest.approx(expected["mse_final"], rel=1e-6)
        for name in ("approximated", "skip"):
            for key in ("accuracy", "accuracy_converged"):
                assert row[key][name]["mean"] == pytest.approx(expected[key][name]["mean"], abs=1e-6)
                assert row[key][name]["std"] == pytest.approx(expected[key][name]["std"], abs=1e-6)
    original = rows[0]
    assert original["blocks_left"] == 4 and original["mse_final"] == 0.0
    assert original["params"] == expected["params"]["original"]
    assert original["accuracy"]["approximated"]["mean"] == pytest.approx(expected["accuracy"]["original"]["mean"])
    assert original["accuracy"]["skip"] is None and original["accuracy_converged"]["skip"] is None
    assert original["accuracy_converged"]["approximated"] == expected["accuracy_converged"]["original"]


def test_second_run_computes_only_the_new_rows(tiny_models, image_folder, tmp_path):
    passes = []

    def progress(done, total):
        if done == total:
            passes.append(total)

    cache = Cache(tmp_path / "cache")
    first = table(tiny_models["vit"], [image_folder], FIT_N, EVAL_N, 0, "1:2", cache=cache, progress=progress)
    # the row's float64 fit statistics (blocks 1..j only), the fit and eval extractions, then the
    # approximated and skipped models on fit and eval samples
    assert sorted(passes) == sorted([FIT_N] * 4 + [EVAL_N] * 3)
    passes.clear()
    second = table(tiny_models["vit"], [image_folder], FIT_N, EVAL_N, 0, "1:2,2:4", cache=cache, progress=progress)
    # only the new row ran the model: its fit statistics, then its approximated and skipped models
    assert sorted(passes) == sorted([FIT_N] * 3 + [EVAL_N] * 2)
    assert second["rows"][:2] == first["rows"]
    passes.clear()
    assert table(tiny_models["vit"], [image_folder], FIT_N, EVAL_N, 0, "2:4", cache=cache,
                 progress=progress)["rows"][1] == second["rows"][2]
    assert passes == []


def test_several_datasets_each_get_an_original_row(tiny_models, image_folder, tmp_path):
    result = table(tiny_models["deit"], [image_folder, "digits"], FIT_N, EVAL_N, 0, [[(0, 2)]],
                   cache=Cache(tmp_path / "cache"))
    assert [(r["dataset"], r["range"]) for r in result["rows"]] == [
        (image_folder, "original"), (image_folder, "0→2"), ("digits", "original"), ("digits", "0→2")]
    text = render(result, "csv")
    parsed = list(csv.DictReader(text.splitlines()))
    assert [r["range"] for r in parsed] == ["original", "0→2", "original", "0→2"]
    assert float(parsed[1]["mse_final"]) == result["rows"][1]["mse_final"]
    assert parsed[0]["skip_acc_mean"] == ""
    markdown = render(result, "md").splitlines()
    assert markdown[0].startswith("| dataset | range (ours) | paper |") and len(markdown) == 2 + 4
    assert " ± " in markdown[3] and "None" not in "".join(markdown)
    assert "converged probe %" in markdown[0] and parsed[0]["converged_skip_acc"] == ""
    assert float(parsed[1]["converged_acc"]) == result["rows"][1]["accuracy_converged"]["approximated"]["mean"]


def test_presets_and_range_syntax():
    paper = preset_rows("paper", 12)
    assert paper[0] == [(2, 6)] and row_label(paper[0]) == ("2→6", "1 5")  # the paper's "1 5": 8 blocks left
    assert [row_label(r)[1] for r in paper[1:]] == [f"{k} {k + 1}" for k in range(11)]
    assert preset_rows("all-consecutive", 4) == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 4)]]
    assert preset_rows("paper", 4) == [[(1, 2)], [(2, 3)], [(3, 4)]]  # too shallow for 2→6
    assert [(2, 6)] not in preset_rows("paper", 6)  # 2→6 would leave 2 of 6 blocks: not the paper's range
    assert parse_rows("8:10+2:6, 3:4", 12) == [[(2, 6), (8, 10)], [(3, 4)]]
    assert parse_rows([[(1, 2)]], 4) == [[(1, 2)]]
    assert parse_rows("all-consecutive,0:2+3:4", 4) == preset_rows("all-consecutive", 4) + [[(0, 2), (3, 4)]]
    for bad, words in (("2-6", "Cannot read"), ("2:6+4:8", "overlap"), ("3:13", "outside"), ("5:5", "empty")):
        with pytest.raises(RBAError, match=words):
            parse_rows(bad, 12)


def test_cli_refuses_an_unknown_format_before_any_work(tiny_models, image_folder, tmp_path, capsys):
    assert main(["table", *_args(tiny_models["vit"], image_folder, tmp_path / "c"),
                 "--out", str(tmp_path / "t.xlsx")]) == 2
    assert ".csv, .md or .json" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
