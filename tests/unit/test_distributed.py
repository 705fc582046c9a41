"""Data-parallel passes: two gloo workers under torchrun compute what one process computes, share its
cache entry, and fail as a group with one sentence when a worker fails."""

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import ROOT, finish, start

from rba_core.ops.analysis import analyze, approximate
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.distributed import World
from rba_core.errors import RBAError
from rba_core.passes.extract import extract
from rba_core.maps import fit_map
from rba_core.models import load_encoder
from rba_core.ops.search import search

N = 27  # not a multiple of the sample group: uneven shares and a partial last group
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def torchrun(*args: str):
    """``torchrun --standalone --nproc-per-node 2 -m rba_core -- ARGS`` (the ``--`` form the README documents)."""
    return finish(start("--", *args, launch=TORCHRUN))


def assert_same_analysis(launched: dict, alone) -> None:
    """A launched run's analyze JSON equals a single process's analysis to 1e-6 relative."""
    for name in ("block_redundancy", "cosine", "cka", "fit_residual"):
        expected = np.array(alone[name], float)
        np.testing.assert_allclose(np.array(launched[name], float), expected, rtol=1e-6,
                                   atol=1e-6 * np.nanmax(np.abs(expected)), err_msg=name)


def test_shares_cover_every_position_once_in_whole_groups():
    for n in (1, 7, 8, 27, 64):
        for size in (1, 2, 3, 5):
            shares = [World(rank, size).share(n, 8) for rank in range(size)]
            assert np.array_equal(np.concatenate(shares), np.arange(n))
            assert all(len(s) == 0 or s[0] % 8 == 0 for s in shares)


def test_two_gloo_workers_equal_one_process_and_share_its_entry(tiny_models, image_folder, tmp_path):
    model, out = tiny_models["vit"], tmp_path / "analysis.json"
    run = torchrun("analyze", "--model", model, "--dataset", image_folder, "--n", str(N), "--cache-dir",
                   str(tmp_path / "dist"), "--json", str(out))
    assert run.returncode == 0, run.stderr
    launched = json.loads(out.read_text())
    assert launched["workers"] == 2 and launched["cache"]["hit"] is False
    assert launched["threads"] == 1  # the OMP_NUM_THREADS=1 that start() sets, kept as the user's choice

    alone = analyze(model, image_folder, N, cache=Cache(tmp_path / "single"))
    assert alone.workers == 1 and alone.cache["key"] == launched["cache"]["key"]  # workers not in the key
    assert_same_analysis(launched, alone)

    # The distributed entry, reopened in this process: a hit that reports the workers that stored it.
    shared = Cache(tmp_path / "dist")
    reopened = analyze(model, image_folder, N, cache=shared)
    assert reopened.cache["hit"] and reopened.workers == 2
    assert [e.workers for e in shared.entries()] == [2]  # as the cache page lists it
    dist = extract(model, image_folder, N, cache=shared)
    single = extract(model, image_folder, N, cache=Cache(tmp_path / "single"))
    np.testing.assert_array_equal(dist.indices, single.indices)
    np.testing.assert_allclose(dist.pooled, single.pooled, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dist.final, single.final, rtol=1e-6, atol=1e-6)
    assert dist.stats().count == single.stats().count
    for i in range(dist.num_blocks + 1):
        for j in range(i + 1, dist.num_blocks + 1):
            t_dist, t_single = (fit_map(e.stats(), (i, j), "affine").weight.numpy() for e in (dist, single))
            np.testing.assert_allclose(t_dist, t_single, rtol=1e-6, atol=1e-6 * np.abs(t_single).max())


def test_a_failing_worker_fails_the_group_naming_its_rank(tiny_models, image_folder, tmp_path):
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    for image in (data / "class2").iterdir():  # the last class: samples in rank 1's half only
        image.write_bytes(b"not an image")
    cache_dir = tmp_path / "cache"
    n = len(open_dataset(str(data), "train"))  # every train image: the broken ones among them
    run = torchrun("analyze", "--model", tiny_models["vit"], "--dataset", str(data), "--n", str(n),
                   "--cache-dir", str(cache_dir))
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and len(errors) == 1, run.stderr
    assert "Worker rank 1 of 2 failed during the pass" in errors[0] and "cannot be decoded" in errors[0]
    assert 'File "' + str(ROOT) not in run.stderr  # no traceback from our code (torchrun prints its own summary)
    assert Cache(cache_dir).entries() == []  # nothing partial reached the cache


def test_token_subsampling_depends_neither_on_batch_size_nor_on_sample_groups(tiny_models, image_folder, tmp_path):
    vit = load_encoder(tiny_models["vit"])
    runs = [extract(tiny_models["vit"], image_folder, N, token_fraction=0.5, batch_size=size,
                    cache=Cache(tmp_path / str(size)), encoder=vit) for size in (8, 16, 40)]
    first = runs[0].stats()
    assert first.count < N * 17  # a real sub-sample: fewer than every token of 27 images of 16 patches + CLS
    for other in runs[1:]:
        for a in range(len(first.upper)):
            np.testing.assert_allclose(other.stats().upper[a], first.upper[a], rtol=1e-12, atol=1e-9)
        assert other.stats().count == first.count


