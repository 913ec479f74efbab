"""Refreshing a project's stored predictions after a promotion, so Label Studio's ranking follows the new model.

A task of project P that carries a prediction of an older version of this backend (the same base
model and settings: the base version or an earlier fine-tune of P) is predicted again with the
model now serving P, through backend.prelabel (fetching overlapped with compute, batched writes,
tasks already at the new version skipped), and this backend's older predictions of the task are
then deleted. Label Studio 1.23 sorts and filters tasks by the mean score of their predictions of
the project's selected model version (of all of them when the selection is null), and its editor
pre-labels with that version's predictions: so the refresh also moves the project's selection to
the new version when it named an older version of this backend, and never leaves a stale
prediction of ours for the mean or the editor to pick up.

RefreshManager runs one refresh per project in a background thread; a newer request (another
promotion) cancels the running one and starts after it stops. Each refresh is a Job of kind
"refresh" with an on-disk record like a fine-tune's. MODEL_DIR/.refresh/<project>.json marks a
refresh that has not finished; a restarted server resumes those (`pending`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from backend.batch import PrelabelSummary
from backend.learning.jobs import Job, JobRecords, job_outcome
from backend.prelabel import PredictionWriter, _has_version, prelabel_tasks, project_tasks

log = logging.getLogger(__name__)

REFRESH_BATCH = 8  # predictions per Label Studio write: small, so the ranking moves while a refresh runs
MAX_ERRORS_SHOWN = 10


def own_version(version: Any, base: str, project: str) -> bool:
    """True for a model_version this backend serves or served `project` with: the base model or one of
    the project's fine-tunes under the same base (weights and result settings)."""
    return isinstance(version, str) and (version == base or version.startswith(f"{base}+{project}-"))


def stale_predictions(task: dict[str, Any], current: str, base: str, project: str) -> list[dict[str, Any]]:
    """This backend's predictions of `task` made by a version other than `current`."""
    return [p for p in task.get("predictions") or []
            if p.get("model_version") != current and own_version(p.get("model_version"), base, project)]


@dataclass
class RefreshSummary(PrelabelSummary):
    """A refresh: the prelabel summary of the stale tasks, plus the older predictions deleted (or not)."""

    deleted: int = 0
    delete_errors: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [super().format(), f"{self.deleted} older prediction(s) of this backend deleted"]
        return "\n".join(lines + [f"  NOT DELETED {e}" for e in self.delete_errors])


class _Pruner:
    """Deletes this backend's older predictions of tasks that now have a prediction of the new version."""

    def __init__(self, client: Any, stale: dict[int, list[dict[str, Any]]]):
        self.client, self.stale = client, stale
        self.deleted = 0
        self.errors: list[str] = []

    def prune(self, tasks: Iterable[dict[str, Any]]) -> None:
        for task in tasks:
            for old in self.stale.pop(int(task["id"]), []):
                try:
                    self.client.predictions.delete(id=int(old["id"]))
                    self.deleted += 1
                except Exception as e:  # noqa: BLE001 - listed; the next refresh deletes it (the task stays stale)
                    if getattr(e, "status_code", None) == 404:
                        continue  # already gone
                    self.errors.append(f"task {task['id']}: deleting prediction {old['id']} failed: "
                                       f"{type(e).__name__}: {e}")
                    log.warning("%s", self.errors[-1])


def refresh_project(backend: Any, client: Any, project_id: int, job: Job | None = None, workers: int = 2,
                    prefetch: int = 4, progress: bool = False, batch: int = REFRESH_BATCH) -> RefreshSummary:
    """Re-predict the project's tasks that carry an older prediction of this backend; delete the older ones.

    `backend` is an ODISEBackend (the model serving the project predicts); `job`, when given, gets
    live progress (tasks done / to do, images/s, failures) and stops the run when cancelled
    (JobCancelled). In the summary `total` counts the stale tasks, `skipped` those already at the new
    version (they only lose their older predictions).
    """
    key = str(project_id)
    project = client.projects.get(id=project_id)
    version, model = backend.model_for(key)
    base = backend.base_version
    tasks, stale = [], {}
    for task in project_tasks(client, project_id):
        old = stale_predictions(task, version, base, key)
        if old:
            tasks.append(task)
            stale[int(task["id"])] = old
    pruner = _Pruner(client, stale)
    pruner.prune([t for t in tasks if _has_version(t.get("predictions"), version)])
    writer = PredictionWriter(client, project_id, batch=batch, on_written=lambda b: pruner.prune(t for t, _ in b))
    if job is not None:
        job.version = version
        job.total_steps = len(tasks) - sum(_has_version(t.get("predictions"), version) for t in tasks)
    summary = prelabel_tasks(backend, client, project_id, project.label_config, tasks, version, model,
                             workers=workers, prefetch=prefetch, progress=progress, writer=writer,
                             stop=(lambda: job.stop_requested) if job is not None else None,
                             on_item=(lambda s: _report(job, s, pruner)) if job is not None else None)
    moved = summary.predicted > 0 or summary.skipped > 0
    if moved and project.model_version != version and own_version(project.model_version, base, key):
        client.projects.update(id=project_id, model_version=version)  # the ranking and pre-labels follow
        log.info("project %s: Label Studio's selected model version moved from %s to %s", key,
                 project.model_version, version)
    if job is not None:
        _report(job, summary, pruner)
        job.check()
    log.info("project %s: refreshed %d of %d stale task(s) to %s, %d older prediction(s) deleted, %d failed",
             key, summary.predicted, summary.total, version, pruner.deleted, len(summary.failures) + len(pruner.errors))
    return RefreshSummary(**{f.name: getattr(summary, f.name) for f in fields(summary)}, deleted=pruner.deleted,
                          delete_errors=pruner.errors)


