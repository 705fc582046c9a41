"""Datasets open as labelled RGB images from image folders and parquet folders, and sample reproducibly."""

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED_DATASETS
from PIL import Image

from rba_core import RBAError
from rba_core.cache import Cache
from rba_core.data import open_dataset, sample_indices
from rba_core.passes.extract import extract
from rba_core.registry import DATA_DIR_ENV

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
needs_shared = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"{SHARED_DATASETS} is absent")


def test_sample_indices_are_seeded_distinct_and_random():
    a = sample_indices(1000, 50, seed=0)
    assert np.array_equal(a, sample_indices(1000, 50, seed=0))
    assert set(a) != set(sample_indices(1000, 50, seed=1))
    assert len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1000
    assert np.all(np.diff(a) > 0)  # sorted, no repeats
    assert not np.array_equal(a, np.arange(50))  # not simply the first rows
    assert a.max() > 500  # spread over the whole split
    assert sorted(sample_indices(7, 7, seed=3).tolist()) == list(range(7))


@pytest.mark.parametrize("n", [0, -3, 1001])
def test_sample_indices_rejects_impossible_sizes(n):
    with pytest.raises(RBAError):
        sample_indices(1000, n, seed=0)


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def test_image_folder_splits_are_disjoint_cover_all_files_and_keep_labels(image_folder):
    files = sorted(Path(image_folder).rglob("*.png"))
    truth = {_digest(Image.open(f)): f.parent.name for f in files}
    assert len(truth) == len(files) == 60
    seen = {}
    for split in ("train", "test"):
        source = open_dataset(image_folder, split)
        assert source.label_names == ["class0", "class1", "class2"]
        assert len(source) > 0
        images = source.items(range(len(source)))
        for image, label in zip(images, source.labels):
            digest = _digest(image)
            assert digest not in seen, "an image is in both splits"
            seen[digest] = split
            assert source.label_names[label] == truth[digest]
    assert set(seen) == set(truth)
    assert 0.1 < list(seen.values()).count("test") / 60 < 0.35  # about one in five


def test_grayscale_images_become_rgb(image_folder):
    source = open_dataset(image_folder, "train")
    files = sorted(Path(image_folder).rglob("*.png"))
    gray = {_digest(Image.open(f)): np.asarray(Image.open(f)) for f in files if Image.open(f).mode == "L"}
    assert gray
    found = 0
    for image in source.items(range(len(source))):
        assert image.mode == "RGB" and image.size == (24, 20)
        pixels = np.asarray(image)
        if _digest(image) in gray:
            found += 1
            for c in range(3):
                np.testing.assert_array_equal(pixels[:, :, c], gray[_digest(image)])
    assert found > 0


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / split / cls / f"{k}.png")
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "test")
    assert train.label_names == test.label_names == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]


def _png(color: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (6, 6), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(folder: Path, table: pa.Table) -> None:
    folder.mkdir(exist_ok=True)
    for split in ("train", "test"):
        pq.write_table(table, folder / f"{split}.parquet")


def test_parquet_folder_reads_images_and_labels(tmp_path):
    images = [{"bytes": _png(10 * k), "path": None} for k in range(5)]
    _write_parquet(tmp_path, pa.table({"img": images, "label": [0, 1, 2, 1, 0]}))
    source = open_dataset(str(tmp_path), "test")
    assert source.labels.tolist() == [0, 1, 2, 1, 0] and source.label_names == ["0", "1", "2"]
    decoded = source.items([3])[0]
    assert decoded.mode == "RGB" and np.asarray(decoded)[0, 0].tolist() == [30, 30, 30]


def test_parquet_is_read_by_row_groups(tmp_path):
    images = [{"bytes": _png(10 * k), "path": None} for k in range(23)]
    table = pa.table({"img": images, "label": [k % 3 for k in range(23)]})
    (tmp_path / "grouped").mkdir()
    for split in ("train", "test"):
        pq.write_table(table, tmp_path / "grouped" / f"{split}.parquet", row_group_size=5)
    assert pq.ParquetFile(tmp_path / "grouped" / "test.parquet").num_row_groups == 5
    source = open_dataset(str(tmp_path / "grouped"), "test")
    picked = [0, 4, 5, 11, 12, 22, 3]  # within, across and back over row-group boundaries
    assert [np.asarray(im)[0, 0, 0] for im in source.items(picked)] == [10 * k for k in picked]


def test_parquet_without_image_column(tmp_path):
    _write_parquet(tmp_path, pa.table({"pixels_png": [b"x"], "label": [0]}))
    with pytest.raises(RBAError, match="no image or text column"):
        open_dataset(str(tmp_path), "train")


def test_empty_parquet(tmp_path):
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())])
    _write_parquet(tmp_path, schema.empty_table())
    with pytest.raises(RBAError, match="empty"):
        open_dataset(str(tmp_path), "train")


