"""The ML backend HTTP protocol: health, setup, predict, webhook, versions, metrics, errors, auth, loading.

A stand-in model (bright pixels = first label, the rest = second) keeps these tests fast and exact;
the real tiny ODISE model goes through the same code in tests/e2e against a real Label Studio.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torch import nn
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder, run_wsgi_app

from backend.app import create_app
from backend.model import BackendSettings, ODISEBackend
from backend.training_data import TrainingData
from odise_core.config import get_config
from odise_core.geometry import mask_iou, polygons_to_mask
from odise_core.training.finetune import TrainSample
from odise_core.types import RawPrediction, Segment

CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="label" toName="image"><Label value="Bright"/><Label value="Dark" category="stuff"/>
</PolygonLabels></View>"""
H, W = 60, 80


class StandIn(nn.Module):
    """Segments bright pixels as class 0 and the rest as class 1; crashes on an all-black image."""

    FROZEN_PREFIXES = ()

    def __init__(self, weight: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([weight]))
        self.cfg = get_config("tiny").replace(name="stand-in")  # saved beside fine-tuned versions
        self.calls = 0

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().clone()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weight.data.copy_(state["weight"])

    def predict_raw(self, image: np.ndarray, vocab, mode: str = "panoptic") -> RawPrediction:
        self.calls += 1
        if image.max() == 0:
            raise RuntimeError("simulated crash inside the model")
        bright = image.mean(-1) > 128
        segs = [Segment(bright, 0, 0.9, True, 0), Segment(~bright, 1, 0.7, False, 1)]
        probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.7, 0.2]])
        return RawPrediction(segs, probs, torch.zeros(2, *bright.shape), bright.shape)


def _image(value: int | None = None) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    if value is None:
        img[10:40, 20:60] = 255
    else:
        img[:] = value
    return img


def _data_uri(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _backend(tmp_path: Path, factory=None, **settings) -> ODISEBackend:
    s = BackendSettings.from_env({}, preset="stand-in", model_dir=tmp_path / "models", **settings)
    return ODISEBackend(s, model_factory=factory or (lambda _: StandIn()))


@pytest.fixture
def ready(tmp_path: Path):
    backend = _backend(tmp_path)
    backend.start_loading(background=False)
    app = create_app(backend)
    return backend, app.test_client()


def _predict(client, tasks, config=CONFIG, project="3.1700000000"):
    return client.post("/predict", json={"tasks": tasks, "label_config": config, "project": project,
                                         "params": {"login": None, "password": None, "context": None}})


def test_health_setup_predict(ready) -> None:
    backend, client = ready
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["model_state"] == "ready"
    assert client.get("/").get_json() == health
    setup = client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG, "hostname": "http://ls:8080",
                                        "access_token": "abc123", "extra_params": None})
    assert setup.status_code == 200
    version = setup.get_json()["model_version"]
    assert version.startswith("odise-stand-in-")
    assert backend.fetcher.ls_url == "http://ls:8080", "setup's hostname locates Label Studio uploads"

    r = _predict(client, [{"id": 7, "data": {"image": _data_uri(_image())}}])
    assert r.status_code == 200
    body = r.get_json()
    assert body["model_version"] == version
    (pred,) = body["results"]
    assert pred["model_version"] == version and 0.0 <= pred["score"] <= 1.0
    labels = [reg["value"]["polygonlabels"] for reg in pred["result"]]
    assert labels == [["Bright"], ["Dark"]]
    bright = pred["result"][0]
    pts = np.asarray(bright["value"]["points"]) / 100 * [W, H]
    assert mask_iou(polygons_to_mask([pts], H, W), _image().mean(-1) > 128) == 1.0
    assert bright["from_name"] == "label" and bright["to_name"] == "image" and bright["type"] == "polygonlabels"


