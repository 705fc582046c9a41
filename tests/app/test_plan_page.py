"""The Table page's compression plans (``rba_core.ops.plan``) through AppTest on the offline demo: the plans it shows
are the core's for the same settings."""

import pytest
from test_pages import DEMO, _app, _clean, cache_dir  # noqa: F401  (fixture)

from rba_core.cache import Cache
from rba_core.ops.plan import plan
from rba_core.registry import DEMO_PAIR


def test_table_page_plans_each_strategy_and_shows_the_core_plans(tmp_path):
    at = _app("pages/4_Table.py", **DEMO)
    _clean(at)
    at.number_input(key="plan_remove").set_value(2)
    at.multiselect(key="plan_strategies").set_value(["greedy", "shortgpt"])
    at.button(key="plan-compute").click().run()
    _clean(at)
    assert any(s.label.startswith("Planned 2 strategies") for s in at.status)
    shown = at.dataframe[-1].value
    for strategy in ("greedy", "shortgpt"):
        core = plan(*DEMO_PAIR, 64, 64, 0, remove_blocks=2, strategy=strategy, kind="linear", cache=Cache(tmp_path))
        row = shown[shown["strategy"] == strategy].iloc[0]
        assert row["ranges"] == ", ".join(f"{i}→{j}" for i, j in core.final["ranges"])
        assert row["mse"] == pytest.approx(core.final["metric"], rel=1e-6)
