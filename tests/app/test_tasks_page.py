"""Issue 17: the Approximate page runs lm-eval tasks for a decoder model (the shipped offline task) on the
original and approximated models, with the numbers ``python -m rba_core eval`` gives for the same settings."""

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")

from test_pages import _app, _clean, cache_dir  # noqa: E402,F401  (cache_dir: this module's cache too)

from rba_core.ops.downstream import DEBIAN_TASK, evaluate  # noqa: E402

LM = {"model": "demo-GPT", "dataset": "demo-text", "n": "16", "eval_n": "8"}


def test_the_approximate_page_runs_lm_eval_tasks(cache_dir):
    from rba_core.cache import Cache

    at = _app(**LM)
    at.button(key="compute-home").click().run()
    _clean(at)
    page = _app("pages/3_Approximate.py", **LM, n_ranges="1", start1="3", end1="5")
    page.button(key="approximate").click().run()
    _clean(page)
    page.number_input(key="lm_tasks_limit").set_value(12).run()
    page.button(key="lm-tasks").click().run()
    _clean(page)
    table = next(df.value for df in page.dataframe if "difference" in df.value.columns)
    expected = evaluate("demo-GPT", DEBIAN_TASK, dataset="demo-text", fit_n=16, ranges=[(3, 5)], limit=12,
                        cache=Cache(cache_dir))["results"][DEBIAN_TASK]
    acc = table[table["metric"] == "acc"].iloc[0]
    assert acc["task"] == DEBIAN_TASK
    assert (acc["original"], acc["approximated"]) == pytest.approx(
        (expected["original"]["acc"], expected["approximated"]["acc"]), abs=1e-12)


def test_the_approximate_page_shows_the_demos_own_head(cache_dir):
    """digits-ViT is a ViTForImageClassification whose classes are the digits: its head's accuracy is shown."""
    from rba_core.ops.analysis import approximate
    from rba_core.cache import Cache
    from rba_core.registry import DEMO_PAIR

    page = _app("pages/3_Approximate.py", model=DEMO_PAIR[0], dataset=DEMO_PAIR[1], n_ranges="1", start1="2",
                end1="6")
    page.button(key="approximate").click().run()
    _clean(page)
    metrics = {m.label: m.value for m in page.metric}
    head = approximate(DEMO_PAIR[0], DEMO_PAIR[1], 64, 64, 0, [(2, 6)], latency=False,
                       cache=Cache(cache_dir)).head_accuracy
    assert head["matched_by"] == "names" and head["classes"] == 10
    for name in ("original", "approximated", "skip"):
        assert metrics[f"Head accuracy, {name}"] == f"{100 * head[name]['top1']:.1f}%"
