"""Build a backend and serve it on 127.0.0.1 in a daemon thread: the set-up shared by the HTTP benchmarks."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from werkzeug.serving import BaseWSGIServer, make_server

from backend.app import create_app
from backend.model import ODISEBackend
from backend.settings import BackendSettings


def load_backend(settings: BackendSettings) -> tuple[ODISEBackend, float]:
    """The backend of `settings` with its model built now, and the seconds that took; exits naming the failure."""
    backend = ODISEBackend(settings)
    t0 = time.perf_counter()
    backend.start_loading(background=False)
    if backend.error:
        raise SystemExit(f"model failed to load: {backend.error}")
    return backend, time.perf_counter() - t0


def serve_backend(preset: str, device: str, random_weights: bool = False
                  ) -> tuple[ODISEBackend, BaseWSGIServer, str, float]:
    """(backend, server (call .shutdown()), /predict URL, seconds to build the model); fresh temp model dir."""
    backend, build_seconds = load_backend(BackendSettings.from_env(
        {}, preset=preset, device=device, random_weights=random_weights,
        model_dir=Path(tempfile.mkdtemp(prefix="odise-bench-"))))
    server = make_server("127.0.0.1", 0, create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return backend, server, f"http://127.0.0.1:{server.port}/predict", build_seconds
