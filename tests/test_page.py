"""The page of `qkv serve` in a real browser: Playwright for Python driving Debian's Chromium against a
real server on a loopback port, with the demo's trained model. The numbers drawn are checked against
`qkv.explain`'s, and the test takes the screenshot README shows: with QKV_UPDATE_DOCS=1 it writes
docs/serve_page.png, else a temporary copy (a test run leaves the checkout as it was).

Needs `pip install playwright` (the dev extra) and `apt-get install chromium` (.ci/run installs both;
Playwright's own browser download is not used). Without them the test skips here, and fails in CI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'qkv[serve]'")
import httpx

from conftest import REPO, qkv_env
from test_serve import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
SENTENCE = "the third of may nineteen ninety"
SCREENSHOT = REPO / "docs" / "serve_page.png"
UPDATE_DOCS = "QKV_UPDATE_DOCS"  # 1: the test writes README's screenshot


def screenshot_path(tmp_path: Path) -> Path:
    """Where the page's screenshot goes: README's picture with `UPDATE_DOCS`, else `tmp_path`."""
    return SCREENSHOT if os.environ.get(UPDATE_DOCS) == "1" else tmp_path / SCREENSHOT.name


def missing(reason: str):
    if os.environ.get("CI"):  # CI installs the browser: a skip there would hide a broken page
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install playwright")
    if not CHROMIUM.exists():
        missing(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def serving(run_dir: Path, *options: str):
    """`qkv serve run_dir OPTIONS...` on a free loopback port, its URL while it runs."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", "serve", str(run_dir), "--port", str(port), "--precision",
         "fp32", *options],
        env=qkv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


@pytest.fixture(scope="module")
def server(demo_run):
    run_dir = demo_run[0] / "runs" / "demo"
    with serving(run_dir) as url:
        yield url, run_dir


def the_models_numbers(run_dir: Path, translation: str, kind: str, layer: int, head: int):
    """What the page must show, computed here by qkv.explain on the same sentence and translation."""
    from qkv import explain, visualize
    from qkv.translate import Translator

    translator = Translator.load(run_dir, precision="fp32")
    tokenizer, model = translator.tokenizer, translator.model
    src_ids = visualize.source_ids(model, tokenizer, SENTENCE)
    tgt_ids = [tokenizer.bos_id, *tokenizer.encode(translation)]
    pieces = (
        [tokenizer.id_to_piece(i) for i in src_ids],
        [tokenizer.id_to_piece(i) for i in tgt_ids],
    )
    return explain.explain(model, src_ids, pieces[0], kind, layer, [head], tgt_ids, pieces[1])


def assert_steps_drawn(sections, expected) -> None:
    """Every step of `expected` (a qkv.explain result) drawn, in order, with its shape, and one cell
    of each equal to the model's number."""
    assert sections.count() == len(expected.steps) == 10
    for number, step in enumerate(expected.steps):
        section = sections.nth(number)
        assert section.get_attribute("data-step") == step.name
        drawn = section.locator(".qkv-matrix").first
        m = step.matrices[0]
        rows, cols = m.values.shape
        assert drawn.locator(".qkv-shape").inner_text().split() == [str(rows), "\u00d7", str(cols)]
        i, j = rows - 1, cols - 1
        value = drawn.locator(f".qkv-cell[data-r='{i}'][data-c='{j}']").get_attribute("data-v")
        assert float(value) == pytest.approx(float(m.values[i, j]), abs=1e-4), step.name


