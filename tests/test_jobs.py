"""Fine-tune jobs and model versions: atomic writes, promotion rule and baseline, one job per round,
job ids that stay answerable, rollback, crashes, kill -9, architecture checks.

A small stand-in model keeps these tests fast: its one trainable number decides whether it
segments the test images right, so held-out PQ before/after is known exactly. Timing is driven by
events and a hand-fired debounce timer, not by sleeps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from backend.learning import (Job, JobManager, ServingModels, VersionIncompatible, VersionStore, copy_sharing_frozen,
                              is_better)
from backend.settings import TrainPolicy
from backend.training_data import TrainingData
from odise_core.training.finetune import TrainSample
from odise_core.types import RawPrediction, Segment

ROOT = Path(__file__).resolve().parents[1]
VOCAB = SimpleNamespace(names=["square", "floor"], is_thing=torch.tensor([True, False]))


@dataclass
class FakeConfig:
    name: str = "fake-preset"
    width: int = 4
    precision: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FakeConfig":
        return cls(**data)


class FakeModel(nn.Module):
    """Segments the bright square exactly when `quality` >= 1, else calls the whole image floor."""

    FROZEN_PREFIXES = ("frozen.",)

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.quality = nn.Parameter(torch.tensor(0.0))
        self.cfg = FakeConfig(width=width)
        self.trained_classes: set[str] = set()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {"quality": self.quality.detach().clone()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.quality.data.copy_(state["quality"])

    def extract_features(self, image: np.ndarray) -> dict:
        """Like ODISE: prediction and training both run the (shared) backbone through this."""
        return {}

    def predict_raw(self, image: np.ndarray, vocab, mode: str = "panoptic") -> RawPrediction:
        self.extract_features(image)
        bright = image[..., 0] > 100
        everything = np.ones_like(bright)
        if self.quality.item() >= 1.0:
            segs = [Segment(bright, 0, 0.9, True, 0), Segment(~bright, 1, 0.9, False, 1)]
            probs = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]
            masks = [bright, ~bright]
        else:
            segs = [Segment(everything, 1, 0.9, False, 1)]
            probs = [[0.05, 0.05, 0.9], [0.05, 0.9, 0.05]]
            masks = [bright, everything]
        logits = torch.from_numpy(np.stack(masks)).float() * 20 - 10
        return RawPrediction(segs, torch.tensor(probs), logits, bright.shape)

    def predict(self, image: np.ndarray, vocab, mode: str = "panoptic") -> list[Segment]:
        return self.predict_raw(image, vocab, mode).segments


def sample(seed: int) -> TrainSample:
    img = np.zeros((24, 24, 3), np.uint8)
    y, x = 2 + seed % 8, 3 + seed % 7
    img[y:y + 8, x:x + 8] = 220
    bright = img[..., 0] > 100
    return TrainSample(image=img, masks=np.stack([bright, ~bright]), classes=np.array([0, 1]))


def fetch_fn(n_train: int = 4, n_holdout: int = 2, fingerprint: str | None = None,
             gate: threading.Event | None = None, reading: threading.Event | None = None):
    """The project's data; with `gate`, reading it blocks until the gate opens (`reading` is set meanwhile)."""
    def fetch(fraction: float) -> TrainingData:
        if reading is not None:
            reading.set()
        if gate is not None:
            assert gate.wait(30)
        return TrainingData(train=[sample(i) for i in range(n_train)],
                            holdout=[sample(100 + i) for i in range(n_holdout)],
                            train_task_ids=list(range(n_train)), holdout_task_ids=list(range(100, 100 + n_holdout)),
                            fingerprint=fingerprint)
    return fetch


def set_quality(value: float, steps: int = 3, delay: float = 0.0, fail_at: int | None = None,
                during=None):
    """A fine-tune that sets `quality`; `during(job)` runs mid-training (to change the world meanwhile)."""
    def finetune(model, data, vocab, job: Job, feature_lock) -> None:
        for step in range(1, steps + 1):
            if job.stop_requested:
                return
            if fail_at == step:
                raise RuntimeError("simulated crash inside training")
            time.sleep(delay)
            with feature_lock:
                model.extract_features(data.train[0].image)
            job.step, job.total_steps, job.loss = step, steps, 1.0 / step
            if during is not None and step == 1:
                during(job)
        model.quality.data.fill_(value)
    return finetune


