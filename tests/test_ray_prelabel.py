"""`prelabel --ray` on a local Ray cluster (2 CPUs, tiny preset): the same outputs as the single-process
path, resume, a bad image, a killed actor, a project's predictions written in batches, and actors that
fetch the next images from a slow image host while the model works."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from skimage import data as skdata
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from backend.label_config import make_label_config
from backend.model import BackendSettings, ODISEBackend
from backend.prelabel import ImportFile, prelabel_folder, prelabel_project
from odise_core.vocabulary import Vocabulary

from backend.cli import build_parser
from backend.ray_prelabel import (ACTOR_PREFIX, IN_FLIGHT_PER_WORKER, RayUnavailable, WorkerPool, import_ray,
                                  prelabel_folder_on_ray, prelabel_project_on_ray)

XML = make_label_config(Vocabulary.from_text("person,cat,cup,sky"), kind="polygon")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
BROKEN = "/data/local-files/?d=photos/broken.jpg"
DELAY = 0.8  # seconds the slow image host waits before answering each request


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU cluster whose workers run at normal priority (Ray nices them by default), like the
    test process, and without Ray's memory monitor, which kills workers when the whole machine (shared
    with other processes) nears its memory limit."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_worker_niceness", "0")
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> BackendSettings:
    return BackendSettings(preset="tiny", device="cpu", fast=True, model_dir=tmp_path_factory.mktemp("models"),
                           feature_cache_dtype="fp32")  # exact: Ray actors hit the features the single run cached


def _photos(root: Path) -> Path:
    folder = root / "photos"
    folder.mkdir(parents=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((160, 120)).save(folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _photos(tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="module")
def backend(settings) -> ODISEBackend:
    """The single-process path's backend."""
    backend = ODISEBackend(settings)
    backend.start_loading(background=False)
    return backend


@pytest.fixture(scope="module")
def single(backend, folder, tmp_path_factory):
    """The single-process run everything is compared with: (tasks by URL, summary)."""
    out = tmp_path_factory.mktemp("single") / "tasks.json"
    summary = prelabel_folder(backend, XML, folder, out, progress=False)
    return _tasks(out), summary


def _tasks(out: Path) -> dict[str, dict]:
    """Tasks of an import JSON by image URL, without region ids (random per region, by design)."""
    return _without_ids({t["data"]["image"]: t for t in json.loads(out.read_text())})


def _without_ids(value):
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k != "id" or "value" not in value}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def test_ray_run_equals_the_single_process_run_and_resumes(cluster, settings, folder, single, tmp_path):
    expected, base = single
    assert (base.predicted, len(base.failures)) == (len(PHOTOS), 1)
    out = tmp_path / "tasks.json"
    summary = prelabel_folder_on_ray(settings, XML, folder, out, workers=2, progress=False)
    assert (summary.total, summary.predicted, summary.skipped, summary.workers) == (len(PHOTOS) + 1, len(PHOTOS), 0, 2)
    assert summary.model_version == base.model_version
    assert [f.item for f in summary.failures] == [f.item for f in base.failures] == [BROKEN]
    assert "is not a readable image" in summary.failures[0].error
    assert _tasks(out) == expected
    assert any(t["predictions"][0]["result"] for t in expected.values())
    assert not out.with_name("tasks.json.partial.jsonl").exists()
    assert "2 Ray worker(s), 0 lost, 0 replaced" in summary.format()
    assert [w.threads for w in summary.worker_stats] == [1, 1]  # one torch thread per reserved CPU
    assert sum(w.images for w in summary.worker_stats) == len(PHOTOS) + 1  # the broken image is answered too

    again = prelabel_folder_on_ray(settings, XML, folder, out, workers=1, cpus_per_worker=2, progress=False)
    assert (again.predicted, again.skipped, [f.item for f in again.failures]) == (0, len(PHOTOS), [BROKEN])
    assert [(w.threads, w.images) for w in again.worker_stats] == [(2, 1)]
    assert _tasks(out) == expected


def test_ray_run_resumes_an_interrupted_journal(cluster, settings, folder, single, tmp_path):
    expected, _ = single
    kept = expected["/data/local-files/?d=photos/chelsea.jpg"]
    out = tmp_path / "tasks.json"
    (tmp_path / "tasks.json.partial.jsonl").write_text(
        json.dumps({"url": kept["data"]["image"], "prediction": kept["predictions"][0]}) + "\n")
    summary = prelabel_folder_on_ray(settings, XML, folder, out, workers=2, progress=False)
    assert (summary.predicted, summary.skipped, len(summary.failures)) == (len(PHOTOS) - 1, 1, 1)
    assert _tasks(out) == expected


