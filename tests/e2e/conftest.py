"""A real Label Studio server and this backend (tiny preset), both on 127.0.0.1, for the whole session.

Label Studio is looked up at <repo>/.venv-ls/bin/label-studio (made by ./dev setup), then
$LABEL_STUDIO_BIN. When neither exists the e2e tests are skipped, except under CI=true
where that is a failure. Both servers stop at the end of the session.

Label Studio is started by tests/e2e/label_studio.py (which caches its migrated database).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest
from flask import Flask
from werkzeug.serving import make_server

from backend.app import create_app
from backend.model import BackendSettings, ODISEBackend
from tests.e2e.label_studio import STARTUP_TIMEOUT, LabelStudioServer, find_label_studio, running_label_studio

@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    binary = find_label_studio()
    if binary is None:
        message = ("Label Studio not found: run ./dev setup (creates .venv-ls) or set LABEL_STUDIO_BIN "
                   "to a label-studio executable")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    with running_label_studio(binary, tmp_path_factory.mktemp("label-studio")) as server:
        yield server


@dataclass
class BackendServer:
    url: str
    backend: ODISEBackend


@pytest.fixture(scope="session")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """This backend with the tiny preset on 127.0.0.1; its model loads while Label Studio starts."""
    model_dir = tmp_path_factory.mktemp("models")
    # Random tiny weights: the demo's overlap threshold (0.0) keeps every query's region, so there is
    # always something to check.
    settings = BackendSettings.from_env({}, preset="tiny", device="cpu", model_dir=model_dir, overlap_threshold=0.0)
    backend = ODISEBackend(settings)
    backend.start_loading(background=True)
    try:
        with serving(create_app(backend)) as url:
            yield BackendServer(url=url, backend=backend)
    finally:
        backend.shutdown(timeout=10)


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """Serve `app` on a free 127.0.0.1 port in a daemon thread; yields its URL, stops on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="odise-backend", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def backend_server(tiny_backend: BackendServer, label_studio: LabelStudioServer) -> BackendServer:
    """The backend, ready, authenticating to Label Studio with a personal access token (refresh JWT)."""
    tiny_backend.backend.fetcher.configure(label_studio.url, label_studio.personal_token)
    assert tiny_backend.backend.wait_ready(STARTUP_TIMEOUT), f"tiny model failed to load: {tiny_backend.backend.error}"
    assert tiny_backend.backend.fetcher.auth.is_personal_token
    return tiny_backend