def manager(tmp_path: Path, finetune, **kw) -> JobManager:
    policy = TrainPolicy(on_annotation=True, min_annotations=kw.pop("min_annotations", 2),
                         debounce_seconds=kw.pop("debounce", 0.0), holdout_fraction=0.25)
    return JobManager(tmp_path / "models", policy=policy, finetune_fn=finetune, **kw)


def serving(m: JobManager, base: FakeModel, project: str = "7"):
    """What the server passes: the version and model serving `project` whenever it is called."""
    models = ServingModels(m.store, lambda: base)
    return lambda: models.get(project)


def run(m: JobManager, model: FakeModel, project: str = "7", fetch=None) -> Job:
    job = m.submit(project, fetch or fetch_fn(), serving(m, model, project), VOCAB)
    assert job.wait(30)
    return job


class HandTimer:
    """A debounce timer the test fires itself."""

    made: list["HandTimer"] = []

    def __init__(self, seconds: float, fn) -> None:
        self.seconds, self.fn, self.cancelled, self.daemon = seconds, fn, False, True
        HandTimer.made.append(self)

    def start(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self):
        assert not self.cancelled
        return self.fn()


def test_store_write_is_complete_and_leftovers_are_cleaned(tmp_path):
    store = VersionStore(tmp_path)
    v1 = store.write("3", {"w": torch.arange(4.0)}, {"note": "a"})
    v2 = store.write("3", {"w": torch.zeros(2)}, {"note": "b"})
    assert (v1, v2) == ("v0001", "v0002")
    assert sorted(os.listdir(tmp_path / "3")) == ["v0001", "v0002"]
    assert torch.equal(store.load_state_dict("3", v1)["w"], torch.arange(4.0))
    meta = store.metadata("3", v2)
    assert meta["note"] == "b" and meta["version"] == "v0002" and meta["project"] == "3" and meta["created"]
    assert store.current("3") is None
    # a writer killed mid-way leaves a temporary directory: never listed, removed on start
    (tmp_path / "3" / ".tmp-v0003-dead").mkdir()
    (tmp_path / "3" / ".tmp-v0003-dead" / "weights.pt").write_bytes(b"partial")
    assert store.versions("3") == ["v0001", "v0002"]
    VersionStore(tmp_path)
    assert not (tmp_path / "3" / ".tmp-v0003-dead").exists()
    with pytest.raises(KeyError, match="no model version 'v0009'"):
        store.load_state_dict("3", "v0009")


def test_better_model_is_promoted_with_metadata(tmp_path):
    promoted = []
    m = manager(tmp_path, set_quality(1.0), on_promoted=lambda p, v: promoted.append((p, v)))
    serving = FakeModel()
    job = run(m, serving)
    assert job.state == "done" and job.promoted is True and job.version == "v0001"
    assert promoted == [("7", "v0001")]
    assert m.current_version("7") == "v0001"
    assert serving.quality.item() == 0.0  # the serving model was never touched
    meta = m.store.metadata("7", "v0001")
    assert meta["promoted"] is True and meta["base_preset"] == "fake-preset"
    assert meta["parent_version"] is None and meta["baseline"]["version"] is None
    assert meta["baseline"]["holdout"] == meta["eval"]["holdout_before"]
    assert m.store.config("7", "v0001") == {"name": "fake-preset", "width": 4, "precision": "auto"}
    assert meta["vocabulary"] == ["square", "floor"] and meta["is_thing"] == [True, False]
    assert meta["data"]["train"] == 4 and meta["data"]["holdout"] == 2
    # before: the square is missed (PQ 0); the floor prediction covers it too (IoU 512/576)
    assert meta["eval"]["holdout_before"]["pq"] == pytest.approx(100 * (512 / 576) / 2)
    assert meta["eval"]["holdout_after"]["pq"] == pytest.approx(100.0)
    assert meta["eval"]["holdout_after"]["mask_ap"] == pytest.approx(100.0)
    version, reloaded = ServingModels(m.store, FakeModel).get("7")
    assert version == "v0001" and reloaded.quality.item() == 1.0
    assert meta["trained_classes"] == ["floor", "square"] and reloaded.trained_classes == {"floor", "square"}
    assert serving.trained_classes == set()
    status = m.status("7")
    assert status["current_version"] == "v0001" and status["job"]["state"] == "done"
    assert status["job"]["progress"] == 1.0 and status["job"]["metrics"]["holdout_after"]["pq"] == 100.0
    json.dumps(status)


