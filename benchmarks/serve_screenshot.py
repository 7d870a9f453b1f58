"""Regenerate docs/serve.png: the search page of ``hbi-run serve`` (demo model, bundled samples) after a query,
with the best result open, its caption written and a question answered, in headless chromium.

Needs the serve extra, Playwright (the test extra) and Debian's chromium (``apt-get install chromium``; never
``playwright install``). Usage::

    python benchmarks/serve_screenshot.py [--out docs/serve.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hbi_runtime.cli import DEMO_PACKAGE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--query", default=json.loads((DEMO_PACKAGE.parent / "queries.json").read_text())
                    ["queries"][0]["query"])
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "my-videos"
        shutil.copytree(DEMO_PACKAGE.parent / "samples", videos)
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        proc = subprocess.Popen([sys.executable, "-m", "hbi_runtime.cli", "serve", "--videos", str(videos),
                                 "--port", "0", "--format", "json", "--log-level", "warning"],
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            url = json.loads(proc.stdout.readline())["url"]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1360, "height": 1100})
                page.goto(url)
                page.fill("#query", args.query)
                page.press("#query", "Enter")
                page.wait_for_selector("#results .card")
                page.wait_for_function("() => [...document.querySelectorAll('#results .thumb img')]"
                                       ".every(i => i.complete)")
                page.locator("#results .card").first.click()
                page.wait_for_function("() => document.getElementById('player').readyState >= 2")
                page.click("#caption-button")
                page.wait_for_function("() => document.getElementById('caption-text').textContent.length > 3")
                page.fill("#qa-question", "what colour is the circle?")
                page.click("#qa-button")
                page.wait_for_selector("#qa-answers li .answer")
                page.eval_on_selector("#player", "v => v.pause()")
                page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
