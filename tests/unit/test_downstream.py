"""``eval``: lm-eval tasks on demo-GPT and its approximation, offline, with the task shipped in the project.

The in-memory approximated model must score what lm-eval's own ``hf`` model type scores on the folder that
``export --map folded`` writes with the same fit settings; the model it hands lm-eval must compute what
``approximate`` evaluates (:class:`ApproximatedEncoder` and the adapter's LM head)."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")

from rba_core.cli import main  # noqa: E402
from rba_core.ops.downstream import DEBIAN_TASK, TASKS_DIR, evaluate  # noqa: E402
from rba_core.errors import RBAError  # noqa: E402

FIT = ["--dataset", "demo-text", "--fit-n", "16", "--seq-len", "128", "--seed", "0"]
LIMIT = 24


def hf_scores(folder) -> tuple[dict, list]:
    """lm-eval's own ``hf`` model type on a saved folder: the task's acc and acc_norm, and every document's
    log-likelihood of each choice."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                                  tasks=[DEBIAN_TASK], task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                  limit=LIMIT, device="cpu", batch_size=8, log_samples=True)
    values = out["results"][DEBIAN_TASK]
    docs = [[r[0] for r in d["filtered_resps"]] for d in sorted(out["samples"][DEBIAN_TASK], key=lambda d: d["doc_id"])]
    return {"acc": values["acc,none"], "acc_norm": values["acc_norm,none"]}, docs


