"""The app in a real browser: Playwright driving Debian's Chromium (`apt-get install -y chromium`).

Set HONES_SCREENSHOT=docs/screenshot.png to also write the screenshot the README shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import ASSETS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launched(demo_service):
    import app

    blocks = app.build_app(demo_service, str(ASSETS / "examples"))
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name="127.0.0.1", prevent_thread_lock=True, show_error=False)
    yield blocks
    blocks.close()


def test_upload_run_and_see_answers_and_plots(launched, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see requirements.txt)")
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (.ci/run does this)")
    from hones_core.demo import read_examples

    example = read_examples(ASSETS / "examples")["vqa"][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1700})
        page.goto(launched.local_url, wait_until="domcontentloaded")   # no network: fonts never finish
        page.locator("#run").wait_for(timeout=30_000)
        page.locator("#image input[type=file]").set_input_files(example["image"])
        page.locator("#image img").first.wait_for(timeout=20_000)
        page.locator("#question textarea").fill(example["question"])
        page.locator("#gold textarea").fill(example["answer"])
        page.locator("#run").click()
        for answer in ("#base-answer", "#steered-answer"):
            page.wait_for_function(f"document.querySelector('{answer}').innerText.trim().split('\\n')"
                                   ".filter(t => t && !t.includes('Base model') && !t.includes('Steered model'))"
                                   ".length > 0", timeout=60_000)
        for plot in ("heads", "layers", "contributions", "layer_sums", "overlap", "sweep"):
            page.locator(f"#plot-{plot} img").first.wait_for(timeout=60_000)
        summary = page.locator("#summary").inner_text()
        assert "neurons" in summary and "VQA accuracy" in summary
        assert page.locator("text=Traceback").count() == 0
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000
    if os.environ.get("HONES_SCREENSHOT"):
        target = Path(os.environ["HONES_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