def test_unlabelled_parquet_has_label_minus_one(tmp_path):
    _write_parquet(tmp_path, pa.table({"image": [{"bytes": _png(0), "path": None}] * 3}))
    assert open_dataset(str(tmp_path), "train").labels.tolist() == [-1, -1, -1]


def test_digits_alias_ships_offline():
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.label_names == [str(d) for d in range(10)]
    assert train.items([0])[0].mode == "RGB"


@needs_shared
def test_real_mnist_and_cifar10_folders():
    mnist = open_dataset(str(SHARED_DATASETS / "mnist"), "test")
    assert len(mnist) == 10_000 and set(mnist.labels.tolist()) == set(range(10))
    image = mnist.items([0])[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    cifar = open_dataset(str(SHARED_DATASETS / "cifar10"), "test")
    assert len(cifar) == 10_000 and cifar.label_names == CIFAR10_NAMES
    assert cifar.items([5])[0].size == (32, 32)


@needs_shared
def test_real_datasets_through_aliases_and_data_dir(monkeypatch, tiny_models, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATASETS))
    cifar = open_dataset("CIFAR-10", "test")
    assert cifar.name == "CIFAR-10" and cifar.label_names == CIFAR10_NAMES
    direct = open_dataset(str(SHARED_DATASETS / "cifar10"), "test")
    np.testing.assert_array_equal(cifar.labels, direct.labels)
    assert _digest(cifar.items([7])[0]) == _digest(direct.items([7])[0])
    mnist = open_dataset("mnist", "test")  # aliases are case-insensitive
    assert len(mnist) == 10_000
    for alias in ("CIFAR-10", "MNIST"):
        ex = extract(tiny_models["vit"], alias, 6, seed=1, split="test", with_stats=False,
                     cache=Cache(tmp_path / alias), device="cpu")
        assert ex.pooled.shape == (5, 6, 32) and np.isfinite(ex.pooled).all()
        source = open_dataset(alias, "test")
        np.testing.assert_array_equal(ex.labels, source.labels[ex.indices])
        assert ex.label_names == source.label_names
        assert np.ptp(ex.final, axis=0).max() > 0  # different images, different representations


def test_imagenet_alias_evaluates_on_validation_and_fails_offline_in_one_sentence():
    from rba_core.registry import dataset_info

    info = dataset_info("imagenet-1k")
    assert info.hub_id == "ILSVRC/imagenet-1k"
    assert (info.hub_split("train"), info.hub_split("test")) == ("train", "validation")
    with pytest.raises(RBAError, match=r"^Dataset 'ImageNet-1k' \(ILSVRC/imagenet-1k\) is not available offline.*\.$"):
        open_dataset("ImageNet-1k", "test")


def _real_rows(name: str, rows: int) -> pa.Table:
    """The first ``rows`` rows of a real local dataset's test split, with its Hugging Face metadata."""
    return pq.ParquetFile(SHARED_DATASETS / name / "test.parquet").read_row_group(0).slice(0, rows)