def test_an_exif_rotated_photo_is_segmented_as_label_studio_shows_it(ready) -> None:
    """Label Studio's editor shows a photo turned by its EXIF orientation (the browser applies it) and keeps
    regions in percent of that view: the regions, and their original size, are of the turned photo."""
    _, client = ready
    stored = np.zeros((H, W, 3), np.uint8)
    stored[5:20, 10:70] = 255  # a wide bright bar near the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the bar stands upright on the right
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    (pred,) = _predict(client, [{"id": 1, "data": {"image": uri}}]).get_json()["results"]
    bright = next(r for r in pred["result"] if r["value"]["polygonlabels"] == ["Bright"])
    assert (bright["original_width"], bright["original_height"]) == (H, W)
    shown = np.rot90(stored, k=-1).mean(-1) > 128
    pts = np.asarray(bright["value"]["points"]) / 100 * [H, W]
    assert mask_iou(polygons_to_mask([pts], W, H), shown) == 1.0


def test_one_bad_task_does_not_fail_the_batch(ready) -> None:
    backend, client = ready
    tasks = [{"id": 1, "data": {"image": _data_uri(_image())}},
             {"id": 2, "data": {"image": _data_uri(_image(0))}},  # the model crashes on it
             {"id": 3, "data": {"image": "data:text/plain;base64," + base64.b64encode(b"hello").decode()}},
             {"id": 4, "data": {"picture": "x"}},
             {"id": 5, "data": {"image": _data_uri(_image(200))}}]
    r = _predict(client, tasks)
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert len(results) == 5
    assert "result" in results[0] and "result" in results[4]
    for res, expected in zip(results[1:4], ["simulated crash", "not a readable image", 'no data field "image"']):
        assert "result" not in res, "Label Studio must not store an empty prediction for a failed task"
        assert expected in res["error"]
    # the server keeps serving
    assert "result" in _predict(client, tasks[:1]).get_json()["results"][0]
    metrics = client.get("/metrics").get_json()
    assert metrics["tasks_predicted"] == 6 and metrics["task_errors"] == 3
    assert metrics["requests"]["predict"] == 2


def test_bad_requests_get_json_errors(ready) -> None:
    _, client = ready
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert r.status_code == 400 and "PolygonLabels" in r.get_json()["error"]
    assert "PolygonLabels" in r.status, "Label Studio shows only the reason phrase to its users"
    r = _predict(client, [{"id": 1, "data": {}}], config="<View/>")
    assert r.status_code == 400
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").get_json()
    assert client.get("/predict").status_code == 405 and "error" in client.get("/predict").get_json()


