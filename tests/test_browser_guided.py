"""Compare's guided-student slider in headless Chromium (issue 19).

(a) A tiny random guided student beside a teacher and a plain student: the slider is there, limited to the
student's range; moving it changes the guided panel's images and nobody else's. (b) The committed guided
MNIST student: at the top of its range its digits of one class spread less (the classifier's feature spread,
dmd2.metrics) than at the bottom: the slider moves them from diverse to prototypical. (b) is skipped only while
that student's folder does not exist. Screenshots go to test-artifacts/browser/. Chromium as in test_browser.py.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
from PIL import Image

from conftest import served, tiny_pixel_unet
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.widgets import DISPLAY_SCALE, format_w
from guided_student import make_tiny_guided_student
from test_browser import ARTIFACTS, UI_MS, chromium_context

ROOT = Path(__file__).resolve().parent.parent
# The committed guided student; $DMD2_TEST_GUIDED_STUDENT points (b) at another one (a run's student/) first.
REAL_GUIDED = Path(os.environ.get("DMD2_TEST_GUIDED_STUDENT") or ROOT / "assets" / "mnist" / "dmd2-1step-guided")
PAD = 2                  # make_grid's padding
SPREAD_IMAGES = 16       # the most Compare draws of one class
SPREAD_CLASSES = (1, 3, 7)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium context for this file's pages."""
    with chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


def serve_page(browser, models, tmp_path):
    """A context manager: the app with `models` on localhost, one page open on it."""
    import contextlib

    from dmd2.ui.app import build_app

    @contextlib.contextmanager
    def page_on_app():
        demo = build_app(models, votes_path=tmp_path / "votes.sqlite", runs_root=tmp_path / "runs")
        with served(demo) as url:
            page = browser.new_page()
            try:
                page.goto(url)
                yield page
            finally:
                page.close()
    return page_on_app()


def slider_limits(page) -> tuple[float, float, float]:
    """(min, max, value) of the guided w slider as the page has it."""
    box = page.locator("#compare-guided-w input[type=range]")
    return tuple(float(box.get_attribute(k) if k != "value" else box.input_value()) for k in ("min", "max", "value"))


