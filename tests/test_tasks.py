"""Image fetching: data URIs, paths, http(s), Label Studio URLs with legacy and personal tokens, limits."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, quote_from_bytes

import numpy as np
import pytest
import skimage.data
from PIL import Image

from backend.ls_client import LabelStudioAuth, LabelStudioAuthError
from backend.tasks import ImageFetcher, ImageFetchError

LEGACY = "0123456789abcdef"


def _jwt(claims: dict) -> str:
    def enc(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(claims)}.c2lnbmF0dXJl"


REFRESH = _jwt({"token_type": "refresh", "exp": 4102444800, "user_id": "1"})


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


COFFEE = skimage.data.coffee()[::4, ::4].copy()
COFFEE_PNG = _png(COFFEE)


class _Server:
    """A small HTTP server standing in for an image host; counts requests and checks auth headers."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.auth_seen: list[str] = []
        self.refreshes = 0
        self.access_ttl = 600
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "image/png") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/token/refresh/" and body.get("refresh") == REFRESH:
                    outer.refreshes += 1
                    access = _jwt({"token_type": "access", "exp": time.time() + outer.access_ttl,
                                   "n": outer.refreshes})
                    return self._send(200, json.dumps({"access": access}).encode(), "application/json")
                self._send(401, b"{}", "application/json")

            def do_GET(self) -> None:
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                auth = self.headers.get("Authorization", "")
                outer.auth_seen.append(auth)
                if self.path.startswith("/data/"):
                    ok = auth == f"Token {LEGACY}" or (auth.startswith("Bearer ") and len(auth.split(".")) == 3)
                    if not ok:
                        return self._send(401, b'{"detail": "no"}', "application/json")
                if self.path.endswith("/slow.png"):
                    time.sleep(2)
                if self.path.endswith("/drip.png"):  # a sixteenth of the image every 0.25 s: ~4 s in all
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(COFFEE_PNG)))
                    self.end_headers()
                    step = len(COFFEE_PNG) // 16 + 1
                    for start in range(0, len(COFFEE_PNG), step):
                        self.wfile.write(COFFEE_PNG[start:start + step])
                        self.wfile.flush()
                        time.sleep(0.25)
                    return
                if self.path.endswith("/text.txt"):
                    return self._send(200, b"hello, not an image", "text/plain")
                if self.path.endswith("/login.png"):  # what a sign-in page or a proxy's error page answers
                    return self._send(200, b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "text/html")
                if self.path.endswith("/error.png"):
                    return self._send(200, b'{"detail": "Not found."}', "application/json")
                if self.path.endswith("/big.png"):
                    return self._send(200, b"\0" * (2 * 2 ** 20))
                self._send(200, COFFEE_PNG)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # clients that give up early (size limit, timeout) break the pipe on purpose

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_data_uri_and_local_path(tmp_path: Path) -> None:
    fetcher = ImageFetcher()
    uri = "data:image/png;base64," + base64.b64encode(COFFEE_PNG).decode()
    assert np.array_equal(fetcher.fetch(uri), COFFEE)
    path = tmp_path / "coffee.png"
    path.write_bytes(COFFEE_PNG)
    assert np.array_equal(fetcher.fetch(str(path)), COFFEE)
    assert np.array_equal(fetcher.fetch(path.as_uri()), COFFEE)
    with pytest.raises(ImageFetchError, match="no such file"):
        fetcher.fetch(str(tmp_path / "missing.png"))
    with pytest.raises(ImageFetchError, match="disabled"):
        ImageFetcher(allow_local_paths=False).fetch(str(path))


B64 = base64.b64encode(COFFEE_PNG).decode()


@pytest.mark.parametrize("uri", [
    "data:image/png;base64," + B64.rstrip("="),
    "data:image/png;BASE64," + B64,
    "data:image/png;base64," + quote(B64, safe=""),
    "data:image/png," + quote_from_bytes(COFFEE_PNG),
], ids=["no padding", "BASE64", "percent-encoded base64", "percent-encoded bytes"])
def test_data_uris_decode_as_the_browser_showing_them_does(uri: str) -> None:
    """Label Studio's editor shows what the browser decodes (data: URLs as WHATWG defines them: percent-decoded,
    then forgiving base64, whose padding is optional and whose marker ignores case), so the backend does too."""
    assert B64.endswith("=") and "%" in quote(B64, safe="")
    assert np.array_equal(ImageFetcher().fetch(uri), COFFEE)


def test_answers_that_are_no_image_say_what_they_are(server: _Server) -> None:
    fetcher = ImageFetcher()
    with pytest.raises(ImageFetchError, match=r"login.png: got an HTML page, not an image \(a sign-in or error page"):
        fetcher.fetch(f"{server.url}/public/login.png")
    with pytest.raises(ImageFetchError, match=r'error.png: got JSON, not an image: {"detail": "Not found."}'):
        fetcher.fetch(f"{server.url}/public/error.png")
    with pytest.raises(ImageFetchError) as caught:
        fetcher.fetch("data:image/png;base64," + base64.b64encode(b"\x00\x01 garbage").decode())
    assert str(caught.value).endswith(": the data (10 bytes) is not a readable image: no image format recognised")
    with pytest.raises(ImageFetchError, match="malformed data URI"):
        fetcher.fetch("data:image/png;base64,AAAAA")


def test_http_download_is_cached_by_url(server: _Server) -> None:
    fetcher = ImageFetcher()
    url = f"{server.url}/public/coffee.png"
    first = fetcher.fetch(url)
    second = fetcher.fetch(url)
    assert np.array_equal(first, COFFEE) and second is first
    assert server.hits["/public/coffee.png"] == 1
    assert (fetcher.hits, fetcher.misses) == (1, 1)
    assert server.auth_seen[-1] == "", "no credentials are sent to other hosts"