JSON = "application/json"
GOOD_TASKS = [{"id": 1, "data": {"image": "x"}}]
BAD_BODIES = [  # endpoint, body, content type, status, what the message must say
    ("/predict", "not json", JSON, 400, "the body is not valid JSON: Expecting value at line 1 column 1"),
    ("/predict", "[" * 100000 + "]" * 100000, JSON, 400, "nested too deeply (at most 100 levels)"),
    ("/predict", '{"tasks": ' + "[" * 150 + "]" * 150 + "}", JSON, 400, "nested too deeply"),
    ("/predict", b'{"tasks": "\xff\xfe"}', JSON, 400, "not UTF-8"),
    ("/predict", '{"tasks": []}', "text/plain", 415, "Content-Type: application/json, got text/plain"),
    ("/predict", '{"tasks": []}', None, 415, "got no Content-Type"),
    ("/predict", "", JSON, 400, "the request body is empty"),
    ("/predict", "[1, 2]", JSON, 400, "must be a JSON object, got a JSON array"),
    ("/predict", {"tasks": GOOD_TASKS, "label_config": 5}, JSON, 400,
     '"label_config" (the project\'s label config XML) must be a string, got a JSON number'),
    ("/predict", {"tasks": GOOD_TASKS}, JSON, 400, '"label_config" (the project\'s label config XML) is required'),
    ("/predict", {"tasks": "x", "label_config": CONFIG}, JSON, 400, '"tasks" must be a list of task objects, got a JSON string'),
    ("/predict", {"label_config": CONFIG}, JSON, 400, '"tasks" must be a list of task objects, got missing'),
    ("/predict", {"tasks": [1], "label_config": CONFIG}, JSON, 400, '"tasks[0]" must be a task object, got a JSON number'),
    ("/predict", {"tasks": [{"id": 1, "data": ["x"]}], "label_config": CONFIG}, JSON, 400,
     '"tasks[0].data" must be an object of the task\'s data fields, got a JSON array'),
    ("/predict", {"tasks": GOOD_TASKS, "label_config": CONFIG, "project": "../../etc"}, JSON, 400,
     '"project" must be a project id or Label Studio\'s "<id>.<timestamp>", got "../../etc"'),
    ("/setup", {"schema": 5}, JSON, 400, '"schema" (the project\'s label config XML) must be a string, got a JSON number'),
    ("/setup", {"project": "1.2"}, JSON, 400, '"schema" (the project\'s label config XML) is required'),
    ("/setup", {"schema": "  "}, JSON, 400, '"schema" (the project\'s label config XML) is empty'),
    ("/setup", {"schema": CONFIG, "hostname": 3}, JSON, 400, '"hostname" (Label Studio\'s address) must be a string'),
    ("/webhook", {}, JSON, 400, '"action" (the Label Studio event name) is required'),
    ("/webhook", {"action": ["START_TRAINING"]}, JSON, 400, '"action" (the Label Studio event name) must be a string, got a JSON array'),
    ("/webhook", {"action": "START_TRAINING", "project": "3"}, JSON, 400, '"project" must be the project object, got a JSON string'),
    ("/webhook", {"action": "START_TRAINING", "project": {"id": True}}, JSON, 400, '"project.id" must be a project id'),
    ("/webhook", {"action": "START_TRAINING", "project": {"id": 3, "label_config": {}}}, JSON, 400,
     '"project.label_config" (the project\'s label config XML) must be a string, got a JSON object'),
    ("/webhook", {"action": "START_TRAINING", "project": {"id": 3}}, JSON, 400, "needs project.id and project.label_config"),
    ("/train", {"label_config": CONFIG}, JSON, 400, '"project" (Label Studio\'s "<id>.<timestamp>") is required'),
    ("/train", {"project": "3.17", "label_config": None}, JSON, 400, '"label_config" (the project\'s label config XML) is required'),
    ("/job_status", {"job": {"id": 1}}, JSON, 400, '"job" (the training job id) must be a string, got a JSON object'),
]


@pytest.mark.parametrize("endpoint,body,content_type,status,message", BAD_BODIES)
def test_bad_bodies_get_4xx_naming_the_problem(ready, endpoint, body, content_type, status, message) -> None:
    _, client = ready
    data = json.dumps(body) if isinstance(body, dict) else body
    r = client.post(endpoint, data=data, content_type=content_type)
    assert r.status_code == status
    assert message in r.get_json()["error"], r.get_json()["error"]
    assert r.get_json()["status"] == status
    # the server keeps serving
    good = _predict(client, [{"id": 1, "data": {"image": _data_uri(_image())}}])
    assert good.status_code == 200 and "result" in good.get_json()["results"][0]


def test_versions_refuses_a_project_that_is_not_an_id(ready) -> None:
    _, client = ready
    r = client.get("/versions?project=../../x")
    assert r.status_code == 400 and '"project" must be a project id' in r.get_json()["error"]


class _CountingStream(io.RawIOBase):
    """A request body of `size` bytes that records how much of it the server read."""

    def __init__(self, size: int):
        self.size, self.read_bytes = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = b" " * n
        self.read_bytes += n
        return n


