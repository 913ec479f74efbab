"""Interactive pre-annotation through a real Label Studio: its /api/ml/{id}/interactive-annotating call.

Label Studio forwards the smart-tool result the editor posts as `context` to the backend's
/predict and returns the first result as `data`. Two backends answer it: one whose query masks are
known (so the click-inside-a-larger-region and negative-click rules are checked exactly) and the
tiny ODISE preset with the shipped label_config/interactive.xml.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
import skimage.data
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from werkzeug.serving import make_server

from backend.app import create_app
from backend.label_config import parse_label_config
from backend.model import ODISEBackend
from backend.settings import BackendSettings
from odise_core.geometry import mask_iou, polygons_to_mask
from tests.known_queries import CONFIG, MASKS, H, W, KnownQueries, full, keypoint, rectangle, text

pytestmark = pytest.mark.e2e
INTERACTIVE_XML = (Path(__file__).resolve().parents[2] / "label_config" / "interactive.xml").read_text()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _interactive_project(ls: Any, backend_url: str, config: str, image: np.ndarray) -> tuple[int, dict]:
    """A project with one uploaded image and the backend connected for interactive pre-annotation."""
    api = ls.api()
    r = api.post(f"{ls.url}/api/projects", json={"title": "odise interactive", "label_config": config}, timeout=30)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = api.post(f"{ls.url}/api/projects/{pid}/import", files=[("file", ("scene.png", _png(image), "image/png"))],
                 timeout=60)
    assert r.status_code == 201, r.text
    task = api.get(f"{ls.url}/api/tasks", params={"project": pid}, timeout=30).json()["tasks"][0]
    r = api.post(f"{ls.url}/api/ml", json={"url": backend_url, "project": pid, "title": "ODISE interactive",
                                           "is_interactive": True}, timeout=60)
    assert r.status_code == 201 and r.json()["state"] == "CO", r.text
    return r.json()["id"], task


def _interact(ls: Any, ml: int, task: dict, results: list[dict]) -> dict:
    """What Label Studio returns the editor for a smart-tool action: the backend's first result."""
    r = ls.api().post(f"{ls.url}/api/ml/{ml}/interactive-annotating",
                      json={"task": task["id"], "context": {"result": results}}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


def _mask(region: dict, h: int, w: int) -> np.ndarray:
    points = [(x / 100 * w, y / 100 * h) for x, y in region["value"]["points"]]
    return polygons_to_mask([points], h, w)


@pytest.fixture(scope="module")
def known_backend(label_studio: Any) -> Iterator[tuple[str, KnownQueries]]:
    model = KnownQueries()
    backend = ODISEBackend(BackendSettings.from_env({}, model_dir=label_studio.data_dir / "known-models"),
                           model_factory=lambda s: model)
    backend.start_loading(background=False)
    backend.fetcher.configure(label_studio.url, label_studio.personal_token)
    server = make_server("127.0.0.1", 0, create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, name="known-backend", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.port}", model
    finally:
        server.shutdown()
        server.server_close()


def test_click_box_and_text_with_known_queries(label_studio: Any, known_backend: tuple[str, KnownQueries]) -> None:
    url, model = known_backend
    config = CONFIG.format(out="PolygonLabels")
    ml, task = _interactive_project(label_studio, url, config, np.full((H, W, 3), 90, np.uint8))
    interface = LabelInterface(config)

    def answer(results: list[dict]) -> list[dict]:
        regions = _interact(label_studio, ml, task, results)["result"]
        for region in regions:
            assert interface.validate_region(region, return_errors=True) == []
            assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "polygonlabels")
        return regions

    cup = answer([keypoint(48, 37, "cup")])  # inside the cup, which lies inside the table
    assert len(cup) == 1 and cup[0]["value"]["polygonlabels"] == ["cup"]
    assert mask_iou(_mask(cup[0], H, W), full(MASKS[1])) > 0.9
    table = answer([keypoint(10, 70, "table")])
    assert table[0]["value"]["polygonlabels"] == ["table"] and mask_iou(_mask(table[0], H, W), full(MASKS[0])) > 0.9
    # two positive clicks hold the table; a negative click on the plate rules the table out again
    assert mask_iou(_mask(answer([keypoint(48, 37), keypoint(10, 70)])[0], H, W), full(MASKS[0])) > 0.9
    negative = answer([keypoint(48, 37), keypoint(10, 70), keypoint(90, 57, positive=False)])
    assert mask_iou(_mask(negative[0], H, W), full(MASKS[1])) > 0.9
    boxed = answer([rectangle(76, 46, 108, 68, "plate")])
    assert boxed[0]["value"]["polygonlabels"] == ["plate"] and mask_iou(_mask(boxed[0], H, W), full(MASKS[2])) > 0.9
    saucer = answer([text("saucer")])
    assert saucer[0]["value"]["polygonlabels"] == ["plate"] and mask_iou(_mask(saucer[0], H, W), full(MASKS[2])) > 0.9
    assert model.passes == 1 and model.phrases == ["saucer"]  # one full pass served every interaction


def test_tiny_odise_answers_click_box_and_text(label_studio: Any, backend_server: Any) -> None:
    photo = skimage.data.coffee()[::2, ::2].copy()
    h, w = photo.shape[:2]
    ml, task = _interactive_project(label_studio, backend_server.url, INTERACTIVE_XML, photo)
    interface = LabelInterface(INTERACTIVE_XML)
    backend = backend_server.backend
    # The first full pass can outlast Label Studio's 100 s ML_TIMEOUT_PREDICT on a loaded CPU: run it
    # here, as the same project's interaction, so Label Studio's calls below are answered from the cache.
    passes_before = backend.interactive.cache.misses
    primed = requests.post(f"{backend_server.url}/predict", timeout=1200, json={
        "tasks": [task], "label_config": INTERACTIVE_XML, "project": f"{task['project']}.1",
        "params": {"context": {"result": [keypoint(w / 2, h / 2, "cup", size=(h, w))]}}})
    assert primed.status_code == 200 and "result" in primed.json()["results"][0], primed.text
    answers = {
        "cup": _interact(label_studio, ml, task, [keypoint(w / 2, h / 2, "cup", size=(h, w))]),
        "dining table": _interact(label_studio, ml, task, [rectangle(0, 0, w, h, "dining table", size=(h, w))]),
        "text": _interact(label_studio, ml, task, [text("coffee")]),
    }
    assert backend.interactive.cache.misses == passes_before + 1  # one full pass, then the cache
    for picked, data in answers.items():
        assert data["model_version"] == backend.base_version
        assert interface.validate_prediction(data, return_errors=True) == []
        for region in data["result"]:
            assert (region["from_name"], region["type"]) == ("label", "polygonlabels")
            assert (region["original_width"], region["original_height"]) == (w, h)
            if picked != "text":
                assert region["value"]["polygonlabels"] == [picked]
    assert answers["cup"]["result"] and answers["dining table"]["result"] and answers["text"]["result"]
    labels = {spec.value for spec in parse_label_config(INTERACTIVE_XML).controls[0].labels}
    assert all(r["value"]["polygonlabels"][0] in labels for r in answers["text"]["result"])
