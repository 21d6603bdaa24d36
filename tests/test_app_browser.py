"""The app in a real browser: Playwright driving Debian's Chromium (`apt-get install -y chromium`).

Chromium's path comes from HONES_CHROMIUM (default /usr/bin/chromium). Without it the tests
are skipped with the install command as the reason; with HONES_REQUIRE_BROWSER=1 (set by
`.ci/run`) a missing browser fails instead, so CI always runs them.
Set HONES_SCREENSHOT=docs/screenshot.png to also write the screenshot the README shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import ASSETS

CHROMIUM = os.environ.get("HONES_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = "apt-get install -y chromium (or set HONES_CHROMIUM to a Chromium binary)"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is missing: pip install -r requirements.txt"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM}: {INSTALL}"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        if os.environ.get("HONES_REQUIRE_BROWSER") == "1":
            pytest.fail(f"HONES_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def launched(toy_vlm, app_rankings):
    """The app on its own service, whose model runs are counted (`blocks.computed`)."""
    import app
    from hones_core import rankings
    from hones_core.demo import DemoService

    service = DemoService(toy_vlm, rankings.load(app_rankings))
    computed = []
    original = service.compute
    service.compute = lambda *args, **kwargs: computed.append(1) or original(*args, **kwargs)
    blocks = app.build_app(service, str(ASSETS / "examples"))
    blocks.computed = computed
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name="127.0.0.1", prevent_thread_lock=True, show_error=False, css=app.CSS)
    yield blocks
    blocks.close()


def _open(browser, launched, query: str = ""):
    """The page, once the request it opens on (the default example, or a share link's) has been answered."""
    page = browser.new_page(viewport={"width": 1400, "height": 1700})
    page.goto(launched.local_url + query, wait_until="domcontentloaded")   # no network: fonts never finish
    page.locator("#run").wait_for(timeout=30_000)
    page.wait_for_function("document.querySelector('#summary').innerText.includes('Computed in')", timeout=60_000)
    page.locator("#plot-sweep img").first.wait_for(timeout=60_000)
    return page


def _wait_answers(page):
    for answer in ("#base-answer", "#steered-answer"):
        page.wait_for_function(f"document.querySelector('{answer}').innerText.trim().split('\\n')"
                               ".filter(t => t && !t.includes('Base model') && !t.includes('Steered model'))"
                               ".length > 0", timeout=60_000)


def _tab(page, title: str, box: str | None = None):
    """Switch tabs and wait until the server's tab change (which clears the last result) has landed."""
    page.locator(f"button[role=tab]:has-text('{title}')").first.click()
    if box:
        page.locator(box).first.wait_for(timeout=20_000)
    page.wait_for_function("document.querySelector('#summary').innerText.trim() === ''", timeout=20_000)


def _upload(page, path):
    """Upload `path` and wait until the page shows it (the page opens with an example's image already there)."""
    before = page.evaluate("(document.querySelector('#image img') || {}).src || ''")
    page.locator("#image input[type=file]").set_input_files(path)
    page.wait_for_function("(b) => { const i = document.querySelector('#image img'); return i && i.src && i.src !== b; }",
                           arg=before, timeout=20_000)


def _summary(page) -> str:
    return page.locator("#summary").inner_text()


def test_upload_run_and_see_answers_and_plots(browser, launched, tmp_path):
    from hones_core.demo import read_examples

    example = read_examples(ASSETS / "examples")["vqa"][0]
    page = _open(browser, launched)
    _tab(page, "VQA", "#question textarea")
    _upload(page, example["image"])
    page.locator("#question textarea").fill(example["question"])
    page.locator("#gold textarea").fill(example["answer"])
    page.locator("#run").click()
    _wait_answers(page)
    page.wait_for_function("document.querySelector('#summary').innerText.includes('VQA accuracy')", timeout=60_000)
    for plot in ("heads", "layers", "contributions", "layer_sums", "overlap", "sweep"):
        page.locator(f"#plot-{plot} img").first.wait_for(timeout=60_000)
    summary = _summary(page)
    assert "neurons" in summary and "VQA accuracy" in summary
    assert page.locator("text=Traceback").count() == 0
    # plot figures carry no label badge or buttons over their title and legend
    assert page.locator("#plot-heads [data-testid=block-label]:not(.hide)").count() == 0
    assert page.locator("#plot-heads .icon-button-wrapper button").count() == 0
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    assert shot.stat().st_size > 20_000
    if os.environ.get("HONES_SCREENSHOT"):
        target = Path(os.environ["HONES_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_retrieval_table_columns_are_visible_and_headers_readable(browser, launched):
    from hones_core.demo import read_examples

    example = read_examples(ASSETS / "examples")["retrieval"][0]
    page = _open(browser, launched)
    _tab(page, "Retrieval", "#candidates textarea")
    _upload(page, example["image"])
    page.locator("#candidates textarea").fill("\n".join(example["candidates"]))
    page.locator("#run").click()
    page.locator("#ranking table th").first.wait_for(timeout=60_000)
    page.wait_for_function("document.querySelectorAll('#ranking table tbody tr').length > 0", timeout=60_000)
    box = page.evaluate("(() => { const r = document.querySelector('#ranking').getBoundingClientRect(); "
                        "return {left: r.left, right: r.right}; })()")
    headers = page.evaluate("""Array.from(document.querySelectorAll('#ranking table thead th')).map(th => {
        const r = th.getBoundingClientRect(); return {text: th.innerText.trim(), left: r.left, right: r.right,
        height: r.height}; }).filter(h => h.text)""")
    texts = [h["text"] for h in headers]
    for name in ("base rank", "steered rank", "candidate", "Δ margin"):
        assert any(name in t for t in texts), texts
    for h in headers:
        assert box["left"] - 1 <= h["left"] and h["right"] <= box["right"] + 1, \
            f"column {h['text']!r} is cut off: {h}, table {box}"
        assert h["height"] < 80, f"header {h['text']!r} wraps letter by letter: {h}"
    page.close()


def test_tabs_keep_their_own_inputs_and_errors_leave_nothing_stale(browser, launched):
    from hones_core.demo import read_examples

    example = read_examples(ASSETS / "examples")["vqa"][0]
    page = _open(browser, launched)
    _tab(page, "VQA", "#question textarea")
    _upload(page, example["image"])
    page.locator("#question textarea").fill(example["question"])
    page.locator("#gold textarea").fill(example["answer"])
    # a factor typed in the slider's box, then Run: one action, one computation
    before = len(launched.computed)
    box = page.locator("#factor input[type=number]")
    box.fill("0.5")
    box.press("Tab")
    page.locator("#run").click()
    _wait_answers(page)
    page.wait_for_function("document.querySelector('#summary').innerText.includes('×0.5')", timeout=60_000)
    page.wait_for_timeout(1500)    # let any second computation land
    assert len(launched.computed) - before == 1
    assert "×0.5" in _summary(page)
    # an error: nothing of the previous run stays on screen as if current
    page.locator("#question textarea").fill("")
    page.locator("#run").click()
    page.wait_for_function("document.querySelector('#summary').innerText.includes('Not computed')", timeout=60_000)
    assert page.locator("#plot-heads img").count() == 0 and page.locator("#plot-sweep img").count() == 0
    # another tab starts with an empty gold answer and moving its slider with nothing filled in is a quiet no-op
    page.locator("button[role=tab]:has-text('Caption')").first.click()
    page.wait_for_function("document.querySelector('#gold textarea').value === ''", timeout=20_000)
    toasts = page.locator(".toast-body")
    shown = toasts.count()      # the error toast of the empty question may still be up
    slider = page.locator("#factor input[type=range]")
    slider.click()              # pointer down and up: a release event
    page.wait_for_timeout(1000)
    assert toasts.count() <= shown
    assert _summary(page).strip() == ""
    page.close()


def test_the_page_opens_on_an_example_that_changes_and_a_share_link_reproduces_a_request(browser, launched):
    from hones_core.demo import read_examples

    examples = read_examples(ASSETS / "examples")
    page = _open(browser, launched)
    # the first view already shows the default example answered, with its held-out evidence line
    assert "held-out items" in page.locator("#evidence").inner_text()
    # a request of another tab, then Share: the link names the example and the settings
    ocr = examples["ocr"][0]
    _tab(page, "OCR", "#bbox textarea, #bbox input")
    page.locator("text=OCR examples").first.wait_for(timeout=20_000)
    page.locator("#tab-ocr img").first.click()           # the first OCR example fills image, box and gold
    page.wait_for_function("document.querySelector('#gold textarea').value !== ''", timeout=20_000)
    box = page.locator("#factor input[type=number]")
    box.fill("0.5")
    box.press("Tab")
    page.locator("#share").click()
    page.wait_for_function("document.querySelector('#share-link textarea, #share-link input').value"
                           ".includes('example=')", timeout=20_000)
    link = page.locator("#share-link textarea, #share-link input").first.input_value()
    assert link.startswith(launched.local_url.rstrip("/")) and "task=ocr" in link and "factor=0.5" in link
    page.close()
    # opening the link: the OCR tab, the example's box and gold answer, x0.5, already run
    shared = browser.new_page(viewport={"width": 1400, "height": 1700})
    shared.goto(link, wait_until="domcontentloaded")
    shared.locator("#run").wait_for(timeout=30_000)
    shared.wait_for_function("document.querySelector('#summary').innerText.includes('×0.5')", timeout=60_000)
    assert shared.locator("#gold textarea").input_value() == ocr["answer"]
    assert shared.locator("#bbox textarea, #bbox input").first.input_value() == ", ".join(str(v) for v in ocr["bbox"])
    assert shared.locator("button[role=tab][aria-selected=true]").first.inner_text().startswith("OCR")
    assert shared.locator("text=Traceback").count() == 0
    shared.close()
    # a damaged link says what is wrong instead of failing
    broken = browser.new_page()
    broken.goto(launched.local_url + "?example=example-999", wait_until="domcontentloaded")
    broken.locator("#run").wait_for(timeout=30_000)
    broken.wait_for_function("document.querySelector('#share-note').innerText.includes('cannot be opened')",
                             timeout=30_000)
    broken.close()


def test_the_stored_evaluation_opens_with_both_figures(browser, launched):
    page = _open(browser, launched)
    page.locator("#stored button, #stored .label-wrap").first.click()
    for key in ("budget", "cross"):
        page.locator(f"#stored-{key} img").first.wait_for(timeout=30_000)
    assert "specificity" in page.locator("#stored-cross-caption").inner_text().lower()
    page.close()


def test_each_view_opens_and_renders(browser, launched):
    """Where the heads look, the neuron card and every answer token: each opens on the request shown."""
    page = _open(browser, launched)
    page.locator("#view-heads .label-wrap, #view-heads button").first.click()
    page.locator("#head-image img").first.wait_for(timeout=60_000)
    assert "head" in page.locator("#head-caption").inner_text()
    page.locator("#view-neuron .label-wrap, #view-neuron button").first.click()
    page.wait_for_function("document.querySelector('#neuron-card').innerText.includes('Neuron L')", timeout=60_000)
    page.locator("#view-tokens .label-wrap, #view-tokens button").first.click()
    page.wait_for_function("document.querySelector('#answer-tokens').innerText.includes('log p base')",
                           timeout=60_000)
    if os.environ.get("HONES_SCREENSHOT"):
        folder = Path(os.environ["HONES_SCREENSHOT"]).parent
        page.locator("#view-heads").screenshot(path=str(folder / "view-heads.png"))
        page.locator("#view-neuron").screenshot(path=str(folder / "view-neuron.png"))
        page.locator("#view-tokens").screenshot(path=str(folder / "view-tokens.png"))
    assert page.locator("text=Traceback").count() == 0
    page.close()