def _post_stream(app, stream: _CountingStream, content_length: int | None) -> tuple[int, dict]:
    """POST /predict with `stream` as the raw body; without a length it is a chunked (terminated) input."""
    environ = EnvironBuilder(path="/predict", method="POST", content_type=JSON).get_environ()
    environ["wsgi.input"] = stream
    if content_length is None:
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(content_length)
    body, status, _ = run_wsgi_app(app, environ, buffered=True)
    return int(status.split()[0]), json.loads(b"".join(body))


def test_request_size_limit_answers_413_before_reading_the_body(tmp_path: Path) -> None:
    backend = _backend(tmp_path, max_request_mb=1)
    backend.start_loading(background=False)
    app = create_app(backend)
    limit = 2 ** 20
    # With a Content-Length over the limit, nothing is read.
    stream = _CountingStream(3 * limit)
    status, body = _post_stream(app, stream, 3 * limit)
    assert status == 413 and stream.read_bytes == 0
    assert body["error"].startswith("request body over the 1 MiB limit (MAX_REQUEST_MB)")
    # Chunked (no Content-Length): reading stops at the limit.
    stream = _CountingStream(3 * limit)
    status, body = _post_stream(app, stream, None)
    assert status == 413 and "1 MiB limit" in body["error"]
    assert stream.read_bytes <= limit + 2 ** 16, f"read {stream.read_bytes} bytes of a body over the limit"
    # Under the limit is served.
    ok = _predict(app.test_client(), [{"id": 1, "data": {"image": _data_uri(_image())}}])
    assert ok.status_code == 200 and "result" in ok.get_json()["results"][0]


def test_request_size_limit_over_http(tmp_path: Path) -> None:
    """A real server answers 413 to a body with Content-Length and to a chunked one, and keeps serving."""
    backend = _backend(tmp_path, max_request_mb=1)
    backend.start_loading(background=False)
    server = make_server("127.0.0.1", 0, create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        body = b'{"tasks": [' + b" " * (2 * 2 ** 20) + b"]}"
        r = requests.post(f"{url}/predict", data=body, headers={"Content-Type": JSON}, timeout=30)
        assert r.status_code == 413 and "1 MiB limit (MAX_REQUEST_MB)" in r.json()["error"]
        chunks = (body[i:i + 2 ** 16] for i in range(0, len(body), 2 ** 16))
        r = requests.post(f"{url}/predict", data=chunks, headers={"Content-Type": JSON}, timeout=30)
        assert r.request.headers.get("Transfer-Encoding") == "chunked"
        assert r.status_code == 413 and "1 MiB limit" in r.json()["error"]
        ok = requests.post(f"{url}/predict", timeout=30,
                           json={"tasks": [{"id": 1, "data": {"image": _data_uri(_image())}}], "label_config": CONFIG})
        assert ok.status_code == 200 and "result" in ok.json()["results"][0]
    finally:
        server.shutdown()
        server.server_close()


def test_loading_answers_503_with_retry_after(tmp_path: Path) -> None:
    gate = threading.Event()

    def slow(_):
        gate.wait(10)
        return StandIn()

    backend = _backend(tmp_path, factory=slow)
    client = create_app(backend).test_client()
    backend.start_loading(background=True)
    assert client.get("/health").get_json()["model_state"] == "loading"
    r = _predict(client, [{"id": 1, "data": {"image": _data_uri(_image())}}])
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0 and "loading" in r.get_json()["error"]
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 503
    bad = client.post("/setup", json={"project": "1.1", "schema": "<View/>"})
    assert bad.status_code == 400, "config errors are reported even while the model loads"
    gate.set()
    assert backend.wait_ready(10)
    assert _predict(client, [{"id": 1, "data": {"image": _data_uri(_image())}}]).status_code == 200


def test_load_failure_is_reported(tmp_path: Path) -> None:
    def broken(_):
        raise RuntimeError("weights missing: put sd-v1-3.ckpt in /weights")

    backend = _backend(tmp_path, factory=broken)
    backend.start_loading(background=False)
    client = create_app(backend).test_client()
    health = client.get("/health").get_json()
    assert health["model_state"] == "failed" and "sd-v1-3.ckpt" in health["error"]
    r = client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    assert r.status_code == 500 and "sd-v1-3.ckpt" in r.get_json()["error"]


def test_model_version_follows_weights(tmp_path: Path) -> None:
    versions = []
    for weight in (0.0, 0.0, 1.0):
        backend = _backend(tmp_path / str(len(versions)), factory=lambda _, w=weight: StandIn(w))
        backend.start_loading(background=False)
        versions.append(backend.model_version())
    assert versions[0] == versions[1] != versions[2]
    client = create_app(backend).test_client()
    assert client.get("/versions?project=4.17").get_json() == {"versions": [versions[2]]}


def test_basic_auth(tmp_path: Path) -> None:
    backend = _backend(tmp_path)
    backend.start_loading(background=False)
    client = create_app(backend, basic_auth=("ls", "s3cret")).test_client()
    for path in ("/predict", "/setup", "/train", "/job_status"):
        r = client.post(path, json={})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), path
    assert client.get("/metrics").status_code == 401 and client.get("/versions").status_code == 401
    assert _predict(client, []).status_code == 401
    r = client.post("/predict", auth=("ls", "wrong"), json={"tasks": [], "label_config": CONFIG})
    assert r.status_code == 401
    r = client.post("/predict", auth=("ls", "s3cret"), json={"tasks": [], "label_config": CONFIG})
    assert r.status_code == 200 and r.get_json()["results"] == []
    # /health answers without credentials (Docker HEALTHCHECK) but shows details only with them.
    anonymous = client.get("/health").get_json()
    assert anonymous["status"] == "UP" and anonymous["model_state"] == "ready"
    assert "preset" not in anonymous and "model_version" not in anonymous
    full = client.get("/health", auth=("ls", "s3cret")).get_json()
    assert full["preset"] == "stand-in" and full["model_version"] == backend.base_version