def _actor_names(ray) -> list[str]:
    names = (n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors())
    return sorted(n for n in names if n.startswith(ACTOR_PREFIX))


def test_a_killed_actor_is_replaced_and_the_run_ends_with_as_many_workers(cluster, settings, folder, single,
                                                                         tmp_path, monkeypatch):
    """SIGKILL one of two actors after the first answer: its images are redone, a new actor takes its place and
    answers images too, and every prediction equals the single process's."""
    ray = cluster
    expected, _ = single
    copies = tmp_path / "photos"
    copies.mkdir()
    for copy in range(3):
        for name in PHOTOS:
            shutil.copy(folder / f"{name}.jpg", copies / f"{name}-{copy}.jpg")
    killed: list[str] = []
    joined: list[str] = []
    add = ImportFile.add

    def add_then_kill_and_await_the_replacement(self, url, prediction):
        add(self, url, prediction)
        names = _actor_names(ray)
        if not killed:
            assert len(names) == 2
            os.kill(ray.get(ray.get_actor(names[0]).stats.remote()).pid, signal.SIGKILL)
            killed.append(names[0])
        elif not joined and names[-1].endswith("-2"):  # hold the driver until the new actor has built its model
            ray.get(ray.get_actor(names[-1]).model_version.remote())
            joined.append(names[-1])

    monkeypatch.setattr(ImportFile, "add", add_then_kill_and_await_the_replacement)
    out = tmp_path / "tasks.json"
    summary = prelabel_folder_on_ray(settings, XML, copies, out, workers=2, progress=False)
    assert killed and killed[0].endswith("-0") and joined
    assert (summary.workers, summary.workers_lost, summary.workers_replaced) == (2, 1, 1)
    assert (summary.predicted, summary.failures) == (3 * len(PHOTOS), [])
    assert summary.retried >= 1
    by_name = {w.name: w.images for w in summary.worker_stats}
    assert len(by_name) == 2 and killed[0] not in by_name and by_name[joined[0]] >= 1
    tasks = _tasks(out)
    assert len(tasks) == 3 * len(PHOTOS)
    for url, task in tasks.items():
        original = url.rsplit("-", 1)[0] + ".jpg"
        assert task["predictions"] == expected[original]["predictions"], url
    assert "1 lost, 1 replaced" in summary.format()


class _FakeLabelStudio:
    """The slice of the SDK client prelabel uses, over tasks held in memory, one per image URL or path."""

    def __init__(self, images: list[str]):
        self.items = [{"id": i + 1, "data": {"image": image}, "predictions": []} for i, image in enumerate(images)]
        self.imports: list[int] = []
        self.projects = SimpleNamespace(get=lambda id: SimpleNamespace(label_config=XML),
                                        import_predictions=self._import)
        self.tasks = SimpleNamespace(list=lambda project, fields: [dict(t) for t in self.items])
        self.predictions = SimpleNamespace(create=self._create)

    def _create(self, task: int, result: list, score: float | None, model_version: str) -> None:
        self.items[task - 1]["predictions"].append({"result": result, "score": score, "model_version": model_version})

    def _import(self, id: int, request: list) -> None:
        self.imports.append(len(request))
        for r in request:
            self._create(r.task, r.result, r.score, r.model_version)


def test_project_mode_writes_the_single_process_predictions_in_batches(cluster, settings, backend, folder):
    paths = [str(folder / f"{n}.jpg") for n in PHOTOS]
    one, many = _FakeLabelStudio(paths), _FakeLabelStudio(paths)
    base = prelabel_project(backend, one, 7, progress=False)
    summary = prelabel_project_on_ray(settings, many, 7, workers=2, progress=False)
    assert (summary.predicted, summary.failures, summary.model_version) == (len(PHOTOS), [], base.model_version)
    assert many.imports == [len(PHOTOS)]  # one batch: fewer than WRITE_BATCH predictions
    assert _without_ids(many.items) == _without_ids(one.items)
    again = prelabel_project_on_ray(settings, many, 7, workers=1, progress=False)
    assert (again.predicted, again.skipped, many.imports) == (0, len(PHOTOS), [len(PHOTOS)])


