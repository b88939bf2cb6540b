"""The voting flow and the report in a real headless Chromium (Playwright, Debian's chromium).

- voting by click and keyboard, under the app's Content-Security-Policy (no violations);
- the buttons stay disabled, and keys do nothing, until both images have loaded;
- both images of a pair are shown at one size although the models made different shapes;
- on a 390 px wide phone the vote page and the report are no wider than the screen (the
  report's tables scroll inside their box): screenshots ``vote_phone.png`` and
  ``report_phone.png`` (copied to ``$PARADIFFUSION_SCREENSHOTS`` when set).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from PIL import Image

from eval.report import build_report
from eval.vote.app import create_app
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs
from eval.vote.server import serve_in_thread
from pipelines.config import load_config

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
PHONE = {"width": 390, "height": 844}


def ready(page, n_done: int) -> None:
    """Wait until the page has taken the answer and shows the next question (keys are
    ignored while an answer is being sent, so that one key press is one answer). Waits are
    written as functions: a string expression would need eval, which the page's CSP forbids."""
    page.wait_for_function(
        "(n) => document.body.dataset.state === 'ready' && "
        "document.getElementById('progress').textContent.startsWith(n + ' /')",
        arg=n_done,
    )


def _images(root: Path, make_images) -> pa.Table:
    """alpha at 64x64 and beta at 48x80 (portrait): two shapes, as SDXL and ParaDiffusion make."""
    table = make_images(root, models=("alpha", "beta"), n_prompts=2, size=64)
    rows = table.read().to_pylist()
    for r in rows:
        if r["model"] == "beta":
            Image.new("RGB", (48, 80), (180, 40, 40)).save(root / r["image_path"])
            r.update(width=48, height=80)
    return pa.Table.from_pylist(rows)


def _no_wider_than_screen(page) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


@pytest.mark.slow
def test_vote_and_report_in_chromium(tmp_path: Path, make_images):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: `make setup` installs it (scripts/install_browser.sh)")
    data = tmp_path / "data"
    images = _images(data / "eval" / "images", make_images)
    store = VoteStore(data / "eval" / "votes" / "votes.sqlite")
    store.add_pairs(build_pairs(images, size=(64, 40), equalise="crop").rows)  # two shapes: cropped to one
    token, admin = store.add_voter("ann"), store.add_voter("boss", role="admin")
    phone_token = store.add_voter("phone")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    csp_errors: list[str] = []

    def watch(page) -> None:
        page.on("console", lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None)

    with (
        serve_in_thread(create_app(store, data / "eval" / "images", size=(64, 40))) as url,
        playwright.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS
        )
        browser.set_default_timeout(90_000)  # a loaded 2-core machine can be slow; the flow itself is quick
        try:
            page = browser.new_page()
            watch(page)
            assert page.goto(f"{url}/vote?t=wrong").status == 403
            assert page.goto(f"{url}/vote?t={admin}").status == 403  # an admin token cannot vote
            # hold the image responses: until both images arrive the buttons are disabled and keys do nothing
            held = []
            page.route("**/image/**", lambda route: held.append(route))
            page.goto(f"{url}/vote?t={token}")
            page.wait_for_function("() => document.body.dataset.state === 'loading'")
            assert page.is_disabled("#btnA") and page.is_disabled("#btnB") and page.is_disabled("#btnTie")
            assert page.is_visible("#loading")
            page.keyboard.press("a")
            page.click("#btnB", force=True, no_wait_after=True)  # a click on a disabled button does nothing
            assert store.votes_rows() == []
            while len(held) < 2:
                page.wait_for_timeout(100)
            for route in held:
                route.continue_()
            page.unroute("**/image/**")
            page.wait_for_function(
                "() => document.getElementById('imgA').naturalWidth > 0 && document.getElementById('imgB').naturalWidth > 0"
            )
            ready(page, 0)
            assert page.is_enabled("#btnA") and page.is_hidden("#loading")
            # one size for both (the study's), although beta's image is portrait
            sizes = page.evaluate(
                "['imgA','imgB'].map(id => { const i = document.getElementById(id); "
                "return [i.naturalWidth, i.naturalHeight, Math.round(i.getBoundingClientRect().width), "
                "Math.round(i.getBoundingClientRect().height)]; })"
            )
            assert sizes[0] == sizes[1] and sizes[0][:2] == [64, 40], sizes
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
            watch(admin_page)
            admin_page.goto(f"{url}/admin?t={admin}")
            admin_page.wait_for_function("() => document.querySelector('#pairs tbody').children.length == 2")
            assert "4 answers on 2 pairs" in admin_page.inner_text("#summary")
            assert "alpha" in admin_page.inner_text("#pairs") and "beta" in admin_page.inner_text("#pairs")
            admin_page.screenshot(path=str(shots / "admin.png"), full_page=True)
            # a phone, 390 px wide (mobile emulation: the viewport tag applies): the vote page fits
            mobile = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            phone = mobile.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True).new_page()
            phone.set_default_timeout(90_000)
            watch(phone)
            phone.goto(f"{url}/vote?t={phone_token}")
            ready(phone, 0)
            _no_wider_than_screen(phone)
            phone.screenshot(path=str(shots / "vote_phone.png"))
            # the report on the phone: no wider than the screen
            cfg_file = tmp_path / "c.yaml"
            cfg_file.write_text(
                yaml.safe_dump({"project": {"data_root": str(data)}, "eval": {"report": {"bootstrap": 100}}})
            )
            html_page, counts = build_report(load_config([str(cfg_file)]))
            assert counts["votes"] == 4
            report = data / "eval" / "report" / "index.html"
            report.parent.mkdir(parents=True)
            report.write_text(html_page)
            phone.goto(report.as_uri())
            phone.wait_for_selector("table")
            _no_wider_than_screen(phone)
            # the voting table stacks its rows: nothing to scroll sideways, every value readable
            box = phone.evaluate(
                "(() => { const d = document.getElementById('voting-rates').parentElement; "
                "return [d.scrollWidth, d.clientWidth]; })()"
            )
            assert box[0] <= box[1] <= PHONE["width"], box
            assert phone.is_hidden("#voting-rates tr.head")
            labels = phone.evaluate(  # each value is shown with its column name (the cells' ::before)
                "[...document.querySelectorAll('#voting-rates tr:not(.head) td')].slice(0, 10)"
                ".map(td => getComputedStyle(td, '::before').content)"
            )
            assert labels[0] == '"comparison (X vs Y): "' and labels[-1] == '"X, ties half: "', labels
            plot = phone.evaluate("document.getElementById('winrate').getBoundingClientRect().width")
            assert 0 < plot <= PHONE["width"]
            assert phone.locator("#winrate g.bar").count() == 2  # one bar per comparison and question
            phone.screenshot(path=str(shots / "report_phone.png"), full_page=True)
            mobile.close()
        finally:
            browser.close()
    assert not csp_errors, csp_errors  # the pages run under their own policy
    rows = store.votes_rows()
    assert [(r["question"], r["choice"]) for r in rows] == [
        ("visual_appeal", "A"),
        ("text_faithfulness", "tie"),
        ("visual_appeal", "B"),
        ("text_faithfulness", "B"),
    ]
    assert rows[0]["winner"] == rows[0]["a_model"] and rows[1]["winner"] is None
    names = ("vote.png", "done.png", "admin.png", "vote_phone.png", "report_phone.png")
    assert all((shots / n).stat().st_size > 1000 for n in names)
    keep = os.environ.get("PARADIFFUSION_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(shots / n, Path(keep) / n)