def test_model_that_is_not_better_is_kept_but_not_promoted(tmp_path, caplog):
    m = manager(tmp_path, set_quality(1.0))
    base = FakeModel()
    run(m, base)
    m.finetune_fn = set_quality(0.0)  # worse than what serves
    with caplog.at_level("INFO", logger="backend.learning"):
        job = run(m, base)
    assert job.state == "done" and job.promoted is False and job.version == "v0002"
    assert m.current_version("7") == "v0001"
    assert m.store.versions("7") == ["v0001", "v0002"]
    meta = m.store.metadata("7", "v0002")
    assert meta["promoted"] is False and meta["parent_version"] == "v0001"
    assert meta["baseline"]["version"] == "v0001" and meta["baseline"]["holdout"]["pq"] == pytest.approx(100.0)
    assert "held-out PQ 44.44 vs 100.00 of serving v0001" in caplog.text


def test_exception_mid_training_keeps_previous_version(tmp_path):
    m = manager(tmp_path, set_quality(1.0))
    run(m, FakeModel())
    m.finetune_fn = set_quality(1.0, steps=5, fail_at=3)
    job = run(m, FakeModel())
    assert job.state == "failed" and "simulated crash" in job.message
    assert m.store.versions("7") == ["v0001"] and m.current_version("7") == "v0001"
    assert not [p for p in (tmp_path / "models" / "7").iterdir() if p.name.startswith(".tmp-")]


def test_start_training_and_webhooks_of_one_round_give_one_fine_tune(tmp_path):
    """Start Training, then the annotation webhooks of the same annotations while the job reads its data,
    then Start Training again: one fine-tune; the follow-up finds no new data; every id answers."""
    m = manager(tmp_path, set_quality(1.0))
    base = FakeModel()
    gate, reading = threading.Event(), threading.Event()
    round1 = fetch_fn(fingerprint="round-1", gate=gate, reading=reading)
    first = m.handle_event("START_TRAINING", "7", round1, serving(m, base), VOCAB)
    assert first["status"] == "started"
    assert reading.wait(10)  # the job is reading the project's annotations
    hook = m.handle_event("ANNOTATION_CREATED", "7", round1, serving(m, base), VOCAB)
    again = m.handle_event("START_TRAINING", "7", round1, serving(m, base), VOCAB)
    assert hook["status"] == "started" and again == {"status": "attached", "job": hook["job"]}
    assert hook["job"] != first["job"] and m.status("7")["followup"] == hook["job"]
    gate.set()
    a, b = m.find(first["job"]), m.find(hook["job"])
    assert a.wait(10) and b.wait(10)
    assert a.state == "done" and a.version == "v0001" and a.promoted
    assert b.state == "skipped" and b.same_data_as == a.id and b.version is None
    assert f"no new annotations since job {a.id} trained v0001" in b.message
    assert b.requests == ["ANNOTATION_CREATED", "START_TRAINING"]
    assert m.store.versions("7") == ["v0001"]
    # a restarted server still answers both ids, from MODEL_DIR
    m.shutdown(10)
    restarted = manager(tmp_path, set_quality(1.0))
    for job in (a, b):
        recorded = restarted.find(job.id)
        assert recorded is not None and recorded.as_dict() == job.as_dict()
    assert restarted.find("0123456789ab") is None and restarted.find("../../etc") is None


def test_webhooks_pending_when_start_training_arrives_are_absorbed(tmp_path):
    HandTimer.made.clear()
    m = manager(tmp_path, set_quality(1.0), debounce=30.0, timer=HandTimer)
    base = FakeModel()
    for _ in range(3):
        assert m.handle_event("ANNOTATION_CREATED", "7", fetch_fn(fingerprint="r1"), serving(m, base),
                              VOCAB)["status"] == "scheduled"
    assert [t.cancelled for t in HandTimer.made] == [True, True, False] and m.status("7")["scheduled"]
    started = m.handle_event("START_TRAINING", "7", fetch_fn(fingerprint="r1"), serving(m, base), VOCAB)
    assert HandTimer.made[-1].cancelled and not m.status("7")["scheduled"]  # the job reads those annotations
    job = m.find(started["job"])
    assert job.wait(10) and job.state == "done" and m.store.versions("7") == ["v0001"]
    assert m.job("7") is job


