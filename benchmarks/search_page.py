"""A screenshot of `dcd serve` answering a caption: the picture of the search page in the README.

    python benchmarks/search_page.py --index runs/meter-synthetic/index --out docs/search-page.png

Starts `dcd serve INDEX --rerank teacher` on a free local port, opens the page in headless Chromium (Debian's
`chromium`), types the caption, and saves the page with its grid. The index is the embedded test split encoded
by the trained DCD dual student (`dcd index runs/meter-synthetic/index --student runs/meter-synthetic --data
synthetic --split test`, after `make distill`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="runs/meter-synthetic/index")
    parser.add_argument("--query", default="the small red circle is under the large blue triangle")
    parser.add_argument("--out", default="docs/search-page.png")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rerank", default="teacher", help="teacher | fusion | none")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("dcd: error: no Chromium: apt-get install chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "dcd.cli", "serve", args.index, "--port", str(port)]
    if args.rerank != "none":
        command += ["--rerank", args.rerank, "--rerank-k", "32"]
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"dcd: error: dcd serve stopped (exit {server.returncode})")
                time.sleep(0.2)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/?k={args.k}")
            page.fill("#q", args.query)
            page.press("#q", "Enter")
            page.wait_for_selector(".hit img")
            page.wait_for_load_state("networkidle")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"written: {args.out}")
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
