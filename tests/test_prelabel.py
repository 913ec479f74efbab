"""Batch pre-labeling of a folder with the tiny preset: import JSON, resumability, failures, overlap."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from skimage import data as skdata

from backend.batch import PrelabelSummary, run_overlapped
from backend.label_config import make_label_config
from backend.model import BackendSettings, ODISEBackend
from backend.prelabel import ImportFile, prelabel_folder
from odise_core.vocabulary import Vocabulary

PHOTOS = ("astronaut", "chelsea")
XML = make_label_config(Vocabulary.from_text("person,cat,cup,sky"), kind="polygon")


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> ODISEBackend:
    # overlap 0.0 (the reference demo's value): the random tiny model then yields regions on every photo
    b = ODISEBackend(BackendSettings(preset="tiny", device="cpu", overlap_threshold=0.0,
                                     model_dir=tmp_path_factory.mktemp("models")))
    b.start_loading(background=False)
    assert b.error is None
    return b


def _photos(root: Path) -> Path:
    folder = root / "files" / "photos"
    folder.mkdir(parents=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


@pytest.fixture(scope="module")
def first_run(backend, tmp_path_factory) -> tuple[Path, Path, PrelabelSummary]:
    """One folder run shared by the tests (the tiny model still takes seconds per image on a busy CPU)."""
    root = tmp_path_factory.mktemp("run")
    folder = _photos(root)
    out = root / "tasks.json"
    return folder, out, prelabel_folder(backend, XML, folder, out, progress=False)


def test_folder_mode_writes_a_valid_import_json_and_lists_failures(backend, first_run):
    folder, out, summary = first_run
    assert (summary.total, summary.predicted, summary.skipped) == (3, 2, 0)
    assert [f.item for f in summary.failures] == ["/data/local-files/?d=photos/broken.jpg"]
    assert "not a readable image" in summary.failures[0].error
    assert summary.images_per_second > 0 and summary.model_version == backend.model_version()
    assert "images/s" in summary.format() and "FAILED /data/local-files/?d=photos/broken.jpg" in summary.format()

    tasks = json.loads(out.read_text())
    sizes = {f"/data/local-files/?d=photos/{n}.jpg": Image.open(folder / f"{n}.jpg").size for n in PHOTOS}
    assert sorted(t["data"]["image"] for t in tasks) == sorted(sizes)
    interface = LabelInterface(XML)
    config = backend.parse_config(XML)
    version, model = backend.model_for(None)
    for task in tasks:
        assert len(task["predictions"]) == 1
        pred = task["predictions"][0]
        assert pred["model_version"] == summary.model_version
        assert interface.validate_prediction(pred, return_errors=True) == []
        assert len(pred["result"]) >= 1, "every photo gets regions"
        # the same regions the server answers for the same image (region ids are random)
        name = task["data"]["image"].rsplit("/", 1)[-1]
        direct = backend.predict_task({"data": {"image": str(folder / name)}}, config, model, version)
        strip = [{k: v for k, v in r.items() if k != "id"} for r in pred["result"]]
        assert strip == [{k: v for k, v in r.items() if k != "id"} for r in direct["result"]]
        assert pred["score"] == direct["score"]
        w, h = sizes[task["data"]["image"]]
        for region in pred["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "polygonlabels")
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert region["value"]["polygonlabels"][0] in ("person", "cat", "cup", "sky")
            assert all(0 <= c <= 100 for point in region["value"]["points"] for c in point)
    assert not out.with_name("tasks.json.partial.jsonl").exists()


def test_second_run_skips_done_images_and_retries_failures(backend, first_run):
    folder, out, _ = first_run
    before = out.read_text()
    again = prelabel_folder(backend, XML, folder, out, progress=False)
    assert (again.total, again.predicted, again.skipped, len(again.failures)) == (3, 0, 2, 1)
    assert out.read_text() == before


def test_interrupted_run_resumes_from_its_journal(backend, first_run, tmp_path):
    tasks = json.loads(first_run[1].read_text())
    folder = _photos(tmp_path)
    out = tmp_path / "tasks.json"
    # An interrupted run leaves only the journal: one image done, no JSON yet.
    kept = next(t for t in tasks if t["data"]["image"].endswith("chelsea.jpg"))
    journal = tmp_path / "tasks.json.partial.jsonl"
    journal.write_text(json.dumps({"url": kept["data"]["image"], "prediction": kept["predictions"][0]}) + "\n")
    assert ImportFile(out, "image").done(kept["data"]["image"], kept["predictions"][0]["model_version"])

    summary = prelabel_folder(backend, XML, folder, out, progress=False)
    assert (summary.predicted, summary.skipped, len(summary.failures)) == (1, 1, 1)
    resumed = {t["data"]["image"]: t for t in json.loads(out.read_text())}
    assert len(resumed) == 2 and resumed[kept["data"]["image"]] == kept
    assert not journal.exists()


def test_images_outside_the_document_root_are_refused(backend, first_run, tmp_path):
    with pytest.raises(ValueError, match="document root"):
        prelabel_folder(backend, XML, first_run[0], tmp_path / "t.json", document_root=tmp_path / "elsewhere",
                        progress=False)


def test_fetching_overlaps_compute_and_failures_do_not_stop_the_run():
    started = {i: threading.Event() for i in range(6)}
    computed = []

    def fetch(i: int) -> int:
        started[i].set()
        if i == 2:
            raise OSError("unreachable")
        return i * 10

    def compute(i: int, value: int) -> None:
        # The next image must already be fetching while this one computes.
        if i + 1 in started:
            assert started[i + 1].wait(timeout=5), f"image {i + 1} was not prefetched during compute of {i}"
        if i == 4:
            raise RuntimeError("out of memory")
        computed.append(value)

    t0 = time.perf_counter()
    run = run_overlapped(list(range(6)), fetch, compute, name=str, workers=2, prefetch=3, progress=False)
    assert run.done == 4 and computed == [0, 10, 30, 50] and not run.interrupted
    assert [(f.item, f.error) for f in run.failures] == [("2", "OSError: unreachable"),
                                                         ("4", "RuntimeError: out of memory")]
    assert 0 < run.seconds <= time.perf_counter() - t0


def test_ctrl_c_abandons_the_item_in_flight_and_cancels_the_read_ahead():
    fetched = []

    def fetch(i: int) -> int:
        fetched.append(i)
        return i

    def compute(i: int, value: int) -> None:
        if i == 2:
            raise KeyboardInterrupt

    run = run_overlapped(list(range(50)), fetch, compute, name=str, workers=1, prefetch=2, progress=False)
    assert run.interrupted and run.done == 2 and run.failures == []
    assert max(fetched) <= 4, "read-ahead stops at the interruption"


def test_a_journal_line_cut_short_is_dropped_and_the_rest_kept(tmp_path):
    journal = tmp_path / "t.json.partial.jsonl"
    good = json.dumps({"url": "/a.jpg", "prediction": {"model_version": "v", "result": []}})
    journal.write_text(good + "\n" + good.replace("/a.jpg", "/b.jpg")[:25])
    out = ImportFile(tmp_path / "t.json", "image")
    assert out.done("/a.jpg", "v") and not out.done("/b.jpg", "v")
    assert journal.read_text() == good + "\n"
    journal.write_text("{oops\n" + good + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        ImportFile(tmp_path / "t.json", "image")


def test_sigint_stops_the_cli_cleanly_with_a_summary_and_exit_130(tmp_path):
    folder = tmp_path / "files" / "many"
    folder.mkdir(parents=True)
    for i in range(40):
        Image.fromarray(skdata.astronaut()[i * 5:i * 5 + 256, :256]).save(folder / f"{i:02d}.png")
    out = tmp_path / "tasks.json"
    journal = tmp_path / "tasks.json.partial.jsonl"
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "backend.cli", "prelabel", "--folder", str(folder), "--labels", "person,sky",
               "--out", str(out), "--preset", "tiny", "--device", "cpu", "--no-progress",
               "--model-dir", str(tmp_path / "models")]
    env = {**os.environ, "PYTHONPATH": str(root), "OVERLAP_THRESHOLD": "0.0"}
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    done = [json.loads(line) for line in journal.read_text().splitlines()]
    assert 2 <= len(done) < 40 and not out.exists()
    assert f"40 item(s), {len(done)} predicted, 0 already done, 0 failed" in stdout
    assert f"interrupted: {40 - len(done)} item(s) not done. The {len(done)} image(s) done are kept in {journal}." \
        in stdout and "Run the same command again to resume" in stdout
