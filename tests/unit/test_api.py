"""The library API a notebook uses: lazy exports, a loaded model object, an in-memory list of samples."""

import numpy as np

import rba_core
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.models import load_encoder


def test_exports_resolve_to_the_core_functions():
    from rba_core.ops.analysis import analyze, approximate
    from rba_core.maps import MAPS

    assert rba_core.analyze is analyze and rba_core.approximate is approximate and rba_core.MAPS is MAPS
    assert {"search", "table", "load_compressed", "block_redundancy", "ADAPTERS"} <= set(rba_core.__all__)


def test_a_loaded_model_and_a_list_of_images_give_the_folder_numbers(tiny_models, image_folder, tmp_path):
    source = open_dataset(image_folder, "train")
    everything = len(source)  # n = the whole split: the same samples in the same order either way
    by_name = rba_core.analyze(tiny_models["vit"], image_folder, everything, cache=Cache(tmp_path / "a"))
    samples = list(zip(source.items(range(everything)), source.labels.tolist()))
    hf_model = load_encoder(tiny_models["vit"], device="cpu").model  # a plain transformers ViTModel
    in_memory = rba_core.analyze(hf_model, samples, everything, cache=Cache(tmp_path / "b"))
    np.testing.assert_allclose(in_memory.block_redundancy, by_name.block_redundancy, rtol=1e-6)
    np.testing.assert_allclose(in_memory.cosine, by_name.cosine, rtol=1e-6)
    assert in_memory.dataset == f"in-memory ({everything} images)" and in_memory.family == "vit"
    assert in_memory.to_frame()["block"].tolist() == list(range(1, in_memory.num_blocks + 1))
    again = rba_core.analyze(hf_model, samples, everything, cache=Cache(tmp_path / "b"))
    assert again.cache["hit"] and again.cache["key"] == in_memory.cache["key"]  # keyed by weights and content


def test_a_list_of_texts_is_a_text_dataset():
    texts = open_dataset(["first text", "a second text", "and a third one"], "test")
    assert texts.modality == "text" and texts.unit == "texts" and texts.items([2]) == ["and a third one"]
    assert texts.labels.tolist() == [-1, -1, -1]
