"""Batch pre-labeling against a real Label Studio: project mode through the SDK, folder mode imported, export."""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import skimage.data
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from pycocotools.coco import COCO

from backend.exports import export_tasks
from backend.label_config import make_label_config
from backend.prelabel import prelabel_folder, prelabel_project, project_tasks
from odise_core.vocabulary import Vocabulary

pytestmark = pytest.mark.e2e

CONFIG = make_label_config(Vocabulary.from_text("cat:kitten, coffee cup:mug, person, grass (stuff)"), kind="polygon")
PHOTOS = {"chelsea.jpg": skimage.data.chelsea(), "coffee.jpg": skimage.data.coffee()}


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _new_project(ls: Any, title: str) -> int:
    r = ls.api().post(f"{ls.url}/api/projects", json={"title": title, "label_config": CONFIG}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _predictions(ls: Any, pid: int) -> list[dict]:
    r = ls.api().get(f"{ls.url}/api/predictions", params={"project": pid}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_prelabel_project_resumes_and_exports(label_studio: Any, backend_server: Any, tmp_path) -> None:
    ls, backend = label_studio, backend_server.backend
    pid = _new_project(ls, "odise e2e prelabel")
    files = [(f"file{i}", (name, _jpeg(img), "image/jpeg")) for i, (name, img) in enumerate(PHOTOS.items())]
    assert ls.api().post(f"{ls.url}/api/projects/{pid}/import", files=files, timeout=60).status_code == 201
    r = ls.api().post(f"{ls.url}/api/projects/{pid}/import", json=[{"image": "http://127.0.0.1:9/gone.jpg"}],
                      timeout=30)
    assert r.status_code == 201, r.text
    # The SDK authenticates with a personal access token, as Label Studio 1.23 issues by default.
    client = LabelStudio(base_url=ls.url, api_key=ls.personal_token)
    tasks = {t["id"]: t for t in project_tasks(client, pid)}
    broken = next(tid for tid, t in tasks.items() if t["data"]["image"].endswith("gone.jpg"))

    summary = prelabel_project(backend, client, pid, progress=False)
    assert (summary.total, summary.predicted, summary.skipped) == (3, 2, 0)
    assert [f.item for f in summary.failures] == [f"task {broken}"]
    assert summary.model_version == backend.model_version(str(pid))
    stored = _predictions(ls, pid)
    assert sorted(p["task"] for p in stored) == sorted(set(tasks) - {broken})
    interface = LabelInterface(CONFIG)
    for pred in stored:
        assert pred["model_version"] == summary.model_version
        assert interface.validate_prediction(pred, return_errors=True) == []
    assert any(pred["result"] for pred in stored), "random tiny weights still give some regions"

    again = prelabel_project(backend, client, pid, progress=False)
    assert (again.predicted, again.skipped, len(again.failures)) == (0, 2, 1)
    assert len(_predictions(ls, pid)) == len(stored)

    # An image whose prediction has no region stays in the dataset; its size comes from the image itself.
    inst = export_tasks(project_tasks(client, pid), CONFIG, tmp_path / "coco", formats=("instances",),
                        image_size=lambda task, url: backend.fetcher.fetch(url, task_id=task["id"]).shape[:2])[0]
    coco = COCO(str(inst))
    sizes = {name: img.shape[:2] for name, img in PHOTOS.items()}
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == 2
    for im in images:
        name = next(n for n in PHOTOS if im["file_name"].endswith(n))
        assert (im["height"], im["width"]) == sizes[name]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])):
            assert coco.annToMask(ann).shape == sizes[name] and ann["area"] > 0


def test_folder_import_json_is_accepted_by_label_studio(label_studio: Any, backend_server: Any) -> None:
    ls, backend = label_studio, backend_server.backend
    folder = ls.data_dir / "prelabel-photos"
    folder.mkdir()
    for name, img in PHOTOS.items():
        (folder / name).write_bytes(_jpeg(img))
    out = ls.data_dir / "prelabel.json"
    summary = prelabel_folder(backend, CONFIG, folder, out, document_root=ls.data_dir, progress=False)
    assert (summary.predicted, len(summary.failures)) == (2, 0)

    pid = _new_project(ls, "odise e2e folder import")
    api = ls.api()
    r = api.post(f"{ls.url}/api/storages/localfiles",
                 json={"project": pid, "path": str(folder), "title": "photos", "use_blob_urls": True}, timeout=30)
    assert r.status_code == 201, r.text
    r = api.post(f"{ls.url}/api/projects/{pid}/import", json=json.loads(out.read_text()), timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["task_count"] == 2 and r.json()["prediction_count"] == 2

    stored = _predictions(ls, pid)
    assert len(stored) == 2 and {p["model_version"] for p in stored} == {summary.model_version}
    for task in api.get(f"{ls.url}/api/tasks", params={"project": pid}, timeout=30).json()["tasks"]:
        # Label Studio serves the image at the URL the JSON gave it: the same pixels as the file.
        image = api.get(f"{ls.url}{task['data']['image']}", timeout=30)
        assert image.status_code == 200
        name = task["data"]["image"].rsplit("/", 1)[1]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.content))),
                              np.asarray(Image.open(folder / name)))