def test_eval_folded_matches_lm_eval_on_the_export(tmp_path, capsys):
    from rba_core.registry import DEMO_LM_DIR

    cache = ["--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "demo-GPT", "--tasks", DEBIAN_TASK, "--range", "3", "5", "--map", "folded",
                 "--limit", str(LIMIT), "--log-documents", *FIT, *cache, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    scores = record["results"][DEBIAN_TASK]
    assert record["samples"][DEBIAN_TASK] == LIMIT and record["blocks"] == {"original": 8, "approximated": 6}
    assert record["ranges"][0]["removed_blocks"] == [4, 5] and record["map"] == "folded"
    for metric in ("acc", "acc_norm"):
        assert 0 <= scores["original"][metric] <= 1 and 0 <= scores["approximated"][metric] <= 1
        assert scores["difference"][metric] == pytest.approx(scores["approximated"][metric] - scores["original"][metric])

    folder = tmp_path / "folded"
    assert main(["export", "--model", "demo-GPT", "--range", "3", "5", "--map", "folded", *FIT, *cache,
                 "--out", str(folder)]) == 0
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 6
    exported, exported_docs = hf_scores(folder)
    original, original_docs = hf_scores(DEMO_LM_DIR)
    for metric in ("acc", "acc_norm"):
        assert scores["approximated"][metric] == pytest.approx(exported[metric], abs=1e-12)
        assert scores["original"][metric] == pytest.approx(original[metric], abs=1e-12)
    # the same per-document log-likelihoods, and the approximated ones are not the original's
    docs = record["documents"][DEBIAN_TASK]
    assert len(docs["approximated"]) == LIMIT and all(len(d) == 6 for d in docs["approximated"])
    assert torch.allclose(torch.tensor(docs["approximated"]), torch.tensor(exported_docs), atol=1e-3, rtol=0)
    assert torch.allclose(torch.tensor(docs["original"]), torch.tensor(original_docs), atol=1e-4, rtol=0)
    assert (torch.tensor(docs["approximated"]) - torch.tensor(docs["original"])).abs().max() > 0.01  # 10x the match
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--tasks", DEBIAN_TASK, "--limit", "4", *cache]) == 0
    summary = capsys.readouterr().out
    assert f"{DEBIAN_TASK} acc: original" in summary and "approximated" not in summary


@pytest.mark.parametrize("kind", ["linear", "folded", "identity"])
def test_cut_model_computes_the_approximated_encoder(kind, cache):
    """The transformers model handed to lm-eval gives the logits of ``approximate``'s own approximated model."""
    from rba_core.ops.analysis import fit_range_maps
    from rba_core.passes.approx import ApproximatedEncoder
    from rba_core.passes.cut import blocks_path, cut_model
    from rba_core.maps import MapParams
    from rba_core.ops.run import Run

    run = Run("demo-GPT", "demo-text", 16, seq_len=128, cache=cache)
    ranges = [(0, 1), (3, 5)] if kind != "folded" else [(3, 5), (6, 7)]
    _, maps = fit_range_maps(run, ranges, kind, MapParams())
    encoder = run.lazy()
    before = {name: p.clone() for name, p in encoder.model.named_parameters()}
    net = cut_model(encoder.model, blocks_path(encoder), encoder, ranges, maps)
    ids = torch.as_tensor([list(b"Debian package description: a small game\nSection: games")])
    with torch.no_grad():
        ours = net(ids).logits
        reference = encoder.logits(ApproximatedEncoder(encoder, ranges, maps).last_hidden(
            input_ids=ids, attention_mask=torch.ones_like(ids)))
        original = encoder.model(ids).logits
    assert torch.allclose(ours, reference, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ours, original, atol=1e-2)
    assert len(encoder.blocks) == 8 and all(torch.equal(p, before[n]) for n, p in encoder.model.named_parameters())


def test_offline_task_and_bad_input_are_one_sentence(tmp_path, cache):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text(
        "task: rba_remote_task\ndataset_path: rba-explorer-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{text}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    with pytest.raises(RBAError, match=r"task 'rba_remote_task' \(rba-explorer-tests/no-such-dataset\)"):
        evaluate("demo-GPT", "rba_remote_task", include_path=tasks, cache=cache)
    with pytest.raises(RBAError, match="Unknown lm-eval task 'no_such_task_here'"):
        evaluate("demo-GPT", "no_such_task_here", cache=cache)
    with pytest.raises(RBAError, match="is not a folder"):
        evaluate("demo-GPT", DEBIAN_TASK, include_path=tmp_path / "missing", cache=cache)
    with pytest.raises(RBAError, match="causal language models"):
        evaluate("digits-ViT", DEBIAN_TASK, cache=cache)
    with pytest.raises(RBAError, match="outside 0..8"):
        evaluate("demo-GPT", DEBIAN_TASK, ranges=[(3, 9)], cache=cache)


def test_shipped_task_data_is_what_build_writes(tmp_path):
    """The committed JSONL is the build script's output from the shared parquet (skipped where it is absent)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_debian_task", TASKS_DIR / DEBIAN_TASK / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if not (build.DEFAULT / "test.parquet").is_file():
        pytest.skip(f"{build.DEFAULT} is not here: the shipped JSONL cannot be rebuilt")
    for split in ("test", "train"):
        rows = [json.loads(line) for line in (TASKS_DIR / DEBIAN_TASK / f"{split}.jsonl").read_text().splitlines()]
        assert rows == build.rows(build.DEFAULT, split)
        assert {r["section"] for r in rows} == set(build.SECTIONS)
        assert all(build.SECTIONS[r["label"]] == r["section"] for r in rows)


def test_table_scores_the_tasks_on_every_row(tmp_path):
    """``table --tasks``: each row's task metrics are ``eval``'s for the same ranges, the original row its original
    (the table's probes need labels: demo-GPT on the labelled Debian descriptions, last-token pooling)."""
    from rba_core.registry import dataset_info, local_dataset_dir

    if local_dataset_dir(dataset_info("debian-descriptions")) is None:
        pytest.skip("debian_descriptions is not in ../shared/datasets or $RBA_DATA_DIR")
    out = tmp_path / "table.json"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["table", "--model", "demo-GPT", "--dataset", "debian-descriptions", "--fit-n", "16", "--eval-n", "8",
                 "--ranges", "3:5,6:7", "--map", "folded", "--tasks", DEBIAN_TASK, "--limit", "12",
                 *cache, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    from rba_core.cache import Cache

    expected = evaluate("demo-GPT", DEBIAN_TASK, dataset="debian-descriptions", fit_n=16, ranges=[(3, 5)],
                        kind="folded", limit=12, cache=Cache(tmp_path / "cache"))["results"][DEBIAN_TASK]
    assert [r["range"] for r in rows] == ["original", "3→5", "6→7"]
    assert rows[0]["tasks"][DEBIAN_TASK]["acc"] == expected["original"]["acc"]
    assert rows[1]["tasks"][DEBIAN_TASK] == {k: v for k, v in expected["approximated"].items()
                                             if not k.endswith("_stderr")}
    assert set(rows[2]["tasks"][DEBIAN_TASK]) == {"acc", "acc_norm"}
    md = tmp_path / "table.md"
    assert main(["table", "--model", "demo-GPT", "--dataset", "debian-descriptions", "--fit-n", "16", "--eval-n", "8",
                 "--ranges", "3:5", "--map", "folded", "--tasks", DEBIAN_TASK, "--limit", "12",
                 *cache, "--out", str(md)]) == 0
    assert f"| {DEBIAN_TASK} acc | {DEBIAN_TASK} acc_norm |" in md.read_text().splitlines()[0]
