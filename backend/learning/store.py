"""The on-disk store of fine-tuned model versions: atomic writes, promotion, rollback.

Per project:
    MODEL_DIR/<project>/<version>/weights.pt      trainable state dict of the fine-tuned model
    MODEL_DIR/<project>/<version>/config.json     the full model configuration it was trained under
    MODEL_DIR/<project>/<version>/metadata.json   vocabulary, data counts, baseline and eval figures
    MODEL_DIR/<project>/CURRENT                   name of the promoted (serving) version
A version directory is written under a temporary name and renamed with `os.replace`, and CURRENT
is replaced the same way, so a crash or `kill -9` at any moment leaves either the old or the new
state, never a partial one; leftover temporary directories are removed on start.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
TMP_PREFIX = ".tmp-"
WEIGHTS = "weights.pt"
CONFIG = "config.json"
METADATA = "metadata.json"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync `data` to `path`."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def to_json(obj: Any) -> bytes:
    """Indented JSON of metadata that may hold numpy scalars."""
    return json.dumps(obj, indent=2, default=_json_default).encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return str(obj)


class VersionStore:
    """Model versions of every project under one directory; atomic writes, promotion, rollback."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove temporary directories a crashed or killed writer left behind."""
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            log.warning("removing unfinished model version %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def project_dir(self, project: str | int) -> Path:
        name = str(project)
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid project id {project!r}")
        return self.root / name

    def versions(self, project: str | int) -> list[str]:
        """Complete versions, oldest first."""
        d = self.project_dir(project)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir()
                      if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (p / METADATA).exists())

    def metadata(self, project: str | int, version: str) -> dict[str, Any]:
        path = self.project_dir(project) / version / METADATA
        if not path.exists():
            raise KeyError(f"project {project} has no model version {version!r}; known: {self.versions(project)}")
        return json.loads(path.read_text())

    def config(self, project: str | int, version: str) -> dict[str, Any] | None:
        """The model configuration `version` was trained under (None for versions older than config.json)."""
        self.metadata(project, version)
        path = self.project_dir(project) / version / CONFIG
        return json.loads(path.read_text()) if path.exists() else None

    def current(self, project: str | int) -> str | None:
        """The promoted version, or None while the base model serves."""
        path = self.project_dir(project) / CURRENT
        if not path.exists():
            return None
        version = path.read_text().strip()
        return version if (self.project_dir(project) / version / METADATA).exists() else None

    def next_version(self, project: str | int) -> str:
        existing = [int(v[1:]) for v in self.versions(project) if v[1:].isdigit()]
        return f"v{max(existing, default=0) + 1:04d}"

    def write(self, project: str | int, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any],
              config: dict[str, Any] | None = None) -> str:
        """Write a new version (weights, its model configuration, metadata) atomically; return its name.

        The version is not promoted.
        """
        d = self.project_dir(project)
        d.mkdir(parents=True, exist_ok=True)
        version = self.next_version(project)
        tmp = d / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / WEIGHTS)
            with open(tmp / WEIGHTS, "rb+") as f:
                os.fsync(f.fileno())
            if config is not None:
                write_file(tmp / CONFIG, to_json(config))
            meta = {**metadata, "version": version, "project": str(project),
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            write_file(tmp / METADATA, to_json(meta))
            fsync_dir(tmp)
            os.replace(tmp, d / version)
            fsync_dir(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def promote(self, project: str | int, version: str) -> None:
        """Point CURRENT at `version` (atomically) and record in its metadata that it was promoted."""
        self.metadata(project, version)
        d = self.project_dir(project)
        tmp = d / f"{TMP_PREFIX}{CURRENT}-{uuid.uuid4().hex[:8]}"
        write_file(tmp, version.encode())
        os.replace(tmp, d / CURRENT)
        fsync_dir(d)
        self._mark_promoted(project, version)
        log.info("project %s now serves model version %s", project, version)

    def rollback(self, project: str | int, version: str | None = None) -> str | None:
        """Serve `version`, or else the newest earlier version that was promoted (None = base model)."""
        if version is not None:
            self.promote(project, version)
            return version
        current = self.current(project)
        if current is None:
            raise ValueError(f"project {project} serves the base model; nothing to roll back")
        earlier = [v for v in self.versions(project) if v < current and self.metadata(project, v).get("promoted")]
        if earlier:
            self.promote(project, earlier[-1])
            return earlier[-1]
        self.serve_base(project)
        return None

    def serve_base(self, project: str | int) -> None:
        """Serve the base model for `project` (its versions stay on disk)."""
        d = self.project_dir(project)
        if (d / CURRENT).exists():
            os.remove(d / CURRENT)
            fsync_dir(d)
        log.info("project %s now serves the base model", project)

    def load_state_dict(self, project: str | int, version: str) -> dict[str, torch.Tensor]:
        self.metadata(project, version)
        return torch.load(self.project_dir(project) / version / WEIGHTS, map_location="cpu", weights_only=True)

    def _mark_promoted(self, project: str | int, version: str) -> None:
        """Record in the version's metadata that it was promoted (rollback goes back to such versions)."""
        d = self.project_dir(project) / version
        meta = self.metadata(project, version)
        if meta.get("promoted") is True:
            return
        meta["promoted"] = True
        tmp = d / f"{TMP_PREFIX}{METADATA}"
        write_file(tmp, to_json(meta))
        os.replace(tmp, d / METADATA)
