"""Map kinds as plug-ins (rba_core/maps/): the diagonal kind, added as one file, works everywhere a kind is
chosen, and every kind is written to and rebuilt from an export through the registry."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rba_core
from rba_core.ops.analysis import approximate, export
from rba_core.cache import Cache
from rba_core.cli import main
from rba_core.data import open_dataset
from rba_core.maps import HYPERS, MAPS, MapParams, fit_map
from rba_core.models import load_encoder
from rba_core.ops.search import search
from rba_core.ops.table import table

FIT_N, EVAL_N = 24, 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vit(tiny_models):
    return load_encoder(tiny_models["vit"], device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(tmp_path_factory.mktemp("kinds-cache"))


def _tokens(encoder, images) -> list[np.ndarray]:
    """hs[0..L] of every token, by running the model's own modules (float64 copies)."""
    with torch.no_grad():
        hs, _ = encoder.hidden_states(encoder.preprocess(images))
    return [h.reshape(-1, h.shape[-1]).double().numpy() for h in hs]


def test_diagonal_map_is_each_features_least_squares_line(vit, tiny_models, image_folder, cache):
    """Against numpy: for every feature d, polyfit(hs[i][:, d], hs[j][:, d], 1) over the fit tokens."""
    from rba_core.passes.range_pass import range_statistics

    source = open_dataset(image_folder, "train")
    stats = range_statistics(tiny_models["vit"], image_folder, FIT_N, 0, [(1, 3)], cache=cache, encoder=vit)
    from rba_core.data import open_sample

    _, indices = open_sample(image_folder, "train", FIT_N, 0)
    tokens = _tokens(vit, source.items(indices))
    fitted = fit_map(stats, (1, 3), "diagonal")
    x, y = tokens[1], tokens[3]
    expected = np.array([np.polyfit(x[:, d], y[:, d], 1) for d in range(x.shape[1])])  # (D, [slope, intercept])
    np.testing.assert_allclose(fitted.scale.double().numpy(), expected[:, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fitted.shift.double().numpy(), expected[:, 1], rtol=1e-4, atol=1e-5)
    assert fitted.conditioning.rank == x.shape[1] and MAPS["diagonal"].added_params(x.shape[1]) == 2 * x.shape[1]
    h = torch.from_numpy(x[:5]).float()
    torch.testing.assert_close(fitted(h), h * fitted.scale + fitted.shift)


def test_diagonal_runs_in_approximate_search_table_and_export(vit, tiny_models, image_folder, cache, tmp_path):
    model = tiny_models["vit"]
    result = approximate(model, image_folder, FIT_N, EVAL_N, 0, [(1, 3)], "diagonal", cache=cache, encoder=vit,
                         latency=False)
    d = vit.hidden_size
    assert result["map"] == "diagonal"
    assert result["params"]["approximated"] == vit.num_params() - vit.block_params(2) - vit.block_params(3) + 2 * d
    linear = approximate(model, image_folder, FIT_N, EVAL_N, 0, [(1, 3)], "linear", cache=cache, encoder=vit,
                         latency=False)
    assert result["mse_final"] != linear["mse_final"]
    found = search(model, image_folder, FIT_N, EVAL_N, 0, blocks=1, kind="diagonal", cache=cache, encoder=vit)
    assert found["map"] == "diagonal" and found["candidates"]
    rows = table(model, [image_folder], FIT_N, EVAL_N, 0, "1:3", kind="diagonal", cache=cache, encoder=vit)["rows"]
    assert rows[1]["mse_final"] == pytest.approx(result["mse_final"], rel=1e-6)
    record = export(model, image_folder, FIT_N, 0, [(1, 3)], "diagonal", tmp_path / "diag", cache=cache, encoder=vit)
    assert record["ranges"][0]["map"] == "diagonal"
    loaded = rba_core.load_compressed(tmp_path / "diag")
    images = open_dataset(image_folder, "test").items(range(4))
    with torch.no_grad():
        ours = approximate_net(vit, model, image_folder, cache, "diagonal", MapParams())(**vit.preprocess(images))
        torch.testing.assert_close(loaded(**loaded.preprocess(images)), ours, rtol=1e-5, atol=1e-5)


def approximate_net(vit, model, dataset, cache, kind, params):
    """The approximated encoder of range 1→3 fitted as approximate and export fit it."""
    from rba_core.ops.analysis import fit_range_maps
    from rba_core.passes.approx import ApproximatedEncoder
    from rba_core.ops.run import Run

    _, maps = fit_range_maps(Run(model, dataset, FIT_N, cache=cache, encoder=vit), [(1, 3)], kind, params)
    return ApproximatedEncoder(vit, [(1, 3)], maps).eval()


def test_ridge_export_records_ridge_and_its_lambda_and_loads_back(vit, tiny_models, image_folder, cache, tmp_path):
    """It was recorded as ``linear`` (the kind guessed from the module's class and bias)."""
    params = MapParams(ridge=0.5)
    record = export(tiny_models["vit"], image_folder, FIT_N, 0, [(1, 3)], "ridge", tmp_path / "r",
                    map_params=params, cache=cache, encoder=vit)
    saved = json.loads((tmp_path / "r" / "rba.json").read_text())
    assert saved["ranges"][0]["map"] == "ridge" and saved["ranges"][0]["map_params"] == {"ridge": 0.5}
    assert record["ranges"] == saved["ranges"]
    loaded = rba_core.load_compressed(tmp_path / "r")
    rebuilt = next(m for m in loaded.maps if m is not None)
    assert (rebuilt.kind, rebuilt.params) == ("ridge", {"ridge": 0.5})
    images = open_dataset(image_folder, "test").items(range(3))
    net = approximate_net(vit, tiny_models["vit"], image_folder, cache, "ridge", params)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded.preprocess(images)), net(**vit.preprocess(images)),
                                   rtol=1e-5, atol=1e-5)
    # a different λ is a different map
    other = approximate_net(vit, tiny_models["vit"], image_folder, cache, "ridge", MapParams(ridge=0.0))
    assert not torch.allclose(other.maps[0].weight, net.maps[0].weight)


def test_cli_options_come_from_the_declarations(tiny_models, image_folder, tmp_path, capsys):
    """--map lists every kind and each declared hyperparameter is a flag; diagonal through the CLI."""
    with pytest.raises(SystemExit):
        main(["approximate", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in MAPS) and all(f"--{h.name.replace('_', '-')}" in text for h in HYPERS)
    out = tmp_path / "a.json"
    assert main(["approximate", "--model", tiny_models["vit"], "--dataset", image_folder, "--fit-n", str(FIT_N),
                 "--eval-n", str(EVAL_N), "--range", "1", "3", "--map", "diagonal", "--no-latency",
                 "--cache-dir", str(tmp_path / "c"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["map"] == "diagonal"


def test_no_module_outside_the_maps_package_switches_on_map_classes_or_statistics():
    """The behaviour of a kind is read from its declaration: no isinstance on map classes, no comparison of
    a kind's statistics, no kind named by its string, outside rba_core/maps."""
    import re

    offending = []
    for path in [*ROOT.joinpath("rba_core").rglob("*.py"), *ROOT.joinpath("pages").rglob("*.py")]:
        if "maps" in path.relative_to(ROOT).parts[:2] or "demo" in path.parts:
            continue
        text = path.read_text()
        for pattern in (r"isinstance\([^)]*(LinearMap|FoldedMap|FittedMap)", r"statistics\s*[!=]=",
                        r"\.kind\s*[!=]=\s*\"", r"kind\s*==\s*\"(linear|affine|ridge|folded|diagonal)\""):
            offending += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offending == []