def _webhook(client, **kwargs):
    return client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3, "label_config": CONFIG}},
                       **kwargs)


def test_basic_auth_without_webhook_secret_warns_that_webhooks_cannot_authenticate(tmp_path: Path, caplog) -> None:
    backend = _backend(tmp_path)
    backend.start_loading(background=False)
    with caplog.at_level("WARNING"):
        client = create_app(backend, basic_auth=("ls", "s3cret")).test_client()
    assert "WEBHOOK_SECRET is not set" in caplog.text, "warned at start-up"
    (warning,) = client.get("/health").get_json()["warnings"]
    assert "WEBHOOK_SECRET is not set" in warning
    r = _webhook(client)
    assert r.status_code == 401 and "X-Webhook-Secret" in r.get_json()["error"]
    assert _webhook(client, headers={"X-Webhook-Secret": ""}).status_code == 401
    warnings = client.get("/health").get_json()["warnings"]
    assert len(warnings) == 2 and warnings[1].startswith("2 webhook call(s) refused for missing credentials")
    assert _webhook(client, auth=("ls", "s3cret")).status_code == 200, "basic auth still opens /webhook"


def test_webhook_secret_opens_only_the_webhook(tmp_path: Path) -> None:
    backend = _backend(tmp_path, webhook_secret="hook-0123")
    backend.start_loading(background=False)
    client = create_app(backend, basic_auth=("ls", "s3cret")).test_client()
    assert "warnings" not in client.get("/health").get_json()
    r = _webhook(client, headers={"X-Webhook-Secret": "hook-0123"})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    assert client.post("/webhook?secret=hook-0123", json={"action": "TASKS_CREATED"}).status_code == 200
    assert _webhook(client, headers={"X-Webhook-Secret": "hook-0124"}).status_code == 401
    assert client.post("/webhook?secret=hook", json={"action": "TASKS_CREATED"}).status_code == 401
    r = client.post("/predict?secret=hook-0123", headers={"X-Webhook-Secret": "hook-0123"},
                    json={"tasks": [], "label_config": CONFIG})
    assert r.status_code == 401, "the webhook secret is not a key to the other endpoints"
    assert client.post("/train?secret=hook-0123", json={}).status_code == 401
    (warning,) = client.get("/health").get_json()["warnings"]
    assert warning.startswith("2 webhook call(s) refused")
    assert BackendSettings.from_env({"WEBHOOK_SECRET": "abc", "MAX_REQUEST_MB": "12.5"}).webhook_secret == "abc"
    assert BackendSettings.from_env({"MAX_REQUEST_MB": "12.5"}).max_request_mb == 12.5
    assert BackendSettings.from_env({}).max_request_mb == 100.0 and BackendSettings.from_env({}).webhook_secret is None


