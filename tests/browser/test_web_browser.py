"""The web demo end to end in a real browser: headless Debian Chromium driven by Playwright.

Starts `llavakit.serve.web` on 127.0.0.1 (a free port, the tiny random llava checkpoint, served from a
background thread), uploads llavakit/assets/sample.png, types a question, clicks Submit and reads the
answer, the visual-token count and the cost off the page; picks FasterVLM in the method dropdown, moves
the budget to 0.25 and reads back fewer kept patches than there are; then, on a fresh page, checks the
error messages for a missing image, a broken file and an empty question. Screenshots land in the test's tmp
directory (paths printed with -s).

Needs `/usr/bin/chromium` (apt: chromium) and the `playwright` Python package; never downloads a
browser (no `playwright install`). Skipped with a reason when either is missing. Run:

    .venv/bin/python -m pytest -m browser tests/browser -s
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
SAMPLE = Path(__file__).resolve().parents[2] / "llavakit" / "assets" / "sample.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # a busy 2-core machine: generation of a few tokens on the tiny model can take seconds

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install gradio)")
    import llavakit
    from llavakit.serve.web import launch
    from tests.tiny_models import build

    vlm = llavakit.load(str(build("llava", tmp_path_factory.mktemp("web-llava"))))
    demo = launch(vlm, "127.0.0.1", _free_port(), max_new_tokens=6, block=False)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(request):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright Python package is not installed (pip install playwright)",
                                   exc_type=ImportError)
    server = request.getfixturevalue("server")  # only after the skip checks: loading the model costs seconds
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1100})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(server, wait_until="domcontentloaded")
        pg.locator("#submit").wait_for(state="visible")
        yield pg
        browser.close()


def _status(pg) -> str:
    return pg.locator("#status").inner_text()


def test_upload_ask_and_read_answer(page, tmp_path):
    page.locator("#image-file input[type=file]").set_input_files(str(SAMPLE))
    _wait_status(page, "Image loaded")
    page.locator("#question textarea").fill("what is in the image ?")
    page.locator("#submit").click()
    _wait_status(page, "Answered")

    answer = page.locator("#answer textarea").input_value()
    tokens = page.locator("#visual-tokens input").input_value()
    cost = page.locator("#cost textarea").input_value()
    assert answer.strip(), "the answer box is empty"
    assert tokens == "16"  # tiny llava: 32x32 view, 8 px patches, CLS dropped
    assert "request cost" in cost and "total" in cost
    assert "every token kept" in _status(page)
    assert page.locator("#token-map img").count() == 1
    page.wait_for_function("() => { const i = document.querySelector('#token-map img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    page.wait_for_timeout(500)  # let Gradio's fade-in of updated outputs finish before the screenshot
    shot = tmp_path / "web_answer.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nanswer: {answer!r}\nscreenshot: {shot}")


def _wait_status(pg, text: str) -> None:
    pg.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text)


def test_fastervlm_budget_keeps_fewer_patches(page, tmp_path):
    """Same page (image and question in place): FasterVLM at 0.25 keeps 4 of the 16 patches."""
    page.locator("#method input").click()
    page.locator("[data-testid=dropdown-option]", has_text="fastervlm").first.click()
    number = page.locator("#budget input[data-testid=number-input]")
    # picking a method makes the slider movable and moves it off 1.0 (to 0.5); wait for that update to land
    page.wait_for_function("() => { const i = document.querySelector('#budget input[data-testid=number-input]');"
                           " return i && !i.disabled && Number(i.value) === 0.5; }")
    number.fill("0.25")
    number.press("Tab")
    page.locator("#submit").click()
    _wait_status(page, "fastervlm:keep=0.25")
    status = _status(page)
    kept, total = (int(x) for x in re.search(r"(\d+) of (\d+) patches kept", status).groups())
    assert (kept, total) == (4, 16) and kept < total, status
    assert page.locator("#visual-tokens input").input_value() == "4"
    cost = page.locator("#cost textarea").input_value()
    assert "fastervlm 4" in cost and "llm 4" in cost
    page.wait_for_timeout(500)
    shot = tmp_path / "web_fastervlm.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nstatus: {status}\nscreenshot: {shot}")


def test_bad_input_shows_errors(page, tmp_path):
    page.reload(wait_until="domcontentloaded")  # a fresh page: no file, no question
    page.locator("#submit").click()
    _wait_status(page, "upload an image first")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    page.locator("#image-file input[type=file]").set_input_files(str(bad))
    _wait_status(page, "is not an image")
    page.locator("#submit").click()  # file present, question empty
    _wait_status(page, "type a question")
    assert page.locator("#answer textarea").input_value() == ""
    shot = tmp_path / "web_error.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
