"""Start a real Label Studio (1.23, the project's .venv-ls or $LABEL_STUDIO_BIN) on 127.0.0.1: used by the
e2e fixtures and by benchmarks that measure work through Label Studio.

Label Studio's database migrations take most of its startup time, so the first start saves the
freshly migrated database (with the test user) under $ODISE_E2E_CACHE (default
~/.cache/odise-label-studio/e2e), keyed by the Label Studio install; later starts copy it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parents[2]
EMAIL = "e2e@example.com"
PASSWORD = "e2e-password-123"
LEGACY_TOKEN = "odise-e2e-legacy-token-0123456789"
STARTUP_TIMEOUT = 300.0


class LabelStudioStartError(RuntimeError):
    """Label Studio exited or did not answer while starting; the message carries its log's tail."""


def find_label_studio() -> Path | None:
    """The project's own Label Studio install, else $LABEL_STUDIO_BIN; None when neither is executable."""
    candidates = [ROOT / ".venv-ls" / "bin" / "label-studio"]
    if os.environ.get("LABEL_STUDIO_BIN"):
        candidates.append(Path(os.environ["LABEL_STUDIO_BIN"]))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise LabelStudioStartError(f"Label Studio exited with code {proc.returncode} during startup:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise LabelStudioStartError(f"{url} did not answer within {timeout:.0f} s")


def _template_path(binary: Path) -> Path:
    """Where the migrated database of this Label Studio install is cached."""
    cache = Path(os.environ.get("ODISE_E2E_CACHE") or Path.home() / ".cache" / "odise-label-studio" / "e2e")
    key = hashlib.sha1(f"{binary.resolve()}:{binary.stat().st_mtime_ns}:{EMAIL}:{LEGACY_TOKEN}".encode())
    return cache / f"label-studio-{key.hexdigest()[:12]}.sqlite3"


def _save_template(db: Path, template: Path) -> None:
    """Consistent copy of the live database (sqlite backup API), renamed into place atomically."""
    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_suffix(f".tmp{os.getpid()}")
    src, dst = sqlite3.connect(db), sqlite3.connect(tmp)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    os.replace(tmp, template)


@dataclass
class LabelStudioServer:
    url: str
    legacy_token: str
    personal_token: str
    data_dir: Path

    def api(self) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Token {self.legacy_token}"
        return s


@contextmanager
def running_label_studio(binary: Path, data_dir: Path, timeout: float = STARTUP_TIMEOUT) -> Iterator[LabelStudioServer]:
    """Label Studio from `binary` on a free 127.0.0.1 port with its data in `data_dir`; stopped on exit."""
    template = _template_path(binary)
    if template.is_file():
        shutil.copyfile(template, data_dir / "label_studio.sqlite3")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        # The backend and the images live on 127.0.0.1, which Label Studio blocks by default.
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(data_dir),
        "DJANGO_DB": "sqlite",
        "PYTHONUNBUFFERED": "1",
    }
    log = data_dir / "label-studio.log"
    cmd = [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
           "--data-dir", str(data_dir), "--username", EMAIL, "--password", PASSWORD,
           "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token", "--log-level", "WARNING"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", proc, log, timeout)
        if not template.is_file():
            _save_template(data_dir / "label_studio.sqlite3", template)
        r = requests.post(f"{url}/api/token/", headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=30)
        if r.status_code not in (200, 201):
            raise LabelStudioStartError(f"creating a personal access token failed: {r.status_code} {r.text}")
        yield LabelStudioServer(url=url, legacy_token=LEGACY_TOKEN, personal_token=r.json()["token"],
                                data_dir=data_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
