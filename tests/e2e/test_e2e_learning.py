"""The learning loop through a real Label Studio: annotate -> webhook -> train -> new model_version ->
better predictions on the held-out tasks; and one fine-tune per round when Start Training races the
annotation webhooks, judged against the version serving at judgement time.

Tasks are generated scenes (odise_core.tools.synthetic) whose ground truth is known, annotated through the
Label Studio API with polygons; each annotation fires Label Studio's ANNOTATION_CREATED webhook at
the backend, whose policy (minimum count + debounce) starts one fine-tune. Predictions retrieved
through Label Studio before and after are scored against the ground truth of the held-out tasks.
"""
from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from backend.label_config import make_label_config
from backend.learning import JobManager, is_better
from backend.training_data import holdout_key, split_samples
from odise_core.geometry import PolygonOptions, mask_to_polygons, polygons_to_mask
from odise_core.tools.evaluation import evaluate
from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, make_dataset
from odise_core.types import Segment
from odise_core.vocabulary import VocabClass, Vocabulary

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

VOCAB = Vocabulary([VocabClass(n, (n,), t) for n, t in zip(CLASS_NAMES, IS_THING)])
N_TASKS = 16
SIZE = 128
TRAIN_TIMEOUT = 1500.0


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _polygon_results(masks: np.ndarray, classes: np.ndarray) -> list[dict]:
    """Ground-truth masks as Label Studio polygon results (percent coordinates, keyhole holes)."""
    h, w = masks.shape[1:]
    results = []
    for i, (mask, cls) in enumerate(zip(masks, classes)):
        for j, ring in enumerate(mask_to_polygons(mask, PolygonOptions(tolerance=0.5, min_area=4))):
            results.append({
                "id": f"r{i}_{j}", "type": "polygonlabels", "from_name": "label", "to_name": "image",
                "original_width": w, "original_height": h, "image_rotation": 0,
                "value": {"points": (ring / [w, h] * 100).tolist(), "closed": True,
                          "polygonlabels": [CLASS_NAMES[int(cls)]]},
            })
    return results


def _segments(prediction: dict) -> list[Segment]:
    """A stored Label Studio prediction back to Segments (polygons of one label in one segment)."""
    by_label: dict[str, np.ndarray] = {}
    for region in prediction["result"]:
        h, w = region["original_height"], region["original_width"]
        pts = np.asarray(region["value"]["points"], dtype=float) / 100.0 * [w, h]
        label = region["value"]["polygonlabels"][0]
        by_label.setdefault(label, np.zeros((h, w), bool))
        by_label[label] |= polygons_to_mask([pts], h, w)
    return [Segment(m, CLASS_NAMES.index(label), float(prediction.get("score") or 1.0), IS_THING[CLASS_NAMES.index(label)])
            for label, m in by_label.items()]


