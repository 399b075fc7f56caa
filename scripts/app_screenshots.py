"""The Compare tab screenshots in README.md and docs/app.md, from the default app in headless Chromium.

    .venv/bin/python scripts/app_screenshots.py [--out docs]

Writes app-compare.png (class 3, seed 0, every default model) and app-compare-handover.png (the same with
"Teacher first, down to t" at 749). Needs Chromium at /usr/bin/chromium and playwright (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLIP = {"x": 0, "y": 0, "width": 1400, "height": 860}
WAIT_MS = 300_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="folder for the two PNGs")
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import expect, sync_playwright

    from dmd2.ui.app import build_app

    tmp = Path(tempfile.mkdtemp())
    demo = build_app(votes_path=tmp / "votes.sqlite", runs_root=tmp / "runs")
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(demo.local_url)
            page.locator("#compare-class input").click()
            page.get_by_role("option", name="3", exact=True).click()
            for until, name, student in ((None, "app-compare.png", r"NFE 4, steps 4"),
                                         ("749", "app-compare-handover.png", r"NFE 16, steps 3, \d+ ms \(teacher first: 13 steps")):
                if until:
                    page.locator("#compare-handover input").click()
                    page.get_by_role("option", name=until, exact=True).click()
                page.get_by_role("button", name="Generate", exact=True).click()
                expect(page.get_by_text(re.compile(rf"^mnist-dmd2-4step-last: {student}"))).to_be_visible(timeout=WAIT_MS)
                expect(page.get_by_text(re.compile(r"^mnist-teacher: NFE 50"))).to_be_visible(timeout=WAIT_MS)
                page.wait_for_timeout(1000)
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(out / name), clip=CLIP)
                print(out / name)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