def _report(job: Job, summary: PrelabelSummary, pruner: _Pruner) -> None:
    """Copy a refresh's progress into its job: done / total tasks, images/s, deletions and errors."""
    errors = [f"{f.item}: {f.error}" for f in summary.failures] + pruner.errors
    job.step = summary.predicted + len(summary.failures)
    job.metrics = {"images_per_second": round(summary.images_per_second, 3), "predicted": summary.predicted,
                   "already_current": summary.skipped, "failed": len(errors), "deleted": pruner.deleted,
                   "errors": errors[:MAX_ERRORS_SHOWN]}


class RefreshManager:
    """Background refreshes, at most one running per project; the newest request wins.

    `run(job)` does the work (ODISEBackend wires refresh_project with its Label Studio client) and
    raises JobCancelled when the job is cancelled; `records` is the job-record store shared with
    fine-tunes, so refresh job ids answer on the same status endpoint.
    """

    def __init__(self, model_dir: str | Path, records: JobRecords, run: Callable[[Job], None]):
        self.root = Path(model_dir) / ".refresh"
        self.root.mkdir(parents=True, exist_ok=True)
        self.records = records
        self._run_fn = run
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # every refresh of this process, by id
        self._latest: dict[str, Job] = {}  # per project
        self._threads: dict[str, threading.Thread] = {}  # by job id
        self._cancelled: dict[str, str] = {}  # job id -> why it was cancelled

    def start(self, project: str | int, reason: str) -> Job:
        """Start a refresh of `project`; a running one is cancelled and the new one starts once it stopped."""
        key = str(project)
        with self._lock:
            previous = self._latest.get(key)
            job = Job(project=key, reason=reason, kind="refresh")
            if previous is not None and previous.active:
                self._cancelled[previous.id] = f"cancelled: superseded by refresh {job.id} ({reason})"
                previous.cancel()
                log.info("project %s: refresh %s cancelled by a newer one (%s)", key, previous.id, reason)
            waits_for = self._threads.get(previous.id) if previous is not None else None
            thread = threading.Thread(target=self._run, args=(job, waits_for), daemon=True,
                                      name=f"refresh-{key}-{job.id}")
            self._jobs[job.id] = self._latest[key] = job
            self._threads[job.id] = thread
            self._mark(job)
            thread.start()
        self.records.save(job)
        return job

    def _run(self, job: Job, waits_for: threading.Thread | None) -> None:
        def cancelled() -> str:
            return self._cancelled.get(job.id, "cancelled: the backend is shutting down")

        def on_end() -> None:
            if job.state == "done":
                self._unmark(job)
            log.info("project %s refresh %s: %s", job.project, job.id, job.message)

        with job_outcome(job, self.records, cancelled, on_end):
            if waits_for is not None:
                waits_for.join()
            job.check()
            job.state = "refreshing"
            self.records.save(job)
            self._run_fn(job)
            job.state = "done"
            failed = job.metrics.get("failed", 0)
            job.message = (f"refreshed {job.metrics.get('predicted', 0)} of {job.total_steps} task(s) to {job.version}"
                           f"{f'; {failed} error(s)' if failed else ''}")

    def _marker(self, project: str) -> Path:
        return self.root / f"{project}.json"

    def _mark(self, job: Job) -> None:
        """Record that `job` is the project's refresh to finish (atomically; a restart resumes it)."""
        tmp = self.root / f".tmp-{job.id}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.write_text(json.dumps({"project": job.project, "job": job.id, "reason": job.reason}))
            os.replace(tmp, self._marker(job.project))
        except OSError as exc:
            log.warning("could not mark refresh %s as pending: %s", job.id, exc)

    def _unmark(self, job: Job) -> None:
        """Drop the project's marker if it still names `job` (a newer refresh replaced it otherwise)."""
        with self._lock:
            path = self._marker(job.project)
            try:
                if json.loads(path.read_text()).get("job") == job.id:
                    path.unlink()
            except (OSError, ValueError):
                pass

    def pending(self) -> list[str]:
        """Projects whose latest refresh did not finish (in an earlier process, or failed in this one)."""
        out = []
        for path in sorted(self.root.glob("*.json")):
            project = path.stem
            with self._lock:
                latest = self._latest.get(project)
            if latest is None or latest.state in ("failed", "interrupted"):
                out.append(project)
        return out

    def latest(self, project: str | int) -> Job | None:
        return self._latest.get(str(project))

    def overview(self) -> list[dict[str, Any]]:
        """Each project's latest refresh in this process, compact (for /health)."""
        with self._lock:
            jobs = list(self._latest.values())
        return [{"id": j.id, "project": j.project, "state": j.state, "version": j.version, "done": j.step,
                 "total": j.total_steps, "images_per_second": j.metrics.get("images_per_second"),
                 "failed": j.metrics.get("failed", 0), "message": j.message} for j in jobs]

    def find(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel every refresh and wait for their threads; their markers stay, so the next start resumes them."""
        with self._lock:
            jobs, threads = list(self._jobs.values()), list(self._threads.values())
        for j in jobs:
            j.cancel()
        for t in threads:
            t.join(timeout)
