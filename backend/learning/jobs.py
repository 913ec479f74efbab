"""Background jobs (fine-tunes, prediction refreshes): their progress payload and a cheap on-disk
record of every job id handed out.

A job id that Label Studio (or a user) was given stays answerable: in memory for as long as the
server runs, and from MODEL_DIR/.jobs/<id>.json after a restart. A record found on disk in a
running state belongs to a process that stopped before the job ended; it reads as "interrupted".
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "fetching", "training", "evaluating", "saving", "refreshing")
JOB_ID = re.compile(r"^[0-9a-f]{12}$")


class JobCancelled(Exception):
    """Raised inside a job that was cancelled (server shutdown, or a refresh superseded by a newer one)."""


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _epoch(iso: str | None) -> float | None:
    return None if iso is None else dt.datetime.fromisoformat(iso).timestamp()


@dataclass
class Job:
    """One fine-tune (kind "finetune") or prediction refresh (kind "refresh", backend.learning.refresh);
    `as_dict()` is the progress payload of the status endpoint and CLI. A refresh counts tasks in
    `step` / `total_steps` and keeps its rate and errors in `metrics`.

    `requests` lists every request this job answers (the first one started it; later ones were
    coalesced into it). `same_data_as` names the job that already trained on this job's data when
    the job was skipped for that reason.
    """

    project: str
    reason: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: str = "finetune"
    state: str = "queued"  # queued fetching training evaluating saving refreshing | done cancelled failed skipped interrupted
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    message: str = ""
    version: str | None = None
    promoted: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    same_data_as: str | None = None
    created: float = field(default_factory=time.time)
    fetch_started: float | None = None
    finished: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if not self.requests:
            self.requests.append(self.reason)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """Raise JobCancelled once the job was cancelled."""
        if self._stop.is_set():
            raise JobCancelled()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it did within `timeout`."""
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "project": self.project, "reason": self.reason, "state": self.state,
            "step": self.step, "total_steps": self.total_steps,
            "progress": round(self.step / self.total_steps, 4) if self.total_steps else 0.0,
            "loss": self.loss, "message": self.message, "version": self.version, "promoted": self.promoted,
            "metrics": self.metrics, "requests": list(self.requests), "same_data_as": self.same_data_as,
            "created": _iso(self.created), "fetch_started": _iso(self.fetch_started), "finished": _iso(self.finished),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Job":
        """A finished Job rebuilt from its on-disk record; a record left running reads as interrupted."""
        job = cls(project=record["project"], reason=record["reason"], id=record["id"],
                  kind=record.get("kind", "finetune"), state=record["state"],
                  step=record["step"], total_steps=record["total_steps"], loss=record["loss"],
                  message=record["message"], version=record["version"], promoted=record["promoted"],
                  metrics=record["metrics"], requests=list(record["requests"]), same_data_as=record["same_data_as"],
                  created=_epoch(record["created"]) or 0.0, fetch_started=_epoch(record["fetch_started"]),
                  finished=_epoch(record["finished"]))
        if job.active:
            job.message = f"interrupted: the backend stopped while this job was {job.state}"
            job.state = "interrupted"
        job._done.set()
        return job


class JobRecords:
    """Every job's latest payload as MODEL_DIR/.jobs/<id>.json (about 1 kB each, written on state changes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / ".jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, job: Job) -> None:
        """Replace the job's record atomically (no fsync: losing the latest state in a power cut is harmless)."""
        path = self.root / f"{job.id}.json"
        tmp = self.root / f".tmp-{job.id}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.write_text(json.dumps(job.as_dict()))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk must not fail the job itself
            log.warning("could not record job %s: %s", job.id, exc)

    def load(self, job_id: str) -> Job | None:
        """The recorded job with this id, or None (also for ids that are not job ids at all)."""
        if not JOB_ID.match(job_id):
            return None
        path = self.root / f"{job_id}.json"
        try:
            return Job.from_record(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as exc:
            log.warning("unreadable record of job %s: %s", job_id, exc)
            return None


@contextmanager
def job_outcome(job: Job, records: JobRecords, cancelled: Callable[[], str],
                on_end: Callable[[], None] | None = None) -> Iterator[None]:
    """Run a job's body in a background thread: JobCancelled ends it "cancelled" (message from `cancelled()`),
    any other exception "failed" with the error as message (reported, never raised: the server keeps
    serving); either way the end time is set, `on_end()` runs and the record is saved."""
    try:
        yield
    except JobCancelled:
        job.state = "cancelled"
        job.message = cancelled()
        log.info("project %s %s job %s cancelled", job.project, job.kind, job.id)
    except Exception as exc:  # noqa: BLE001 - reported in the job's status instead
        job.state = "failed"
        job.message = f"{type(exc).__name__}: {exc}"
        log.exception("project %s %s job %s failed", job.project, job.kind, job.id)
    finally:
        job.finished = time.time()
        if on_end is not None:
            on_end()
        records.save(job)
        job._done.set()
