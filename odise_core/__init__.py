"""ODISE open-vocabulary panoptic segmentation in pure PyTorch (diffusers + open_clip)."""
from odise_core.config import ModelConfig, get_config
from odise_core.types import RawPrediction, Segment

__all__ = ["ModelConfig", "get_config", "Segment", "RawPrediction"]