@needs_shared
def test_a_split_of_many_parquet_shards_reads_as_the_single_file(tmp_path):
    table = _real_rows("cifar10", 230)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    (sharded / "test").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(table, single / f"{split}.parquet")
    bounds = [0, 37, 100, 101, 230]  # uneven shards, one of a single row
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        pq.write_table(table.slice(a, b - a), sharded / f"train-{k:05d}-of-00004.parquet", row_group_size=16)
        pq.write_table(table.slice(a, b - a), sharded / "test" / f"{k:04d}.parquet", row_group_size=16)
    whole = open_dataset(str(single), "train")
    for split in ("train", "test"):
        shards = open_dataset(str(sharded), split)
        assert len(shards) == 230 and shards.label_names == whole.label_names == CIFAR10_NAMES
        np.testing.assert_array_equal(shards.labels, whole.labels)
        picked = sample_indices(len(shards), 40, seed=5)
        assert [_digest(im) for im in shards.items(picked)] == [_digest(im) for im in whole.items(picked)]
    (sharded / "train-00004-of-00004.parquet").write_bytes(b"not parquet")
    with pytest.raises(RBAError, match=r"Cannot read '.*train-00004-of-00004.parquet'.*valid parquet file"):
        open_dataset(str(sharded), "train")


@needs_shared
def test_text_shards_and_shards_missing_a_column(tmp_path):
    table = pq.read_table(SHARED_DATASETS / "debian_descriptions" / "test.parquet")
    for k, (a, b) in enumerate([(0, 500), (500, len(table))]):
        pq.write_table(table.slice(a, b - a), tmp_path / f"train-{k:05d}-of-00002.parquet")
    source = open_dataset(str(tmp_path), "train")
    assert source.modality == "text" and len(source) == len(table)
    assert source.items([0, 499, 500, 971]) == [table.column("text")[i].as_py() for i in (0, 499, 500, 971)]
    np.testing.assert_array_equal(source.labels, table.column("label").to_numpy())
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for k, rows in enumerate([range(0, 3), range(3, 7)]):  # JSON Lines shards read one after the other
        (jsonl / f"test-{k:05d}.jsonl").write_text("".join(
            json.dumps({"text": table.column("text")[i].as_py(), "label": table.column("label")[i].as_py()}) + "\n"
            for i in rows))
    lines = open_dataset(str(jsonl), "test")
    assert lines.items(range(7)) == table.column("text").to_pylist()[:7]
    assert lines.labels.tolist() == table.column("label").to_pylist()[:7]
    pq.write_table(table.slice(0, 5).drop_columns(["label"]), tmp_path / "train-00002-of-00002.parquet")
    with pytest.raises(RBAError, match=r"shard '.*train-00002-of-00002.parquet' lacks column\(s\) label"):
        open_dataset(str(tmp_path), "train")


