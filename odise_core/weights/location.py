"""Where weights are looked up and cached, whether the network may be used, and the missing-weights message.

Every loader (sd, clip, checkpoint) resolves its source through a `WeightsLocation` and raises the
`WeightsMissingError` built here, so every message ends with the same instructions.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from odise_core.config import ModelConfig

DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "odise-label-studio"
SD_CKPT_NAME = "sd-v1-3.ckpt"
SD_DIFFUSERS_DIR_NAME = "stable-diffusion-v1-3"
HF_HOST = "huggingface.co"
CONNECT_TIMEOUT = 3.0


def how_to_supply(root: Path | None = None) -> str:
    """The one-line instructions every WeightsMissingError ends with."""
    return (
        "Supply the weights with --weights-dir or these environment variables: "
        "ODISE_SD_WEIGHTS=<diffusers dir | sd-v1-3.ckpt | hub id>, ODISE_CLIP_WEIGHTS=<file | open_clip tag>, "
        f"ODISE_CHECKPOINT=<.pth path | URL>, or place them in {root or DEFAULT_WEIGHTS_DIR} "
        f"(--weights-dir / ODISE_WEIGHTS_DIR): {SD_CKPT_NAME} or {SD_DIFFUSERS_DIR_NAME}/, "
        "clip/ViT-L-14-336px.pt, checkpoints/<name>.pth. Use --preset tiny for random weights."
    )


class WeightsMissingError(RuntimeError):
    """Pretrained weights are not on disk and cannot be downloaded now."""


def weights_dir(root: str | Path | None = None) -> Path:
    """Cache directory for weights and derived constants: `root`, or ~/.cache/odise-label-studio."""
    return Path(root).expanduser() if root else DEFAULT_WEIGHTS_DIR


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub library parses it, read now (tests and tools may set it late)."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES


@dataclass(frozen=True)
class WeightsLocation:
    """Where weights are looked up and cached, and whether the network may be used."""

    root: Path = DEFAULT_WEIGHTS_DIR
    offline_flag: bool = False

    @classmethod
    def of(cls, cfg: ModelConfig) -> "WeightsLocation":
        return cls(weights_dir(cfg.weights_dir), cfg.offline)

    @property
    def offline(self) -> bool:
        return self.offline_flag or _hub_offline()

    def why_missing(self, host: str) -> str:
        return "offline (ODISE_OFFLINE/HF_HUB_OFFLINE)" if self.offline else f"{host} unreachable"

    def missing(self, what: str, looked: list[str], why: str) -> WeightsMissingError:
        where = "; ".join(looked) if looked else "nowhere"
        return WeightsMissingError(f"{what} not found ({why}). Looked in: {where}. {how_to_supply(self.root)}")


DEFAULT_LOCATION = WeightsLocation()
_REACHABLE: dict[str, bool] = {}


def reachable(host: str, where: WeightsLocation) -> bool:
    """Whether `host`:443 accepts a TCP connection within CONNECT_TIMEOUT (cached per process)."""
    if where.offline:
        return False
    if host not in _REACHABLE:
        try:
            with socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT):
                _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def given_source(source: str | None, what: str, where: WeightsLocation, dirs: bool = False) -> tuple[str, str] | None:
    """("random", "") for no source; ("dir"|"file", path) for an existing path (directories only when `dirs`);
    None for a name to look up elsewhere. Something that looks like a path but does not exist is an error."""
    if source is None:
        return "random", ""
    path = Path(source).expanduser()
    if dirs and path.is_dir():
        return "dir", str(path)
    if path.is_file():
        return "file", str(path)
    if looks_like_path(source):
        raise where.missing(f"{what} {source!r}", [str(path)], "no such file or directory" if dirs else "no such file")
    return None


def is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https")


def looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin"))


def hf_cached(repo_id: str, filename: str, cache_dir: Path | None = None) -> bool:
    """Whether the file is in the default Hugging Face cache (or in `cache_dir`)."""
    from huggingface_hub import try_to_load_from_cache

    dirs = [None] + ([str(cache_dir)] if cache_dir is not None else [])
    return any(isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=d), str) for d in dirs)


def source_identity(kind: str, location: str) -> str:
    """`location` for caches keyed by weights: with the resolved path, size and mtime of a local file (or of
    every file in a local directory), so replacing the weights changes it."""
    if kind == "file":
        stat = Path(location).stat()
        return f"{Path(location).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    if kind == "dir":
        root = Path(location).resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return f"{root}:" + ",".join(f"{p.relative_to(root)}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)
    return location
