"""Backend settings reach the model they build."""
from __future__ import annotations

import pytest

from backend.model import BackendSettings, _default_factory


def test_overlap_threshold_and_fast_reach_the_model_config():
    settings = BackendSettings.from_env({"PRESET": "tiny", "DEVICE": "cpu", "OVERLAP_THRESHOLD": "0.25", "FAST": "1",
                                         "PRECISION": "bf16"})
    assert settings.overlap_threshold == 0.25 and settings.fast
    model = _default_factory(settings)
    assert model.cfg.head.overlap_threshold == 0.25 and model.cfg.precision == "bf16"
    assert model.cfg.backbone.min_size == model.cfg.backbone.window
    assert BackendSettings.from_env({}).overlap_threshold == 0.8  # the reference config's value by default


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
