"""Flask app factory: the HTTP protocol Label Studio 1.23 speaks to an ML backend.

GET  /, /health  liveness + model state (always 200 so Label Studio can connect while loading)
POST /setup      validate the project's label config, return {"model_version"}
POST /predict    {"tasks", "label_config", "project", "params": {"context"}} -> {"results": [one entry per task],
                 "model_version"}; a smart-tool context gets the region it points at (backend/interactive.py)
POST /webhook    Label Studio webhooks; training events start fine-tune jobs
POST /train      legacy training request (same as the START_TRAINING webhook)
POST /job_status status of a project's training job
GET  /versions   model versions available to a project
GET  /metrics    request counters and timings

Errors are JSON {"error": message} with 400 (bad request/config), 401 (basic auth), 404, 405,
500, and 503 + Retry-After while the model loads. gunicorn: `gunicorn 'backend.app:create_app()'`
with one worker and several threads (each worker holds its own model).
"""
from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.label_config import LabelConfigError
from backend.model import BackendSettings, ModelLoadFailed, ModelNotReady, ODISEBackend, project_id_of

log = logging.getLogger(__name__)


class _Metrics:
    """Thread-safe counters exposed at /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.tasks = 0
        self.task_errors = 0
        self.predict_seconds = 0.0

    def count(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
            if status >= 400:
                self.errors[endpoint] = self.errors.get(endpoint, 0) + 1

    def predicted(self, tasks: int, errors: int, seconds: float) -> None:
        with self._lock:
            self.tasks += tasks
            self.task_errors += errors
            self.predict_seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"uptime_seconds": round(time.time() - self.started, 1), "requests": dict(self.requests),
                    "errors": dict(self.errors), "tasks_predicted": self.tasks, "task_errors": self.task_errors,
                    "seconds_per_task": round(self.predict_seconds / self.tasks, 4) if self.tasks else None}


def _error(message: str, status: int, **headers: str) -> Response:
    """JSON error; the message is also the HTTP reason phrase, the only part Label Studio shows its users."""
    response = jsonify({"error": message, "status": status})
    reason = " ".join(message.encode("ascii", "replace").decode().split())[:300]
    response.status = f"{status} {reason}" if reason else str(status)
    response.headers.update(headers)
    return response


def _json_body() -> dict:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise _BadRequest("the request body must be a JSON object")
    return data


class _BadRequest(ValueError):
    pass


def create_app(backend: ODISEBackend | None = None, settings: BackendSettings | None = None,
               basic_auth: tuple[str, str] | None = None, load: bool = True) -> Flask:
    """The WSGI app; builds an ODISEBackend from env vars unless one is given and starts loading its model."""
    if backend is None:
        backend = ODISEBackend(settings or BackendSettings.from_env())
        if load:
            backend.start_loading(background=True)
    if basic_auth is None and os.environ.get("BASIC_AUTH_USER") and os.environ.get("BASIC_AUTH_PASS"):
        basic_auth = (os.environ["BASIC_AUTH_USER"], os.environ["BASIC_AUTH_PASS"])
    app = Flask("odise-label-studio")
    app.config["backend"] = backend
    metrics = _Metrics()
    app.config["metrics"] = metrics

    @app.before_request
    def _check_auth() -> Response | None:
        if basic_auth is None:
            return None
        auth = request.authorization
        ok = auth is not None and auth.username is not None and auth.password is not None and \
            hmac.compare_digest(auth.username, basic_auth[0]) and hmac.compare_digest(auth.password, basic_auth[1])
        if ok:
            return None
        return _error("basic authentication required: set the same user/password in the Label Studio model "
                      "connection", 401, **{"WWW-Authenticate": 'Basic realm="odise-label-studio"'})

    @app.after_request
    def _count(response: Response) -> Response:
        metrics.count(request.endpoint or "unknown", response.status_code)
        return response

    @app.errorhandler(_BadRequest)
    @app.errorhandler(LabelConfigError)
    def _bad_request(e: Exception) -> Response:
        return _error(str(e), 400)

    @app.errorhandler(ModelNotReady)
    def _not_ready(e: ModelNotReady) -> Response:
        return _error(str(e), 503, **{"Retry-After": str(e.retry_after)})

    @app.errorhandler(ModelLoadFailed)
    def _load_failed(e: ModelLoadFailed) -> Response:
        return _error(str(e), 500)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Response:
        return _error(e.description or e.name, e.code or 500)

    @app.errorhandler(Exception)
    def _internal(e: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return _error(f"internal error: {type(e).__name__}: {e}", 500)

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        body = {"status": "UP", "model_class": "ODISEBackend", "model_state": backend.state.value,
                "preset": backend.settings.preset}
        if backend.base_version:
            body["model_version"] = backend.base_version
        if backend.error:
            body["error"] = backend.error
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        data = _json_body()
        schema = data.get("schema") or data.get("label_config")
        if not isinstance(schema, str):
            raise _BadRequest('"schema" (the project label config) is required')
        version = backend.setup(data.get("project"), schema, hostname=data.get("hostname"),
                                access_token=data.get("access_token"))
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict() -> Response:
        data = _json_body()
        tasks = data.get("tasks")
        label_config = data.get("label_config")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise _BadRequest('"tasks" must be a list of task objects')
        if not isinstance(label_config, str):
            raise _BadRequest('"label_config" is required')
        t0 = time.perf_counter()
        params = data.get("params")
        context = params.get("context") if isinstance(params, dict) else None
        results, version = backend.predict(tasks, label_config, data.get("project"), context=context)
        metrics.predicted(len(tasks), sum("error" in r for r in results), time.perf_counter() - t0)
        return jsonify({"results": results, "model_version": version})

    @app.post("/webhook")
    def webhook() -> Response:
        data = _json_body()
        event = data.get("action")
        if not isinstance(event, str):
            raise _BadRequest('webhook payload needs an "action"')
        try:
            return jsonify(backend.handle_webhook(event, data))
        except ValueError as e:
            raise _BadRequest(str(e)) from e

    @app.post("/train")
    def train() -> Response:
        data = _json_body()
        project = {"id": project_id_of(data.get("project")), "label_config": data.get("label_config")}
        try:
            return jsonify(backend.handle_webhook("START_TRAINING", {"project": project})), 201
        except ValueError as e:
            raise _BadRequest(str(e)) from e

    @app.post("/job_status")
    def job_status() -> Response:
        data = _json_body()
        job = backend.find_job(str(data.get("job") or ""))
        if job is None:
            return _error(f"no training job {data.get('job')!r}", 410)
        body = job.as_dict()
        body["job_status"] = {"done": "finished"}.get(job.state, job.state)
        return jsonify(body)

    @app.get("/versions")
    def versions() -> Response:
        return jsonify({"versions": backend.versions(request.args.get("project"))})

    @app.get("/metrics")
    def get_metrics() -> Response:
        return jsonify({**metrics.as_dict(), "model_state": backend.state.value,
                        "model_load_seconds": backend.load_seconds,
                        "image_cache": {"hits": backend.fetcher.hits, "misses": backend.fetcher.misses}})

    return app
