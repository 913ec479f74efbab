"""The contract between odise_core and its callers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Segment:
    """One predicted region at the original image size."""

    mask: np.ndarray  # (H, W) bool
    class_index: int  # index into the Vocabulary's classes
    score: float  # in [0, 1]
    is_thing: bool
    query_index: int = -1  # decoder query that produced it (-1 when not from a query)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class RawPrediction:
    """Per-query outputs for callers that need more than segments (active learning, evaluation)."""

    segments: list[Segment]
    class_probs: torch.Tensor  # (Q, K+1) ensembled class probabilities, last column = no object
    mask_logits: torch.Tensor  # (Q, h, w) mask logits at the model's working size (resized, unpadded)
    image_size: tuple[int, int]  # (H, W) of the original image
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # "hit" or "miss" when the predictor has a feature cache ("backbone" time is then the cache's), else None
    feature_cache: str | None = None
