"""The page's routes over real HTTP (uvicorn subprocess, no worker): ``GET /``, ``/static/...``,
``GET /styles/{style}/thumbnail``. What the browser does with them is in ``test_web_page.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.make_thumbnails import main as make_thumbnails
from service.launch import free_port, start_api, wait_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def api(
    redis_instance: object, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """An API on a copy of the tiny zoo where only ``tiny_style`` has a thumbnail."""
    zoo = tmp_path_factory.mktemp("web-zoo")
    for path in tiny_zoo_template.rglob("*"):
        if path.is_file():
            target = zoo / path.relative_to(tiny_zoo_template)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    assert make_thumbnails(["--zoo", str(zoo), "--styles", "tiny_style", "--size", "32"]) == 0
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_instance.url,  # type: ignore[attr-defined]
        "QUEUE_PREFIX": "webtest",
        "MODEL_ZOO_DIR": str(zoo),
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    log = tmp_path_factory.mktemp("web-api") / "api.log"
    with open(log, "wb") as out:
        child = start_api(env, output=out, cwd=str(REPO))
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, child)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                yield client
        finally:
            child.stop()


def test_index_is_the_page_with_a_same_origin_policy(api: httpx.Client) -> None:
    resp = api.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in resp.text
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["cache-control"] == "no-cache"
    # every asset the page names is served by the API itself: no CDN, no web font
    for asset in ("/static/app.js", "/static/app.css", "/static/sample.jpg"):
        assert asset in resp.text or asset == "/static/sample.jpg"
        got = api.get(asset)
        assert got.status_code == 200, asset
        assert got.headers["content-security-policy"] == csp
        assert got.headers["x-content-type-options"] == "nosniff"
    for name in ("index.html", "app.css", "app.js"):
        text = (REPO / "service/static" / name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} loads from elsewhere"
        assert "@import" not in text and "@font-face" not in text


def test_static_files_revalidate_and_stay_inside_their_folder(api: httpx.Client) -> None:
    first = api.get("/static/app.js")
    assert first.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    again = api.get("/static/app.js", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304
    for path in ("/static/nope.js", "/static/../app.py", "/static/%2e%2e/app.py"):
        resp = api.get(path)
        assert resp.status_code == 404, path
        assert resp.json()["error"] == "not_found"
    assert "def create_app" not in api.get("/static/../app.py").text


def test_thumbnail_route(api: httpx.Client) -> None:
    resp = api.get("/styles/tiny_style/thumbnail")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/jpeg"
    assert resp.content[:3] == b"\xff\xd8\xff"
    assert "max-age=" in resp.headers["cache-control"]

    missing = api.get("/styles/mosaic/thumbnail")  # a style, but no thumbnail made for it
    assert missing.status_code == 404
    assert missing.json()["error"] == "thumbnail_missing"
    assert "make_thumbnails" in missing.json()["detail"]

    for name in ("no_such_style", "x4"):  # x4 is an SR model, not a style
        body = api.get(f"/styles/{name}/thumbnail").json()
        assert body["error"] == "unknown_style", body
        assert body["styles"] == ["mosaic", "tiny_style"]


def test_page_routes_are_metered_by_template(api: httpx.Client) -> None:
    api.get("/static/app.css")
    api.get("/styles/tiny_style/thumbnail")
    text = api.get("/metrics").text
    assert 'route="/styles/{style}/thumbnail",status="200"' in text
    assert 'route="/static"' in text
    assert "app.css" not in text  # file names never become label values
