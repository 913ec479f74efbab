"""Predictions requested through a real Label Studio server and stored by it: polygons, then brushes."""
from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import pytest
import requests
import skimage.data
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.app import create_app
from backend.label_config import make_label_config
from backend.ls_format import brush_rle_decode
from odise_core.geometry import polygons_to_mask
from odise_core.vocabulary import Vocabulary

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

VOCAB = Vocabulary.from_text("cat:kitten, coffee cup:mug, person, grass (stuff), sky (stuff)")
PHOTOS = {"chelsea.jpg": skimage.data.chelsea(), "coffee.jpg": skimage.data.coffee()}


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _project_with_tasks(ls: Any, kind: str, broken_task: bool) -> tuple[int, dict[int, tuple]]:
    """A project with the given control kind and the photos uploaded as files; returns task id -> (h, w)."""
    api = ls.api()
    r = api.post(f"{ls.url}/api/projects", json={"title": f"odise e2e {kind}",
                                                 "label_config": make_label_config(VOCAB, kind=kind)}, timeout=30)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    files = [(f"file{i}", (name, _jpeg(img), "image/jpeg")) for i, (name, img) in enumerate(PHOTOS.items())]
    n_photos = len(files)
    r = api.post(f"{ls.url}/api/projects/{pid}/import", files=files, timeout=60)
    assert r.status_code == 201 and r.json()["task_count"] == n_photos, r.text
    if broken_task:
        r = api.post(f"{ls.url}/api/projects/{pid}/import", json=[{"image": "http://127.0.0.1:9/nothing.jpg"}],
                     timeout=30)
        assert r.status_code == 201, r.text
    tasks = api.get(f"{ls.url}/api/tasks", params={"project": pid, "page_size": 100}, timeout=30).json()["tasks"]
    sizes = {}
    for t in tasks:
        name = next((n for n in PHOTOS if t["data"]["image"].endswith(n)), None)
        sizes[t["id"]] = PHOTOS[name].shape[:2] if name else None
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks if sizes[t["id"]])
    return pid, sizes


