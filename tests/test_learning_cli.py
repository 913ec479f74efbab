"""`odise-ls train / evaluate / models / rank` on a COCO-format folder of generated scenes (tiny preset)."""
from __future__ import annotations

import json

import pytest
import torch

from backend.cli import main
from backend.jobs import VersionStore
from odise_core.synthetic import CLASS_NAMES


def test_train_then_models_then_evaluate(coco_dir, tmp_path, capsys):
    models = tmp_path / "models"
    common = ["--coco", str(coco_dir), "--key", "syn", "--model-dir", str(models), "--preset", "tiny",
              "--device", "cpu"]
    assert main(["train", *common, "--steps", "2", "--holdout", "0.25"]) == 0
    out = capsys.readouterr().out
    job = json.loads(out[out.index("{"):])
    assert job["state"] == "done" and job["version"] == "v0001" and job["step"] == 2
    store = VersionStore(models)
    meta = store.metadata("syn", "v0001")
    assert meta["data"]["train"] + meta["data"]["holdout"] == 4 and meta["data"]["holdout"] == 1
    assert meta["base_preset"] == "tiny" and meta["vocabulary"] == list(CLASS_NAMES)

    assert main(["models", "syn", "--model-dir", str(models), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listing["versions"]] == ["v0001"]
    assert listing["current"] == ("v0001" if job["promoted"] else None)

    assert main(["models", "syn", "--model-dir", str(models), "--rollback", "v0001"]) == 0
    assert store.current("syn") == "v0001"
    assert "* v0001" in capsys.readouterr().out
    assert main(["models", "syn", "--model-dir", str(models), "--rollback", "base"]) == 0
    assert store.current("syn") is None

    report = tmp_path / "eval.json"
    assert main(["evaluate", *common, "--version", "v0001", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert figures["version"].startswith("odise-tiny-") and figures["version"].endswith("+syn-v0001")
    assert figures["num_images"] == 4
    assert 0.0 <= figures["pq"] <= 100.0 and 0.0 <= figures["miou"] <= 100.0
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
