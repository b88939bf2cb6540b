"""The voting flow in a real headless Chromium (Playwright): click and keyboard."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from eval.vote.app import create_app
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs
from eval.vote.server import serve_in_thread

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ready(page, n_done: int) -> None:
    """Wait until the page has taken the answer and shows the next question (keys are
    ignored while an answer is being sent, so that one key press is one answer)."""
    page.wait_for_function(
        f"document.body.dataset.state === 'ready' && document.getElementById('progress').textContent.startsWith('{n_done} /')"
    )


@pytest.mark.slow
def test_vote_in_chromium(tmp_path: Path, make_images):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: `make setup` installs it (scripts/install_browser.sh)")
    images = make_images(tmp_path / "images", models=("alpha", "beta"), n_prompts=2, size=64)
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(build_pairs(images.read())[0])
    token, admin = store.add_voter("ann"), store.add_voter("boss", role="admin")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with serve_in_thread(create_app(store, tmp_path / "images")) as url, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS
        )
        browser.set_default_timeout(90_000)  # a loaded 2-core machine can be slow; the flow itself is quick
        try:
            page = browser.new_page()
            assert page.goto(f"{url}/vote?t=wrong").status == 403
            page.goto(f"{url}/vote?t={token}")
            page.wait_for_function(
                "document.getElementById('imgA').naturalWidth > 0 && document.getElementById('imgB').naturalWidth > 0"
            )
            ready(page, 0)
            assert "visually appealing" in page.inner_text("#question")
            assert page.inner_text("#progress").startswith("0 / 4")
            page.screenshot(path=str(shots / "vote.png"))
            page.click("#btnA")  # pair 1, visual appeal: click
            ready(page, 1)
            assert "faithfully" in page.inner_text("#question")
            page.keyboard.press("t")  # pair 1, text faithfulness: keyboard, tie
            ready(page, 2)
            page.keyboard.press("ArrowRight")  # pair 2: B
            ready(page, 3)
            page.keyboard.press("b")
            page.wait_for_selector("#done", state="visible")
            page.screenshot(path=str(shots / "done.png"))
            admin_page = browser.new_page()
            admin_page.goto(f"{url}/admin?t={admin}")
            admin_page.wait_for_function("document.querySelector('#voters tbody').children.length >= 2")
            assert "4 answers on 2 pairs" in admin_page.inner_text("#summary")
            admin_page.screenshot(path=str(shots / "admin.png"))
        finally:
            browser.close()
    rows = store.votes_rows()
    assert [(r["question"], r["choice"]) for r in rows] == [
        ("visual_appeal", "A"),
        ("text_faithfulness", "tie"),
        ("visual_appeal", "B"),
        ("text_faithfulness", "B"),
    ]
    assert rows[0]["winner"] == rows[0]["a_model"] and rows[1]["winner"] is None
    assert all((shots / n).stat().st_size > 1000 for n in ("vote.png", "done.png", "admin.png"))
