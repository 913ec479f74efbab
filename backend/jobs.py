"""Background fine-tune jobs and the model versions they write.

On disk, per project:
    MODEL_DIR/<project>/<version>/weights.pt      trainable state dict of the fine-tuned model
    MODEL_DIR/<project>/<version>/metadata.json   base preset, vocabulary, data counts, eval figures
    MODEL_DIR/<project>/CURRENT                   name of the promoted (serving) version
A version directory is written under a temporary name and renamed with `os.replace`, and CURRENT
is replaced the same way, so a crash or `kill -9` at any moment leaves either the old or the new
state, never a partial one; leftover temporary directories are removed on start.

Jobs run in a thread (PyTorch releases the GIL, so predictions keep being served by the last
promoted model), one per project: a newer request cancels the running job of that project.
A finished fine-tune is promoted only if its PQ on the held-out annotations beats the serving
model's (at equal PQ, its mIoU must); otherwise it is kept on disk, not promoted, and the figures
are logged.

Webhook policy (env vars): START_TRAINING always trains; ANNOTATION_CREATED/UPDATED train when
ODISE_TRAIN_ON_ANNOTATION is true (default), after ODISE_TRAIN_DEBOUNCE seconds without a
further event (default 30), and only with at least ODISE_TRAIN_MIN_ANNOTATIONS usable annotated
tasks (default 8). The fine-tune's steps, learning rate, batch size, augmented views per image
and points per mask come from ODISE_TRAIN_STEPS / _LR / _BATCH / _VIEWS / _POINTS when set.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backend.training_data import TrainingData
from odise_core.predictor import ODISEPredictor
from odise_core.tools.evaluation import EvalResult, Evaluator
from odise_core.types import Segment

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
TMP_PREFIX = ".tmp-"
WEIGHTS = "weights.pt"
METADATA = "metadata.json"
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
ACTIVE_STATES = ("queued", "fetching", "training", "evaluating", "saving")


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class TrainPolicy:
    """When webhooks start training; defaults from env vars (see the module docstring)."""

    on_annotation: bool = field(default_factory=lambda: _env_bool("ODISE_TRAIN_ON_ANNOTATION", True))
    min_annotations: int = field(default_factory=lambda: int(os.environ.get("ODISE_TRAIN_MIN_ANNOTATIONS", "8")))
    debounce_seconds: float = field(default_factory=lambda: float(os.environ.get("ODISE_TRAIN_DEBOUNCE", "30")))
    holdout_fraction: float = field(default_factory=lambda: float(os.environ.get("ODISE_HOLDOUT_FRACTION", "0.2")))


class JobCancelled(Exception):
    """Raised inside a job when a newer request for the same project superseded it."""


@dataclass
class Job:
    """One fine-tune run; `as_dict()` is the progress payload of the status endpoint and CLI."""

    project: str
    reason: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"  # queued fetching training evaluating saving | done cancelled failed skipped
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    message: str = ""
    version: str | None = None
    promoted: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def cancel(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it did within `timeout`."""
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "project": self.project, "reason": self.reason, "state": self.state,
            "step": self.step, "total_steps": self.total_steps,
            "progress": round(self.step / self.total_steps, 4) if self.total_steps else 0.0,
            "loss": self.loss, "message": self.message, "version": self.version, "promoted": self.promoted,
            "metrics": self.metrics, "created": _iso(self.created),
            "finished": _iso(self.finished) if self.finished else None,
        }


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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

    def write(self, project: str | int, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
        """Write a new version atomically and return its name (not promoted)."""
        d = self.project_dir(project)
        d.mkdir(parents=True, exist_ok=True)
        version = self.next_version(project)
        tmp = d / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / WEIGHTS)
            with open(tmp / WEIGHTS, "rb+") as f:
                os.fsync(f.fileno())
            meta = {**metadata, "version": version, "project": str(project),
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            _write_file(tmp / METADATA, json.dumps(meta, indent=2, default=_json_default).encode())
            _fsync_dir(tmp)
            os.replace(tmp, d / version)
            _fsync_dir(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def promote(self, project: str | int, version: str) -> None:
        """Point CURRENT at `version` (atomically)."""
        self.metadata(project, version)
        d = self.project_dir(project)
        tmp = d / f"{TMP_PREFIX}{CURRENT}-{uuid.uuid4().hex[:8]}"
        _write_file(tmp, version.encode())
        os.replace(tmp, d / CURRENT)
        _fsync_dir(d)
        log.info("project %s now serves model version %s", project, version)

    def rollback(self, project: str | int, version: str | None = None) -> str | None:
        """Serve `version`, or else the newest earlier version that was promoted (None = base model)."""
        if version is not None:
            self.promote(project, version)
            self.mark_promoted(project, version)
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
            _fsync_dir(d)
        log.info("project %s now serves the base model", project)

    def load_state_dict(self, project: str | int, version: str) -> dict[str, torch.Tensor]:
        self.metadata(project, version)
        return torch.load(self.project_dir(project) / version / WEIGHTS, map_location="cpu", weights_only=True)

    def mark_promoted(self, project: str | int, version: str) -> None:
        """Record in the version's metadata that it was promoted (used by rollback)."""
        d = self.project_dir(project) / version
        meta = self.metadata(project, version)
        meta["promoted"] = True
        tmp = d / f"{TMP_PREFIX}{METADATA}"
        _write_file(tmp, json.dumps(meta, indent=2, default=_json_default).encode())
        os.replace(tmp, d / METADATA)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, float) and np.isnan(obj):
        return None
    return str(obj)


SHARED_SUBMODULES = ("backbone", "clip")


def network_of(model: Any) -> Any:
    """The network a fine-tune trains: an ODISEPredictor's model, else `model` itself (stand-ins in tests)."""
    return model.model if isinstance(model, ODISEPredictor) else model


def clone_for_training(model: Any) -> Any:
    """Copy of `model` (a network, or a predictor over one) whose heads are independent but whose
    frozen parts are shared, not copied.

    The backbone (SD + captioner, not trained by the fine-tune), CLIP, the text-embedding cache and
    every frozen parameter/buffer are the same objects as in `model`, so a fine-tune costs only
    the memory of the heads and the serving model is never modified.
    """
    if isinstance(model, ODISEPredictor):
        return ODISEPredictor(clone_for_training(model.model))
    memo: dict[int, Any] = {}
    frozen_prefixes = tuple(getattr(model, "FROZEN_PREFIXES", ()))
    for name in SHARED_SUBMODULES + ("text_cache",):
        if hasattr(model, name):
            memo[id(getattr(model, name))] = getattr(model, name)
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(frozen_prefixes):
            memo[id(p)] = p
    for name, b in model.named_buffers():
        if name.startswith(frozen_prefixes):
            memo[id(b)] = b
    return copy.deepcopy(model, memo)


def ground_truth_segments(sample: Any, is_thing: Any) -> list[Segment]:
    """A TrainSample's masks as ground-truth Segments."""
    flags = [bool(t) for t in is_thing]
    return [Segment(np.asarray(m, dtype=bool), int(c), 1.0, flags[int(c)]) for m, c in zip(sample.masks, sample.classes)]


def instances_from_raw(raw: Any, is_thing: torch.Tensor, max_instances: int = 100) -> list[Segment]:
    """Scored, possibly overlapping thing instances (for mask AP) from a panoptic RawPrediction."""
    from odise_core.postprocess import instance_inference

    logits = raw.mask_logits.float()
    if tuple(logits.shape[-2:]) != tuple(raw.image_size):
        logits = torch.nn.functional.interpolate(logits[None], size=tuple(raw.image_size), mode="bilinear",
                                                 align_corners=False)[0]
    return instance_inference(raw.class_probs.float(), logits, is_thing, max_instances)


def evaluate_model(model: Any, samples: list[Any], vocab: Any, lock: Any = None) -> EvalResult:
    """PQ / mask AP / mIoU of `model` on samples: one panoptic forward pass per image, whose
    per-query outputs also give the scored instances for mask AP. `lock` is held around each pass.
    """
    flags = [bool(t) for t in vocab.is_thing]
    is_thing = torch.as_tensor(flags, dtype=torch.bool)
    ev = Evaluator(list(vocab.names), flags)
    for s in samples:
        with lock if lock is not None else contextlib.nullcontext():
            raw = model.predict_raw(s.image, vocab, mode="panoptic")
        ev.add(raw.segments, ground_truth_segments(s, flags), instances=instances_from_raw(raw, is_thing))
    return ev.summarize()


def is_better(after: EvalResult, before: EvalResult) -> bool:
    """The promotion rule: higher held-out PQ; at equal PQ (e.g. both 0 early on), higher mIoU."""
    def key(r: EvalResult) -> tuple[float, float]:
        return tuple(-1.0 if v != v else v for v in (r.pq, r.miou))

    return key(after) > key(before)


FetchFn = Callable[[float], TrainingData]


TRAIN_ENV = {"ODISE_TRAIN_STEPS": ("steps", int), "ODISE_TRAIN_LR": ("lr", float),
             "ODISE_TRAIN_BATCH": ("batch_size", int), "ODISE_TRAIN_VIEWS": ("views_per_image", int),
             "ODISE_TRAIN_POINTS": ("num_points", int)}


def default_finetune_options() -> Any:
    """FinetuneOptions, with the fields named in TRAIN_ENV taken from those env vars when set."""
    from odise_core.training.finetune import FinetuneOptions

    opts = FinetuneOptions()
    for env, (attr, kind) in TRAIN_ENV.items():
        if os.environ.get(env):
            setattr(opts, attr, kind(os.environ[env]))
    return opts


def run_finetune(model: Any, data: TrainingData, vocab: Any, job: Job, options: Any | None = None) -> Any:
    """Run odise_core.training.finetune on the job's training samples, reporting progress into `job`."""
    from odise_core.training.finetune import finetune

    def progress(step: int, total: int, loss: float) -> None:
        job.step, job.total_steps, job.loss = int(step), int(total), float(loss)

    opts = options if options is not None else default_finetune_options()
    job.total_steps = opts.steps
    return finetune(network_of(model), data.train, opts, progress=progress, should_stop=job._stop.is_set, vocab=vocab)


class JobManager:
    """Runs fine-tunes in the background, one per project, and manages their model versions.

    `finetune_fn(model, data, vocab, job)` trains `model` in place; the default runs
    odise_core.training.finetune with `default_finetune_options()` (use functools.partial(run_finetune,
    options=...) for others). `on_promoted(project, version)` is called after a promotion
    so the server can swap the model it serves.

    `model_lock` guards the frozen backbone that serving and training models share (its feature
    hooks are not re-entrant): jobs hold it for every forward pass they make, one image at a
    time, and the server must hold it around its own forward passes.
    """

    def __init__(self, model_dir: str | Path, policy: TrainPolicy | None = None,
                 finetune_fn: Callable[[Any, TrainingData, Any, Job], Any] = run_finetune,
                 on_promoted: Callable[[str, str], None] | None = None, base_preset: str | None = None,
                 model_lock: Any = None):
        self.store = VersionStore(model_dir)
        self.model_lock = model_lock if model_lock is not None else threading.Lock()
        self.policy = policy or TrainPolicy()
        self.finetune_fn = finetune_fn
        self.on_promoted = on_promoted
        self.base_preset = base_preset
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._timers: dict[str, threading.Timer] = {}

    # ---------------------------------------------------------------- requests
    def submit(self, project: str | int, fetch: FetchFn, model: Any, vocab: Any, reason: str = "START_TRAINING",
               min_annotations: int = 1) -> Job:
        """Start a fine-tune of `model` (the serving model; it is copied, never modified) in the background.

        `fetch(holdout_fraction)` returns the project's TrainingData. A running job of the same
        project is cancelled first; the new one starts once it has stopped.
        """
        key = str(project)
        self.store.project_dir(key)
        job = Job(project=key, reason=reason)
        with self._lock:
            previous = self._jobs.get(key)
            prev_thread = self._threads.get(key)
            if previous is not None and previous.active:
                log.info("project %s: cancelling job %s for a newer request", key, previous.id)
                previous.cancel()
            thread = threading.Thread(target=self._run, name=f"finetune-{key}-{job.id}", daemon=True,
                                      args=(job, prev_thread, fetch, model, vocab, min_annotations))
            self._jobs[key] = job
            self._threads[key] = thread
        thread.start()
        return job

    def handle_event(self, action: str, project: str | int, fetch: FetchFn, model: Any, vocab: Any) -> dict[str, Any]:
        """Apply the webhook policy to a Label Studio event; returns what was decided (for the response)."""
        key = str(project)
        if action == "START_TRAINING":
            job = self.submit(key, fetch, model, vocab, reason=action, min_annotations=1)
            return {"status": "started", "job": job.id}
        if action not in ANNOTATION_EVENTS:
            return {"status": "ignored", "reason": f"event {action} does not train"}
        if not self.policy.on_annotation:
            return {"status": "ignored", "reason": "training on annotation events is off (ODISE_TRAIN_ON_ANNOTATION)"}

        def fire() -> None:
            with self._lock:
                self._timers.pop(key, None)
            self.submit(key, fetch, model, vocab, reason=action, min_annotations=self.policy.min_annotations)

        with self._lock:
            pending = self._timers.pop(key, None)
            if pending is not None:
                pending.cancel()
            if self.policy.debounce_seconds <= 0:
                timer = None
            else:
                timer = threading.Timer(self.policy.debounce_seconds, fire)
                timer.daemon = True
                self._timers[key] = timer
        if timer is None:
            fire()
            return {"status": "started"}
        timer.start()
        return {"status": "scheduled", "in_seconds": self.policy.debounce_seconds,
                "min_annotations": self.policy.min_annotations}

    # ---------------------------------------------------------------- queries
    def status(self, project: str | int) -> dict[str, Any]:
        """Progress payload: the latest job (if any), pending debounce, serving and stored versions."""
        key = str(project)
        with self._lock:
            job = self._jobs.get(key)
            pending = key in self._timers
        return {"project": key, "job": job.as_dict() if job else None, "scheduled": pending,
                "current_version": self.store.current(key), "versions": self.store.versions(key)}

    def job(self, project: str | int) -> Job | None:
        return self._jobs.get(str(project))

    def find(self, job_id: str) -> Job | None:
        """The latest job of any project with this id (older jobs are forgotten), or None."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.id == job_id), None)

    def current_version(self, project: str | int) -> str | None:
        return self.store.current(project)

    def load_version(self, model: Any, project: str | int, version: str | None = None) -> str | None:
        """Load `version` (default: the promoted one) into `model`: its trainable weights and the class
        names it was trained on (`model.trained_classes`). Returns the version, None for the base model."""
        version = version or self.store.current(project)
        if version is not None:
            model.load_trainable_state_dict(self.store.load_state_dict(project, version))
            if hasattr(model, "trained_classes"):
                model.trained_classes = set(self.store.metadata(project, version).get("trained_classes") or ())
        return version

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel pending timers and running jobs and wait for them."""
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
    def _check(self, job: Job) -> None:
        if job._stop.is_set():
            raise JobCancelled()

    def _lock_feature_extraction(self, candidate: Any) -> None:
        """Make the candidate's backbone passes (feature caching in the fine-tune) hold `model_lock`."""
        extract = getattr(candidate, "extract_features", None)
        if extract is None:
            return
        lock = self.model_lock

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return extract(*args, **kwargs)

        object.__setattr__(candidate, "extract_features", locked)

    def _run(self, job: Job, previous: threading.Thread | None, fetch: FetchFn, model: Any, vocab: Any,
             min_annotations: int) -> None:
        try:
            if previous is not None:
                previous.join()
            self._check(job)
            job.state = "fetching"
            data = fetch(self.policy.holdout_fraction)
            self._check(job)
            if data.count < max(min_annotations, 1) or not data.train:
                job.state = "skipped"
                job.message = (f"{data.count} usable annotated tasks ({len(data.train)} for training); "
                               f"need at least {max(min_annotations, 1)}")
                log.info("project %s job %s skipped: %s", job.project, job.id, job.message)
                return
            job.state = "training"
            t0 = time.perf_counter()
            candidate = clone_for_training(model)
            self._lock_feature_extraction(network_of(candidate))
            try:
                self.finetune_fn(candidate, data, vocab, job)
            finally:  # evaluation below holds the lock around whole passes itself
                vars(network_of(candidate)).pop("extract_features", None)
            self._check(job)
            trained = sorted(set(getattr(model, "trained_classes", set())) | set(vocab.names))
            if hasattr(candidate, "trained_classes"):
                candidate.trained_classes = set(trained)
            train_seconds = time.perf_counter() - t0
            job.state = "evaluating"
            after = evaluate_model(candidate, data.holdout, vocab, self.model_lock) if data.holdout else None
            self._check(job)
            before = evaluate_model(model, data.holdout, vocab, self.model_lock) if data.holdout else None
            self._check(job)
            promote = after is not None and before is not None and is_better(after, before)
            job.metrics = {"holdout_before": before.as_dict() if before else None,
                           "holdout_after": after.as_dict() if after else None,
                           "train_seconds": round(train_seconds, 2)}
            job.state = "saving"
            parent = self.store.current(job.project)
            meta = {
                "base_preset": self.base_preset or getattr(getattr(model, "cfg", None), "name", None),
                "parent_version": parent,
                "vocabulary": list(vocab.names), "is_thing": [bool(t) for t in vocab.is_thing],
                "trained_classes": trained,
                "data": {"train": len(data.train), "holdout": len(data.holdout),
                         "train_task_ids": data.train_task_ids, "holdout_task_ids": data.holdout_task_ids,
                         "skipped": dict(data.skipped)},
                "eval": job.metrics, "better_than_serving": promote, "promoted": False,
                "reason": job.reason, "job": job.id,
            }
            job.version = self.store.write(job.project, candidate.trainable_state_dict(), meta)
            job.promoted = promote
            figures = (f"held-out PQ {after.pq:.2f} vs serving {before.pq:.2f}, mIoU {after.miou:.2f} vs "
                       f"{before.miou:.2f}" if after and before else "no held-out tasks to compare on")
            if promote:
                self.store.promote(job.project, job.version)
                self.store.mark_promoted(job.project, job.version)
                job.message = f"promoted {job.version}: {figures}"
                if self.on_promoted is not None:
                    self.on_promoted(job.project, job.version)
            else:
                job.message = f"kept {job.version} without promoting it: {figures}"
            log.info("project %s job %s: %s", job.project, job.id, job.message)
            job.state = "done"
        except JobCancelled:
            job.state = "cancelled"
            job.message = "cancelled by a newer request"
            log.info("project %s job %s cancelled", job.project, job.id)
        except Exception as exc:  # a failed job must not take the server down; it is reported instead
            job.state = "failed"
            job.message = f"{type(exc).__name__}: {exc}"
            log.exception("project %s job %s failed", job.project, job.id)
        finally:
            job.finished = time.time()
            job._done.set()
