"""In the real browser (issue 15): with DMD2_REQUIRE_LOGIN=1 a logged-out vote is refused with a message that
says to log in with Hugging Face, and nothing is stored. Headless Debian Chromium, as tests/test_browser.py."""

from __future__ import annotations

import os
import re

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest

from conftest import served, tiny_pixel_unet
from dmd2.arena import VoteStore
from dmd2.families.pixel import save_pixel_unet
from test_arena_login import mock_login  # noqa: F401  (a fixture: no whoami call off a Space)
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, UI_MS, open_tab


def test_a_logged_out_vote_is_refused_with_a_message_to_log_in(tmp_path, monkeypatch, mock_login):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    from dmd2.ui.app import build_app

    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: `make test` installs it", pytrace=False)
    monkeypatch.setenv("DMD2_REQUIRE_LOGIN", "1")
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, tmp_path / "tiny-teacher")
    save_pixel_unet(unet, tmp_path / "tiny-student", timesteps=[999])
    votes = tmp_path / "votes.sqlite"
    demo = build_app([str(tmp_path / "tiny-teacher"), str(tmp_path / "tiny-student")], votes_path=votes,
                     runs_root=tmp_path / "runs")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with served(demo) as url, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(UI_MS)
        try:
            page = context.new_page()
            page.goto(url)
            open_tab(page, "Arena")
            expect(page.get_by_role("button", name=re.compile("Sign in with Hugging Face"))).to_be_visible()
            page.get_by_role("button", name="New round", exact=True).click()
            vote = page.locator("#arena-vote-a")
            expect(vote).to_be_enabled()
            vote.click()
            # the refusal itself (an error toast), not the tab's standing hint "Log in with Hugging Face to vote."
            expect(page.get_by_text(re.compile(r'Log in with Hugging Face to vote \(the "Sign in with'))).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "login-refused.png"), full_page=True)
        finally:
            context.close()
    with VoteStore(votes) as store:
        assert store.votes() == []