def test_debounce_firing_after_the_job_read_its_data_joins_that_job(tmp_path):
    """Annotation webhook while a Start Training job waits to start: the job reads the annotation, so
    the debounced request joins it instead of queueing a second fine-tune."""
    HandTimer.made.clear()
    m = manager(tmp_path, set_quality(1.0), debounce=30.0, timer=HandTimer)
    base = FakeModel()
    gate, reading = threading.Event(), threading.Event()
    job = m.submit("7", fetch_fn(fingerprint="r1", gate=gate, reading=reading), serving(m, base), VOCAB,
                   dedupe=True)
    m.handle_event("ANNOTATION_CREATED", "7", fetch_fn(fingerprint="r1"), serving(m, base), VOCAB)
    m._last_event["7"] = job.created  # the webhook of an annotation saved before the job started reading
    assert reading.wait(10)
    joined = HandTimer.made[-1].fire()
    assert joined is job and job.requests == ["START_TRAINING", "ANNOTATION_CREATED"]
    assert m.status("7")["followup"] is None and not m.status("7")["scheduled"]
    gate.set()
    assert job.wait(10) and job.state == "done" and m.store.versions("7") == ["v0001"]


def test_new_annotations_during_a_job_train_once_more_against_the_new_serving_version(tmp_path):
    """Round 2 arrives while round 1 trains: one follow-up, which starts from and is judged against the
    version round 1 promoted (the baseline serving at judgement time), on the same held-out tasks."""
    m = manager(tmp_path, set_quality(1.0))
    base = FakeModel()
    gate, reading = threading.Event(), threading.Event()
    a = m.submit("7", fetch_fn(fingerprint="r1", gate=gate, reading=reading), serving(m, base), VOCAB, dedupe=True)
    assert reading.wait(10)
    m.finetune_fn = set_quality(1.0)
    decision = m.handle_event("ANNOTATION_UPDATED", "7", fetch_fn(fingerprint="r2"), serving(m, base), VOCAB)
    gate.set()
    b = m.find(decision["job"])
    assert a.wait(10) and b.wait(10)
    assert (a.state, a.version, a.promoted) == ("done", "v0001", True)
    assert (b.state, b.version, b.promoted) == ("done", "v0002", False)
    meta = m.store.metadata("7", "v0002")
    assert meta["parent_version"] == "v0001"
    assert meta["baseline"]["version"] == "v0001" and meta["baseline"]["holdout"]["pq"] == pytest.approx(100.0)
    assert b.metrics["baseline_version"] == "v0001" and "vs 100.00 of serving v0001" in b.message
    assert m.current_version("7") == "v0001"


def test_baseline_is_the_version_serving_when_the_candidate_is_judged(tmp_path):
    """Another version is promoted while the job trains: the candidate is compared with it, not with the
    base model the job started from."""
    m = manager(tmp_path, set_quality(1.0))
    base = FakeModel()

    def promote_elsewhere(job: Job) -> None:
        better = {"quality": torch.tensor(1.0)}
        version = m.store.write("7", better, {"trained_classes": ["square", "floor"]},
                                config={"name": "fake-preset", "width": 4, "precision": "auto"})
        m.store.promote("7", version)

    m.finetune_fn = set_quality(1.0, during=promote_elsewhere)
    job = run(m, base)
    assert job.state == "done" and job.version == "v0002" and job.promoted is False
    meta = m.store.metadata("7", "v0002")
    assert meta["parent_version"] is None  # trained from the base model ...
    assert meta["baseline"]["version"] == "v0001"  # ... but judged against v0001, which served by then
    assert meta["eval"]["holdout_before"]["pq"] == pytest.approx(100.0)
    assert m.current_version("7") == "v0001"


def test_version_from_another_architecture_is_refused_with_a_message(tmp_path):
    m = manager(tmp_path, set_quality(1.0))
    run(m, FakeModel(width=4))
    with pytest.raises(VersionIncompatible, match=r"trained under model 'fake-preset'.*width: 4 vs 8"):
        ServingModels(m.store, lambda: FakeModel(width=8)).get("7")
    other_precision = FakeModel()
    other_precision.cfg.precision = "fp32"  # a serving-time setting, not the architecture
    assert ServingModels(m.store, lambda: other_precision).get("7")[1].quality.item() == 1.0