def _connect_and_predict(ls: Any, backend: Any, pid: int) -> list[dict]:
    """Connect the backend in the project's Model settings, run "Retrieve predictions", return stored ones."""
    api = ls.api()
    r = api.post(f"{ls.url}/api/ml", json={"url": backend.url, "project": pid, "title": "ODISE tiny"}, timeout=60)
    assert r.status_code == 201, r.text
    ml = r.json()
    assert ml["state"] == "CO", f"Label Studio could not connect the backend: {ml.get('error_message')}"
    assert ml["model_version"] == backend.backend.base_version
    r = api.post(f"{ls.url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                 json={"selectedItems": {"all": True, "excluded": []}}, timeout=600)
    assert r.status_code == 200, r.text
    r = api.get(f"{ls.url}/api/predictions", params={"project": pid}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _labels_of(region: dict) -> list[str]:
    return region["value"][region["type"]]


def test_polygon_predictions_through_label_studio(label_studio: Any,
                                                  backend_server: Any) -> None:
    pid, sizes = _project_with_tasks(label_studio, "polygon", broken_task=True)
    predictions = _connect_and_predict(label_studio, backend_server, pid)
    good = {tid for tid, size in sizes.items() if size}
    # The task whose image cannot be downloaded gets no prediction; the others are stored.
    assert {p["task"] for p in predictions} == good
    example = {**predictions[0], "result": [
        {**r, "value": {**r["value"], "points": r["value"]["points"][:4] + [f"... {len(r['value']['points'])} points"]}}
        for r in predictions[0]["result"][:2]] + [f"... {len(predictions[0]['result'])} regions"]}
    log.info("stored prediction (trimmed): %s", json.dumps(example))
    interface = LabelInterface(make_label_config(VOCAB, kind="polygon"))
    for pred in predictions:
        assert interface.validate_prediction(pred, return_errors=True) == []
        h, w = sizes[pred["task"]]
        assert pred["model_version"] == backend_server.backend.base_version
        assert 0.0 <= pred["score"] <= 1.0
        assert pred["result"], "the tiny model with random weights still returns regions"
        for region in pred["result"]:
            assert region["type"] == "polygonlabels"
            assert (region["from_name"], region["to_name"]) == ("label", "image")
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert len(_labels_of(region)) == 1 and _labels_of(region)[0] in VOCAB.names
            assert 0.0 <= region["score"] <= 1.0
            pts = np.asarray(region["value"]["points"], dtype=float)
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
            assert pts.min() >= 0.0 and pts.max() <= 100.0
            area = polygons_to_mask([pts / 100.0 * [w, h]], h, w).sum()
            assert area >= backend_server.backend.settings.result.min_area * 0.5


def test_brush_predictions_through_label_studio(label_studio: Any,
                                                backend_server: Any) -> None:
    pid, sizes = _project_with_tasks(label_studio, "brush", broken_task=False)
    predictions = _connect_and_predict(label_studio, backend_server, pid)
    assert {p["task"] for p in predictions} == set(sizes)
    interface = LabelInterface(make_label_config(VOCAB, kind="brush"))
    for pred in predictions:
        assert interface.validate_prediction(pred, return_errors=True) == []
        h, w = sizes[pred["task"]]
        assert pred["result"]
        covered = np.zeros((h, w), bool)
        for region in pred["result"]:
            assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
            assert _labels_of(region)[0] in VOCAB.names
            mask = brush_rle_decode(region["value"]["rle"], h, w)
            assert mask.sum() >= backend_server.backend.settings.result.min_area
            covered |= mask
        assert covered.any()


def test_label_studio_reports_a_bad_config_at_setup(label_studio: Any,
                                                    backend_server: Any) -> None:
    api = label_studio.api()
    config = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/>' \
             '</Choices></View>'
    pid = api.post(f"{label_studio.url}/api/projects", json={"title": "odise e2e choices", "label_config": config},
                   timeout=30).json()["id"]
    r = api.post(f"{label_studio.url}/api/ml", json={"url": backend_server.url, "project": pid}, timeout=60)
    # Label Studio calls /setup before saving the connection and shows the backend's reason.
    assert r.status_code == 400, r.text
    assert "PolygonLabels" in r.text
    assert requests.get(f"{backend_server.url}/health", timeout=5).json()["model_state"] == "ready"


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_annotation_webhook_reaches_the_backend_with_basic_auth(label_studio: Any, backend_server: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Label Studio's auto-created webhook is refused under basic auth until it carries X-Webhook-Secret."""
    from tests.e2e.conftest import serving

    backend = backend_server.backend
    received: list[tuple[str, Any]] = []
    handle = backend.handle_webhook

    def recording(event: str, payload: dict) -> dict:
        received.append((event, payload.get("project", {}).get("id")))
        return handle(event, payload)

    monkeypatch.setattr(backend, "handle_webhook", recording)
    app = create_app(backend, basic_auth=("odise", "basic-pass-123"), webhook_secret="e2e-webhook-secret-42")
    metrics = app.config["metrics"]
    api = label_studio.api()
    with serving(app) as url:
        assert requests.get(f"{url}/predict", timeout=5).status_code == 401
        pid, sizes = _project_with_tasks(label_studio, "polygon", broken_task=False)
        r = api.post(f"{label_studio.url}/api/ml", timeout=60, json={
            "url": url, "project": pid, "title": "ODISE basic auth", "auth_method": "BASIC_AUTH",
            "basic_auth_user": "odise", "basic_auth_pass": "basic-pass-123"})
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "CO", r.json().get("error_message")
        hooks = api.get(f"{label_studio.url}/api/webhooks", params={"project": pid}, timeout=30).json()
        (hook,) = [h for h in hooks if h["url"] == f"{url}/webhook"]
        assert hook["headers"] == {}, "Label Studio creates the webhook without credentials"
        first, second = list(sizes)[:2]

        def annotate(task_id: int) -> None:
            h, w = sizes[task_id]
            region = {"from_name": "label", "to_name": "image", "type": "polygonlabels",
                      "original_width": w, "original_height": h,
                      "value": {"points": [[10, 10], [60, 10], [60, 60]], "polygonlabels": ["cat"]}}
            r = api.post(f"{label_studio.url}/api/tasks/{task_id}/annotations", json={"result": [region]}, timeout=30)
            assert r.status_code == 201, r.text

        annotate(first)
        assert _wait_for(lambda: metrics.errors.get("webhook", 0) >= 1), "the webhook never reached the backend"
        assert not [e for e in received if e[0] == "ANNOTATION_CREATED"], "refused before the backend saw it"
        health = requests.get(f"{url}/health", timeout=5).json()
        assert any("refused for missing credentials" in w for w in health["warnings"])

        r = api.patch(f"{label_studio.url}/api/webhooks/{hook['id']}", timeout=30,
                      json={"headers": {"X-Webhook-Secret": "e2e-webhook-secret-42"}})
        assert r.status_code == 200, r.text
        annotate(second)
        assert _wait_for(lambda: ("ANNOTATION_CREATED", pid) in received), \
            f"the authenticated webhook did not reach the backend: {received}, {metrics.as_dict()}"
        assert _wait_for(lambda: metrics.requests["webhook"] - metrics.errors["webhook"] >= 1), "answered 2xx"
