"""The model's own classifier head: ``approximate --probe`` on a ViTForImageClassification folder reports the
head's accuracy for the original, approximated and skipped models, equal to the same models written out by
hand (transformers' own classes, the map fitted by least squares on stacked tokens, argmax)."""

import json

import numpy as np
import pytest
import torch

from rba_core.ops.analysis import approximate
from rba_core.cli import main
from rba_core.errors import RBAError
from rba_core.passes.extract import extract
from rba_core.ops.head import head_setup, match_labels, read_label_map

# the head's classes in another order and spelling than the dataset's class0, class1, class2
ID2LABEL = {0: "Class_2", 1: "CLASS-0", 2: "class 1"}
DATASET_TO_HEAD = {0: 1, 1: 2, 2: 0}
FIT_N, EVAL_N, RANGE = 16, 14, (1, 3)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, image_folder):
    """A tiny random ViT with an ImageClassification head fitted by least squares to the train images' classes
    (so that its accuracy means something and differs between the models), saved with save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from conftest import TINY
    from rba_core.data import open_dataset

    torch.manual_seed(1)
    model = ViTForImageClassification(ViTConfig(**TINY, num_labels=3, id2label=ID2LABEL,
                                                label2id={v: k for k, v in ID2LABEL.items()})).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    train = open_dataset(image_folder, "train")
    items = train.items(np.arange(len(train)))
    labels = [DATASET_TO_HEAD[int(y)] for y in train.labels]
    with torch.no_grad():
        cls = model.vit(**processor(images=[im.convert("RGB") for im in items], return_tensors="pt")).last_hidden_state[:, 0]
        x = torch.cat([cls, torch.ones(len(cls), 1)], 1).double()
        w = torch.linalg.lstsq(x, torch.eye(3, dtype=torch.float64)[labels]).solution.float()
        model.classifier.weight.copy_(w[:-1].T)
        model.classifier.bias.copy_(w[-1])
    folder = tmp_path_factory.mktemp("vit-classifier")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def by_hand(folder, image_folder, cache) -> dict:
    """Top-1 accuracy of the original, linear-map and skipped models, written out with transformers' classes."""
    from transformers import AutoModelForImageClassification

    from rba_core.data import open_dataset
    from rba_core.models import load_encoder

    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
    encoder = load_encoder(folder, device="cpu")  # only its image processor, for the pixels
    fit = extract(folder, image_folder, FIT_N, 0, "train", with_stats=False, cache=cache)
    ev = extract(folder, image_folder, EVAL_N, 0, "test", with_stats=False, cache=cache)
    i, j = RANGE
    with torch.no_grad():
        pixels = encoder.preprocess(open_dataset(image_folder, "train").items(fit.indices))["pixel_values"]
        hs = model.vit(pixel_values=pixels, output_hidden_states=True).hidden_states
        x, y = (hs[k].reshape(-1, hs[k].shape[-1]).double().numpy() for k in (i, j))
        t = torch.as_tensor(np.linalg.lstsq(x, y, rcond=None)[0], dtype=torch.float32)
        pixels = encoder.preprocess(open_dataset(image_folder, "test").items(ev.indices))["pixel_values"]
        logits = {"original": model(pixel_values=pixels).logits}
        for name, step in (("approximated", lambda h: h @ t), ("skip", lambda h: h)):
            h = model.vit.embeddings(pixels)
            for block in model.vit.layers[:i]:
                h = block(h)
            h = step(h)
            for block in model.vit.layers[j:]:
                h = block(h)
            logits[name] = model.classifier(model.vit.layernorm(h)[:, 0])
    truth = torch.as_tensor([DATASET_TO_HEAD[int(y)] for y in ev.labels])
    return {name: int((out.argmax(-1) == truth).sum()) / len(truth) for name, out in logits.items()}


def test_head_accuracy_equals_the_models_written_out_by_hand(classifier, image_folder, cache):
    result = approximate(classifier, image_folder, FIT_N, EVAL_N, 0, [RANGE], "linear", probe=True, latency=False,
                         cache=cache)
    head = result.head_accuracy
    assert head["classes"] == 3 and head["matched_by"] == "names" and head["n"] == EVAL_N
    expected = by_hand(classifier, image_folder, cache)
    assert {name: head[name]["top1"] for name in expected} == pytest.approx(expected, abs=1e-9)
    assert all("top5" not in head[name] for name in expected)  # 3 classes: top-1 only
    assert len({round(v, 6) for v in expected.values()}) > 1  # the three models differ: the test can tell them apart
    assert "head_accuracy" in result.to_json() and result.accuracy is not None
    again = approximate(classifier, image_folder, FIT_N, EVAL_N, 0, [RANGE], "linear", latency=False, cache=cache)
    assert again.head_accuracy == head  # stored: read back without running the head


