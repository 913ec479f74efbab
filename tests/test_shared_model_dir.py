"""Two backend processes on one MODEL_DIR (serving replicas): the version store stays whole and a
project never trains in both at once (backend.learning.locks)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from backend.learning import VersionStore

ROOT = Path(__file__).resolve().parents[1]
VERSIONS_EACH = 6

REPLICA = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_jobs import FakeModel, VOCAB, fetch_fn
    from backend.learning import JobManager, ServingModels, VersionStore
    from backend.settings import TrainPolicy
    mode, model_dir, log, go = sys.argv[1:5]
    Path(log + ".ready").write_text("ready")
    while not os.path.exists(go):
        time.sleep(0.01)

    def record(what):
        with open(log, "a") as f:
            f.write(f"{{what}} {{time.time()!r}}\\n")

    if mode == "store":  # a replica writing and promoting versions while the other starts up (clean-up)
        for i in range({versions}):
            store = VersionStore(model_dir)
            version = store.write("7", {{"w": torch.full((256, 256), float(os.getpid()))}}, {{"pid": os.getpid()}})
            store.promote("7", version)
            record(version)
    else:  # "train": a replica fine-tuning project 7
        def finetune(model, data, vocab, job, feature_lock):
            record("start")
            time.sleep(1.5)
            model.quality.data.fill_(1.0)
            record("end")

        m = JobManager(model_dir, policy=TrainPolicy(holdout_fraction=0.25), finetune_fn=finetune)
        served = ServingModels(m.store, FakeModel)
        job = m.submit("7", fetch_fn(), lambda: served.get("7"), VOCAB)
        assert job.wait(120), "the job did not finish"
        assert job.state == "done", job.message
        m.shutdown(5)
""")


def _two_replicas(tmp_path: Path, mode: str) -> list[list[str]]:
    """Run the replica script twice at once on one MODEL_DIR; each one's log lines."""
    script = tmp_path / "replica.py"
    script.write_text(REPLICA.format(root=str(ROOT), tests=str(ROOT / "tests"), versions=VERSIONS_EACH))
    models, go = tmp_path / "models", tmp_path / "go"
    logs = [tmp_path / f"replica{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), mode, str(models), str(log), str(go)]) for log in logs]
    try:
        deadline = time.time() + 120
        while not all(Path(f"{log}.ready").exists() for log in logs):
            assert time.time() < deadline, "the replicas did not start"
            assert all(p.poll() is None for p in procs), "a replica died while starting"
            time.sleep(0.02)
        go.write_text("go")
        assert [p.wait(180) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [log.read_text().split("\n")[:-1] for log in logs]


def test_two_replicas_writing_versions_keep_the_store_whole(tmp_path):
    lines = _two_replicas(tmp_path, "store")
    written = [line.split()[0] for replica in lines for line in replica]
    expected = [f"v{i:04d}" for i in range(1, 2 * VERSIONS_EACH + 1)]
    assert sorted(written) == expected  # no name given twice, none lost
    store = VersionStore(tmp_path / "models")
    assert store.versions("7") == expected
    for version in expected:  # every version complete: its weights are the writer's
        pid = store.metadata("7", version)["pid"]
        assert torch.equal(store.load_state_dict("7", version)["w"], torch.full((256, 256), float(pid)))
        assert store.metadata("7", version)["promoted"] is True
    assert store.current("7") in expected
    assert not [p for p in (tmp_path / "models" / "7").iterdir() if p.name.startswith(".tmp-")]


def test_two_replicas_never_train_the_same_project_at_once(tmp_path):
    lines = _two_replicas(tmp_path, "train")
    spans = []
    for replica in lines:
        events = dict(line.split() for line in replica)
        spans.append((float(events["start"]), float(events["end"])))
    first, second = sorted(spans)
    assert first[1] <= second[0], f"the fine-tunes overlapped: {spans}"
    assert VersionStore(tmp_path / "models").versions("7") == ["v0001", "v0002"]
