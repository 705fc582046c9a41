"""Mistakes a user can make raise RBAError with one sentence that says what is wrong and what to do."""

import os
import shutil

import numpy as np
import pytest
import torch

from rba_core import RBAError
from rba_core.ops.analysis import approximate
from rba_core.maps import validate_ranges
from rba_core.maps import fit_map
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.passes.extract import extract
from rba_core.models import load_encoder
from rba_core.measures.stats import StatsAccumulator


def raises(pattern: str, call, *args, **kwargs) -> str:
    """Run ``call``; it must raise RBAError matching ``pattern`` with a one-sentence message."""
    with pytest.raises(RBAError, match=pattern) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and len(message) < 400, message
    assert info.value.__cause__ is None or info.value.__suppress_context__
    return message


def test_unknown_hub_model_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    message = raises(r"(?i)hub|offline", load_encoder, "no-such-org/no-such-vit-model", "cpu")
    assert "no-such-org/no-such-vit-model" in message and "local folder" in message


@pytest.mark.parametrize("family", ["t5", "resnet"])
def test_folder_with_unsupported_architecture(family, tmp_path):
    from transformers import ResNetConfig, T5Config

    config = T5Config(d_model=32, num_layers=1) if family == "t5" else ResNetConfig()
    config.save_pretrained(tmp_path)
    message = raises(family, load_encoder, str(tmp_path), "cpu")
    for name in ("vit", "deit", "dinov2", "clip", "bert", "modernbert"):  # the supported families are listed
        assert name in message


@pytest.mark.parametrize("path", ["/no/such/folder/model", "./no-such-model-folder"])
def test_missing_model_folder(path):
    raises(r"folder.*config\.json", load_encoder, path, "cpu")


def test_model_folder_without_weights(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["vit"], folder)
    (folder / "model.safetensors").unlink()
    raises(r"weights", load_encoder, str(folder), "cpu")


@pytest.mark.parametrize("ranges, pattern", [
    ([(5, 3)], "reversed"),
    ([(2, 2)], "empty"),
    ([(0, 13)], "outside 0..12"),
    ([(-1, 3)], "outside 0..12"),
    ([(2, 6), (4, 8)], "overlap"),
    ([(4, 8), (1, 5)], "overlap"),
    ([], "at least one range"),
    ([(1, 2, 3)], "two ends"),
])
def test_bad_ranges(ranges, pattern):
    raises(pattern, validate_ranges, ranges, 12)


def test_good_ranges_are_sorted_and_may_touch():
    assert validate_ranges([(8, 10), (2, 6), (6, 7)], 12) == [(2, 6), (6, 7), (8, 10)]
    assert validate_ranges([(0, 12)], 12) == [(0, 12)]


def test_unknown_dataset_and_split(image_folder):
    raises(r"Unknown dataset 'ImageNet-42'.*alias", open_dataset, "ImageNet-42", "train")
    raises(r"Unknown split 'validation'.*train, test", open_dataset, image_folder, "validation")


def test_more_samples_than_the_split_has(tiny_models, image_folder, tmp_path):
    raises(r"only \d+ images", extract, tiny_models["vit"], image_folder, 10_000,
           cache=Cache(tmp_path), device="cpu")
    # The error names the setting to change: the evaluation samples for the test split.
    message = raises(r"Asked for 256 evaluation samples \(test split\) but the test split has only \d+ images; "
                     r"lower the evaluation samples to at most \d+\.", approximate, tiny_models["vit"], image_folder,
                     8, 256, 0, [(1, 2)], cache=Cache(tmp_path))
    assert "samples n" not in message
    raises(r"Asked for 999 samples n \(train split\).*lower samples n", extract, tiny_models["vit"], image_folder,
           999, cache=Cache(tmp_path))


def test_unknown_map_kind(tiny_models, image_folder, tmp_path):
    acc = StatsAccumulator(3, 4, "cpu")
    acc.add([torch.randn(2, 5, 4) for _ in range(3)])
    raises(r"Unknown map 'cubic'.*linear, affine, ridge, identity", fit_map, acc.result(), (0, 2), "cubic")
    # approximate refuses it before loading anything
    raises(r"Unknown map 'cubic'", approximate, tiny_models["vit"], image_folder, 4, 4, 0, [(1, 2)],
           "cubic", cache=Cache(tmp_path), encoder=lambda: pytest.fail("model loaded"))
    assert not any(tmp_path.iterdir())


def test_approximate_range_outside_model(tiny_models, image_folder, tmp_path):
    raises(r"outside 0..4", approximate, tiny_models["vit"], image_folder, 4, 4, 0, [(2, 6)],
           cache=Cache(tmp_path))


def test_image_that_cannot_be_decoded(tmp_path):
    (tmp_path / "a").mkdir()
    for k in range(10):
        (tmp_path / "a" / f"{k}.png").write_bytes(b"not a png")
    source = open_dataset(str(tmp_path), "train")
    message = raises(r"cannot be decoded", source.items, [0, 3])
    assert message.startswith(f"Sample 0 ('{tmp_path / 'a'}/") and "BytesIO" not in message and " at 0x" not in message
    assert np.all(source.labels == 0)


def test_missing_dataset_folder_says_it_does_not_exist(tmp_path):
    message = raises(r"does not exist", open_dataset, str(tmp_path / "missing-data"), "train")
    assert str(tmp_path / "missing-data") in message and "Unknown dataset" not in message


def test_folder_without_images(tmp_path):
    (tmp_path / "empty_class").mkdir()
    raises(r"No images found", open_dataset, str(tmp_path), "train")


def test_more_samples_than_a_split_holds_are_refused_before_any_pass(tmp_path):
    """Issue 18 item 3: the split sizes decide it, so no pass runs first (nothing reaches the cache)."""
    from rba_core.ops.analysis import approximate
    from rba_core.cache import Cache

    with pytest.raises(RBAError, match="evaluation samples .test split. but the test split has only 360 images"):
        approximate("digits-ViT", "digits", 16, 100000, 0, [(1, 3)], cache=Cache(tmp_path))
    assert Cache(tmp_path).entries() == []
