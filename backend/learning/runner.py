"""Runs fine-tune jobs in background threads, one at a time per project, and promotes their results.

Jobs run in threads (PyTorch releases the GIL, so predictions keep being served by the promoted
model). Requests for a project are coalesced into one job per round of annotations (the rule is in
backend.learning.policy). A job fine-tunes a copy of the model serving when it starts; when it is
judged, the baseline is the version serving at that moment, evaluated on the same held-out tasks,
and the candidate is promoted only if it beats that baseline (promotion.is_better). Both figures
and the baseline's version are stored in the new version's metadata.

`model_lock` guards the frozen backbone that serving and training models share (its feature hooks
are not re-entrant): jobs hold it for every forward pass they make, one image at a time, and the
server holds it around its own forward passes. Across processes sharing MODEL_DIR (serving
replicas), a job holds the project's training lock (backend.learning.locks) from reading its data
to saving its version; a job of the same project in another process waits for it.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from filelock import Timeout

from backend.learning.jobs import Job, JobRecords, job_outcome
from backend.learning.locks import training_lock
from backend.learning.policy import ANNOTATION_EVENTS, START_TRAINING
from backend.learning.promotion import evaluate_model, is_better
from backend.learning.serving import copy_sharing_frozen, model_config
from backend.learning.store import VersionStore
from backend.learning.training import run_finetune
from backend.settings import TrainPolicy
from backend.training_data import TrainingData
from odise_core.tools.evaluation import EvalResult

log = logging.getLogger(__name__)

FetchFn = Callable[[float], TrainingData]  # holdout_fraction -> the project's training data
ServingFn = Callable[[], tuple[str | None, Any]]  # -> (stored version or None for the base, model) serving now
FinetuneFn = Callable[[Any, TrainingData, Any, Job, ContextManager], Any]
JUDGE_ATTEMPTS = 3
LOCK_POLL_SECONDS = 0.5  # how often a job waiting for another process's training checks for cancellation


@dataclass
class _Request:
    """What a job needs to run, fixed by the request that created it."""

    fetch: FetchFn
    serving: ServingFn
    vocab: Any
    min_annotations: int
    dedupe: bool


class JobManager:
    """Fine-tune jobs of every project and the model versions they write.

    `finetune_fn(model, data, vocab, job, feature_lock)` trains `model` in place (default:
    training.run_finetune; use functools.partial(run_finetune, options=...) for other options).
    `on_promoted(project, version)` is called after a promotion.
    """

    def __init__(self, model_dir: str | Path, policy: TrainPolicy | None = None,
                 finetune_fn: FinetuneFn = run_finetune, on_promoted: Callable[[str, str], None] | None = None,
                 model_lock: Any = None, timer: Callable[[float, Callable[[], Any]], Any] = threading.Timer):
        self.store = VersionStore(model_dir)
        self.records = JobRecords(model_dir)
        self.model_lock = model_lock if model_lock is not None else threading.Lock()
        self.policy = policy or TrainPolicy()
        self.finetune_fn = finetune_fn
        self.on_promoted = on_promoted
        self._timer = timer  # threading.Timer; tests pass one they fire themselves
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # every job of this process, by id
        self._latest: dict[str, Job] = {}  # per project: the newest job
        self._running: dict[str, Job] = {}  # per project: the job reading data / training (or about to)
        self._followup: dict[str, Job] = {}  # per project: the one job queued behind it
        self._threads: dict[str, threading.Thread] = {}  # by job id
        self._timers: dict[str, Any] = {}
        self._last_event: dict[str, float] = {}
        self._event_seq: dict[str, int] = {}

    # ---------------------------------------------------------------- requests
    def submit(self, project: str | int, fetch: FetchFn, serving: ServingFn, vocab: Any,
               reason: str = START_TRAINING, min_annotations: int = 1, dedupe: bool = False) -> Job:
        """Ask for a fine-tune of `project`; returns the job that will answer it (new or coalesced).

        `fetch(holdout_fraction)` returns the project's TrainingData; `serving()` the version and model
        serving the project now (the job copies it, never modifies it). `dedupe` skips the job when
        its data equals the data of the project's latest fine-tune (policy module docstring).
        """
        key = str(project)
        self.store.project_dir(key)
        request = _Request(fetch, serving, vocab, max(min_annotations, 1), dedupe)
        with self._lock:
            self._cancel_timer(key)
            job = self._attachable(key)
            if job is not None:
                job.requests.append(reason)
                log.info("project %s: %s request joins job %s", key, reason, job.id)
            else:
                job = self._start(key, reason, request)
        self.records.save(job)
        return job

    def _attachable(self, key: str) -> Job | None:
        """The job a new request of `key` joins: one that has not started reading data. Needs `_lock`."""
        followup = self._followup.get(key)
        if followup is not None:
            return followup
        running = self._running.get(key)
        if running is not None and running.active and running.fetch_started is None:
            return running
        return None

    def _start(self, key: str, reason: str, request: _Request) -> Job:
        """Create a job; it runs now, or after the running job of its project. Needs `_lock`."""
        job = Job(project=key, reason=reason)
        running = self._running.get(key)
        previous = self._threads.get(running.id) if running is not None and running.active else None
        if previous is None:
            self._running[key] = job
        else:
            self._followup[key] = job
            log.info("project %s: job %s queued behind job %s", key, job.id, running.id)
        thread = threading.Thread(target=self._run, name=f"finetune-{key}-{job.id}", daemon=True,
                                  args=(job, previous, request))
        self._jobs[job.id] = self._latest[key] = job
        self._threads[job.id] = thread
        thread.start()
        return job

    def handle_event(self, action: str, project: str | int, fetch: FetchFn, serving: ServingFn,
                     vocab: Any) -> dict[str, Any]:
        """Apply the training policy to a Label Studio event; returns what was decided (for the response)."""
        key = str(project)
        if action == START_TRAINING:
            job = self.submit(key, fetch, serving, vocab, reason=action, min_annotations=1, dedupe=True)
            status = "started" if job.requests == [action] else "attached"
            return {"status": status, "job": job.id}
        reason = self.ignored_reason(action)
        if reason is not None:
            return {"status": "ignored", "reason": reason}
        request = _Request(fetch, serving, vocab, max(self.policy.min_annotations, 1), True)
        with self._lock:
            self._last_event[key] = time.time()
            seq = self._event_seq[key] = self._event_seq.get(key, 0) + 1
            fire = functools.partial(self._annotations_settled, key, action, request, seq)
            self._cancel_timer(key)
            if self.policy.debounce_seconds > 0:
                timer = self._timer(self.policy.debounce_seconds, fire)
                timer.daemon = True
                self._timers[key] = timer
                timer.start()
                return {"status": "scheduled", "in_seconds": self.policy.debounce_seconds,
                        "min_annotations": self.policy.min_annotations}
        job = fire()
        return {"status": "started", "job": job.id}

    def ignored_reason(self, action: str) -> str | None:
        """Why the Label Studio event `action` asks for no fine-tune under the policy; None when it asks for one."""
        if action == START_TRAINING:
            return None
        if action not in ANNOTATION_EVENTS:
            return f"event {action} does not train"
        if not self.policy.on_annotation:
            return "training on annotation events is off (ODISE_TRAIN_ON_ANNOTATION)"
        return None

    def _annotations_settled(self, key: str, action: str, request: _Request, seq: int) -> Job:
        """The debounce ended: join the running job if it read its data after the last event, else submit."""
        with self._lock:
            if self._event_seq.get(key) == seq:
                self._timers.pop(key, None)
            running = self._running.get(key)
            covered = (running is not None and running.active and key not in self._followup
                       and running.fetch_started is not None
                       and running.fetch_started >= self._last_event.get(key, 0.0))
            if covered:
                running.requests.append(action)
        if covered:
            log.info("project %s: job %s already read the annotations of these events", key, running.id)
            self.records.save(running)
            return running
        return self.submit(key, request.fetch, request.serving, request.vocab, reason=action,
                           min_annotations=request.min_annotations, dedupe=request.dedupe)

    def _cancel_timer(self, key: str) -> None:
        """Drop a pending debounce: a job that starts reading data later covers its events. Needs `_lock`."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    # ---------------------------------------------------------------- queries
    def status(self, project: str | int) -> dict[str, Any]:
        """Progress payload: the latest job, a queued follow-up, pending debounce, serving and stored versions."""
        key = str(project)
        with self._lock:
            job = self._latest.get(key)
            followup = self._followup.get(key)
            pending = key in self._timers
        return {"project": key, "job": job.as_dict() if job else None,
                "followup": followup.id if followup else None, "scheduled": pending,
                "current_version": self.store.current(key), "versions": self.store.versions(key)}

    def job(self, project: str | int) -> Job | None:
        """The newest job of `project` in this process."""
        return self._latest.get(str(project))

    def find(self, job_id: str) -> Job | None:
        """Any job handed out by this process or (from its record) by an earlier one; None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None else self.records.load(job_id)

    def current_version(self, project: str | int) -> str | None:
        return self.store.current(project)

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel pending timers and unfinished jobs, and wait for their threads to end.

        Call it before the process exits: a job thread still alive at interpreter exit is killed
        inside native code, which aborts the process ("terminate called without an active exception").
        """
        with self._lock:
            for t in self._timers.values():
                t.cancel()
            self._timers.clear()
            jobs, threads = list(self._jobs.values()), list(self._threads.values())
        for j in jobs:
            j.cancel()
        for t in threads:
            t.join(timeout)

    # ---------------------------------------------------------------- the job
    def _run(self, job: Job, previous: threading.Thread | None, request: _Request) -> None:
        with job_outcome(job, self.records, lambda: "cancelled: the backend is shutting down"):
            if previous is not None:
                previous.join()
            with self._training_slot(job):
                with self._lock:
                    job.check()
                    self._running[job.project] = job
                    if self._followup.get(job.project) is job:
                        del self._followup[job.project]
                    job.state, job.fetch_started = "fetching", time.time()
                self.records.save(job)
                data = request.fetch(self.policy.holdout_fraction)
                job.check()
                if self._skip(job, data, request):
                    return
                self._train_and_judge(job, data, request)

    @contextmanager
    def _training_slot(self, job: Job) -> Iterator[None]:
        """Hold the project's cross-process training lock; wait (cancellably) while another process has it."""
        lock = training_lock(self.store.root, job.project)
        while True:
            try:
                lock.acquire(timeout=LOCK_POLL_SECONDS)
                break
            except Timeout:
                job.check()
            if not job.message:
                job.message = "waiting: another backend process sharing MODEL_DIR is training this project"
                log.info("project %s job %s waits for another process's fine-tune", job.project, job.id)
        try:
            job.message = ""
            yield
        finally:
            lock.release()

    def _skip(self, job: Job, data: TrainingData, request: _Request) -> bool:
        """End the job as "skipped" when there is too little data or only data already trained on."""
        if data.count < request.min_annotations or not data.train:
            job.message = (f"{data.count} usable annotated tasks ({len(data.train)} for training); "
                           f"need at least {request.min_annotations}")
        elif request.dedupe and data.fingerprint is not None:
            same = self._trained_on(job.project, data.fingerprint)
            if same is None:
                return False
            job.same_data_as, version = same
            job.message = (f"no new annotations since job {job.same_data_as} trained {version} on the same "
                           f"{data.count} tasks; nothing to train")
        else:
            return False
        job.state = "skipped"
        log.info("project %s job %s skipped: %s", job.project, job.id, job.message)
        return True

    def _trained_on(self, project: str, fingerprint: str) -> tuple[str, str] | None:
        """(job id, version) of the project's latest fine-tune if it was trained on data `fingerprint`."""
        versions = self.store.versions(project)
        if not versions:
            return None
        meta = self.store.metadata(project, versions[-1])
        if (meta.get("data") or {}).get("fingerprint") != fingerprint:
            return None
        return str(meta.get("job")), versions[-1]

    def _judge(self, job: Job, candidate: Any, data: TrainingData, request: _Request
               ) -> tuple[str | None, EvalResult | None, EvalResult | None]:
        """(baseline version, its held-out figures, the candidate's): the baseline is the version
        serving at judgement time, re-evaluated if another promotion lands while it is evaluated."""
        if not data.holdout:
            return self.store.current(job.project), None, None
        after = evaluate_model(candidate, data.holdout, request.vocab, self.model_lock)
        for _ in range(JUDGE_ATTEMPTS):
            job.check()
            version, serving = request.serving()
            before = evaluate_model(serving, data.holdout, request.vocab, self.model_lock)
            if self.store.current(job.project) == version:
                break
            log.info("project %s job %s: serving version changed while judging; judging again", job.project, job.id)
        return version, before, after

    def _train_and_judge(self, job: Job, data: TrainingData, request: _Request) -> None:
        job.state = "training"
        self.records.save(job)
        t0 = time.perf_counter()
        parent, start = request.serving()
        candidate = copy_sharing_frozen(start)
        self.finetune_fn(candidate, data, request.vocab, job, self.model_lock)
        job.check()
        trained = sorted(set(getattr(start, "trained_classes", set())) | set(request.vocab.names))
        candidate.trained_classes = set(trained)
        train_seconds = time.perf_counter() - t0
        job.state = "evaluating"
        self.records.save(job)
        baseline, before, after = self._judge(job, candidate, data, request)
        job.check()
        promote = after is not None and before is not None and is_better(after, before)
        job.metrics = {"baseline_version": baseline, "holdout_before": before.as_dict() if before else None,
                       "holdout_after": after.as_dict() if after else None, "train_seconds": round(train_seconds, 2)}
        job.state = "saving"
        config = model_config(candidate)
        meta = {
            "base_preset": config.get("name"), "parent_version": parent,
            "baseline": {"version": baseline, "holdout": job.metrics["holdout_before"]},
            "vocabulary": list(request.vocab.names), "is_thing": [bool(t) for t in request.vocab.is_thing],
            "trained_classes": trained,
            "data": {"train": len(data.train), "holdout": len(data.holdout), "fingerprint": data.fingerprint,
                     "train_task_ids": data.train_task_ids, "holdout_task_ids": data.holdout_task_ids,
                     "skipped": dict(data.skipped)},
            "eval": job.metrics, "better_than_serving": promote, "promoted": False,
            "reason": job.reason, "requests": list(job.requests), "job": job.id,
        }
        job.version = self.store.write(job.project, candidate.trainable_state_dict(), meta, config=config)
        job.promoted = promote
        against = baseline or "the base model"
        figures = (f"held-out PQ {after.pq:.2f} vs {before.pq:.2f} of serving {against}, mIoU {after.miou:.2f} vs "
                   f"{before.miou:.2f}" if after and before else "no held-out tasks to compare on")
        if promote:
            self.store.promote(job.project, job.version)
            job.message = f"promoted {job.version}: {figures}"
            if self.on_promoted is not None:
                self.on_promoted(job.project, job.version)
        else:
            job.message = f"kept {job.version} without promoting it: {figures}"
        log.info("project %s job %s: %s", job.project, job.id, job.message)
        job.state = "done"
