"""Re-rank after promotion through a real Label Studio: pre-label, annotate, Start Training, promotion ->
the tasks' stored predictions move to the new model version by themselves (this backend's older ones
deleted), the project's selected model version follows, so the Data Manager's prediction-score order
is the new model's; the refresh is visible in /health and /job_status with done/total, and a newer
refresh request cancels the running one, which the newer one completes.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from label_studio_sdk.client import LabelStudio

from backend.label_config import make_label_config
from backend.prelabel import prelabel_project
from odise_core.tools.synthetic import make_dataset
from tests.e2e.test_e2e_learning import (SIZE, TRAIN_TIMEOUT, VOCAB, _png, _polygon_results, _train_settings,
                                         project_predictions)

pytestmark = pytest.mark.e2e

N_TASKS = 10
REFRESH_TIMEOUT = 600.0


def _health(backend_url: str) -> dict:
    r = requests.get(f"{backend_url}/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _refresh_of(backend_url: str, pid: int) -> dict | None:
    return next((j for j in _health(backend_url)["refresh"] if j["project"] == str(pid)), None)


def test_promotion_refreshes_the_stored_predictions(label_studio: Any, backend_server: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backend_server.backend
    jobs = backend.jobs
    _train_settings(backend, monkeypatch, min_annotations=3, debounce=600.0)  # Start Training below, not webhooks
    api, url = label_studio.api(), label_studio.url
    r = api.post(f"{url}/api/projects", json={"title": "odise e2e refresh",
                                              "label_config": make_label_config(VOCAB, kind="polygon")}, timeout=30)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    scenes = make_dataset(16, seed=23, size=SIZE)[:N_TASKS]  # the round that promotes in test_e2e_learning
    files = [(f"file{i}", (f"scene{i:02d}.png", _png(s.image), "image/png")) for i, s in enumerate(scenes)]
    r = api.post(f"{url}/api/projects/{pid}/import", files=files, timeout=120)
    assert r.status_code == 201, r.text
    tasks = api.get(f"{url}/api/tasks", params={"project": pid, "page_size": 100}, timeout=30).json()["tasks"]
    scene_of = {t["id"]: scenes[int(t["data"]["image"].rsplit("scene", 1)[1][:2])] for t in tasks}
    r = api.post(f"{url}/api/ml", json={"url": backend_server.url, "project": pid, "title": "ODISE tiny"}, timeout=60)
    assert r.status_code == 201, r.text
    ml_id = r.json()["id"]

    # pre-label with the base model, and keep a prediction of another model that must survive
    client = LabelStudio(base_url=url, api_key=label_studio.personal_token)
    base_version = backend.model_version(str(pid))
    summary = prelabel_project(backend, client, pid, progress=False)
    assert (summary.predicted, summary.failures) == (N_TASKS, [])
    other = api.post(f"{url}/api/predictions", json={"task": min(scene_of), "result": [], "score": 0.5,
                                                     "model_version": "someone-else-v1"}, timeout=30)
    assert other.status_code == 201, other.text
    base_ids = {p["id"] for p in project_predictions(label_studio, pid) if p["model_version"] == base_version}
    assert len(base_ids) == N_TASKS
    # the user picks this backend's predictions in Settings > Predictions (what the score column averages)
    r = api.patch(f"{url}/api/projects/{pid}", json={"model_version": base_version}, timeout=30)
    assert r.status_code == 200, r.text

    for tid, s in scene_of.items():
        r = api.post(f"{url}/api/tasks/{tid}/annotations", json={
            "result": _polygon_results(s.masks, s.classes), "was_cancelled": False, "lead_time": 1.0}, timeout=60)
        assert r.status_code == 201, r.text
    r = api.post(f"{url}/api/ml/{ml_id}/train", json={}, timeout=120)
    assert r.status_code == 200, r.text
    train = jobs.job(str(pid))
    assert train is not None and train.wait(TRAIN_TIMEOUT), "training did not finish"
    assert train.state == "done" and train.promoted, train.as_dict()
    new_version = backend.model_version(str(pid))
    assert new_version == f"{base_version}+{pid}-{train.version}"

    # the promotion started a refresh by itself: wait until it has written one task, then pause it
    # (hold the forward-pass lock it takes per image) and ask for another refresh of the same project
    deadline = time.time() + REFRESH_TIMEOUT
    first = _refresh_of(backend_server.url, pid)
    while (first is None or first["done"] < 1) and time.time() < deadline:
        time.sleep(0.1)
        first = _refresh_of(backend_server.url, pid)
    assert first is not None and first["done"] >= 1, f"no refresh progress in /health: {first}"
    with backend._predict_lock:
        first = _refresh_of(backend_server.url, pid)
        assert first["state"] == "refreshing" and first["total"] == N_TASKS and first["version"] == new_version
        assert first["done"] < first["total"], f"the refresh ended before it could be superseded: {first}"
        r = requests.post(f"{backend_server.url}/refresh", json={"project": pid}, timeout=30)
        assert r.status_code == 201, r.text
        second = r.json()
        assert second["kind"] == "refresh" and second["id"] != first["id"]
    assert backend.refresher.find(second["id"]).wait(REFRESH_TIMEOUT), "the second refresh did not end"

    first_status = requests.post(f"{backend_server.url}/job_status", json={"job": first["id"]}, timeout=30).json()
    assert first_status["state"] == "cancelled" and second["id"] in first_status["message"], first_status
    done_by_first = first_status["metrics"]["predicted"]
    assert 1 <= done_by_first < N_TASKS
    second_status = requests.post(f"{backend_server.url}/job_status", json={"job": second["id"]}, timeout=30).json()
    assert second_status["state"] == "done", second_status
    # the first one wrote what it had predicted before it stopped; the second had only the rest to do
    assert (second_status["total_steps"], second_status["metrics"]["already_current"]) == (N_TASKS - done_by_first, 0)
    assert second_status["step"] == second_status["total_steps"] and second_status["metrics"]["failed"] == 0
    assert second_status["metrics"]["images_per_second"] > 0
    assert _refresh_of(backend_server.url, pid)["id"] == second["id"]

    # Label Studio now holds exactly one prediction of this backend per task, of the new version,
    # plus the other model's prediction untouched
    stored = project_predictions(label_studio, pid)
    ours = [p for p in stored if p["model_version"] != "someone-else-v1"]
    assert sorted(p["task"] for p in ours) == sorted(scene_of), [(p["task"], p["model_version"]) for p in ours]
    assert {p["model_version"] for p in ours} == {new_version}
    assert not base_ids & {p["id"] for p in stored}
    assert [p["task"] for p in stored if p["model_version"] == "someone-else-v1"] == [min(scene_of)]
    # the project's selection moved to the new version: the Data Manager sorts by the new model's scores
    assert api.get(f"{url}/api/projects/{pid}", timeout=30).json()["model_version"] == new_version
    view = api.post(f"{url}/api/dm/views", json={"project": pid, "data": {"ordering": ["tasks:predictions_score"]}},
                    timeout=30).json()["id"]
    listed = api.get(f"{url}/api/tasks", params={"project": pid, "view": view, "fields": "all", "page_size": 100},
                     timeout=30).json()["tasks"]
    new_score = {p["task"]: p["score"] for p in ours}
    assert {t["id"]: t["predictions_score"] for t in listed} == pytest.approx(new_score)
    assert [t["predictions_score"] for t in listed] == sorted(new_score.values())
    # and a rerun finds nothing left to refresh
    r = requests.post(f"{backend_server.url}/refresh", json={"project": pid}, timeout=30)
    rerun = backend.refresher.find(r.json()["id"])
    assert rerun.wait(120) and rerun.state == "done" and rerun.total_steps == 0, rerun.as_dict()
