"""Backend settings reach the model they build."""
from __future__ import annotations

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
    from odise_core.model import ODISE
    from odise_core.vocabulary import Vocabulary

    cfg = get_config("tiny")
    model = ODISE.from_config(cfg, device="cpu")
    vocab = Vocabulary.from_text("cup,table,saucer")
    fp32 = model.predict_raw(skimage.data.coffee(), vocab)
    model.cfg.precision = "bf16"
    bf16 = model.predict_raw(skimage.data.coffee(), vocab)
    assert bf16.class_probs.dtype == torch.float32
    assert torch.allclose(bf16.class_probs, fp32.class_probs, atol=0.05)
    model.cfg.precision = "fp64"
    try:
        model.predict_raw(skimage.data.coffee(), vocab)
    except ValueError as e:
        assert "precision" in str(e)
    else:
        raise AssertionError("an unknown precision must be refused")
