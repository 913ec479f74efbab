"""Locks across processes that share one MODEL_DIR (serving replicas, `odise-ls train` beside a server).

Advisory file locks (the `filelock` package: flock on POSIX), released by the OS when a process
dies, so a `kill -9` never leaves a stale lock. Both live in MODEL_DIR/.locks/:
    store.lock          held around every change of the version store (write, promote, rollback,
                        clean-up), so two writers never pick the same version name or remove each
                        other's unfinished versions
    train-<project>     held by the one job in any process that reads data, trains and judges for
                        that project; a job in another process waits for it
"""
from __future__ import annotations

from pathlib import Path

from filelock import FileLock

LOCK_DIR = ".locks"


def _lock(root: str | Path, name: str) -> FileLock:
    folder = Path(root) / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / name)


def store_lock(root: str | Path) -> FileLock:
    """The version store's lock (re-entrant within a thread: promote inside rollback is fine)."""
    return _lock(root, "store.lock")


def training_lock(root: str | Path, project: str) -> FileLock:
    """The lock a fine-tune of `project` holds from reading its data to saving its version."""
    return _lock(root, f"train-{project}.lock")
