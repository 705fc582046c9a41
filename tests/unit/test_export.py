"""Export round trip: safetensors folder -> plain nn.Module, ONNX -> onnxruntime; tampering is refused."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import rba_core
from rba_core.ops.analysis import approximate, export
from rba_core.passes.approx import ApproximatedEncoder, approximate_encoder, count_params
from rba_core.maps import fit_map
from rba_core.data import open_dataset
from rba_core.errors import RBAError
from rba_core.store.export import RECORD, WEIGHTS, onnx_session, save_compressed
from rba_core.passes.extract import extract
from rba_core.models import load_encoder

FIT_N, EVAL_N = 40, 12


@pytest.fixture(scope="module")
def fitted(tiny_models, image_folder, tmp_path_factory):
    from rba_core.cache import Cache

    cache = Cache(tmp_path_factory.mktemp("export-cache"))
    encoders = {fam: load_encoder(tiny_models[fam], device="cpu") for fam in ("vit", "deit", "dinov2")}
    stats = {fam: extract(tiny_models[fam], image_folder, FIT_N, 0, cache=cache, encoder=enc).stats()
             for fam, enc in encoders.items()}
    return encoders, stats, cache


@pytest.fixture(scope="module")
def pixels(fitted, image_folder):
    encoder = fitted[0]["vit"]
    return encoder.preprocess(open_dataset(image_folder, "test").items(range(5)))


@pytest.fixture
def saved(fitted, tmp_path):
    encoders, stats, _ = fitted
    net = approximate_encoder(encoders["vit"], stats["vit"], [(1, 3)])
    return save_compressed(net, tmp_path / "compressed", encoder=encoders["vit"]), net


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_round_trip_reproduces_the_approximated_encoder(family, fitted, pixels, tmp_path):
    encoders, stats, _ = fitted
    encoder = encoders[family]
    ranges = [(0, 1), (2, 4)]
    maps = [fit_map(stats[family], ranges[0], "affine"), None]  # a mapped and a skipped range
    net = ApproximatedEncoder(encoder, ranges, maps).eval()
    folder = save_compressed((encoder, ranges[::-1], maps[::-1]), tmp_path / family)  # any order
    loaded = rba_core.load_compressed(folder)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    conditioning = loaded.record["ranges"][0].pop("conditioning")  # the fit's, as the map recorded it
    assert conditioning == maps[0].conditioning.to_json() and conditioning["rank"] <= conditioning["dimension"]
    assert loaded.record["ranges"] == [{"start": 0, "end": 1, "paper": "emb 0", "map": "affine"},
                                       {"start": 2, "end": 4, "paper": "1 3", "map": "identity"}]
    assert loaded.record["kept_blocks"] == [2] and count_params(loaded) == count_params(net)
    assert count_params(loaded) == loaded.record["params"]["compressed"] < encoder.num_params()
    with torch.no_grad():
        assert torch.allclose(loaded(**pixels), net(**pixels), atol=1e-5, rtol=0)
    # The original weights stay untouched and unshared.
    assert all(p.data_ptr() != q.data_ptr() for p in loaded.parameters() for q in encoder.model.parameters())


def test_loaded_model_reproduces_the_dashboard_outputs(fitted, tiny_models, image_folder, tmp_path):
    encoders, stats, cache = fitted
    result = approximate(tiny_models["vit"], image_folder, FIT_N, EVAL_N, 0, [(1, 3)], cache=cache)
    # export fits the maps as approximate does (the same float64 statistics of the range, from the cache)
    record = export(tiny_models["vit"], image_folder, FIT_N, 0, [(1, 3)], "linear", tmp_path / "c", cache=cache)
    expected = {k: v for k, v in result["conditioning"][0].items() if k != "range"}
    assert record["ranges"][0]["conditioning"] == expected
    loaded = rba_core.load_compressed(tmp_path / "c")
    source = open_dataset(image_folder, "test")
    indices = extract(tiny_models["vit"], image_folder, EVAL_N, 0, "test", with_stats=False, cache=cache).indices
    images = source.items(indices)
    # The folder's own processor gives the same pixels as the original encoder's.
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = loaded(pixel_values=pixels).numpy()
    np.testing.assert_allclose(out, result["final"]["approximated"], atol=1e-5, rtol=0)


def test_onnx_matches_onnxruntime(fitted, pixels, tmp_path):
    encoders, stats, _ = fitted
    net = approximate_encoder(encoders["vit"], stats["vit"], [(1, 3)], "affine")
    folder = save_compressed(net, tmp_path / "onnx", encoder=encoders["vit"], onnx=True)
    session = onnx_session(folder)
    batch = torch.cat([pixels["pixel_values"], pixels["pixel_values"][:2]])  # another batch size than the example's
    out = session.run(["final"], {"pixel_values": batch.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, net(pixel_values=batch).numpy(), atol=1e-4, rtol=0)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(RBAError, match="model.onnx that was changed"):
        onnx_session(folder)


def test_changed_tensor_shape_is_refused(saved):
    folder, _ = saved
    state = load_file(str(folder / WEIGHTS))
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()  # the record digest stays valid: only a shape changes
    name = next(n for n in state if n.endswith("weight") and state[n].ndim == 2)
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(folder / WEIGHTS), metadata=metadata)
    with pytest.raises(RBAError, match=rf"tensor '{name}' of shape .* where this model needs"):
        rba_core.load_compressed(folder)


def test_missing_edited_or_swapped_files_are_refused(saved, tmp_path):
    folder, _ = saved
    copy = lambda name: shutil.copytree(folder, tmp_path / name)  # noqa: E731
    missing = copy("missing")
    (missing / "config.json").unlink()
    with pytest.raises(RBAError, match="lacks config.json; export it again"):
        rba_core.load_compressed(missing)
    edited = copy("edited")
    record = json.loads((edited / RECORD).read_text())
    record["ranges"][0]["end"] = 4
    (edited / RECORD).write_text(json.dumps(record))
    with pytest.raises(RBAError, match="rba.json that does not belong"):
        rba_core.load_compressed(edited)
    config = copy("config")
    (config / "config.json").write_text((config / "config.json").read_text().replace("\n", "\n "))
    with pytest.raises(RBAError, match="config.json that was changed"):
        rba_core.load_compressed(config)
    with pytest.raises(RBAError, match="is not a folder"):
        rba_core.load_compressed(tmp_path / "nowhere")


def test_loading_never_unpickles(saved, pixels, monkeypatch):
    folder, net = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "rba.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("load_compressed must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = rba_core.load_compressed(folder)
    with torch.no_grad():
        assert torch.allclose(loaded(**pixels), net(**pixels), atol=1e-5, rtol=0)


def test_a_module_carries_its_encoder_and_a_wrong_one_is_refused(fitted, tmp_path, pixels):
    encoders, stats, _ = fitted
    net = approximate_encoder(encoders["vit"], stats["vit"], [(1, 3)])
    with pytest.raises(RBAError, match="built from another encoder"):
        save_compressed(net, tmp_path / "x", encoder=encoders["deit"])
    loaded = rba_core.load_compressed(save_compressed(net, tmp_path / "y"))  # the module knows its encoder
    with torch.no_grad():
        assert torch.allclose(loaded(**pixels), net(**pixels), atol=1e-5, rtol=0)


def test_export_never_overwrites_a_folder_it_did_not_write(fitted, tmp_path):
    encoders, stats, _ = fitted
    net = approximate_encoder(encoders["vit"], stats["vit"], [(1, 3)])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RBAError, match="not empty"):
        save_compressed(net, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_package_import_stays_light():
    code = ("import sys, rba_core; assert 'torch' not in sys.modules; "
            "assert callable(rba_core.load_compressed); assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