def test_approximate_and_search_under_two_workers_equal_one_process(tiny_models, image_folder, tmp_path):
    """The approximated model's evaluation (rows gathered), the search (candidates dealt to ranks) and
    a folded map's statistics (each rank's share, summed over the ranks)."""
    model, common = tiny_models["vit"], ["--model", tiny_models["vit"], "--dataset", image_folder, "--fit-n", "24",
                                         "--eval-n", "11", "--cache-dir", str(tmp_path / "dist")]
    budget = ["--pairs", "--max-latency-ms", "1e9"]  # the budget needs rank 0's stage times on every rank
    folded = ["--range", "1", "3", "--map", "folded"]
    for command, extra, name in (("approximate", ["--range", "1", "3"], "approximate"), ("search", budget, "search"),
                                 ("approximate", folded, "folded")):
        run = torchrun(command, *common, *extra, "--json", str(tmp_path / f"{name}.json"))
        assert run.returncode == 0, run.stderr
    launched = json.loads((tmp_path / "approximate.json").read_text())
    alone = approximate(model, image_folder, 24, 11, 0, [(1, 3)], cache=Cache(tmp_path / "single"))
    assert launched["mse_final"] == pytest.approx(alone.mse_final, rel=1e-6)
    searched = json.loads((tmp_path / "search.json").read_text())
    expected = search(model, image_folder, 24, 11, 0, pairs=True, max_latency_ms=1e9,
                      cache=Cache(tmp_path / "single"))
    assert [(r["range"], r["samples"]) for r in searched["candidates"]] == \
        [(r["range"], r["samples"]) for r in expected.candidates]
    np.testing.assert_allclose([r["mse_final"] for r in searched["candidates"]],
                               [r["mse_final"] for r in expected.candidates], rtol=1e-6)
    launched = json.loads((tmp_path / "folded.json").read_text())
    alone = approximate(model, image_folder, 24, 11, 0, [(1, 3)], "folded", cache=Cache(tmp_path / "single"))
    assert launched["map"] == "folded" and launched["mse_final"] == pytest.approx(alone.mse_final, rel=1e-6)


def test_the_dashboard_launcher_forwards_rank_0_progress_and_stops_the_whole_group(tiny_models, tmp_path):
    from rba_core.distributed import run_group
    from rba_core.progress import Cancelled

    n, seen = 1400, []
    request = ["analyze", "--model", tiny_models["vit"], "--dataset", "digits", "--n", str(n)]
    run_group(request, 2, tmp_path / "cache", lambda done, total: seen.append((done, total)))
    assert [e.workers for e in Cache(tmp_path / "cache").entries()] == [2]
    # rank 0's progress is forwarded while the group runs; a fast pass may finish between two polls, so
    # the stop below (which needs a forwarded report to happen at all) is what checks the forwarding.

    def stop(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):  # the first report stops it, before the workers have done anything
        run_group(request[:-1] + ["1000"], 2, tmp_path / "stopped", stop)
    assert Cache(tmp_path / "stopped").entries() == []
    # A group's error comes back as its sentence; which rank reports first is a race (rank 0's line may
    # be cut when torchrun stops the group), so the sentence may carry the reporting rank.
    with pytest.raises(RBAError, match=r"^(\[rank \d+\] )?The number of samples n"):
        run_group(request[:-1] + ["0"], 2, tmp_path / "stopped", None)


def test_accelerate_launch_runs_the_same_pass_as_one_process(tiny_models, image_folder, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; gloo without GPUs)."""
    # ``python -m accelerate.commands.launch`` is ``accelerate launch``: the console script also imports timm
    # for its estimate command, which fails where timm is installed without torchvision.
    launch = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no")
    out = tmp_path / "analysis.json"
    run = finish(start("analyze", "--model", tiny_models["vit"], "--dataset", image_folder, "--n", str(N),
                       "--cache-dir", str(tmp_path / "dist"), "--json", str(out), launch=launch))
    assert run.returncode == 0, run.stderr
    launched = json.loads(out.read_text())
    alone = analyze(tiny_models["vit"], image_folder, N, cache=Cache(tmp_path / "single"))
    assert launched["workers"] == 2 and launched["cache"]["key"] == alone.cache["key"]
    assert_same_analysis(launched, alone)


def _workers(launcher: int) -> dict[int, int]:
    """rank -> PID of the worker processes a launcher started (its children that carry RANK)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(v.split("=", 1) for v in (stat.parent / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(stat.parent.name)
    return found


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_worker_fails_the_run_naming_its_rank_and_stores_nothing(rank, tmp_path):
    """SIGKILL to a real rank mid-pass: rank 0, which holds the cache lock and is the one writer, or rank 1,
    whose peer is then stopped by the launcher."""
    import fcntl

    cache_dir = tmp_path / "cache"
    run = start("--", "analyze", "--model", "digits-ViT", "--dataset", "digits", "--n", "1400",
                "--cache-dir", str(cache_dir), launch=TORCHRUN)
    deadline = time.monotonic() + 120
    while not list((cache_dir / ".locks").glob("*.progress")):  # rank 0 reports progress: the pass runs
        assert run.poll() is None and time.monotonic() < deadline, finish(run).stderr
        time.sleep(0.1)
    workers = _workers(run.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[rank], signal.SIGKILL)
    done = finish(run)
    assert done.returncode != 0
    # torchrun's failure summary names the killed rank as the root cause; no traceback from our code.
    assert "Root Cause" in done.stderr, done.stderr
    root_cause = done.stderr.split("Root Cause", 1)[1]
    assert re.search(rf"rank\s*:\s*{rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*:\s*-9", root_cause), done.stderr
    assert 'File "' + str(ROOT) not in done.stderr
    assert Cache(cache_dir).entries() == []
    assert [p.name for p in cache_dir.iterdir()] == [".locks"]  # no entry, no temporary folder
    for lock in (cache_dir / ".locks").glob("*.lock"):  # the dead writer's lock is free for the next run
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
