"""End to end in a real browser: headless Debian Chromium driven by Playwright clicks through every tab.

Compare generates, the Arena takes a vote, the Leaderboard counts it, the Train tab trains a tiny
run to the end and its student then appears in Compare. Screenshots go to test-artifacts/browser/.
Chromium must be at /usr/bin/chromium (`apt-get install -y chromium`; .ci/run installs it): when it
is missing these tests fail, they do not skip. Playwright never downloads a browser of its own here.
"""

from __future__ import annotations

import contextlib

import os
import re
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest

from conftest import served, tiny_pixel_unet
from dmd2.arena import VoteStore
from dmd2.families.pixel import save_pixel_unet

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
# Without these flags Chromium tries to reach Google's servers and stalls on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_MS = 120_000         # hang guards for the page (a loaded 2-core machine is slow), not timing assertions
TRAIN_MS = 900_000


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app on localhost: a tiny teacher and a tiny 1-step student, fresh votes and runs folders."""
    from dmd2.ui.app import build_app
    from dmd2.ui.train import TrainManager

    root = tmp_path_factory.mktemp("browser")
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, root / "tiny-teacher")
    save_pixel_unet(unet, root / "tiny-student", timesteps=[999])
    manager = TrainManager(root / "runs")
    demo = build_app([str(root / "tiny-teacher"), str(root / "tiny-student")], votes_path=root / "votes.sqlite",
                     trainer=manager)
    try:
        with served(demo) as url:
            yield dict(url=url, root=root, votes=root / "votes.sqlite", manager=manager)
    finally:
        manager.close()


@contextlib.contextmanager
def chromium_context(profile_dir):
    """A headless Chromium context (a fresh profile in `profile_dir`); fails the test, saying what to install,
    without Chromium or Playwright."""
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: the browser tests need the Debian package "
                    "(`apt-get install -y chromium`; .ci/run installs it)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r requirements-test.txt", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # A persistent context is how Playwright takes a fresh --user-data-dir.
        context = p.chromium.launch_persistent_context(
            str(profile_dir), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(UI_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def page(app, tmp_path_factory):
    """One browser page on the app, shared by the tests below in file order (each continues the last)."""
    with chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        page = context.new_page()
        page.goto(app["url"])
        yield page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def test_compare_generates_one_panel_per_model(page):
    from playwright.sync_api import expect

    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.get_by_text(re.compile(r"^tiny-teacher: NFE \d+, steps \d+, \d+ ms$"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^tiny-student: NFE 1, steps 1, \d+ ms$"))).to_be_visible()
    shot(page, "1-compare")


def leaderboard_rows(page) -> dict[str, list[str]]:
    """Model name -> its row's cells, as the page shows them."""
    rows = {}
    for row in page.locator("#leaderboard-table [role=row].virtual-row").all():    # Gradio 6's data grid
        cells = [c.strip() for c in row.locator("[role=gridcell]").all_inner_texts()]
        if len(cells) > 1:
            rows[cells[1]] = cells
    return rows


def test_arena_vote_changes_the_leaderboard(page, app):
    from playwright.sync_api import expect

    from dmd2.ui.leaderboard import COLUMNS

    battles = COLUMNS.index("Battles")
    open_tab(page, "Leaderboard")
    expect(page.locator("#leaderboard-table")).to_contain_text("tiny-student")
    before = leaderboard_rows(page)
    assert [before[m][battles] for m in ("tiny-teacher", "tiny-student")] == ["0", "0"], before

    open_tab(page, "Arena")
    page.get_by_role("button", name="New round", exact=True).click()
    vote = page.locator("#arena-vote-a")
    expect(vote).to_be_enabled()
    vote.click()
    expect(page.get_by_text(re.compile(r"Vote recorded \(A is better\)"))).to_be_visible()
    expect(vote).to_be_disabled()
    shot(page, "2-arena")
    with VoteStore(app["votes"]) as store:
        assert [v["outcome"] for v in store.votes()] == ["a"]

    open_tab(page, "Leaderboard")
    # a rating interval: the bootstrap runs in a child process, seconds on a loaded machine (expect's own
    # default wait is 5 s; UI_MS is the page's hang guard)
    expect(page.locator("#leaderboard-table")).to_contain_text(re.compile(r"\d+ to \d+"), timeout=UI_MS)
    after = leaderboard_rows(page)
    assert [after[m][battles] for m in ("tiny-teacher", "tiny-student")] == ["1", "1"], after
    shot(page, "3-leaderboard")


def test_train_tab_runs_a_tiny_run_to_the_end(page, app):
    from playwright.sync_api import expect

    teacher = app["root"] / "tiny-teacher"
    open_tab(page, "Train")
    page.locator("#train-name textarea").fill("browser-run")
    page.locator("#train-iterations input").fill("4")
    page.locator("#train-batch-size input").fill("4")
    page.get_by_text("Other config values", exact=True).click()
    page.locator("#train-extra textarea").fill(
        f"teacher={teacher}\neval_every=0\nlog_every=1\nsample_every=2\ncheckpoint_every=2\nwarmup_steps=0")
    page.locator("#train-launch").click()
    progress = page.locator("#train-progress-text")
    expect(progress).to_contain_text("of 4")                                     # the new run is watched
    shot(page, "4-train-launched")
    expect(progress).to_contain_text("finished", timeout=TRAIN_MS)
    expect(progress).to_contain_text("100% (step 4 of 4)")
    expect(page.locator("#train-status")).to_contain_text("Run browser-run: finished")
    expect(page.locator("#train-runs")).to_contain_text("browser-run")
    expect(page.locator("#train-sample img")).to_be_visible()                    # the latest sample grid
    shot(page, "5-train-finished")
    assert (app["manager"].runs_root / "browser-run" / "student" / "dmd2.json").is_file()


def test_the_finished_run_is_in_compare_without_a_restart(page):
    from playwright.sync_api import expect

    open_tab(page, "Compare")
    page.locator("#compare-more input").click()
    page.get_by_role("option", name="browser-run").click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#compare-more-gallery")).to_contain_text(re.compile(r"browser-run: NFE 1, steps 1"))
    shot(page, "6-compare-with-run")

