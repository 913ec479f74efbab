"""Settings: flags > environment > defaults reach the model every command builds; the model version follows them."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from backend.cli import build_parser, main
from backend.ls_format import ResultOptions
from backend.model import base_model_version, weights_digest
from backend.settings import BackendSettings, SettingsError, build_model, parse_bool
from odise_core.tools.synthetic import CLASS_NAMES

ENV = {"OVERLAP_THRESHOLD": "0.3", "PREDICTION_MODE": "instance"}
FLAGS = ["--preset", "tiny", "--fast", "--precision", "bf16", "--device", "cpu", "--feature-cache-mb", "64",
         "--feature-cache-dtype", "bf16"]


def test_overlap_threshold_and_fast_reach_the_model_config():
    settings = BackendSettings.from_env({"PRESET": "tiny", "DEVICE": "cpu", "OVERLAP_THRESHOLD": "0.25", "FAST": "1",
                                         "PRECISION": "bf16"})
    assert settings.overlap_threshold == 0.25 and settings.fast
    model = build_model(settings)
    assert model.cfg.head.overlap_threshold == 0.25 and model.cfg.precision == "bf16"
    assert model.cfg.backbone.min_size == model.cfg.backbone.window
    assert BackendSettings.from_env({}).overlap_threshold == 0.8  # the reference config's value by default


def test_one_yes_no_parser_for_every_variable():
    assert [parse_bool(v) for v in ("1", "TRUE", " yes", "On")] == [True] * 4
    assert [parse_bool(v) for v in ("0", "false", "No", "off", "")] == [False] * 5
    with pytest.raises(SettingsError, match="FAST='maybe' is not a yes/no value"):
        BackendSettings.from_env({"FAST": "maybe"})
    env = {"FAST": "yes", "KEEP_HOLES": "off", "ALLOW_LOCAL_PATHS": "0", "ODISE_OFFLINE": "on"}
    s = BackendSettings.from_env(env)
    assert (s.fast, s.result.keep_holes, s.allow_local_paths, s.offline) == (True, False, False, True)
    with pytest.raises(SettingsError, match="MIN_AREA='big' is not an integer"):
        BackendSettings.from_env({"MIN_AREA": "big"})
    with pytest.raises(SettingsError, match="PREDICTION_MODE 'panoptical'"):
        BackendSettings.from_env({"PREDICTION_MODE": "panoptical"})


def test_weight_variables_reach_the_config_as_values(tmp_path, monkeypatch):
    env = {"ODISE_WEIGHTS_DIR": str(tmp_path / "w"), "ODISE_SD_WEIGHTS": str(tmp_path / "sd.ckpt"),
           "ODISE_CLIP_WEIGHTS": str(tmp_path / "clip.pt"), "ODISE_CHECKPOINT": str(tmp_path / "odise.pth"),
           "ODISE_OFFLINE": "1"}
    cfg = BackendSettings.from_env(env).model_config()
    assert (cfg.weights_dir, cfg.diffusion.pretrained, cfg.clip.pretrained, cfg.checkpoint, cfg.offline) == \
        (str(tmp_path / "w"), str(tmp_path / "sd.ckpt"), str(tmp_path / "clip.pt"), str(tmp_path / "odise.pth"), True)
    monkeypatch.delenv("ODISE_WEIGHTS_DIR", raising=False)
    args = build_parser().parse_args(["predict", "x.png", "--labels", "a", "--weights-dir",
                                                          str(tmp_path / "flag")])
    assert BackendSettings.resolve(args, env).model_config().weights_dir == str(tmp_path / "flag")  # flag wins
    assert "ODISE_WEIGHTS_DIR" not in os.environ  # nothing was written into the environment


def test_feature_cache_settings_resolve_flags_over_env_over_defaults(tmp_path):
    default = BackendSettings.from_env({}, model_dir=tmp_path / "models").feature_cache()
    assert (default.root, default.max_bytes, default.storage) == (tmp_path / "models" / "feature_cache",
                                                                  16384 * 2**20, "fp16")
    env = {"FEATURE_CACHE_MB": "0.5", "FEATURE_CACHE_DTYPE": "fp32", "FEATURE_CACHE_DIR": str(tmp_path / "f")}
    cache = BackendSettings.from_env(env).feature_cache()
    assert (cache.root, cache.max_bytes, cache.storage, cache.enabled) == (tmp_path / "f", 2**19, "fp32", True)
    args = build_parser().parse_args(["rank", "x.png", "--labels", "a", "--feature-cache-mb", "0",
                                      "--feature-cache-dir", str(tmp_path / "g")])
    flagged = BackendSettings.resolve(args, env).feature_cache()
    assert (flagged.root, flagged.enabled, flagged.storage) == (tmp_path / "g", False, "fp32")
    with pytest.raises(SettingsError, match="FEATURE_CACHE_DTYPE 'int8' is not one of fp16, bf16, fp32"):
        BackendSettings.from_env({"FEATURE_CACHE_DTYPE": "int8"})
    with pytest.raises(SettingsError, match="FEATURE_CACHE_MB/--feature-cache-mb=-1 must be at least 0"):
        BackendSettings.from_env({"FEATURE_CACHE_MB": "-1"})


def test_results_digest_changes_with_results_and_only_then():
    base = BackendSettings.from_env({}, preset="tiny", device="cpu")
    assert BackendSettings.from_env({}, preset="tiny", device="cpu").results_digest() == base.results_digest()
    changed = {
        "preset": dataclasses.replace(base, preset="odise-label-coco"),
        "fast": dataclasses.replace(base, fast=True),
        "precision": dataclasses.replace(base, precision="bf16"),
        "overlap": dataclasses.replace(base, overlap_threshold=0.0),
        "mode": dataclasses.replace(base, mode="semantic"),
        "tolerance": dataclasses.replace(base, result=ResultOptions(tolerance=0.0)),
        "max_points": dataclasses.replace(base, result=ResultOptions(max_points=50)),
        "min_area": dataclasses.replace(base, result=ResultOptions(min_area=1)),
        "score": dataclasses.replace(base, result=ResultOptions(score_threshold=0.5)),
        "holes": dataclasses.replace(base, result=ResultOptions(keep_holes=False)),
        "cache-bf16": dataclasses.replace(base, feature_cache_dtype="bf16"),
        "cache-exact": dataclasses.replace(base, feature_cache_dtype="fp32"),
    }
    digests = {name: s.results_digest() for name, s in changed.items()}
    assert base.results_digest() not in digests.values() and len(set(digests.values())) == len(digests)
    # what does not change predictions does not change the version
    same = [dataclasses.replace(base, model_dir=Path("/elsewhere"), image_timeout=5.0, api_key="k"),
            dataclasses.replace(base, feature_cache_mb=1.0, feature_cache_dir=Path("/f")),
            dataclasses.replace(base, precision="fp32" if base.resolved_precision() == "sd-float32" else "auto")]
    assert {s.results_digest() for s in same} == {base.results_digest()}
    # a disabled cache and an exact one give the results of no cache; only a rounding one is in the digest
    assert dataclasses.replace(base, feature_cache_mb=0.0).results_digest() == digests["cache-exact"]


# ----------------------------------------------------------------------------- every command
@pytest.fixture(scope="module")
def tiny_model():
    return build_model(BackendSettings(preset="tiny", device="cpu"))


@pytest.fixture
def built(tiny_model, monkeypatch, tmp_path):
    """Records the (config, device) each command hands the core builder; returns the shared tiny model."""
    from odise_core import predictor

    calls: list[tuple] = []

    def build_predictor(cfg, device="auto", feature_cache=None, **kwargs):
        calls.append((cfg, str(device), feature_cache))
        return tiny_model

    monkeypatch.setattr(predictor, "build_predictor", build_predictor)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FEATURE_CACHE_DIR", str(tmp_path / "features"))
    monkeypatch.setenv("FEATURE_CACHE_MB", "1")  # the flag wins
    for name in ("FAST", "PRECISION", "DEVICE", "PRESET", "ODISE_WEIGHTS_DIR", "MODEL_DIR", "FEATURE_CACHE_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _expected_version(tiny_model) -> str:
    settings = BackendSettings.from_env(ENV, preset="tiny", fast=True, precision="bf16", device="cpu",
                                        feature_cache_dtype="bf16")
    version = base_model_version(settings, tiny_model)
    assert version.startswith(f"odise-tiny-fast-{weights_digest(tiny_model)}-s")
    assert version != base_model_version(BackendSettings(preset="tiny", device="cpu"), tiny_model)
    return version


def _check_built(calls: list[tuple], weights: Path) -> None:
    assert len(calls) == 1, "one model per command"
    cfg, device, cache = calls[0]
    assert (cache.root, cache.max_bytes, cache.storage) == (weights.parent / "features", 64 * 2**20, "bf16")
    assert device == "cpu" and cfg.name == "tiny" and cfg.precision == "bf16"
    assert cfg.backbone.min_size == cfg.backbone.window  # --fast
    assert cfg.head.overlap_threshold == 0.3 and cfg.weights_dir == str(weights)


def test_predict_honours_every_model_setting(built, tiny_model, coco_dir, tmp_path):
    out = tmp_path / "out"
    args = ["predict", str(coco_dir / "images" / "0.png"), "--labels", ",".join(CLASS_NAMES), "--out", str(out)]
    assert main([*args, *FLAGS, "--weights-dir", str(tmp_path / "w")]) == 0
    _check_built(built, tmp_path / "w")
    assert json.loads((out / "0.json").read_text())["model_version"] == _expected_version(tiny_model)


def test_prelabel_honours_every_model_setting(built, tiny_model, coco_dir, tmp_path):
    out = tmp_path / "tasks.json"
    args = ["prelabel", "--folder", str(coco_dir / "images"), "--labels", ",".join(CLASS_NAMES), "--out", str(out),
            "--model-dir", str(tmp_path / "models"), "--no-progress"]
    assert main([*args, *FLAGS, "--weights-dir", str(tmp_path / "w")]) == 0
    _check_built(built, tmp_path / "w")
    versions = {p["model_version"] for t in json.loads(out.read_text()) for p in t["predictions"]}
    assert versions == {_expected_version(tiny_model)}


def test_rank_honours_every_model_setting(built, tiny_model, coco_dir, tmp_path, capsys):
    images = [str(p) for p in sorted((coco_dir / "images").glob("*.png"))]
    args = ["rank", *images, "--labels", ",".join(CLASS_NAMES), "--model-dir", str(tmp_path)]
    assert main([*args, *FLAGS, "--weights-dir", str(tmp_path / "w")]) == 0
    _check_built(built, tmp_path / "w")
    assert f"# model version {_expected_version(tiny_model)};" in capsys.readouterr().out


def test_evaluate_honours_every_model_setting(built, tiny_model, coco_dir, tmp_path):
    report = tmp_path / "eval.json"
    args = ["evaluate", "--coco", str(coco_dir), "--model-dir", str(tmp_path / "models"), "--json", str(report)]
    assert main([*args, *FLAGS, "--weights-dir", str(tmp_path / "w")]) == 0
    _check_built(built, tmp_path / "w")
    assert json.loads(report.read_text())["version"] == _expected_version(tiny_model)


def test_train_honours_every_model_setting(built, tiny_model, coco_dir, tmp_path, caplog):
    args = ["train", "--coco", str(coco_dir), "--model-dir", str(tmp_path / "models"), "--steps", "1"]
    with caplog.at_level("INFO", logger="odise-ls"):
        main([*args, *FLAGS, "--weights-dir", str(tmp_path / "w")])
    _check_built(built, tmp_path / "w")
    assert f"fine-tuning {_expected_version(tiny_model)} from base" in caplog.text


def test_serve_honours_every_model_setting(built, tiny_model, tmp_path, serve_cli):
    xml = '<View><Image name="image" value="$image"/><PolygonLabels name="label" toName="image">' \
          '<Label value="cat"/></PolygonLabels></View>'
    code, seen = serve_cli(["--model-dir", str(tmp_path / "models"), *FLAGS, "--weights-dir", str(tmp_path / "w")],
                           lambda client: client.post("/setup", json={"project": "1.1", "schema": xml}).get_json())
    assert code == 0
    _check_built(built, tmp_path / "w")
    assert seen["answers"] == {"model_version": _expected_version(tiny_model)} and seen["closed"]


def test_bf16_precision_on_cpu_predicts_close_to_fp32():
    import skimage.data
    import torch

    from odise_core.config import get_config
    from odise_core.predictor import build_predictor
    from odise_core.vocabulary import Vocabulary

    cfg = get_config("tiny")
    cfg.precision = "fp32"
    model = build_predictor(cfg, device="cpu")
    extractor = model.model.backbone.feature_extractor
    assert extractor.sd_dtype == torch.float32
    vocab = Vocabulary.from_text("cup,table,saucer")
    fp32 = model.predict_raw(skimage.data.coffee(), vocab)
    model.cfg.precision = "bf16"
    bf16 = model.predict_raw(skimage.data.coffee(), vocab)
    # only the frozen SD networks went to bf16; the trainable parts and the outputs stay float32
    assert extractor.sd_dtype == torch.bfloat16 and next(extractor.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_state_dict().values() if p.is_floating_point())
    assert next(model.model.clip.parameters()).dtype == torch.float32
    assert bf16.class_probs.dtype == torch.float32
    assert torch.allclose(bf16.class_probs, fp32.class_probs, atol=0.05)
    assert not torch.equal(bf16.class_probs, fp32.class_probs)  # bf16 really ran
    model.cfg.precision = "fp32"
    with pytest.raises(ValueError, match="rebuild the model"):  # bf16 weights cannot become fp32 again
        model.predict_raw(skimage.data.coffee(), vocab)
    model.cfg.precision = "fp64"
    with pytest.raises(ValueError, match="precision"):
        model.predict_raw(skimage.data.coffee(), vocab)


def test_precision_plan():
    import torch

    from odise_core.predictor import cpu_has_native_bf16, precision_plan

    cpu = torch.device("cpu")
    assert precision_plan("fp32", cpu) == (None, torch.float32)
    assert precision_plan("bf16", cpu) == (None, torch.bfloat16)  # SD only; no whole-model autocast on CPU
    assert precision_plan("auto", cpu) == (None, torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
