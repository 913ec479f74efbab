"""Flask app factory: the HTTP protocol Label Studio 1.23 speaks to an ML backend.

GET  /, /health  liveness + model state (always 200 so Label Studio can connect while loading)
POST /setup      validate the project's label config, return {"model_version"}
POST /predict    {"tasks", "label_config", "project", "params": {"context"}} -> {"results": [one entry per task],
                 "model_version"}; a smart-tool context gets the region it points at (backend/interactive.py)
POST /webhook    Label Studio webhooks; training events start fine-tune jobs
POST /train      legacy training request (same as the START_TRAINING webhook)
POST /refresh    {"project"}: re-predict the project's tasks stored with an older model version (also
                 started by every promotion when REFRESH_ON_PROMOTE allows it); answers the job
POST /job_status status of a training or refresh job
GET  /versions   model versions available to a project
GET  /metrics    request counters and timings

Errors are JSON {"error": message} with 400 (bad body, field or config), 401 (basic auth or webhook
secret), 404, 405, 413 (body over MAX_REQUEST_MB), 415 (not JSON), 500, and 503 + Retry-After while
the model loads. gunicorn: `gunicorn 'backend.app:create_app()'`
with one worker and several threads (each worker holds its own model).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.auth import WEBHOOK_SECRET_HEADER, WEBHOOK_SECRET_PARAM, RequestAuth
from backend.label_config import LabelConfigError
from backend.model import BackendSettings, ModelLoadFailed, ModelNotReady, ODISEBackend
from backend.protocol import (BadRequest, WebhookRequest, parse_json_object, project_id, read_job_status, read_predict,
                              read_refresh, read_setup, read_train, read_webhook)

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


def _json_body() -> dict[str, Any]:
    """The body as a JSON object; RequestEntityTooLarge past MAX_CONTENT_LENGTH, with or without Content-Length.

    Werkzeug refuses a Content-Length over the limit before reading, but stops a chunked body silently at
    the limit: a chunked body that fills the limit is refused here rather than parsed truncated.
    """
    body = request.stream.read()
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(body) >= limit:
        raise RequestEntityTooLarge()
    return parse_json_object(body, request.mimetype)


def create_app(backend: ODISEBackend | None = None, settings: BackendSettings | None = None,
               basic_auth: tuple[str, str] | None = None, webhook_secret: str | None = None,
               load: bool = True) -> Flask:
    """The WSGI app; builds an ODISEBackend from env vars unless one is given and starts loading its model.

    `basic_auth` and `webhook_secret` default to the backend's settings (BASIC_AUTH_USER/PASS, WEBHOOK_SECRET).
    """
    if backend is None:
        backend = ODISEBackend(settings or BackendSettings.from_env())
        if load:
            backend.start_loading(background=True)
    auth = RequestAuth(basic_auth or backend.settings.basic_auth, webhook_secret or backend.settings.webhook_secret)
    for warning in auth.warnings():
        log.warning("%s", warning)
    if auth.webhook_secret and not auth.enabled:
        log.warning("WEBHOOK_SECRET is set without BASIC_AUTH_USER/BASIC_AUTH_PASS: every endpoint is open anyway")
    limit_mb = backend.settings.max_request_mb
    app = Flask("odise-label-studio")
    app.config["MAX_CONTENT_LENGTH"] = int(limit_mb * 2 ** 20)
    app.config["backend"] = backend
    metrics = _Metrics()
    app.config["metrics"] = metrics

    @app.before_request
    def _check_auth() -> Response | None:
        if auth.basic_ok(request.authorization):
            return None
        if request.endpoint == "health":
            return None  # open: liveness for Docker and load balancers; details need credentials (see health)
        if request.endpoint == "webhook":
            if auth.webhook_secret_ok(request.headers.get(WEBHOOK_SECRET_HEADER),
                                      request.args.get(WEBHOOK_SECRET_PARAM)):
                return None
            auth.refused_webhook()
            log.warning("webhook refused: no basic auth and no valid %s header or ?%s= parameter",
                        WEBHOOK_SECRET_HEADER, WEBHOOK_SECRET_PARAM)
            return _error("webhook not authenticated: add the X-Webhook-Secret header (WEBHOOK_SECRET) or basic "
                          "auth to the project's webhook in Label Studio", 401,
                          **{"WWW-Authenticate": 'Basic realm="odise-label-studio"'})
        return _error("basic authentication required: set the same user/password in the Label Studio model "
                      "connection", 401, **{"WWW-Authenticate": 'Basic realm="odise-label-studio"'})

    @app.after_request
    def _count(response: Response) -> Response:
        metrics.count(request.endpoint or "unknown", response.status_code)
        return response

    @app.errorhandler(BadRequest)
    def _bad_body(e: BadRequest) -> Response:
        return _error(str(e), e.status)

    @app.errorhandler(LabelConfigError)
    def _bad_config(e: LabelConfigError) -> Response:
        return _error(str(e), 400)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e: RequestEntityTooLarge) -> Response:
        return _error(f"request body over the {limit_mb:g} MiB limit (MAX_REQUEST_MB): predict fewer tasks per "
                      "request (select fewer in Label Studio) or raise MAX_REQUEST_MB", 413)

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

    @app.get("/", endpoint="health")
    @app.get("/health", endpoint="health")
    def health() -> Response:
        body = {"status": "UP", "model_class": "ODISEBackend", "model_state": backend.state.value}
        warnings = auth.warnings()
        if warnings:
            body["warnings"] = warnings
        if not auth.basic_ok(request.authorization):
            return jsonify(body)  # without credentials: no preset, version or load error (paths, hosts)
        body["preset"] = backend.settings.preset
        if backend.base_version:
            body["model_version"] = backend.base_version
        if backend.error:
            body["error"] = backend.error
        body["refresh"] = backend.refresher.overview()
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        req = read_setup(_json_body())
        version = backend.setup(req.project, req.label_config, hostname=req.hostname, access_token=req.access_token)
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict() -> Response:
        req = read_predict(_json_body())
        t0 = time.perf_counter()
        results, version = backend.predict(req.tasks, req.label_config, req.project, context=req.context)
        metrics.predicted(len(req.tasks), sum("error" in r for r in results), time.perf_counter() - t0)
        return jsonify({"results": results, "model_version": version})

    @app.post("/webhook")
    def webhook() -> Response:
        return _train(read_webhook(_json_body())), 200

    @app.post("/train")
    def train() -> Response:
        return _train(read_train(_json_body())), 201

    def _train(req: WebhookRequest) -> Response:
        try:
            return jsonify(backend.handle_webhook(req.action, req.payload))
        except ValueError as e:
            raise BadRequest(str(e)) from e

    @app.post("/refresh")
    def refresh() -> Response:
        project = read_refresh(_json_body())
        try:
            job = backend.start_refresh(project)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        return jsonify(job.as_dict()), 201

    @app.post("/job_status")
    def job_status() -> Response:
        job_id = read_job_status(_json_body())
        job = backend.find_job(job_id)
        if job is None:
            return _error(f"no training or refresh job {job_id!r}", 410)
        body = job.as_dict()
        body["job_status"] = {"done": "finished"}.get(job.state, job.state)
        return jsonify(body)

    @app.get("/versions")
    def versions() -> Response:
        return jsonify({"versions": backend.versions(project_id(request.args.get("project"), "project"))})

    @app.get("/metrics")
    def get_metrics() -> Response:
        return jsonify({**metrics.as_dict(), "model_state": backend.state.value,
                        "model_load_seconds": backend.load_seconds,
                        "image_cache": {"hits": backend.fetcher.hits, "misses": backend.fetcher.misses}})

    return app