def test_webhooks(ready) -> None:
    _, client = ready
    project = {"id": 3, "label_config": CONFIG}
    r = client.post("/webhook", json={"action": "TASKS_CREATED", "project": project})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": project})
    assert r.status_code == 400 and "LABEL_STUDIO_URL" in r.get_json()["error"]
    assert client.post("/webhook", json={"project": project}).status_code == 400
    assert client.post("/job_status", json={"job": "nope"}).status_code == 410


def test_annotation_webhooks_that_cannot_train_are_acknowledged_whatever_else_is_missing(tmp_path: Path) -> None:
    """With ODISE_TRAIN_ON_ANNOTATION off, annotation events (Label Studio sends every event to a webhook by
    default) are acknowledged as ignored, not refused for a model still loading, unknown Label Studio
    credentials or a config the model cannot label; Start Training still says why it cannot run."""
    backend = _backend(tmp_path, on_annotation=False)
    client = create_app(backend).test_client()  # the model is still loading
    choices = "<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='a'/></Choices></View>"
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
        for config in (CONFIG, choices):
            r = client.post("/webhook", json={"action": action, "project": {"id": 3, "label_config": config}})
            assert r.status_code == 200 and r.get_json() == {
                "status": "ignored", "reason": "training on annotation events is off (ODISE_TRAIN_ON_ANNOTATION)"}
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3, "label_config": CONFIG}})
    assert r.status_code == 503 and "loading" in r.get_json()["error"]


def test_training_does_not_block_predictions(tmp_path: Path, monkeypatch) -> None:
    backend = _backend(tmp_path)
    backend.start_loading(background=False)
    client = create_app(backend).test_client()
    started, release = threading.Event(), threading.Event()

    def finetune(model, data, vocab, job, feature_lock) -> None:
        started.set()
        release.wait(20)
        model.weight.data.fill_(5.0)

    img = _image()
    sample = TrainSample(image=img, masks=(img.mean(-1) > 128)[None], classes=np.array([0]))
    backend.jobs.finetune_fn = finetune
    monkeypatch.setattr(backend, "_training_fetcher",
                        lambda project_id, target: lambda fraction: TrainingData(train=[sample], holdout=[]))
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9, "label_config": CONFIG}})
    assert r.status_code == 200 and r.get_json()["status"] == "started"
    job_id = r.get_json()["job"]
    assert started.wait(10)
    t0 = time.perf_counter()
    pred = _predict(client, [{"id": 1, "data": {"image": _data_uri(img)}}], project="9.1")
    assert pred.status_code == 200 and "result" in pred.get_json()["results"][0]
    assert time.perf_counter() - t0 < 5, "a running fine-tune must not hold up predictions"
    assert client.post("/job_status", json={"job": job_id}).get_json()["job_status"] == "training"
    release.set()
    assert backend.jobs.job("9").wait(20)
    status = client.post("/job_status", json={"job": job_id}).get_json()
    assert status["job_status"] == "finished" and status["version"]
    # Without held-out tasks the fine-tune is stored but not promoted: the base version keeps serving.
    assert client.post("/setup", json={"project": "9.1", "schema": CONFIG}).get_json()["model_version"] == \
        backend.base_version
    assert len(client.get("/versions?project=9.1").get_json()["versions"]) == 2


