"""Training policy, fine-tune options, basic auth, host/port and the document root: flags > environment >
defaults, resolved only in backend.settings, and reaching the code that uses them."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from backend.cli import build_parser, main
from backend.settings import BackendSettings, SettingsError
from odise_core.tools.synthetic import CLASS_NAMES
from test_app import CONFIG, StandIn

SERVE = ["serve"]
TRAIN = ["train", "--coco", "data"]
PRELABEL = ["prelabel", "--folder", "images", "--labels", "cat"]
# command, flag, variable, its value, what to read, default, value from the variable, value from the flag
CASES = [
    (SERVE, ["--host", "0.0.0.0"], "HOST", "10.0.0.1", "host", "127.0.0.1", "10.0.0.1", "0.0.0.0"),
    (SERVE, ["--port", "8000"], "PORT", "9999", "port", 9090, 9999, 8000),
    (SERVE, ["--train-on-annotation"], "ODISE_TRAIN_ON_ANNOTATION", "off", "policy.on_annotation", True, False, True),
    (SERVE, ["--min-annotations", "3"], "ODISE_TRAIN_MIN_ANNOTATIONS", "5", "policy.min_annotations", 8, 5, 3),
    (SERVE, ["--debounce", "2.5"], "ODISE_TRAIN_DEBOUNCE", "7", "policy.debounce_seconds", 30.0, 7.0, 2.5),
    (SERVE, ["--holdout", "0.5"], "ODISE_HOLDOUT_FRACTION", "0.3", "policy.holdout_fraction", 0.2, 0.3, 0.5),
    (SERVE, ["--steps", "7"], "ODISE_TRAIN_STEPS", "50", "finetune.steps", 200, 50, 7),
    (TRAIN, ["--steps", "7"], "ODISE_TRAIN_STEPS", "50", "finetune.steps", 200, 50, 7),
    (TRAIN, ["--lr", "0.01"], "ODISE_TRAIN_LR", "0.003", "finetune.lr", 1e-4, 0.003, 0.01),
    (TRAIN, ["--batch-size", "3"], "ODISE_TRAIN_BATCH", "2", "finetune.batch_size", 1, 2, 3),
    (TRAIN, ["--views", "2"], "ODISE_TRAIN_VIEWS", "1", "finetune.views_per_image", 4, 1, 2),
    (TRAIN, ["--points", "100"], "ODISE_TRAIN_POINTS", "64", "finetune.num_points", 12544, 64, 100),
    (TRAIN, ["--holdout", "0.5"], "ODISE_HOLDOUT_FRACTION", "0.3", "policy.holdout_fraction", 0.2, 0.3, 0.5),
    (PRELABEL, ["--document-root", "/flag"], "LOCAL_FILES_DOCUMENT_ROOT", "/env", "document_root", None, Path("/env"),
     Path("/flag")),
]


def _read(settings: BackendSettings, path: str) -> object:
    return functools.reduce(getattr, path.split("."), settings)


@pytest.mark.parametrize("command, flag, var, value, path, default, from_env, from_flag", CASES,
                         ids=[f"{c[0][0]}-{c[2]}" for c in CASES])
def test_flag_over_variable_over_default(command, flag, var, value, path, default, from_env, from_flag):
    parse = build_parser().parse_args
    assert _read(BackendSettings.resolve(parse(command), {}), path) == default
    assert _read(BackendSettings.resolve(parse(command), {var: value}), path) == from_env
    assert _read(BackendSettings.resolve(parse(command + flag), {var: value}), path) == from_flag


@pytest.mark.parametrize("env, message", [
    ({"ODISE_TRAIN_DEBOUNCE": "abc"}, "ODISE_TRAIN_DEBOUNCE='abc' is not a number"),
    ({"ODISE_TRAIN_MIN_ANNOTATIONS": "2.5"}, "ODISE_TRAIN_MIN_ANNOTATIONS='2.5' is not an integer"),
    ({"ODISE_TRAIN_ON_ANNOTATION": "sometimes"}, "ODISE_TRAIN_ON_ANNOTATION='sometimes' is not a yes/no value"),
    ({"ODISE_HOLDOUT_FRACTION": "1"}, "ODISE_HOLDOUT_FRACTION/--holdout=1 must be in"),
    ({"ODISE_TRAIN_STEPS": "0"}, "ODISE_TRAIN_STEPS/--steps=0 must be at least 1"),
    ({"ODISE_TRAIN_LR": "-1e-3"}, "ODISE_TRAIN_LR/--lr=-0.001 must be above 0"),
    ({"PORT": "http"}, "PORT='http' is not an integer"),
    ({"PORT": "70000"}, "PORT/--port=70000 must be in 0..65535"),
    ({"BASIC_AUTH_USER": "ls"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"),
])
def test_bad_values_name_their_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        BackendSettings.from_env(env)


def test_a_bad_value_stops_serve_before_it_listens(serve_cli, monkeypatch, capsys):
    monkeypatch.setenv("ODISE_TRAIN_DEBOUNCE", "abc")
    code, seen = serve_cli(["--preset", "tiny"], lambda client: None)
    assert code == 2 and "bound" not in seen
    assert "error: ODISE_TRAIN_DEBOUNCE='abc' is not a number" in capsys.readouterr().err


def test_serve_binds_authenticates_and_trains_as_its_settings_say(serve_cli, monkeypatch, tmp_path):
    from odise_core import predictor

    monkeypatch.setattr(predictor, "build_predictor", lambda cfg, device="auto", **kw: StandIn())
    env = {"PORT": "9999", "HOST": "10.9.9.9", "ODISE_TRAIN_DEBOUNCE": "7", "ODISE_TRAIN_MIN_ANNOTATIONS": "5",
           "ODISE_TRAIN_STEPS": "3", "ODISE_TRAIN_LR": "0.5", "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "s3cret"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": CONFIG}}

    def ask(client):
        backend = client.application.config["backend"]
        options = backend.jobs.finetune_fn.keywords["options"]
        return {"anonymous": client.post("/webhook", json=event).status_code,
                "webhook": client.post("/webhook", json=event, auth=("ls", "s3cret")).get_json(),
                "finetune": (options.steps, options.lr, options.views_per_image)}

    code, seen = serve_cli(["--preset", "tiny", "--device", "cpu", "--model-dir", str(tmp_path), "--host",
                            "127.0.0.2", "--debounce", "300", "--lr", "0.01", "--label-studio-url",
                            "http://127.0.0.1:9", "--api-key", "k"], ask)
    assert code == 0 and seen["bound"] == ("127.0.0.2", 9999)
    answers = seen["answers"]
    assert answers["anonymous"] == 401
    assert answers["webhook"] == {"status": "scheduled", "in_seconds": 300.0, "min_annotations": 5}
    assert answers["finetune"] == (3, 0.01, 4)


def test_serve_without_webhook_training(serve_cli, monkeypatch, tmp_path):
    from odise_core import predictor

    monkeypatch.setattr(predictor, "build_predictor", lambda cfg, device="auto", **kw: StandIn())
    monkeypatch.setenv("ODISE_TRAIN_ON_ANNOTATION", "yes")
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": CONFIG}}
    code, seen = serve_cli(["--preset", "tiny", "--model-dir", str(tmp_path), "--no-train-on-annotation",
                            "--label-studio-url", "http://127.0.0.1:9", "--api-key", "k"],
                           lambda client: client.post("/webhook", json=event).get_json())
    assert code == 0 and seen["bound"] == ("127.0.0.1", 9090)
    assert seen["answers"]["status"] == "ignored" and "ODISE_TRAIN_ON_ANNOTATION" in seen["answers"]["reason"]


def test_train_fine_tunes_with_the_resolved_options(coco_dir, tmp_path, monkeypatch, capsys):
    import backend.learning

    used = []
    real = backend.learning.run_finetune

    def recording(model, data, vocab, job, feature_lock, options=None):
        used.append((options, len(data.train), len(data.holdout)))
        return real(model, data, vocab, job, feature_lock, options=options)

    monkeypatch.setattr(backend.learning, "run_finetune", recording)
    env = {"ODISE_TRAIN_STEPS": "500", "ODISE_TRAIN_LR": "0.003", "ODISE_TRAIN_VIEWS": "1",
           "ODISE_TRAIN_POINTS": "64", "ODISE_HOLDOUT_FRACTION": "0.75"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["train", "--coco", str(coco_dir), "--model-dir", str(tmp_path), "--preset", "tiny", "--device",
                 "cpu", "--steps", "2", "--holdout", "0.25"])
    job = json.loads(capsys.readouterr().out)
    assert code == 0 and job["total_steps"] == 2 and job["step"] == 2, job
    (options, train, holdout), = used
    assert (options.steps, options.lr, options.views_per_image, options.num_points, options.batch_size) == \
        (2, 0.003, 1, 64, 1)
    assert (train, holdout) == (3, 1)  # --holdout 0.25 of the four images, not the variable's 0.75


@pytest.mark.parametrize("env, flag, under_root", [
    ({}, [], "images"),  # default: the folder's parent
    ({"LOCAL_FILES_DOCUMENT_ROOT": "{up}"}, [], "{name}/images"),
    ({"LOCAL_FILES_DOCUMENT_ROOT": "/elsewhere"}, ["--document-root", "{up}"], "{name}/images"),
], ids=["default", "variable", "flag"])
def test_prelabel_urls_follow_the_document_root(env, flag, under_root, coco_dir, tmp_path, monkeypatch):
    from odise_core import predictor

    monkeypatch.setattr(predictor, "build_predictor", lambda cfg, device="auto", **kw: StandIn())
    where = {"up": coco_dir.parent, "name": coco_dir.name}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**where))
    out = tmp_path / "tasks.json"
    args = ["prelabel", "--folder", str(coco_dir / "images"), "--labels", ",".join(CLASS_NAMES), "--out", str(out),
            "--model-dir", str(tmp_path / "models"), "--no-progress", "--preset", "tiny", "--device", "cpu"]
    assert main(args + [f.format(**where) for f in flag]) == 0
    urls = sorted(t["data"]["image"] for t in json.loads(out.read_text()))
    assert urls == [f"/data/local-files/?d={under_root.format(**where)}/{i}.png" for i in range(4)]