def test_cache_is_bounded_by_count_and_bytes(server: _Server) -> None:
    by_count = ImageFetcher(cache_size=2)
    by_bytes = ImageFetcher(cache_bytes=COFFEE.nbytes * 2 + 1)
    for fetcher in (by_count, by_bytes):
        for name in "abc":
            fetcher.fetch(f"{server.url}/public/{name}.png")
        fetcher.fetch(f"{server.url}/public/c.png")
        fetcher.fetch(f"{server.url}/public/a.png")
        assert (fetcher.hits, fetcher.misses) == (1, 4), "a was evicted, c was still cached"


def test_label_studio_upload_with_legacy_token(server: _Server) -> None:
    fetcher = ImageFetcher(server.url, LEGACY)
    assert np.array_equal(fetcher.fetch("/data/upload/1/coffee.png"), COFFEE)
    assert server.auth_seen[-1] == f"Token {LEGACY}"
    assert np.array_equal(fetcher.fetch("/data/local-files/?d=images/coffee.png"), COFFEE)
    with pytest.raises(ImageFetchError, match="refused the API key"):
        ImageFetcher(server.url, "wrong-token").fetch("/data/upload/1/other.png")


def test_personal_access_token_is_exchanged_and_renewed(server: _Server) -> None:
    auth = LabelStudioAuth(server.url, REFRESH)
    assert auth.is_personal_token and not LabelStudioAuth(server.url, LEGACY).is_personal_token
    fetcher = ImageFetcher(server.url, REFRESH)
    before = server.refreshes
    fetcher.fetch("/data/upload/2/a.png")
    fetcher.fetch("/data/upload/2/b.png")
    assert server.refreshes == before + 1, "a valid access token is reused"
    assert server.auth_seen[-1].startswith("Bearer ")
    server.access_ttl = 10  # expires within the refresh margin: renewed on next use
    fetcher.auth.header(force_refresh=True)
    fetcher.fetch("/data/upload/2/c.png")
    assert server.refreshes == before + 3
    server.access_ttl = 600
    revoked = _jwt({"token_type": "refresh", "user_id": "9"})
    with pytest.raises(LabelStudioAuthError, match="personal access token"):
        LabelStudioAuth(server.url, revoked).header()
    with pytest.raises(ImageFetchError, match="rejected the personal access token"):  # the fetcher says the same
        ImageFetcher(server.url, revoked).fetch("/data/upload/2/d.png")


def test_label_studio_url_needs_configuration() -> None:
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        ImageFetcher().fetch("/data/upload/1/x.png")
    fetcher = ImageFetcher()
    fetcher.configure("http://ls.example:8080/", LEGACY)
    assert fetcher.ls_url == "http://ls.example:8080" and fetcher.auth.api_key == LEGACY


def test_limits_and_bad_content(server: _Server) -> None:
    fetcher = ImageFetcher(timeout=(2, 0.5), max_bytes=2 ** 20)
    with pytest.raises(ImageFetchError, match="over the 1 MiB limit"):
        fetcher.fetch(f"{server.url}/public/big.png")
    with pytest.raises(ImageFetchError, match="not a readable image"):
        fetcher.fetch(f"{server.url}/public/text.txt")
    with pytest.raises(ImageFetchError, match="timed out"):
        fetcher.fetch(f"{server.url}/public/slow.png")
    with pytest.raises(ImageFetchError, match="unsupported image URL scheme"):
        fetcher.fetch("ftp://example.com/a.png")
    with pytest.raises(ImageFetchError, match="task id"):
        fetcher.fetch("s3://bucket/a.png")
    with pytest.raises(ImageFetchError, match="non-empty string"):
        fetcher.fetch("")


def test_a_server_trickling_bytes_cannot_hold_a_download_past_the_timeout(server: _Server) -> None:
    """The read timeout bounds each wait for a byte; the whole download is bounded too, or a server sending a
    little every quarter second would hold the prediction (and Label Studio's request) for as long as it likes."""
    fetcher = ImageFetcher(timeout=(2, 1.0))
    t0 = time.perf_counter()
    with pytest.raises(ImageFetchError, match=r"drip.png: timed out: the download took more than 1 s \(IMAGE_TIMEOUT\)"):
        fetcher.fetch(f"{server.url}/public/drip.png")
    assert time.perf_counter() - t0 < 2.5
    assert np.array_equal(ImageFetcher(timeout=(2, 30)).fetch(f"{server.url}/public/drip.png"), COFFEE)


def test_decompression_bomb_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    uri = "data:image/png;base64," + base64.b64encode(COFFEE_PNG).decode()
    with pytest.raises(ImageFetchError, match="too many pixels"):
        ImageFetcher().fetch(uri)


def test_absolute_local_path_under_data_is_read_from_disk(tmp_path, monkeypatch):
    """A file that exists at /data/... on this host (a mounted volume) is read locally, not via Label Studio."""
    from PIL import Image

    from backend.tasks import ImageFetcher

    image = tmp_path / "img.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    real_is_file = Path.is_file

    def is_file(path: Path) -> bool:  # pretend /data/img.png exists on this host
        return True if str(path) == "/data/img.png" else real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    fetcher = ImageFetcher(ls_url=None)
    read: list[Path] = []
    monkeypatch.setattr(fetcher, "_local", lambda p: read.append(p) or image.read_bytes())
    assert fetcher.fetch("/data/img.png").shape == (8, 8, 3)
    assert read == [Path("/data/img.png")]