def test_folded_head_accuracy_and_the_cli(classifier, image_folder, tmp_path):
    out = tmp_path / "approx.json"
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"class0": "CLASS-0", "1": 2, "class2": "class_2"}))
    assert main(["approximate", "--model", classifier, "--dataset", image_folder, "--fit-n", str(FIT_N), "--eval-n",
                 str(EVAL_N), "--range", "1", "3", "--map", "folded", "--no-latency", "--label-map", str(label_map),
                 "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    head = json.loads(out.read_text())["head_accuracy"]
    assert head["matched_by"] == "label map" and set(head) >= {"original", "approximated", "skip"}
    assert all(0 <= head[name]["top1"] <= 1 for name in ("original", "approximated", "skip"))


def test_labels_match_by_names_count_or_label_map(tmp_path):
    names, labels = ["Sea_Lion", "tench"], np.array([0, 1, 1])
    mapping, how = match_labels({0: "tench, Tinca tinca", 1: "sea lion", 2: "other"}, names, labels)
    assert how == "names" and mapping.tolist() == [1, 0]
    mapping, how = match_labels({0: "LABEL_0", 1: "LABEL_1"}, ["0", "1"], labels)
    assert how == "count" and mapping.tolist() == [0, 1]
    mapping, why = match_labels({0: "a", 1: "b", 2: "c"}, ["0", "1"], labels)
    assert mapping is None and "integer classes are not the head's 3" in why
    mapping, why = match_labels({0: "cat", 1: "dog"}, ["cat", "car"], labels)
    assert mapping is None and "'car' is not among the head's 2 classes" in why and "--label-map" in why
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"cat": "dog", "1": 0}))
    assert read_label_map(path, ["cat", "car"], {0: "cat", 1: "dog"}).tolist() == [1, 0]
    path.write_text(json.dumps({"cat": "dog"}))
    with pytest.raises(RBAError, match="does not map the dataset class 'car'"):
        read_label_map(path, ["cat", "car"], {0: "cat", 1: "dog"})
    path.write_text(json.dumps({"cat": "horse", "car": 0}))
    with pytest.raises(RBAError, match="no class named 'horse'"):
        read_label_map(path, ["cat", "car"], {0: "cat", 1: "dog"})
    path.write_text("{")
    with pytest.raises(RBAError, match="not valid JSON"):
        read_label_map(path, ["cat", "car"], {0: "cat", 1: "dog"})


def test_no_head_is_one_sentence(tiny_models):
    from rba_core.models import load_config

    head, why = head_setup(load_config(tiny_models["vit"]), tiny_models["vit"], ["a", "b"], np.array([0, 1]))
    assert head is None and why.startswith("No head accuracy: the model has no classification head")
    assert why.count(".") == 1 and why.endswith(".")


def test_table_rows_carry_the_head_accuracy(classifier, image_folder, cache):
    from rba_core.ops.table import render, table

    result = table(classifier, [image_folder], FIT_N, EVAL_N, 0, "1:3", "linear", cache=cache)
    single = approximate(classifier, image_folder, FIT_N, EVAL_N, 0, [RANGE], "linear", latency=False, cache=cache)
    original, row = result["rows"]
    assert original["head_accuracy"] == {"approximated": single.head_accuracy["original"], "skip": None}
    assert row["head_accuracy"] == {"approximated": single.head_accuracy["approximated"],
                                    "skip": single.head_accuracy["skip"]}
    csv = render(result, "csv").splitlines()
    assert csv[0].endswith("head_top1,skip_head_top1")
    assert csv[2].endswith(f"{single.head_accuracy['approximated']['top1']},{single.head_accuracy['skip']['top1']}")
    assert "head top1 % | skip head top1 % |" in render(result, "md").splitlines()[0]


def test_search_ranks_by_the_head(classifier, image_folder, cache):
    from rba_core.ops.search import search

    result = search(classifier, image_folder, FIT_N, EVAL_N, 0, blocks=2, metric="head-accuracy", exhaustive=True,
                    cache=cache)
    rows = result["candidates"]
    assert result["metric"] == "head-accuracy" and [r["ranges"] for r in rows] != []
    for row in rows:  # each candidate's head accuracy is approximate's for its ranges
        single = approximate(classifier, image_folder, FIT_N, EVAL_N, 0, row["ranges"], "linear", latency=False,
                             cache=cache).head_accuracy
        assert row["head_accuracy"] == {"approximated": single["approximated"], "skip": single["skip"]}
        assert result["original"]["head_accuracy"] == single["original"]
    keys = [(-r["head_accuracy"]["approximated"]["top1"], r["mse_final"]) for r in rows]
    assert keys == sorted(keys) and len(rows) == 3  # 0→2, 1→3, 2→4 of 4 blocks


def test_search_by_head_without_a_head_is_one_sentence(tiny_models, image_folder, cache):
    from rba_core.ops.search import search

    with pytest.raises(RBAError, match=r"^No head accuracy: the model has no classification head .*use --metric mse"):
        search(tiny_models["vit"], image_folder, 8, 4, 0, blocks=1, metric="head-accuracy", cache=cache)
    with pytest.raises(RBAError, match="Unknown metric 'accuracy'"):
        search(tiny_models["vit"], image_folder, 8, 4, 0, blocks=1, metric="accuracy", cache=cache)
