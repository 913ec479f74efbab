"""Refreshing stored predictions after a promotion: the setting, which predictions are stale, the
refresh jobs (newest wins, restart, failures reported) and their wiring into the server.

The refresh of a real Label Studio project runs in tests/e2e/test_e2e_refresh.py; here the manager
runs a work function driven by events, and the server runs without Label Studio.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from backend.app import create_app
from backend.cli import build_parser
from backend.learning import JobManager
from backend.learning.jobs import Job, JobRecords
from backend.learning.refresh import RefreshManager, own_version, stale_predictions
from backend.batch import run_overlapped
from backend.settings import BackendSettings, SettingsError
from tests.test_app import _backend

BASE = "odise-tiny-1234abcd-sabcdef"


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("AUTO", "auto"), ("true", "true"), ("1", "true"),
                                            ("yes", "true"), ("false", "false"), ("off", "false")])
def test_refresh_on_promote_values(value, expected):
    assert BackendSettings.from_env({"REFRESH_ON_PROMOTE": value}).refresh_on_promote == expected


def test_refresh_on_promote_refuses_other_values_naming_the_variable():
    with pytest.raises(SettingsError, match=r"REFRESH_ON_PROMOTE='sometimes' is not one of auto, true, false"):
        BackendSettings.from_env({"REFRESH_ON_PROMOTE": "sometimes"})
    with pytest.raises(SettingsError, match="REFRESH_ON_PROMOTE"):
        BackendSettings(refresh_on_promote="maybe").validate()


def test_refresh_enabled_auto_follows_label_studio_credentials():
    auto, on, off = (BackendSettings.from_env({}, refresh_on_promote=v) for v in ("auto", "true", "false"))
    assert BackendSettings.from_env({}).refresh_on_promote == "auto"
    assert [auto.refresh_enabled(known) for known in (True, False)] == [True, False]
    assert [on.refresh_enabled(known) for known in (True, False)] == [True, True]
    assert [off.refresh_enabled(known) for known in (True, False)] == [False, False]


def test_serve_flag_beats_the_environment():
    args = build_parser().parse_args(["serve", "--refresh-on-promote", "false"])
    assert BackendSettings.resolve(args, {"REFRESH_ON_PROMOTE": "true"}).refresh_on_promote == "false"
    args = build_parser().parse_args(["serve"])
    assert BackendSettings.resolve(args, {"REFRESH_ON_PROMOTE": "true"}).refresh_on_promote == "true"


def test_stale_predictions_are_this_backends_older_versions_of_the_project():
    current = f"{BASE}+7-v0002"
    task = {"id": 1, "predictions": [
        {"id": 10, "model_version": BASE}, {"id": 11, "model_version": f"{BASE}+7-v0001"},
        {"id": 12, "model_version": current}, {"id": 13, "model_version": f"{BASE}+8-v0001"},
        {"id": 14, "model_version": "odise-tiny-ffffffff-sabcdef"}, {"id": 15, "model_version": "other-model"},
        {"id": 16, "model_version": None}, {"id": 17, "model_version": f"{BASE}x"}]}
    assert [p["id"] for p in stale_predictions(task, current, BASE, "7")] == [10, 11]
    assert stale_predictions({"id": 2, "predictions": []}, current, BASE, "7") == []
    assert own_version(current, BASE, "7") and not own_version(f"{BASE}+70-v0001", BASE, "7")


class _Work:
    """A refresh's work function whose progress the test drives: each call waits for `go`."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.go = threading.Event()
        self.entered = threading.Event()
        self.fail: str | None = None

    def __call__(self, job: Job) -> None:
        self.started.append(job.id)
        self.entered.set()
        while not self.go.wait(0.01):
            job.check()
        if self.fail:
            raise ConnectionError(self.fail)
        job.version, job.total_steps, job.step = "v-new", 3, 3
        job.metrics = {"predicted": 3, "failed": 0}


def _manager(tmp_path: Path, work: _Work) -> RefreshManager:
    return RefreshManager(tmp_path, JobRecords(tmp_path), work)


