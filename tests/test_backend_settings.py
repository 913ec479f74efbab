"""Backend settings reach the model they build."""
from __future__ import annotations

from backend.model import BackendSettings, _default_factory


def test_overlap_threshold_and_fast_reach_the_model_config():
    settings = BackendSettings.from_env({"PRESET": "tiny", "DEVICE": "cpu", "OVERLAP_THRESHOLD": "0.25", "FAST": "1"})
    assert settings.overlap_threshold == 0.25 and settings.fast
    model = _default_factory(settings)
    assert model.cfg.head.overlap_threshold == 0.25
    assert model.cfg.backbone.min_size == model.cfg.backbone.window
    assert BackendSettings.from_env({}).overlap_threshold == 0.8  # the reference config's value by default
