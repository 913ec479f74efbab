"""Resolve and fetch task images: Label Studio uploads and local files, cloud storage, http(s), data URIs, paths.

Label Studio URLs (``/data/upload/...``, ``/data/local-files/?d=...``, storage proxies) are fetched from
LABEL_STUDIO_URL with the API key (`backend.ls_client.LabelStudioAuth`: personal access token or
legacy token).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlparse

import numpy as np
import requests
import urllib3
from PIL import Image

from backend.ls_client import LabelStudioAuth, LabelStudioAuthError
from odise_core.preprocess import load_image

log = logging.getLogger(__name__)

LS_PATH_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/api/")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "gcs")


class ImageFetchError(RuntimeError):
    """An image could not be resolved, downloaded or decoded; the message names the URL and the cause."""


class ImageFetcher:
    """Fetch and decode task images with an in-memory LRU cache keyed by URL.

    `max_bytes` caps downloads and files (checked before decoding); `timeout` is (connect, read) seconds,
    and the read time (IMAGE_TIMEOUT) also bounds a whole download, however steadily its bytes arrive;
    the cache holds at most `cache_size` decoded images and `cache_bytes` of pixels.
    """

    def __init__(self, ls_url: str | None = None, api_key: str | None = None, timeout: tuple[float, float] = (5, 30),
                 max_bytes: int = 50 * 2 ** 20, cache_size: int = 32, cache_bytes: int = 512 * 2 ** 20, allow_local_paths: bool = True):
        self.ls_url = ls_url.rstrip("/") if ls_url else None
        self.auth = LabelStudioAuth(self.ls_url, api_key) if (self.ls_url and api_key) else None
        self._key_from_setup = False  # True while `auth` holds the token of Label Studio's latest /setup
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.allow_local_paths = allow_local_paths
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self.session = requests.Session()
        self.hits = 0
        self.misses = 0

    def configure(self, ls_url: str | None, api_key: str | None, from_setup: bool = False) -> None:
        """Set the Label Studio URL and key unless they were given already.

        With `from_setup` (they come in a /setup request), the key replaces one an earlier /setup gave:
        Label Studio sends the token its project's creator has now, and the older one stops working
        once they reset it.
        """
        if ls_url and not self.ls_url:
            self.ls_url = ls_url.rstrip("/")
        if not (api_key and self.ls_url):
            return
        if self.auth is None or (from_setup and self._key_from_setup and api_key != self.auth.api_key):
            self.auth = LabelStudioAuth(self.ls_url, api_key)
            self._key_from_setup = from_setup

    def fetch(self, url: str, task_id: int | None = None) -> np.ndarray:
        """The image at `url` as uint8 HxWx3 RGB; raises ImageFetchError with an actionable message."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"task image value must be a non-empty string, got {url!r}")
        key = url if not url.startswith("data:") else "data:" + hashlib.sha1(url.encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        data = self._read_bytes(url.strip(), task_id)
        try:
            image = load_image(data)
        except Image.DecompressionBombError as e:
            raise ImageFetchError(f"{_short(url)} has too many pixels: {e}") from e
        except (ValueError, OSError) as e:
            raise ImageFetchError(f"{_short(url)}: {_not_an_image(data, e)}") from e
        with self._lock:
            self.misses += 1
            self._cache[key] = image
            while len(self._cache) > 1 and (len(self._cache) > self._cache_size or
                                            sum(a.nbytes for a in self._cache.values()) > self._cache_bytes):
                self._cache.popitem(last=False)
        return image

    # ----------------------------------------------------------------- resolving
    def _read_bytes(self, url: str, task_id: int | None) -> bytes:
        if url.startswith("data:"):
            return self._data_uri(url)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            return self._download(url, self._is_label_studio(url))
        if parsed.scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError(f"{url}: cloud storage URLs need the task id to be resolved by Label Studio")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return self._download(self._ls_join(f"/tasks/{task_id}/presign/?fileuri={quote(encoded)}", url), True)
        if parsed.scheme == "file":
            return self._local(Path(unquote(parsed.path)))
        # "/data/..." is a Label Studio route unless it names a file on this host (e.g. a Docker volume).
        if url.startswith(LS_PATH_PREFIXES) and not (self.allow_local_paths and Path(url).is_file()):
            return self._download(self._ls_join(url, url), True)
        if parsed.scheme == "":
            return self._local(Path(url))
        raise ImageFetchError(f"{_short(url)}: unsupported image URL scheme {parsed.scheme!r}")

    def _is_label_studio(self, url: str) -> bool:
        if not self.ls_url:
            return False
        a, b = urlparse(url), urlparse(self.ls_url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    def _ls_join(self, path: str, original: str) -> str:
        if not self.ls_url:
            raise ImageFetchError(
                f"{_short(original)} is a Label Studio URL but the Label Studio address is unknown: set "
                "LABEL_STUDIO_URL (e.g. http://localhost:8080) and LABEL_STUDIO_API_KEY for the backend")
        return urljoin(self.ls_url + "/", path.lstrip("/"))

    def _data_uri(self, url: str) -> bytes:
        """The bytes of a data: URL as a browser reads them (the WHATWG rules): percent-decoded, then, after a
        ";base64" marker in any case, base64 that ignores whitespace and may leave out its padding."""
        header, _, payload = url.partition(",")
        data = unquote_to_bytes(payload)
        if header.rstrip().lower().endswith(";base64"):
            data = b"".join(data.split()).rstrip(b"=")
            try:
                data = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageFetchError(f"malformed data URI: its base64 cannot be decoded ({e})") from e
        self._check_size(len(data), "data URI")
        return data

    def _local(self, path: Path) -> bytes:
        if not self.allow_local_paths:
            raise ImageFetchError(f"{path}: local paths are disabled on this backend")
        if not path.is_file():
            raise ImageFetchError(f"{path}: no such file on the backend host")
        self._check_size(path.stat().st_size, str(path))
        return path.read_bytes()

    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_bytes:
            raise ImageFetchError(f"{_short(what)} is {size / 2 ** 20:.1f} MiB, over the "
                                  f"{self.max_bytes / 2 ** 20:.0f} MiB limit (MAX_IMAGE_MB)")

    def _download(self, url: str, with_auth: bool) -> bytes:
        deadline = time.monotonic() + self.timeout[1]
        headers = {}
        if with_auth:
            if self.auth is None:
                raise ImageFetchError(
                    f"{_short(url)} needs Label Studio credentials: set LABEL_STUDIO_API_KEY (a personal access "
                    "token or, if enabled in the organization, a legacy token)")
        try:
            if with_auth:
                headers.update(self.auth.header())
            r = self._get(url, headers)
            if r.status_code == 401 and with_auth and self.auth is not None and self.auth.is_personal_token:
                r.close()
                r = self._get(url, {**headers, **self.auth.header(force_refresh=True)})
            with r:
                if r.status_code in (401, 403) and with_auth:
                    raise ImageFetchError(
                        f"{_short(url)}: Label Studio refused the API key (HTTP {r.status_code}). Label Studio 1.23 "
                        "disables legacy tokens by default: use a personal access token or enable legacy tokens in "
                        "Organization > API Tokens Settings")
                if r.status_code != 200:
                    raise ImageFetchError(f"{_short(url)}: HTTP {r.status_code}")
                length = r.headers.get("Content-Length")
                if length and length.isdigit():
                    self._check_size(int(length), url)
                return self._body(r, url, deadline)
        except LabelStudioAuthError as e:
            raise ImageFetchError(str(e)) from e
        except (requests.Timeout, urllib3.exceptions.TimeoutError) as e:
            if time.monotonic() >= deadline:
                raise self._overdue(url) from e
            raise ImageFetchError(f"{_short(url)}: timed out after {self.timeout} s") from e
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise ImageFetchError(f"{_short(url)}: download failed: {e}") from e

    def _body(self, r: requests.Response, url: str, deadline: float) -> bytes:
        """The body as it arrives, one socket read at a time, each waiting at most until `deadline`
        (time.monotonic()): the read timeout alone bounds only the wait for the next byte."""
        sock = getattr(r.raw.connection, "sock", None)
        chunks, total = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._overdue(url)
            if sock is not None:
                sock.settimeout(min(left, self.timeout[1]))
            chunk = r.raw.read1(1 << 16, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            self._check_size(total, url)
            chunks.append(chunk)

    def _overdue(self, url: str) -> ImageFetchError:
        return ImageFetchError(f"{_short(url)}: timed out: the download took more than {self.timeout[1]:g} s "
                               "(IMAGE_TIMEOUT)")

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        return self.session.get(url, headers=headers, timeout=self.timeout, stream=True)


def _not_an_image(data: bytes, error: Exception) -> str:
    """Why `data` did not decode, in words a user can act on: an HTML or JSON answer says what it is."""
    head = data[:1024].lstrip()
    if head[:15].lower().startswith((b"<!doctype html", b"<html")):
        return ("got an HTML page, not an image (a sign-in or error page? check the URL, and LABEL_STUDIO_API_KEY "
                "for Label Studio files)")
    if head[:1] in (b"{", b"["):
        return f"got JSON, not an image: {head[:200].decode('utf-8', 'replace')}"
    return str(error)


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[:limit] + "..."
