"""`odise-ls train / evaluate / models / rank` on a COCO-format folder of generated scenes (tiny preset)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.cli import main
from backend.learning import ServingModels, VersionStore, evaluate_model, is_better
from odise_core.tools.synthetic import CLASS_NAMES


ROOT = Path(__file__).resolve().parents[1]


def _samples(coco_dir: Path) -> tuple[list, list, object]:
    """The COCO folder as (all samples, held-out samples by the CLI's 0.25 split, vocabulary)."""
    import argparse

    from backend.learning_cli import _source

    source = _source(argparse.Namespace(coco=coco_dir, key="syn", project=None))
    data = source.fetch(0.25)
    return data.train + data.holdout, data.holdout, source.vocab


def _tiny_with(store: VersionStore, version: str | None):
    from odise_core.config import get_config
    from odise_core.predictor import build_predictor

    model = build_predictor(get_config("tiny"), device="cpu")
    return ServingModels(store, lambda: model).get("syn")[1] if version else model


def _headline(figures: dict) -> dict:
    return {k: figures[k] for k in ("pq", "sq", "rq", "miou", "mask_ap", "num_images")}


@pytest.fixture(scope="module")
def trained(coco_dir, tmp_path_factory):
    """`odise-ls train` run as a user runs it: a separate process, which must exit 0 after promoting."""
    models = tmp_path_factory.mktemp("models")
    cmd = [sys.executable, "-m", "backend.cli", "train", "--coco", str(coco_dir), "--key", "syn",
           "--model-dir", str(models), "--preset", "tiny", "--device", "cpu", "--steps", "40", "--lr", "1e-3",
           "--holdout", "0.25"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    return models, proc


def test_train_cli_exits_0_after_promoting(trained):
    models, proc = trained
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert job["state"] == "done" and job["version"] == "v0001" and job["step"] == 40 and job["promoted"] is True
    assert "promoted v0001: held-out PQ" in proc.stderr
    assert VersionStore(models).current("syn") == "v0001"


def test_train_records_config_and_the_baseline_it_beat(trained, coco_dir):
    models, _ = trained
    store = VersionStore(models)
    meta = store.metadata("syn", "v0001")
    assert meta["data"]["train"] + meta["data"]["holdout"] == 4 and meta["data"]["holdout"] == 1
    assert meta["base_preset"] == "tiny" and meta["vocabulary"] == list(CLASS_NAMES)
    assert store.config("syn", "v0001")["decoder"]["hidden_dim"] == 32  # the tiny architecture, in full
    # the recorded figures are what the base model and v0001 score on the held-out task
    _, holdout, vocab = _samples(coco_dir)
    before = evaluate_model(_tiny_with(store, None), holdout, vocab)
    after = evaluate_model(_tiny_with(store, "v0001"), holdout, vocab)
    assert meta["baseline"]["version"] is None
    assert _headline(meta["baseline"]["holdout"]) == pytest.approx(_headline(before.as_dict()), nan_ok=True)
    assert _headline(meta["eval"]["holdout_after"]) == pytest.approx(_headline(after.as_dict()), nan_ok=True)
    assert is_better(after, before) and meta["promoted"] is True


def test_second_train_is_judged_against_the_promoted_version(trained, coco_dir, tmp_path, capsys):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(trained[0], models)
    assert main(["train", "--coco", str(coco_dir), "--key", "syn", "--model-dir", str(models), "--preset", "tiny",
                 "--device", "cpu", "--steps", "2", "--holdout", "0.25"]) == 0
    out = capsys.readouterr().out
    job = json.loads(out[out.index("{"):])
    store = VersionStore(models)
    meta = store.metadata("syn", "v0002")
    assert job["version"] == "v0002" and meta["parent_version"] == "v0001"
    assert meta["baseline"]["version"] == "v0001"
    assert meta["baseline"]["holdout"] == store.metadata("syn", "v0001")["eval"]["holdout_after"]
    before, after = (meta["eval"][k] for k in ("holdout_before", "holdout_after"))
    expected = (after["pq"], after["miou"]) > (before["pq"], before["miou"])
    assert job["promoted"] is expected and store.current("syn") == ("v0002" if expected else "v0001")


def test_models_rollback_and_evaluate_a_version(trained, coco_dir, tmp_path, capsys):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(trained[0], models)
    store = VersionStore(models)
    assert main(["models", "syn", "--model-dir", str(models), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == "v0001" and [v["version"] for v in listing["versions"]] == ["v0001"]
    assert listing["versions"][0]["pq_after"] == store.metadata("syn", "v0001")["eval"]["holdout_after"]["pq"]

    assert main(["models", "syn", "--model-dir", str(models), "--rollback", "base"]) == 0
    assert store.current("syn") is None
    assert main(["models", "syn", "--model-dir", str(models), "--rollback", "v0001"]) == 0
    assert store.current("syn") == "v0001"
    assert "* v0001" in capsys.readouterr().out

    common = ["--coco", str(coco_dir), "--key", "syn", "--model-dir", str(models), "--preset", "tiny",
              "--device", "cpu"]
    samples, _, vocab = _samples(coco_dir)
    for version in ("v0001", "base"):
        report = tmp_path / f"eval-{version}.json"
        assert main(["evaluate", *common, "--version", version, "--json", str(report)]) == 0
        figures = json.loads(report.read_text())
        expected = evaluate_model(_tiny_with(store, None if version == "base" else version), samples, vocab)
        assert figures["version"].startswith("odise-tiny-") and figures["num_images"] == 4
        assert figures["version"].endswith("+syn-v0001") == (version == "v0001")
        assert figures["pq"] == pytest.approx(expected.pq) and figures["miou"] == pytest.approx(expected.miou)
    assert "PQ" in capsys.readouterr().out


def test_rank_images_most_uncertain_first(coco_dir, tmp_path, capsys):
    paths = [str(p) for p in sorted((coco_dir / "images").glob("*.png"))]
    labels = ",".join(CLASS_NAMES)
    assert main(["rank", *paths, "--labels", labels, "--preset", "tiny", "--device", "cpu",
                 "--model-dir", str(tmp_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith("#")][1:]
    scores = [float(ln.split()[1]) for ln in lines]
    assert len(scores) == 4 and scores == sorted(scores)
    assert {ln.split()[-1] for ln in lines} == set(paths)


def test_rank_names_the_tasks_it_cannot_read_and_still_ranks_the_others(coco_dir, tmp_path, monkeypatch, capsys):
    """A project task whose image is gone, or whose data lacks the image field, is listed with its error
    and the exit code says so; the ranking of every other task is printed (not lost to a traceback)."""
    import base64

    import backend.learning_cli as learning_cli
    import backend.training_data as training_data
    from backend.label_config import make_label_config, parse_label_config
    from backend.tasks import ImageFetcher
    from odise_core.vocabulary import Vocabulary

    pngs = sorted((coco_dir / "images").glob("*.png"))
    tasks = [{"id": i + 1, "annotations": [],
              "data": {"image": "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()}}
             for i, p in enumerate(pngs)]
    tasks += [{"id": 8, "annotations": [], "data": {"image": "http://127.0.0.1:9/gone.png"}},
              {"id": 9, "annotations": [], "data": {"picture": "x.png"}}]
    target = parse_label_config(make_label_config(Vocabulary.from_text(",".join(CLASS_NAMES)))).targets[0]
    monkeypatch.setattr(learning_cli, "_label_studio", lambda args: (None, target, ImageFetcher()))
    monkeypatch.setattr(training_data, "fetch_tasks", lambda client, project, only_annotated: tasks)
    assert main(["rank", "--project", "5", "--preset", "tiny", "--device", "cpu", "--model-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")][1:]
    assert sorted(int(ln.split()[0]) for ln in lines) == [1, 2, 3, 4]
    scores = [float(ln.split()[1]) for ln in lines]
    assert scores == sorted(scores)
    assert "task 8 not ranked: http://127.0.0.1:9/gone.png: download failed" in err
    assert "task 9 not ranked: task image value must be a non-empty string, got None" in err
    assert "2 of 6 tasks could not be ranked" in out


def test_models_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["models", "9", "--model-dir", str(tmp_path), "--rollback"]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    VersionStore(tmp_path).write("9", {"w": torch.zeros(1)}, {})
    assert main(["models", "9", "--model-dir", str(tmp_path), "--rollback", "v0042"]) == 2
    assert "no model version 'v0042'" in capsys.readouterr().err


def test_label_studio_url_flag_is_spelled_like_serve_and_prelabel(monkeypatch, capsys):
    from backend.cli import build_parser

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    for command in ("train", "rank", "evaluate"):
        args = build_parser().parse_args([command, "--project", "3", "--label-studio-url", "http://ls:8080"])
        assert args.label_studio_url == "http://ls:8080"
        old = build_parser().parse_args([command, "--project", "3", "--url", "http://old:8080"])
        assert old.label_studio_url == "http://old:8080"  # the older spelling still works
    assert main(["rank", "--project", "3", "--preset", "tiny", "--device", "cpu"]) != 0
    assert "--label-studio-url" in capsys.readouterr().err