def _retrieve_predictions(ls: Any, pid: int, task_ids: list[int]) -> list[dict]:
    """Run "Retrieve predictions" on `task_ids`, two at a time (Label Studio waits at most 100 s per
    request and the tiny model on a busy CPU can need 20 s per image), and return the project's predictions."""
    api = ls.api()
    for i in range(0, len(task_ids), 2):
        r = api.post(f"{ls.url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                     json={"selectedItems": {"all": False, "included": task_ids[i:i + 2]}}, timeout=300)
        assert r.status_code == 200, r.text
    return project_predictions(ls, pid)


def project_predictions(ls: Any, pid: int) -> list[dict]:
    """Every prediction Label Studio stores for the project."""
    r = ls.api().get(f"{ls.url}/api/predictions", params={"project": pid}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_annotations_train_a_better_model_through_label_studio(label_studio: Any, backend_server: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backend_server.backend
    jobs = backend.jobs
    _train_settings(backend, monkeypatch, min_annotations=12, debounce=10.0)
    api = label_studio.api()
    url = label_studio.url

    r = api.post(f"{url}/api/projects", json={"title": "odise e2e learning",
                                              "label_config": make_label_config(VOCAB, kind="polygon")}, timeout=30)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    scenes = make_dataset(N_TASKS + 1, seed=11, size=SIZE)
    files = [(f"file{i}", (f"scene{i:02d}.png", _png(s.image), "image/png")) for i, s in enumerate(scenes)]
    r = api.post(f"{url}/api/projects/{pid}/import", files=files, timeout=120)
    assert r.status_code == 201 and r.json()["task_count"] == N_TASKS + 1, r.text
    tasks = api.get(f"{url}/api/tasks", params={"project": pid, "page_size": 100}, timeout=30).json()["tasks"]
    scene_of = {t["id"]: scenes[int(t["data"]["image"].rsplit("scene", 1)[1][:2])] for t in tasks}
    ordered = sorted(scene_of)
    # the backend holds tasks out by a hash of their id: known before any training
    holdout = split_samples([(tid, None) for tid in ordered[:N_TASKS]], 0.25).holdout_task_ids
    assert holdout

    # connecting the backend makes Label Studio create its /webhook hook; predictions of the base model
    r = api.post(f"{url}/api/ml", json={"url": backend_server.url, "project": pid, "title": "ODISE tiny"}, timeout=60)
    assert r.status_code == 201 and r.json()["state"] == "CO", r.text
    before = {p["task"]: p for p in _retrieve_predictions(label_studio, pid, holdout)}
    base_version = backend.base_version
    assert {p["model_version"] for p in before.values()} == {base_version}

    # annotate: every task but one gets its ground truth; the last one is skipped (cancelled)
    for tid in ordered[:N_TASKS]:
        s = scene_of[tid]
        r = api.post(f"{url}/api/tasks/{tid}/annotations", json={"result": _polygon_results(s.masks, s.classes),
                                                                "was_cancelled": False, "lead_time": 1.0}, timeout=60)
        assert r.status_code == 201, r.text
    r = api.post(f"{url}/api/tasks/{ordered[-1]}/annotations",
                 json={"result": [], "was_cancelled": True, "lead_time": 1.0}, timeout=60)
    assert r.status_code == 201, r.text

    # the webhooks (one per annotation) are debounced into one job
    seen_progress = False
    deadline = time.time() + TRAIN_TIMEOUT
    while time.time() < deadline:
        job = jobs.job(str(pid))
        if job is None or jobs.status(str(pid))["scheduled"]:
            time.sleep(0.5)
            continue
        if job.wait(2.0) and job.state != "cancelled":
            break
        body = requests.post(f"{backend_server.url}/job_status", json={"job": job.id}, timeout=120)
        assert body.status_code == 200, body.text
        seen_progress |= body.json()["state"] == "training" and body.json()["step"] > 0
    assert job is not None, f"no training job started: {jobs.status(str(pid))}"
    assert job.reason in ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED")
    assert job.state == "done", job.as_dict()
    assert seen_progress, "training progress was never visible through /job_status"
    log.info("job: %s", job.as_dict())

    meta = jobs.store.metadata(str(pid), job.version)
    assert meta["data"]["train"] + meta["data"]["holdout"] == N_TASKS
    assert meta["data"]["holdout"] >= 1 and sum(meta["data"]["skipped"].values()) == 1
    assert meta["vocabulary"] == list(CLASS_NAMES)
    assert job.promoted, f"fine-tune was not better on the held-out tasks: {job.message}"
    assert jobs.current_version(str(pid)) == job.version

    # Label Studio now gets predictions from the new model version
    after_all = _retrieve_predictions(label_studio, pid, holdout)
    new_version = backend.model_version(str(pid))
    assert new_version != base_version and new_version.endswith(job.version)
    after = {p["task"]: p for p in after_all if p["model_version"] == new_version}
    assert sorted(meta["data"]["holdout_task_ids"]) == sorted(holdout)
    assert set(holdout) <= set(after) and set(holdout) <= set(before)

    def figures(preds: dict[int, dict]) -> Any:
        pairs = [(_segments(preds[t]), scene_of[t].segments()) for t in holdout]
        return evaluate(pairs, CLASS_NAMES, IS_THING)

    fig_before, fig_after = figures(before), figures(after)
    log.info("held-out through Label Studio: PQ %.2f -> %.2f, mIoU %.2f -> %.2f", fig_before.pq, fig_after.pq,
             fig_before.miou, fig_after.miou)
    assert is_better(fig_after, fig_before)  # the backend's promotion rule, on what Label Studio stored
    # a backend restart (new JobManager on the same MODEL_DIR) serves the same version
    assert type(jobs)(jobs.store.root).current_version(str(pid)) == job.version


def _train_settings(backend: Any, monkeypatch: pytest.MonkeyPatch, min_annotations: int, debounce: float) -> None:
    """The running backend's training policy and fine-tune options (the objects its JobManager uses)."""
    assert backend.jobs.policy is backend.settings.policy
    for attr, value in (("min_annotations", min_annotations), ("debounce_seconds", debounce), ("holdout_fraction", 0.25)):
        monkeypatch.setattr(backend.settings.policy, attr, value)
    for attr, value in (("steps", 120), ("lr", 1e-3), ("views_per_image", 1), ("num_points", 3136)):
        monkeypatch.setattr(backend.settings.finetune, attr, value)


def _wait_state(job: Any, states: tuple[str, ...], timeout: float) -> None:
    deadline = time.time() + timeout
    while job.state not in states and time.time() < deadline:
        time.sleep(0.2)
    assert job.state in states, job.as_dict()


def test_start_training_racing_the_webhooks_gives_one_fine_tune_per_round(label_studio: Any, backend_server: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1: ten annotations (ten webhooks), Start Training at once and again while it trains: one
    fine-tune, the second press answered by a job that finds no new data, every job id answerable.
    Round 2: new annotations train a second version, judged against the version serving by then
    on the same held-out tasks."""
    backend = backend_server.backend
    jobs = backend.jobs
    debounce = 5.0
    _train_settings(backend, monkeypatch, min_annotations=3, debounce=debounce)
    api, url = label_studio.api(), label_studio.url
    r = api.post(f"{url}/api/projects", json={"title": "odise e2e one job per round",
                                              "label_config": make_label_config(VOCAB, kind="polygon")}, timeout=30)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    scenes = make_dataset(16, seed=23, size=SIZE)
    files = [(f"file{i}", (f"scene{i:02d}.png", _png(s.image), "image/png")) for i, s in enumerate(scenes)]
    r = api.post(f"{url}/api/projects/{pid}/import", files=files, timeout=120)
    assert r.status_code == 201, r.text
    tasks = api.get(f"{url}/api/tasks", params={"project": pid, "page_size": 100}, timeout=30).json()["tasks"]
    scene_of = {t["id"]: scenes[int(t["data"]["image"].rsplit("scene", 1)[1][:2])] for t in tasks}
    ordered = sorted(scene_of)
    round1 = ordered[:10]
    # round 2 adds training tasks only, so both rounds are judged on the same held-out tasks
    round2 = [t for t in ordered[10:] if holdout_key(t) >= 0.25][:3]
    assert len(round2) == 3 and split_samples([(t, None) for t in round1], 0.25).holdout_task_ids
    r = api.post(f"{url}/api/ml", json={"url": backend_server.url, "project": pid, "title": "ODISE tiny"}, timeout=60)
    assert r.status_code == 201, r.text
    ml_id = r.json()["id"]

    def annotate(task_ids: list[int]) -> None:
        for tid in task_ids:
            s = scene_of[tid]
            r = api.post(f"{url}/api/tasks/{tid}/annotations", json={
                "result": _polygon_results(s.masks, s.classes), "was_cancelled": False, "lead_time": 1.0}, timeout=60)
            assert r.status_code == 201, r.text

    def start_training() -> None:
        r = api.post(f"{url}/api/ml/{ml_id}/train", json={}, timeout=120)
        assert r.status_code == 200, r.text

    key = str(pid)
    annotate(round1)
    assert jobs.status(key)["scheduled"], "the annotation webhooks did not reach the backend"
    start_training()
    first = jobs.job(key)
    assert first is not None and first.reason == "START_TRAINING"
    assert not jobs.status(key)["scheduled"], "the job reads those annotations: their debounce must be dropped"
    _wait_state(first, ("training",), 300)
    start_training()  # pressed again while the round trains
    second = jobs.job(key)
    assert second is not first and jobs.status(key)["followup"] == second.id
    assert first.wait(TRAIN_TIMEOUT) and second.wait(60)
    log.info("round 1: %s / %s", first.as_dict(), second.as_dict())
    assert first.state == "done" and first.version == "v0001", first.as_dict()
    assert first.promoted, f"round 1 fine-tune was not better than the base model: {first.message}"
    assert second.state == "skipped" and second.same_data_as == first.id and second.version is None
    time.sleep(debounce + 2)  # a stray debounced webhook job would start within this time
    assert jobs.job(key) is second and jobs.store.versions(key) == ["v0001"]
    meta1 = jobs.store.metadata(key, "v0001")
    assert meta1["baseline"]["version"] is None and meta1["data"]["train"] + meta1["data"]["holdout"] == 10

    monkeypatch.setattr(backend.settings.finetune, "steps", 20)  # round 2 checks what it is judged against, not its gain
    annotate(round2)
    deadline = time.time() + 120
    while jobs.job(key) is second and time.time() < deadline:
        time.sleep(0.2)
    third = jobs.job(key)
    assert third is not second and third.reason == "ANNOTATION_CREATED"
    assert third.wait(TRAIN_TIMEOUT) and third.state == "done", third.as_dict()
    log.info("round 2: %s", third.as_dict())
    meta2 = jobs.store.metadata(key, third.version)
    assert third.version == "v0002" and meta2["parent_version"] == "v0001"
    assert meta2["data"]["holdout_task_ids"] == meta1["data"]["holdout_task_ids"]
    # judged against v0001 (serving by then) on the same held-out tasks: v0001's own figures there
    assert meta2["baseline"]["version"] == "v0001" and third.metrics["baseline_version"] == "v0001"
    assert meta2["baseline"]["holdout"] == meta1["eval"]["holdout_after"]
    assert third.promoted == is_better(_figures(meta2["eval"]["holdout_after"]), _figures(meta1["eval"]["holdout_after"]))

    # every job id handed out answers, now and after a restart
    for job in (first, second, third):
        body = requests.post(f"{backend_server.url}/job_status", json={"job": job.id}, timeout=30)
        assert body.status_code == 200 and body.json()["state"] == job.state, body.text
        assert JobManager(jobs.store.root).find(job.id).as_dict() == job.as_dict()


def _figures(d: dict) -> Any:
    from odise_core.tools.evaluation import EvalResult

    nan = float("nan")
    return EvalResult(*(nan if d[k] is None else d[k] for k in ("pq", "sq", "rq", "pq_things", "pq_stuff", "mask_ap",
                                                                  "mask_ap50", "miou")), d["num_images"])
