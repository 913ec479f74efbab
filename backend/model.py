"""The ML backend: setup / predict / fit (webhook) on top of ODISE.

Configured by `backend.settings.BackendSettings` (flags > environment > defaults; its module
docstring lists the variables). The model version names everything that changes predictions:
the preset, the trainable weights and a digest of the result-shaping settings.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from enum import Enum
from typing import Any, Callable

from backend.interactive import InteractionError, parse_context
from backend.interactive_predict import InteractivePredictor
from backend.learning import JobManager, ServingModels, run_finetune
from backend.learning.refresh import RefreshManager, refresh_project
from backend.label_config import ImageTarget, LabelConfigError, ProjectConfig, parse_label_config
from backend.ls_format import image_regions, task_score
from backend.query_cache import QueryStateCache
from backend.settings import BackendSettings, build_model
from backend.tasks import ImageFetcher, ImageFetchError
from odise_core.types import RawPrediction

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelNotReady(RuntimeError):
    """The model is still loading; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 10):
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadFailed(RuntimeError):
    """Loading the model failed for good (e.g. weights missing); the message says how to fix it."""


def weights_digest(model: Any) -> str:
    """Short hash of the trainable weights: the model version changes whenever they do."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def base_model_version(settings: BackendSettings, model: Any) -> str:
    """The base model's version: preset, fast marker, trainable-weights digest and result-settings digest.

    Stable across restarts with the same weights and settings; changes whenever either would change
    the predictions. Fine-tunes append "+<project>-vNNNN".
    """
    fast = "-fast" if settings.fast else ""
    return f"odise-{settings.preset}{fast}-{weights_digest(model)}-s{settings.results_digest()}"


def version_name(base: str, project: str | None, version: str | None) -> str:
    """A served model version: the base version, plus "+<project>-<version>" for a project's fine-tune."""
    return base if version is None else f"{base}+{project}-{version}"