def set_number(page, elem_id: str, value: float) -> None:
    """Type `value` into a slider's number box, as a user would, and check the slider follows."""
    from playwright.sync_api import expect

    number = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    wanted = re.compile(rf"^{re.escape(f'{value:g}')}(\.0+)?$")
    # Typed right after the page loads, on a loaded CPU, the first entry can land before the page's handlers
    # are attached (seen once in CI: the slider stayed at 1); a user would type it again, so the test does, at
    # most twice more; a box the slider never follows still fails.
    for attempt in range(3):
        number.fill(f"{value:g}")
        number.press("Enter")
        number.blur()
        try:
            expect(slider).to_have_value(wanted, timeout=5000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def set_w(page, w: float) -> None:
    set_number(page, "compare-guided-w", w)


def panel_image(page, name: str):
    return page.locator(".compare-panel").filter(has_text=f"{name}:").locator("img").first


def generate(page, wait_for: list[str], fresh: str | None = None) -> None:
    """Press Generate and wait until every panel caption in `wait_for` (regexes, in sampling order) is shown
    and, if `fresh` names a panel, until that panel shows another image than before."""
    from playwright.sync_api import expect

    before = panel_image(page, fresh).get_attribute("src") if fresh and panel_image(page, fresh).count() else None
    page.get_by_role("button", name="Generate", exact=True).click()
    for pattern in wait_for:
        expect(page.get_by_text(re.compile(pattern))).to_be_visible()
    if fresh:
        expect(panel_image(page, fresh)).to_be_visible()
        if before:
            expect(panel_image(page, fresh)).not_to_have_attribute("src", before)


def panel_grid(page, name: str) -> np.ndarray:
    """The grid image the panel titled `name` shows, as a uint8 array."""
    src = panel_image(page, name).get_attribute("src")
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        data = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def grid_cells(grid: np.ndarray, n: int, side: int = 32) -> np.ndarray:
    """Undo make_grid(scale=DISPLAY_SCALE): the n side x side images of a near-square grid, uint8 (n, side, side, 1)."""
    cell = side * DISPLAY_SCALE
    cols = int(np.ceil(np.sqrt(n)))
    cells = []
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = r * (cell + PAD), k * (cell + PAD)
        cells.append(grid[y:y + cell:DISPLAY_SCALE, x:x + cell:DISPLAY_SCALE])
    return np.stack(cells)[..., None]


# --- (a) the tiny guided student: the slider and where its value goes ---------------------------------------


def test_the_slider_moves_the_guided_panel_only(browser, tmp_path):
    from playwright.sync_api import expect

    unet = tiny_pixel_unet()
    save_pixel_unet(unet, tmp_path / "tiny-teacher")
    save_pixel_unet(unet, tmp_path / "tiny-plain", timesteps=[999])
    make_tiny_guided_student(tmp_path / "tiny-guided")
    names = ("tiny-teacher", "tiny-plain", "tiny-guided")
    with serve_page(browser, [str(tmp_path / n) for n in names], tmp_path) as page:
        expect(page.get_by_text("Guided student's guidance w", exact=True)).to_be_visible()
        expect(page.get_by_text("Teacher guidance (CFG)", exact=True)).to_be_visible()
        assert slider_limits(page) == (1.0, 3.0, 1.0)            # the student's range, at its default
        set_w(page, 2.5)                                          # typed in its box, the slider follows
        set_w(page, 1.0)
        teacher_done = r"^tiny-teacher: NFE \d+, steps \d+, \d+ ms$"
        generate(page, [r"^tiny-guided: NFE 1, steps 1, w=1\.0, \d+ ms$", teacher_done], fresh="tiny-teacher")
        expect(page.get_by_text(re.compile(r"^tiny-plain: NFE 1, steps 1, \d+ ms$"))).to_be_visible()
        at_1 = {n: panel_grid(page, n) for n in names}
        page.screenshot(path=str(ARTIFACTS / "guided-1-w1.png"), full_page=True)

        set_w(page, 3.0)
        generate(page, [r"^tiny-guided: NFE 1, steps 1, w=3\.0, \d+ ms$", teacher_done], fresh="tiny-guided")
        at_3 = {n: panel_grid(page, n) for n in names}
        page.screenshot(path=str(ARTIFACTS / "guided-2-w3.png"), full_page=True)
    assert at_1["tiny-guided"].shape == at_3["tiny-guided"].shape
    assert np.abs(at_1["tiny-guided"].astype(int) - at_3["tiny-guided"]).mean() > 1.0     # w moved its digits
    for n in ("tiny-teacher", "tiny-plain"):                                                 # and nobody else's
        assert np.array_equal(at_1[n], at_3[n]), n


# --- (b) the committed guided student: from diverse to prototypical digits ---------------------------------


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@pytest.mark.skipif(not REAL_GUIDED.is_dir(), reason=f"the guided MNIST student is not committed yet "
                    f"({_shown(REAL_GUIDED)} does not exist); this test runs once it is")
def test_the_slider_moves_the_real_student_from_diverse_to_prototypical(browser, tmp_path):
    from playwright.sync_api import expect

    from dmd2 import registry
    from dmd2.metrics.mnist import evaluate_images

    model = registry.load(str(REAL_GUIDED))
    assert model.guided, f"{REAL_GUIDED} is not a guidance-conditioned student"
    low, high = model.guidance_range
    name = REAL_GUIDED.name
    spread = {}
    with serve_page(browser, [str(REAL_GUIDED)], tmp_path) as page:
        assert slider_limits(page)[:2] == (low, high)
        set_number(page, "compare-num-images", SPREAD_IMAGES)
        for w in (low, high):
            set_w(page, w)
            images = []
            for digit in SPREAD_CLASSES:
                page.locator("#compare-class input").click()
                page.get_by_role("option", name=str(digit), exact=True).click()
                expect(page.locator("#compare-class input")).to_have_value(str(digit))
                generate(page, [rf"^{re.escape(name)}: NFE 1, steps 1, {re.escape(format_w(w))}, \d+ ms$"], fresh=name)
                images.append(grid_cells(panel_grid(page, name), SPREAD_IMAGES))
            page.screenshot(path=str(ARTIFACTS / f"guided-real-w{w:g}.png"), full_page=True)
            labels = np.repeat(SPREAD_CLASSES, SPREAD_IMAGES)
            scores = evaluate_images(np.concatenate(images), labels)
            spread[w] = (scores["diversity"], scores["alignment"])
    (div_low, _), (div_high, align_high) = spread[low], spread[high]
    assert div_high < div_low, f"per-class feature spread at w={high:g}: {div_high:.3f}, at w={low:g}: {div_low:.3f}"
    assert align_high >= 0.9, f"at w={high:g} only {align_high:.0%} of the digits are the class asked for"
