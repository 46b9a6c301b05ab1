"""dcd serve and dcd search --html: the page, the JSON API, bad input, and the page in a real browser."""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dcd import cli
from dcd.index import Index
from dcd.index.serve import MAX_QUERY_CHARS, MAX_UPLOAD_BYTES, Searcher, create_app
from index_world import COLOURS, make_world
from teachers import as_teacher
from teachers.meter import meter_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("serve"))
    out = world["root"] / "idx"
    cli.main(["index", str(out), "--student", str(world["student"]), "--images", str(world["images"]),
              "--captions", str(world["captions"]), "--no-progress"])
    return {**world, "index": out}


@pytest.fixture(scope="module")
def client(indexed):
    from fastapi.testclient import TestClient

    index = Index.load(indexed["index"])
    reranker = as_teacher(meter_preset("roberta32x1-vit32x2"))
    return TestClient(create_app(Searcher(index, reranker, "teacher", rerank_k=8))), index


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_caption_returns_the_grid_with_the_dual_and_the_re_ranked_ranking(client):
    http, index = client
    expected = index.search("a blue picture", k=3).ids[0]
    page = http.get("/", params={"q": "a blue picture", "k": 3, "both": 1})
    assert page.status_code == 200 and "re-ranked by teacher" in page.text and "dual student" in page.text
    assert f'data-id="{expected}" data-rank="1"' in page.text  # the dual student's first image is on the page
    api = http.get("/api/search", params={"q": "a blue picture", "k": 3}).json()
    assert api["dual"]["hits"][0]["id"] == expected and api["dual"]["hits"][0]["item"]["path"].endswith("blue.jpg")
    assert len(api["reranked"]["hits"]) == 3 and api["timing"]["dual_ms"] > 0 and api["timing"]["rerank_ms"] >= 0
    thumb = http.get(f"/image/{expected}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 192


def test_an_uploaded_image_returns_captions(client):
    http, _ = client
    found = http.post("/api/search", files={"image": ("q.jpg", _jpeg(COLOURS["green"]), "image/jpeg")},
                      params={"k": 2}).json()
    assert found["dual"]["hits"][0]["item"]["caption"] == "a green picture"
    page = http.post("/", files={"image": ("q.jpg", _jpeg(COLOURS["green"]), "image/jpeg")})
    assert page.status_code == 200 and "a green picture" in page.text


@pytest.mark.parametrize("request_, status, message", [
    (("get", "/api/search", {"params": {"q": "  "}}), 400, "empty query"),
    (("get", "/api/search", {"params": {"q": "x" * (MAX_QUERY_CHARS + 1)}}), 400, "at most"),
    (("get", "/api/search", {"params": {"q": "red", "k": 0}}), 400, "k must be"),
    (("post", "/api/search", {"files": {"image": ("q.jpg", b"not an image", "image/jpeg")}}), 400, "not an image"),
    (("post", "/api/search", {"files": {"image": ("q.jpg", b"0" * (MAX_UPLOAD_BYTES + 1), "image/jpeg")}}), 413,
     "at most"),
    (("get", "/image/999", {}), 404, "no image 999"),
])
def test_bad_input_gets_a_message_and_a_4xx_never_a_trace(client, request_, status, message):
    http, _ = client
    method, url, kwargs = request_
    answer = getattr(http, method)(url, **kwargs)
    assert answer.status_code == status and message in answer.json()["error"]
    assert "Traceback" not in answer.text


def test_images_are_served_by_id_only(client):
    http, _ = client
    assert http.get("/image/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    page = http.get("/", params={"q": ""})
    assert page.status_code == 400 and "empty query" in page.text and "<form" in page.text


def test_search_html_writes_a_page_with_the_thumbnails_inline(indexed, tmp_path, capsys):
    out = tmp_path / "red.html"
    cli.main(["search", str(indexed["index"]), "a red picture", "-k", "3", "--html", str(out)])
    text = out.read_text()
    assert text.count("data:image/jpeg;base64,") == 3 and 'data-rank="1"' in text and "<form" not in text


def test_an_index_that_does_not_load_stops_serve_at_start(tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", str(tmp_path / "nowhere")])
    assert str(stop.value).startswith("dcd: error:") and "\n" not in str(stop.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_a_real_browser(indexed, tmp_path):
    """dcd serve in its own process; headless Chromium types a caption and finds the expected first image."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium; here it could not be installed)")
    from playwright.sync_api import sync_playwright

    expected = Index.load(indexed["index"]).search("a yellow picture", k=1).ids[0]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "dcd.cli", "serve", str(indexed["index"]), "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#q", "a yellow picture")
            page.press("#q", "Enter")
            page.wait_for_selector(".hit")
            first = page.locator(".hit").first
            assert first.get_attribute("data-id") == str(expected)
            assert page.locator(".hit img").first.evaluate("img => img.naturalWidth") > 0  # the thumbnail loaded
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
        assert (tmp_path / "page.png").stat().st_size > 1000
    finally:
        server.terminate()
        server.wait(10)