def project_id_of(project: Any) -> str | None:
    """Label Studio sends the project as "<id>.<created timestamp>" (or a webhook dict with "id")."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or project == "":
        return None
    return str(project).split(".", 1)[0]


class ODISEBackend:
    """Loads ODISE in the background and turns Label Studio tasks into predictions.

    Forward passes are serialised by a lock (one model, CPU/GPU bound); fine-tuning runs in
    backend.learning JobManager threads on copies, so predictions keep being served while a project trains.
    """

    def __init__(self, settings: BackendSettings | None = None,
                 model_factory: Callable[[BackendSettings], Any] | None = None):
        self.settings = settings or BackendSettings.from_env()
        self._factory = model_factory or build_model
        self.fetcher = ImageFetcher(self.settings.label_studio_url, self.settings.api_key,
                                    timeout=(5.0, self.settings.image_timeout),
                                    max_bytes=int(self.settings.max_image_mb * 2 ** 20),
                                    allow_local_paths=self.settings.allow_local_paths)
        self._predict_lock = threading.Lock()
        self.jobs = JobManager(self.settings.model_dir, policy=self.settings.policy,
                               finetune_fn=functools.partial(run_finetune, options=self.settings.finetune),
                               on_promoted=self._on_promoted, model_lock=self._predict_lock)
        self.serving = ServingModels(self.jobs.store, self._require_model)
        self.refresher = RefreshManager(self.settings.model_dir, self.jobs.records, self._run_refresh)
        self.interactive = InteractivePredictor(QueryStateCache(int(self.settings.interactive_cache_mb * 2 ** 20)),
                                                self._task_image, self._predict_lock, self.settings.result)
        self.state = ModelState.LOADING
        self.error: str | None = None
        self.model: Any = None
        self.base_version: str | None = None
        self._configs: OrderedDict[str, ProjectConfig] = OrderedDict()
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_started = 0.0
        self.load_seconds: float | None = None

    # ----------------------------------------------------------------- model lifecycle
    def start_loading(self, background: bool = True) -> None:
        """Build the model (in a daemon thread unless `background` is False)."""
        self._load_started = time.time()
        if background:
            threading.Thread(target=self._load, name="odise-load", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            model = self._factory(self.settings)
            version = base_model_version(self.settings, model)
            with self._lock:
                self.model = model
                self.base_version = version
                self.state = ModelState.READY
            self.load_seconds = time.time() - self._load_started
            log.info("model %s ready in %.1f s", self.base_version, self.load_seconds)
            self.resume_refreshes()
        except Exception as e:  # reported by /health, /setup and /predict rather than killing the server
            self.error = f"{type(e).__name__}: {e}"
            self.state = ModelState.FAILED
            log.error("model loading failed: %s", self.error)
        finally:
            self._loaded.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading ends; True when the model is ready."""
        self._loaded.wait(timeout)
        return self.state is ModelState.READY

    def _require_model(self) -> Any:
        if self.state is ModelState.READY:
            return self.model
        if self.state is ModelState.FAILED:
            raise ModelLoadFailed(f"the model could not be loaded: {self.error}")
        waited = time.time() - self._load_started
        raise ModelNotReady(f"the model is loading ({waited:.0f} s so far); retry shortly", retry_after=5)

    def model_for(self, project: str | None) -> tuple[str, Any]:
        """(model_version, model) serving `project`: its promoted fine-tune, else the base model."""
        version, model = self.serving.get(project)
        return self._version_name(version, project), model

    def _version_name(self, version: str | None, project: str | None) -> str:
        return version_name(self.base_version, project, version)

    def _on_promoted(self, project: str, version: str) -> None:
        self.serving.forget(project)
        self.interactive.cache.drop_project(str(project))
        log.info("project %s: next predictions use fine-tuned version %s", project, version)
        if self.settings.refresh_enabled(self.label_studio_known):
            self.refresher.start(project, reason=f"promoted {version}")

    # ----------------------------------------------------------------- refreshing stored predictions
    @property
    def label_studio_known(self) -> bool:
        """True once the Label Studio URL and key are known (settings or /setup)."""
        return bool(self.fetcher.ls_url and self.fetcher.auth)

    def start_refresh(self, project: Any, reason: str = "requested") -> Any:
        """Start refreshing `project`'s stored predictions to the version serving it (backend.learning.refresh)."""
        key = project_id_of(project)
        if not key:
            raise ValueError("refreshing needs a project id")
        if not self.label_studio_known:
            raise ValueError("refreshing predictions needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                             "(or a /setup call from Label Studio) to read and write them")
        self._require_model()
        return self.refresher.start(key, reason)

    def resume_refreshes(self) -> None:
        """Restart refreshes an earlier process (or a failure here) left unfinished, if refreshing is on."""
        if self.state is not ModelState.READY or not self.settings.refresh_enabled(self.label_studio_known):
            return
        for project in self.refresher.pending():
            self.refresher.start(project, reason="resumed")

    def _run_refresh(self, job: Any) -> None:
        if not self.label_studio_known:
            raise ValueError("Label Studio URL and key are unknown: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        refresh_project(self, self.fetcher.auth.client(), int(job.project), job=job)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop background work (refreshes, then fine-tunes) and wait for it; call before the process exits."""
        self.refresher.shutdown(timeout)
        self.jobs.shutdown(timeout)

    def model_version(self, project: str | None = None) -> str:
        """The version `project` is served with; cheap (no weights are loaded), as /setup must answer in 3 s."""
        self._require_model()
        return self._version_name(self.jobs.current_version(project) if project else None, project)

    # ----------------------------------------------------------------- protocol
    def parse_config(self, label_config: str) -> ProjectConfig:
        """Parsed label config, cached by its text."""
        with self._lock:
            cached = self._configs.get(label_config)
            if cached is not None:
                self._configs.move_to_end(label_config)
                return cached
        parsed = parse_label_config(label_config)
        with self._lock:
            self._configs[label_config] = parsed
            while len(self._configs) > 64:
                self._configs.popitem(last=False)
        return parsed

    def setup(self, project: Any, label_config: str, hostname: str | None = None,
              access_token: str | None = None) -> str:
        """Validate the project's config (LabelConfigError if unusable) and return the model version."""
        self.parse_config(label_config)
        self.fetcher.configure(hostname, access_token, from_setup=True)
        version = self.model_version(project_id_of(project))
        self.resume_refreshes()
        return version

    def predict(self, tasks: list[dict], label_config: str, project: Any = None,
                context: Any = None) -> tuple[list[dict], str]:
        """One prediction (or error entry without "result") per task, in order, and the model version.

        A `context` holding a smart-tool result (Label Studio's interactive-annotating call) is
        answered with the region it points at instead of the full prediction."""
        config = self.parse_config(label_config)
        project_id = project_id_of(project)
        version, model = self.model_for(project_id)
        try:
            interaction = parse_context(context)
        except InteractionError as e:
            return [{"error": str(e), "task": t.get("id"), "model_version": version} for t in tasks], version
        if interaction is None:
            return [self.predict_task(task, config, model, version) for task in tasks], version
        return [self.interactive.answer(task, config, model, version, interaction, project_id)
                for task in tasks], version

    def predict_task(self, task: dict, config: ProjectConfig, model: Any, version: str) -> dict:
        """Prediction of one task; any failure becomes an error entry so other tasks still get theirs."""
        task_id = task.get("id") if isinstance(task, dict) else None
        t0 = time.perf_counter()
        try:
            regions, raws = [], []
            for target in config.targets:
                raw = self._predict_image(task, target, model)
                raws.append(raw)
                regions.extend(image_regions(raw.segments, target.controls, target.label_of, self.settings.result))
            log.info("task %s: %d regions in %.2f s", task_id, len(regions), time.perf_counter() - t0)
            return {"result": regions, "score": task_score(raws), "model_version": version}
        except (ImageFetchError, LabelConfigError, ValueError) as e:
            log.warning("task %s: %s", task_id, e)
            return {"error": str(e), "task": task_id, "model_version": version}
        except Exception as e:  # a crash in one prediction must not fail the batch or the server
            log.exception("task %s: prediction crashed", task_id)
            return {"error": f"prediction failed: {type(e).__name__}: {e}", "task": task_id, "model_version": version}

    def _predict_image(self, task: dict, target: ImageTarget, model: Any) -> RawPrediction:
        image = self._task_image(task, target)
        with self._predict_lock:
            return model.predict_raw(image, target.vocabulary, mode=self.settings.mode)

    def _task_image(self, task: dict, target: ImageTarget) -> Any:
        """The decoded image `target` shows for `task`."""
        data = task.get("data") or {}
        url = data.get(target.data_key)
        if url is None and "$undefined$" in data:
            url = data["$undefined$"]
        if url is None:
            raise ValueError(f'task {task.get("id")} has no data field "{target.data_key}" '
                             f'needed by <Image name="{target.to_name}">')
        return self.fetcher.fetch(url, task_id=task.get("id"))

    # ----------------------------------------------------------------- training
    def handle_webhook(self, event: str, payload: dict) -> dict:
        """Forward training events to the job manager; events that do not train under the policy are
        acknowledged and ignored before anything else (model, config, credentials) is asked of them."""
        reason = self.jobs.ignored_reason(event)
        if reason is not None:
            return {"status": "ignored", "reason": reason}
        project = payload.get("project") or {}
        project_id = project_id_of(project)
        label_config = project.get("label_config") if isinstance(project, dict) else None
        if not project_id or not label_config:
            raise ValueError("webhook payload needs project.id and project.label_config")
        target = self.parse_config(label_config).targets[0]
        self._require_model()
        return self.jobs.handle_event(event, project_id, self._training_fetcher(int(project_id), target),
                                      lambda: self.serving.get(project_id), target.vocabulary)

    def find_job(self, job_id: str) -> Any:
        """The training or refresh job with this id (as returned by /webhook, /train, /refresh or a status
        payload), or None. Ids stay answerable for the server's lifetime, and after a restart from MODEL_DIR/.jobs."""
        return self.refresher.find(job_id) or self.jobs.find(job_id)

    def _training_fetcher(self, project_id: int, target: ImageTarget) -> Callable[[float], Any]:
        from backend.training_data import build_training_data, fetch_annotated_tasks

        if not (self.fetcher.ls_url and self.fetcher.auth):
            raise ValueError("training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read annotations")

        def fetch(holdout_fraction: float) -> Any:
            client = self.fetcher.auth.client()
            tasks = fetch_annotated_tasks(client, project_id)
            return build_training_data(
                tasks, target.vocabulary.names,
                lambda task: self._task_image(task, target),
                is_thing=[bool(t) for t in target.vocabulary.is_thing], holdout_fraction=holdout_fraction,
                from_names=[c.name for c in target.controls])

        return fetch

    def versions(self, project: Any) -> list[str]:
        """Model versions available to `project`: the base model and its stored fine-tunes."""
        base = self.base_version or f"odise-{self.settings.preset}"
        pid = project_id_of(project)
        stored = self.jobs.store.versions(pid) if pid else []
        return [base] + [f"{base}+{pid}-{v}" for v in stored]