def test_a_newer_refresh_cancels_the_running_one_and_runs_after_it(tmp_path):
    work = _Work()
    manager = _manager(tmp_path, work)
    first = manager.start("5", "promoted v0001")
    assert work.entered.wait(10)
    second = manager.start("5", "promoted v0002")
    assert first.wait(10) and first.state == "cancelled"
    assert first.message == f"cancelled: superseded by refresh {second.id} (promoted v0002)"
    work.go.set()
    assert second.wait(10) and second.state == "done", second.as_dict()
    assert work.started == [first.id, second.id] and second.message == "refreshed 3 of 3 task(s) to v-new"
    assert manager.latest("5") is second and manager.find(first.id) is first
    assert [(j["id"], j["done"], j["total"]) for j in manager.overview()] == [(second.id, 3, 3)]
    assert not (tmp_path / ".refresh" / "5.json").exists()  # finished: nothing to resume
    records = JobRecords(tmp_path)
    assert records.load(first.id).as_dict() == first.as_dict() and records.load(second.id).kind == "refresh"


def test_a_restart_resumes_an_unfinished_refresh_and_its_job_id_still_answers(tmp_path):
    work = _Work()
    manager = _manager(tmp_path, work)
    job = manager.start("9", "promoted v0003")
    assert work.entered.wait(10)
    manager.shutdown(timeout=10)  # the server stops mid-refresh
    assert job.state == "cancelled" and job.message == "cancelled: the backend is shutting down"
    assert json.loads((tmp_path / ".refresh" / "9.json").read_text())["job"] == job.id

    restarted = _manager(tmp_path, _Work())
    assert restarted.pending() == ["9"]
    assert JobManager(tmp_path).find(job.id).as_dict() == job.as_dict()  # answers from its record


def test_a_failed_refresh_is_reported_kept_pending_and_the_next_one_runs(tmp_path):
    work = _Work()
    work.fail = "Label Studio is down"
    work.go.set()
    manager = _manager(tmp_path, work)
    job = manager.start("4", "promoted v0001")
    assert job.wait(10) and job.state == "failed"
    assert job.message == "ConnectionError: Label Studio is down"
    assert manager.pending() == ["4"] and manager.overview()[0]["state"] == "failed"
    work.fail = None
    again = manager.start("4", "resumed")
    assert again.wait(10) and again.state == "done" and manager.pending() == []


def test_run_overlapped_stops_when_asked_and_reports_each_item():
    seen: list[int] = []
    stop = threading.Event()

    def compute(item: int, _: None) -> None:
        if item == 2:
            stop.set()

    progress = run_overlapped(list(range(6)), lambda i: None, compute, name=str, progress=False,
                              stop=stop.is_set, on_item=lambda p: seen.append(p.done))
    assert (progress.done, progress.interrupted, seen) == (3, True, [1, 2, 3])


def test_the_server_refreshes_after_a_promotion_only_when_the_setting_allows(tmp_path):
    auto = _backend(tmp_path / "auto")
    auto._on_promoted("3", "v0001")
    assert auto.refresher.latest("3") is None  # auto, and Label Studio unknown

    on = _backend(tmp_path / "on", refresh_on_promote="true")
    on.start_loading(background=False)
    on._on_promoted("3", "v0001")
    job = on.refresher.latest("3")
    assert job is not None and job.wait(10) and job.state == "failed"
    assert "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in job.message
    client = create_app(on).test_client()
    assert client.get("/health").get_json()["refresh"][0]["state"] == "failed"  # reported, serving goes on
    body = client.post("/job_status", json={"job": job.id}).get_json()
    assert (body["kind"], body["state"]) == ("refresh", "failed")

    off = _backend(tmp_path / "off", refresh_on_promote="false", label_studio_url="http://127.0.0.1:9",
                   api_key="key")
    off._on_promoted("3", "v0001")
    assert off.label_studio_known and off.refresher.latest("3") is None


def test_refresh_endpoint_needs_a_project_and_label_studio(tmp_path):
    backend = _backend(tmp_path)
    backend.start_loading(background=False)
    client = create_app(backend).test_client()
    r = client.post("/refresh", json={})
    assert r.status_code == 400 and '"project"' in r.get_json()["error"]
    r = client.post("/refresh", json={"project": 3})
    assert r.status_code == 400 and "LABEL_STUDIO_URL" in r.get_json()["error"]