def test_other_projects_train_independently(tmp_path):
    m = manager(tmp_path, set_quality(1.0, steps=5, delay=0.01))
    a = m.submit("1", fetch_fn(), serving(m, FakeModel(), "1"), VOCAB)
    b = m.submit("2", fetch_fn(), serving(m, FakeModel(), "2"), VOCAB)
    assert a.wait(10) and b.wait(10)
    assert a.state == b.state == "done"
    assert m.current_version("1") == m.current_version("2") == "v0001"


def test_rollback_to_previous_promoted_then_base(tmp_path):
    m = manager(tmp_path, set_quality(1.0))
    base = FakeModel()
    run(m, base)  # v0001 promoted over the base
    m.finetune_fn = set_quality(0.0)
    run(m, base)  # v0002 kept
    m.store.rollback("7", "v0002")  # explicit version
    assert m.current_version("7") == "v0002"
    assert m.store.rollback("7") == "v0001"  # newest earlier promoted version
    assert m.store.rollback("7") is None and m.current_version("7") is None
    with pytest.raises(ValueError, match="nothing to roll back"):
        m.store.rollback("7")


def test_training_does_not_block_status_or_the_serving_model(tmp_path):
    m = manager(tmp_path, set_quality(1.0, steps=50, delay=0.02))
    served = FakeModel()
    job = m.submit("7", fetch_fn(), serving(m, served), VOCAB)
    deadline = time.time() + 10
    while job.step < 2 and time.time() < deadline:
        time.sleep(0.01)
    t = time.perf_counter()
    payload = m.status("7")
    segs = served.predict(sample(0).image, VOCAB)
    assert time.perf_counter() - t < 0.5
    assert payload["job"]["state"] == "training" and 0 < payload["job"]["progress"] < 1
    assert len(segs) == 1
    m.shutdown(10)
    assert job.state == "cancelled"


def test_webhook_policy(tmp_path):
    HandTimer.made.clear()
    m = manager(tmp_path, set_quality(1.0), debounce=0.3, min_annotations=5, timer=HandTimer)
    base = FakeModel()
    assert m.handle_event("PROJECT_UPDATED", "7", fetch_fn(), serving(m, base), VOCAB)["status"] == "ignored"
    # annotation events are debounced into one job, which needs min_annotations usable tasks
    for _ in range(3):
        decision = m.handle_event("ANNOTATION_CREATED", "7", fetch_fn(2, 1), serving(m, base), VOCAB)
        assert decision == {"status": "scheduled", "in_seconds": 0.3, "min_annotations": 5}
    assert m.job("7") is None and m.status("7")["scheduled"]
    assert [t.seconds for t in HandTimer.made] == [0.3] * 3 and [t.cancelled for t in HandTimer.made[:2]] == [True] * 2
    job = HandTimer.made[-1].fire()
    assert not m.status("7")["scheduled"] and job.wait(10)
    assert job.state == "skipped" and "need at least 5" in job.message
    m.handle_event("ANNOTATION_UPDATED", "7", fetch_fn(4, 2, fingerprint="r1"), serving(m, base), VOCAB)
    job2 = HandTimer.made[-1].fire()
    assert job2.id != job.id and job2.wait(10) and job2.state == "done" and job2.version == "v0001"
    # the same annotations again (e.g. an update that changed nothing we read) do not train twice
    m.handle_event("ANNOTATION_UPDATED", "7", fetch_fn(4, 2, fingerprint="r1"), serving(m, base), VOCAB)
    job3 = HandTimer.made[-1].fire()
    assert job3.wait(10) and job3.state == "skipped" and job3.same_data_as == job2.id
    # START_TRAINING trains at once, whatever the count
    decision = m.handle_event("START_TRAINING", "7", fetch_fn(1, 1), serving(m, base), VOCAB)
    assert decision["status"] == "started" and m.job("7").wait(10) and m.job("7").state == "done"
    off = manager(tmp_path / "off", set_quality(1.0))
    off.policy.on_annotation = False
    assert off.handle_event("ANNOTATION_CREATED", "7", fetch_fn(), serving(off, base), VOCAB)["status"] == "ignored"


