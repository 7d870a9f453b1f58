"""The search page of ``hbi-run serve`` in a real headless browser (Debian's chromium through Playwright).

Types a demo query, waits for the results, checks that the expected demo video ranks first, opens the player at
the best-matching moment, asks for a caption and a QA answer, and saves a screenshot under pytest's tmp_path.
``python benchmarks/serve_screenshot.py`` makes the screenshot docs/serve.md shows the same way.

Skipped (with the reason) without the serve extra, Playwright, or a chromium binary; never `playwright install`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'hbi-toolkit[serve]'")
pytest.importorskip("httpx", reason="httpx is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")

from hbi_runtime.cli import DEMO_PACKAGE  # noqa: E402

CHROMIUM = os.environ.get("HBI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
QUERIES = json.loads((DEMO_PACKAGE.parent / "queries.json").read_text())["queries"]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serve import Server, _copy_samples  # noqa: E402


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does it as root)")
    root = tmp_path_factory.mktemp("page")
    videos = _copy_samples(root)
    # the demo model (QA and caption packages with it), its default index folder under this test's cache
    s = Server("--videos", videos, env={"XDG_CACHE_HOME": str(root / "cache")})
    yield s
    assert s.stop() == 0, "".join(s.stderr)


def test_search_page_finds_plays_and_describes(page_server, tmp_path):
    query = QUERIES[0]["query"]
    expected = QUERIES[0]["expected"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(page_server.url) else outside.append(r.url))
            page.goto(page_server.url + "/")
            page.fill("#query", query)
            page.press("#query", "Enter")
            page.wait_for_selector("#results .card", timeout=30_000)
            first = page.locator("#results .card").first
            assert first.locator(".name").inner_text() == expected
            assert page.locator("#results .card").count() == 8
            page.wait_for_function("() => [...document.querySelectorAll('#results .thumb img')]"
                                   ".some(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            first.click()
            page.wait_for_selector("#detail:not([hidden])")
            assert page.locator("#detail-title").inner_text() == expected
            page.wait_for_function("() => document.getElementById('player').readyState >= 1 || "
                                   "!document.getElementById('player-error').hidden", timeout=30_000)
            assert page.locator("#player-error").is_hidden(), page.locator("#player-error").inner_text()
            start = float(page.eval_on_selector("#player", "v => Number(v.dataset.start)"))
            page.wait_for_function(f"() => Math.abs(document.getElementById('player').currentTime - {start}) < 0.6",
                                   timeout=15_000)
            assert page.locator("#why-words li").count() >= 2  # a row per query word (and the best moment)
            page.click("#caption-button")
            page.wait_for_function("() => document.getElementById('caption-text').textContent.includes('\u201c')",
                                   timeout=30_000)
            assert "circle" in page.locator("#caption-text").inner_text()
            page.fill("#qa-question", "what colour is the circle?")
            page.click("#qa-button")
            page.wait_for_selector("#qa-answers li .answer", timeout=30_000)
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert not errors, errors
            assert not outside, f"the page loaded something from elsewhere: {outside}"
        finally:
            browser.close()