class _SlowImageHost:
    """The files of a folder over HTTP on 127.0.0.1, each answer DELAY seconds late; records the paths asked
    for and the most requests it had under way at once."""

    def __init__(self, folder: Path):
        self.paths: list[str] = []
        self.active = self.peak = 0
        self._lock = threading.Lock()

        @Request.application
        def app(request: Request) -> Response:
            with self._lock:
                self.paths.append(request.path)
                self.active += 1
                self.peak = max(self.peak, self.active)
            time.sleep(DELAY)
            with self._lock:
                self.active -= 1
            file = folder / request.path.rsplit("/", 1)[-1]
            return Response(file.read_bytes(), mimetype="image/jpeg") if file.is_file() else Response("gone", 404)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def slow_host(folder):
    host = _SlowImageHost(folder)
    yield host
    host.server.shutdown()
    host.server.server_close()


def test_an_actor_fetches_the_next_images_while_the_model_works(cluster, settings, backend, slow_host):
    """One actor, images from a host that answers DELAY s late: the downloads overlap the predictions (the
    run takes well under the downloads plus the model time, one after the other), each image is downloaded
    once, and the predictions and failures are the single process's: a missing image and a task whose data
    is not a dict fail alone, and the next run retries them."""
    images = [f"{slow_host.url}/{copy}/{name}.jpg" for copy in "ab" for name in PHOTOS] + [f"{slow_host.url}/gone.jpg"]
    one, many = _FakeLabelStudio(images), _FakeLabelStudio(images)
    for fake in (one, many):
        fake.items.append({"id": len(images) + 1, "data": "an image", "predictions": []})
    base = prelabel_project(backend, one, 7, progress=False)
    assert base.predicted == 2 * len(PHOTOS)
    slow_host.paths.clear()
    slow_host.peak = 0  # the single process's read-ahead had two downloads under way too
    with WorkerPool(settings, XML, "7", 1) as pool:
        summary = prelabel_project_on_ray(settings, many, 7, progress=False, pool=pool)
        again = prelabel_project_on_ray(settings, many, 7, progress=False, pool=pool)
    assert (summary.predicted, summary.model_version) == (base.predicted, base.model_version)
    assert _without_ids(many.items) == _without_ids(one.items)
    failed, failed_before = ({f.item: f.error for f in s.failures} for s in (summary, base))
    assert sorted(failed) == sorted(failed_before) == ["task 10", "task 9"]  # answers arrive in any order
    assert "HTTP 404" in failed["task 9"] and "HTTP 404" in failed_before["task 9"]
    assert failed["task 10"] == failed_before["task 10"] and failed["task 10"].startswith("TypeError: ")
    assert (again.predicted, again.skipped) == (0, 2 * len(PHOTOS))
    assert sorted(f.item for f in again.failures) == ["task 10", "task 9"]
    first = sorted(i[len(slow_host.url):] for i in images)
    assert sorted(slow_host.paths) == sorted(first + ["/gone.jpg"])  # once each, and the missing one again
    assert 2 <= slow_host.peak <= IN_FLIGHT_PER_WORKER

    (worker,) = summary.worker_stats
    assert worker.images == len(images) + 1
    assert worker.busy_seconds + DELAY <= summary.seconds  # busy is the model's time: the first download precedes it
    one_after_the_other = len(images) * DELAY + worker.busy_seconds
    assert summary.seconds < one_after_the_other - len(images) * DELAY / 2, (summary.seconds, worker)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailable, match=r"pip install 'odise-label-studio\[ray\]'"):
        import_ray()


@pytest.mark.parametrize("workers, cpus, gpus", [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_a_pool_refuses_resources_no_actor_could_use(settings, workers, cpus, gpus):
    with pytest.raises(ValueError, match="--workers must be at least 1|--cpus-per-worker must be above 0"):
        WorkerPool(settings, XML, None, workers, gpus_per_worker=gpus, cpus_per_worker=cpus)


def test_settings_repr_hides_the_label_studio_key():
    assert "s3cret" not in repr(BackendSettings(api_key="s3cret", webhook_secret="s3cret"))


def test_ray_flags_parse():
    parse = build_parser().parse_args
    base = ["prelabel", "--folder", "photos", "--labels", "cat"]
    assert parse(base).ray is None
    assert parse(base + ["--ray"]).ray == ""
    assert (parse(base).cpus_per_worker, parse(base).gpus_per_worker) == (1.0, 0.0)
    args = parse(base + ["--ray", "auto", "--workers", "4", "--gpus-per-worker", "0.5", "--cpus-per-worker", "3"])
    assert (args.ray, args.workers, args.gpus_per_worker, args.cpus_per_worker) == ("auto", 4, 0.5, 3.0)
    assert parse(base + ["--ray", "ray://head:10001"]).ray == "ray://head:10001"