def test_translate_look_at_cross_attention_then_step_by_step(server, chromium, tmp_path):
    url, run_dir = server
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(url)
    page.wait_for_selector("#pair option", state="attached")
    assert "Dates in words" in page.inner_text("#pair")
    assert page.locator("#key-label").is_hidden()  # no key asked where the server needs none

    page.fill("#text", SENTENCE)
    page.click("#translate")
    page.wait_for_selector("#results > li")
    translation = page.locator("#results > li .best .text").inner_text()
    assert translation == "1990-05-03"
    assert page.locator("#results > li .alternatives > li").count() == 2  # 3 hypotheses asked for

    page.select_option("#kind", "cross")
    page.select_option("#layer", "2")
    page.select_option("#head", "1")
    expected = the_models_numbers(run_dir, translation, "cross", 1, 0)
    weights = next(step for step in expected.steps if step.name == "softmax").matrices[0]
    queries, keys = weights.row_labels, weights.col_labels  # (BOS + translation, source + EOS)
    grid = page.locator("#heatmap .qkv-grid")
    assert (grid.get_attribute("data-rows"), grid.get_attribute("data-cols")) == (
        str(len(queries)), str(len(keys)),
    )  # fmt: skip
    assert page.locator("#heatmap .qkv-cell").count() == len(queries) * len(keys)
    assert page.locator("#heatmap .qkv-row-label").all_inner_texts() == queries
    assert page.locator("#heatmap .qkv-col-label").all_inner_texts() == keys
    r, c = len(queries) // 2, len(keys) // 2
    cell = page.locator(f"#heatmap .qkv-cell[data-r='{r}'][data-c='{c}']")
    assert float(cell.get_attribute("data-v")) == pytest.approx(
        float(weights.values[r, c]), abs=1e-4
    )
    cell.hover()  # the number on hover, and the source tokens shaded by the row's weights
    assert f"= {float(weights.values[r, c]):.4f}" in page.inner_text("#heatmap .qkv-readout")
    shaded = page.locator("#keys span").evaluate_all("spans => spans.map(s => s.style.background)")
    assert len(shaded) == len(keys) and all(shaded)

    page.check("#all-heads")
    assert page.locator("#heads .qkv-matrix").count() == 4  # the tiny model's heads, small

    page.click("#explain")
    page.wait_for_selector("#steps .qkv-step")
    assert_steps_drawn(page.locator("#steps .qkv-step"), expected)
    page.locator("#steps .qkv-step").nth(1).locator(".qkv-cell").nth(5).hover()
    screenshot = screenshot_path(tmp_path)
    screenshot.parent.mkdir(exist_ok=True)
    # README's picture: the translation, the explorer and the first steps; without the time taken,
    # so that the picture changes only when the page does
    page.add_style_tag(content=".timing { visibility: hidden; }")
    page.screenshot(path=str(screenshot), full_page=True,
                    clip={"x": 0, "y": 0, "width": 1200, "height": 1900})  # fmt: skip
    assert screenshot.read_bytes()[:4] == b"\x89PNG"

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: no page wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert errors == []


def test_where_the_server_requires_a_key_the_page_asks_for_it(demo_run, chromium, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("s3cret\n")
    with serving(demo_run[0] / "runs" / "demo", "--api-keys", str(keys)) as url:
        page = chromium.new_page()
        page.goto(url)
        page.wait_for_selector("#key-label", state="visible")
        page.wait_for_selector("#pair option", state="attached")
        page.fill("#text", SENTENCE)
        page.click("#translate")
        page.wait_for_selector("#status.error")
        assert page.inner_text("#status") == "invalid or missing api_key"
        page.fill("#api-key", "s3cret")
        page.click("#translate")
        page.wait_for_selector("#results > li")
        assert page.locator("#results > li .best .text").inner_text() == "1990-05-03"


def test_qkv_explain_html_draws_the_same_grids(chromium, run_qkv, tmp_path):
    from qkv import explain

    page_file = tmp_path / "explain.html"
    result = run_qkv("explain", "thinking machines", "--heads", "2", "--html", page_file)
    assert result.returncode == 0, result.stderr
    model, src_ids, labels = explain.random_model("thinking machines")  # what the command used
    expected = explain.explain(model, src_ids, labels, "encoder", 0, [1])
    page = chromium.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_file.as_uri())
    assert page.locator("h2").inner_text() == expected.title
    assert_steps_drawn(page.locator(".qkv-step"), expected)
    assert page.locator("table").count() == 0  # grids, not walls of numbers
    assert errors == []