def test_an_unreachable_or_missing_task_image_skips_that_task_instead_of_failing_the_fine_tune(tmp_path: Path,
                                                                                               monkeypatch) -> None:
    """Training data read through the backend's fetcher: a task whose image is gone (connection refused) or
    whose data lacks the image field is skipped and counted, as the job's other tasks still train."""
    import backend.training_data as training_data

    server = _backend(tmp_path, label_studio_url="http://127.0.0.1:9", api_key="legacy-token")
    server.start_loading(background=False)
    square = {"from_name": "label", "to_name": "image", "type": "polygonlabels",
              "value": {"points": [[25, 20], [75, 20], [75, 60], [25, 60]], "polygonlabels": ["Bright"]}}

    def task(task_id: int, data: dict) -> dict:
        return {"id": task_id, "data": data, "annotations": [{"id": task_id, "result": [square]}]}

    tasks = [task(1, {"image": _data_uri(_image())}), task(2, {"image": "http://127.0.0.1:9/gone.png"}),
             task(3, {"picture": _data_uri(_image())}), task(4, {"image": _data_uri(_image())})]
    monkeypatch.setattr(training_data, "fetch_annotated_tasks", lambda client, project: tasks)
    data = server._training_fetcher(9, server.parse_config(CONFIG).targets[0])(0.0)
    assert sorted(data.train_task_ids) == [1, 4] and data.holdout_task_ids == []
    assert dict(data.skipped) == {"image not loadable": 2}
    assert data.train[0].classes.tolist() == [0] and data.train[0].masks.shape == (1, H, W)


def test_a_token_a_later_setup_sends_replaces_the_one_an_earlier_setup_sent(tmp_path: Path) -> None:
    """Label Studio's /setup carries the project creator's token; once they reset it the old one is refused, so
    the token of a later /setup replaces it. A key given in the settings (LABEL_STUDIO_API_KEY) stays."""
    def setup(client, token: str) -> None:
        r = client.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": "http://ls.example:8080",
                                        "access_token": token})
        assert r.status_code == 200, r.get_json()

    backend = _backend(tmp_path / "setup")
    backend.start_loading(background=False)
    client = create_app(backend).test_client()
    for token in ("first-token", "reset-token"):
        setup(client, token)
        assert (backend.fetcher.ls_url, backend.fetcher.auth.api_key) == ("http://ls.example:8080", token)
    configured = _backend(tmp_path / "settings", label_studio_url="http://ls.example:8080", api_key="from-settings")
    configured.start_loading(background=False)
    setup(create_app(configured).test_client(), "reset-token")
    assert configured.fetcher.auth.api_key == "from-settings"


def test_several_images_and_controls_per_task(ready) -> None:
    _, client = ready
    config = """<View><Image name="before" value="$before"/><Image name="after" value="$after"/>
    <PolygonLabels name="p" toName="before"><Label value="Bright"/><Label value="Dark" category="stuff"/></PolygonLabels>
    <RectangleLabels name="r" toName="after"><Label value="Bright"/></RectangleLabels>
    <BrushLabels name="b" toName="after"><Label value="Dark" category="stuff"/></BrushLabels></View>"""
    task = {"id": 1, "data": {"before": _data_uri(_image()), "after": _data_uri(_image())}}
    (pred,) = _predict(client, [task], config=config).get_json()["results"]
    got = sorted((r["to_name"], r["from_name"], r["type"], r["value"][r["type"]][0]) for r in pred["result"])
    assert got == [("after", "b", "brushlabels", "Dark"), ("after", "r", "rectanglelabels", "Bright"),
                   ("before", "p", "polygonlabels", "Bright"), ("before", "p", "polygonlabels", "Dark")]
    box = next(r for r in pred["result"] if r["type"] == "rectanglelabels")["value"]
    assert (box["x"], box["y"], box["width"], box["height"]) == (25.0, 16.6667, 50.0, 50.0)
