"""Latency is measured, not guessed: warm-up, repeats to a stated spread, median inside its spread,
and both models timed interleaved on the same inputs."""

import time

import pytest
import torch

from rba_core.latency import describe, measure, summarise


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from rba_core.models import load_encoder

    return load_encoder(tiny_models["vit"], device="cpu")


def test_a_repeated_measurement_reports_a_spread_with_the_median_inside(tiny):
    from rba_core.passes.approx import ApproximatedEncoder

    pixels = {"pixel_values": torch.rand(4, 3, 32, 32)}
    full = ApproximatedEncoder(tiny, [], [])  # the original model's path
    half = ApproximatedEncoder(tiny, [(2, tiny.num_blocks)], [None])  # blocks 3.. skipped
    result = measure({"original": full, "approximated": half}, pixels, budget_s=1.0)
    for name, m in result.items():
        assert 5 <= m["repeats"] <= 200 and m["images"] == 4, name
        assert 0 < m["low"] <= m["median"] <= m["high"], name
        assert m["relative_spread"] == pytest.approx((m["high"] - m["low"]) / m["median"])
        assert m["converged"] == (m["relative_spread"] <= m["target_spread"])
    # Interleaved: both forwards ran the same number of rounds.
    assert result["original"]["repeats"] == result["approximated"]["repeats"]
    assert result["approximated"]["median"] < result["original"]["median"]  # half the blocks
    assert describe(result["original"]).endswith(f"{result['original']['repeats']} runs)")


def test_warm_up_and_interleaving_on_the_same_inputs():
    calls = []
    x = torch.zeros(2, 1)
    measure({"a": lambda x: calls.append(("a", id(x))), "b": lambda x: calls.append(("b", id(x)))}, {"x": x},
            warmup=2, min_repeats=3, max_repeats=3)
    assert [name for name, _ in calls] == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]
    assert {ident for _, ident in calls} == {id(x)}


def test_stops_at_the_budget_when_the_spread_stays_wide():
    delays = iter([0.001, 0.02] * 1000)  # a bimodal forward: its spread never gets under 5%
    began = time.perf_counter()
    result = measure({"noisy": lambda x: time.sleep(next(delays))}, {"x": torch.zeros(1)}, budget_s=0.3)["noisy"]
    assert time.perf_counter() - began < 1.0 and not result["converged"] and result["repeats"] >= 5


def test_summary_in_ms_per_image():
    m = summarise([0.010, 0.020, 0.030, 0.040, 0.050], items=10)
    assert m["median"] == pytest.approx(3.0) and m["low"] == pytest.approx(2.0) and m["high"] == pytest.approx(4.0)
    assert m["repeats"] == 5 and not m["converged"]