def test_clone_shares_frozen_weights_and_copies_trainable():
    model = FakeModel()
    clone = copy_sharing_frozen(model)
    assert clone.frozen.weight is model.frozen.weight
    assert clone.quality is not model.quality
    clone.quality.data.fill_(3.0)
    assert model.quality.item() == 0.0


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_jobs import FakeModel, VOCAB, fetch_fn
    from backend.learning import JobManager, ServingModels
    from backend.settings import TrainPolicy
    mode, model_dir, marker = sys.argv[1:4]

    def slow_finetune(model, data, vocab, job, feature_lock):
        open(marker, "w").write("training")
        for step in range(10**6):
            job.step = step
            time.sleep(0.01)

    m = JobManager(model_dir, policy=TrainPolicy(holdout_fraction=0.25), finetune_fn=slow_finetune)
    if mode == "train":
        served = ServingModels(m.store, FakeModel)
        m.submit("7", fetch_fn(), lambda: served.get("7"), VOCAB).wait()
    else:  # "write": a large version being written when the kill comes
        open(marker, "w").write("writing")
        m.store.write("7", {{"big": torch.randn(64, 1024, 1024)}}, {{"note": "huge"}})
        open(marker, "w").write("written")
        time.sleep(60)
""")


@pytest.mark.parametrize("mode", ["train", "write"])
def test_kill_9_mid_training_leaves_previous_version_serving(tmp_path, mode):
    models = tmp_path / "models"
    m = manager(tmp_path, set_quality(1.0))
    run(m, FakeModel())
    assert m.current_version("7") == "v0001"
    script = tmp_path / "victim.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), mode, str(models), str(marker)])
    try:
        deadline = time.time() + 300  # a loaded machine needs minutes just to import torch
        while time.time() < deadline:
            if marker.exists() and (mode == "train" or any(p.name.startswith(".tmp-") for p in (models / "7").iterdir())):
                break
            time.sleep(0.005)
        else:
            pytest.fail("victim never reached the kill point")
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    # what a restarted server sees: the previous version, complete, still serving
    restarted = JobManager(models, policy=TrainPolicy(), finetune_fn=set_quality(1.0))
    assert restarted.current_version("7") == "v0001"
    assert not [p for p in (models / "7").iterdir() if p.name.startswith(".tmp-")]
    version, served = ServingModels(restarted.store, FakeModel).get("7")
    assert version == "v0001" and served.quality.item() == 1.0
    for v in restarted.store.versions("7"):  # any version listed is complete and loadable
        restarted.store.load_state_dict("7", v)
    if mode == "train":  # the killed job's id still answers: interrupted while training
        records = [json.loads(p.read_text()) for p in (models / ".jobs").glob("*.json")]
        killed = [r["id"] for r in records if r["state"] == "fetching" or r["state"] == "training"]
        assert len(killed) == 1
        assert restarted.find(killed[0]).state == "interrupted"
        assert "stopped while this job was" in restarted.find(killed[0]).message
    job = restarted.submit("7", fetch_fn(), lambda: (version, served), VOCAB)
    assert job.wait(30) and job.state == "done"


def test_jobs_hold_the_shared_model_lock_for_forward_passes(tmp_path):
    m = manager(tmp_path, set_quality(1.0))
    with m.model_lock:  # the server is busy with a forward pass
        job = m.submit("7", fetch_fn(), serving(m, FakeModel()), VOCAB)
        time.sleep(0.5)
        # the fine-tune's backbone pass waits for the lock
        assert job.state == "training" and job.step == 0 and not job.wait(0)
    assert job.wait(10) and job.state == "done"


def test_promotion_rule_breaks_pq_ties_with_miou():
    from odise_core.tools.evaluation import EvalResult

    def r(pq: float, miou: float) -> EvalResult:
        return EvalResult(pq, 0, 0, 0, 0, 0, 0, miou, 1)

    assert is_better(r(10, 1), r(5, 50)) and not is_better(r(5, 50), r(10, 1))
    assert is_better(r(0, 6), r(0, 4)) and not is_better(r(0, 4), r(0, 4))
    assert is_better(r(0, 1), r(float("nan"), float("nan")))