def _write_shards(folder: Path, table: pa.Table, image_col: str, bounds: list[int], name: str, ext: str) -> None:
    """WebDataset shards of ``table``'s rows: ``<key>.<ext>`` (the stored image bytes) + ``<key>.cls``."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        with tarfile.open(folder / name.format(k), "w") as tar:
            for row in range(a, b):
                for suffix, data in ((ext, table.column(image_col)[row].as_py()["bytes"]),
                                     ("cls", str(table.column("label")[row].as_py()).encode())):
                    member = tarfile.TarInfo(f"sample{row:06d}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))


@needs_shared
def test_webdataset_shards_of_real_images_read_like_the_parquet_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("RBA_CACHE_DIR", str(tmp_path / "cache"))  # where the shard indexes are kept
    cifar, mnist = _real_rows("cifar10", 120), _real_rows("mnist", 60)
    _write_shards(tmp_path / "cifar", cifar, "img", [0, 50, 90, 120], "train-{:06d}.tar", "jpg")
    _write_shards(tmp_path / "cifar", cifar, "img", [0, 40], "test-{:06d}.tar", "jpg")
    source = open_dataset(str(tmp_path / "cifar"), "train")
    assert len(source) == 120 and source.modality == "image"
    np.testing.assert_array_equal(source.labels, cifar.column("label").to_numpy())
    picked = sample_indices(120, 30, seed=2)
    expected = [_digest(Image.open(io.BytesIO(cifar.column("img")[i].as_py()["bytes"]))) for i in picked]
    assert [_digest(im) for im in source.items(picked)] == expected
    assert len(open_dataset(str(tmp_path / "cifar"), "test")) == 40
    assert len(list((tmp_path / "cache" / ".index").glob("*.json"))) == 4  # one index per shard

    # Indexed once: with the last shard garbled (same size and time) the index is reused and samples
    # of the other shards are read by offset without touching it; its own samples then fail to decode.
    last = tmp_path / "cifar" / "train-000002.tar"
    stat = last.stat()
    last.write_bytes(b"\0" * stat.st_size)
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = open_dataset(str(tmp_path / "cifar"), "train")
    assert [_digest(im) for im in again.items(picked[picked < 90])] == expected[: int((picked < 90).sum())]
    with pytest.raises(RBAError, match="train-000002.tar.*cannot be decoded"):
        again.items([100])

    # A brace pattern of PNG shards not named by split: one key in five is a test sample.
    _write_shards(tmp_path / "mnist", mnist, "image", [0, 20, 40, 60], "shards-{:06d}.tar", "png")
    pattern = str(tmp_path / "mnist" / "shards-{000000..000002}.tar")
    train, test = open_dataset(pattern, "train"), open_dataset(pattern, "test")
    assert len(train) + len(test) == 60 and 3 <= len(test) <= 25
    everything = {_digest(im): int(label) for s in (train, test) for im, label in zip(s.items(range(len(s))), s.labels)}
    assert everything == {_digest(Image.open(io.BytesIO(mnist.column("image")[i].as_py()["bytes"]))):
                          mnist.column("label")[i].as_py() for i in range(60)}
    with pytest.raises(RBAError, match=r"shard '.*shards-000003.tar' named by '.*' does not exist"):
        open_dataset(str(tmp_path / "mnist" / "shards-{000000..000003}.tar"), "train")


def test_webdataset_text_shards(tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("RBA_CACHE_DIR", str(tmp_path / "cache"))
    texts = [f"text number {k}" for k in range(12)]
    for split, rows in (("train", range(0, 8)), ("test", range(8, 12))):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            for k in rows:
                for suffix, data in (("txt", texts[k].encode()), ("json", f'{{"label": {k % 2}}}'.encode())):
                    member = tarfile.TarInfo(f"doc{k}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    train = open_dataset(str(tmp_path / "{split}.tar"), "train")
    assert train.modality == "text" and train.items([0, 7]) == [texts[0], texts[7]]
    assert train.labels.tolist() == [k % 2 for k in range(8)]
    assert open_dataset(str(tmp_path / "{split}.tar"), "test").items([3]) == [texts[11]]


@needs_shared
def test_a_stream_draws_a_seeded_reproducible_sample_through_datasets_streaming(tmp_path, tiny_models, monkeypatch):
    from rba_core.data import streaming
    from rba_core.data import open_sample

    table = _real_rows("mnist", 150)
    for k, (a, b) in enumerate([(0, 60), (60, 150)]):
        pq.write_table(table.slice(a, b - a), tmp_path / f"train-{k:05d}-of-00002.parquet")
    truth = {_digest(Image.open(io.BytesIO(table.column("image")[i].as_py()["bytes"]))):
             table.column("label")[i].as_py() for i in range(150)}
    spec = f"stream:{tmp_path}"
    source, indices = open_sample(spec, "train", 25, seed=4)
    assert indices.tolist() == list(range(25)) and source.label_names == [str(d) for d in range(10)]
    drawn = [_digest(im) for im in source.items(indices)]
    assert all(truth[d] == label for d, label in zip(drawn, source.labels))  # real rows, their own labels
    assert len(set(drawn)) == 25 and drawn != list(truth)[:25]  # shuffled, not the first rows
    assert [_digest(im) for im in open_sample(f"stream: {tmp_path}", "train", 25, seed=4)[0].items(indices)] == drawn
    monkeypatch.setattr(streaming, "INPUT_SHARDS", 1)  # from here on no 5 s wait for the reader threads
    other, _ = open_sample(spec, "train", 25, seed=5)
    assert [_digest(im) for im in other.items(indices)] != drawn and other.fingerprint != source.fingerprint

    cache = Cache(tmp_path / "cache")
    ex = extract(tiny_models["vit"], spec, 25, seed=5, with_stats=False, cache=cache, device="cpu")
    np.testing.assert_array_equal(ex.labels, other.labels)
    assert extract(tiny_models["vit"], spec, 25, seed=5, with_stats=False, cache=cache).hit
    with pytest.raises(RBAError, match=r"^Asked for 151 samples but the train stream of '.*' ended after 150; "):
        open_sample(spec, "train", 151, seed=0)
    with pytest.raises(RBAError, match="has no test parquet files to stream"):
        open_sample(spec, "test", 5, seed=0)
    texts, indices = open_sample(f"stream:{SHARED_DATASETS / 'debian_descriptions'}", "test", 5, seed=0)
    whole = open_dataset(str(SHARED_DATASETS / "debian_descriptions"), "test")
    truth = dict(zip(whole.items(range(len(whole))), whole.labels.tolist()))
    assert texts.modality == "text" and texts.label_names == whole.label_names
    assert [truth[t] for t in texts.items(indices)] == texts.labels.tolist()


def test_decoding_in_dataloader_workers_keeps_order_results_and_cache_key(tiny_models, image_folder, tmp_path):
    from rba_core.models import load_encoder

    vit = load_encoder(tiny_models["vit"], "cpu")
    runs = {workers: extract(tiny_models["vit"], image_folder, 27, batch_size=8, encoder=vit, decode_workers=workers,
                             cache=Cache(tmp_path / str(workers))) for workers in (0, 2)}
    alone, pooled = runs[0], runs[2]
    assert alone.key == pooled.key  # the workers change the speed, not the result
    np.testing.assert_array_equal(pooled.indices, alone.indices)
    np.testing.assert_array_equal(pooled.pooled, alone.pooled)
    np.testing.assert_array_equal(pooled.final, alone.final)
    for a, b in zip(pooled.stats().upper, alone.stats().upper):
        np.testing.assert_array_equal(a, b)
    # Independently: the model's own forward on the sampled images, in sample order.
    source = open_dataset(image_folder, "train")
    with torch.inference_mode():
        out = vit.model(**vit.preprocess(source.items(pooled.indices)))
    np.testing.assert_allclose(pooled.final, out.last_hidden_state[:, 0].numpy(), rtol=1e-5, atol=1e-5)

    broken = tmp_path / "broken"
    shutil.copytree(image_folder, broken)
    (broken / "class1" / "3.png").write_bytes(b"not an image")
    with pytest.raises(RBAError, match=r"^Sample \d+ \('.*3.png'\) cannot be decoded as an image .*\.$"):
        extract(tiny_models["vit"], str(broken), 40, encoder=vit, decode_workers=2, cache=Cache(tmp_path / "b"))


def test_imagenet_train_alias_streams_and_fails_offline_in_one_sentence(tmp_path, monkeypatch):
    from rba_core.data import open_sample
    from rba_core.hub import require_available
    from rba_core.registry import dataset_info

    info = dataset_info("ImageNet-1k-train")
    assert info.streamed and info.hub_id == "ILSVRC/imagenet-1k"
    assert (info.hub_split("train"), info.hub_split("test")) == ("train", "validation")
    with pytest.raises(RBAError, match=r"^Dataset 'ImageNet-1k-train' cannot be streamed: HF_HUB_OFFLINE is set; .*\.$"):
        require_available(None, ["ImageNet-1k-train"])  # what the CLI checks before anything is opened
    with pytest.raises(RBAError, match=r"^Dataset 'ILSVRC/imagenet-1k' cannot be streamed from the hub .*\.$"):
        open_sample("ImageNet-1k-train", "train", 8, seed=0)
    with pytest.raises(RBAError, match=r"^'ImageNet-1k-train' is read as a stream, a sample at a time; .*\.$"):
        open_dataset("ImageNet-1k-train", "test")
    # A local copy (parquet shards under $RBA_DATA_DIR/imagenet) is read in place of the stream.
    table = pa.table({"image": [{"bytes": _png(k), "path": None} for k in range(6)], "label": [3, 1, 4, 1, 5, 9]})
    (tmp_path / "imagenet").mkdir()
    for split in ("train", "test"):
        pq.write_table(table, tmp_path / "imagenet" / f"{split}-00000-of-00001.parquet")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    source, indices = open_sample("ImageNet-1k-train", "train", 4, seed=0)
    assert source.name == "ImageNet-1k-train" and source.labels[indices].tolist() == \
        [[3, 1, 4, 1, 5, 9][i] for i in indices]
    require_available(None, ["ImageNet-1k-train"])
