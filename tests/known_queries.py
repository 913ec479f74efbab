"""A model whose query masks are known (a table with a cup and a plate on it) and smart-tool results.

The kept masks are at half the image size, so the tests also check the grid <-> image scaling.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from odise_core.query_state import QueryState
from odise_core.types import RawPrediction

H, W = 80, 120  # image; the kept masks are at half this size
CONFIG = """<View><Image name="image" value="$image"/>
<{out} name="label" toName="image"><Label value="table"/><Label value="cup" predicted_values="mug"/>
<Label value="plate"/></{out}>
<KeyPointLabels name="click" toName="image" smartOnly="true"><Label value="table"/><Label value="cup"/>
<Label value="plate"/><Label value="saucer"/></KeyPointLabels>
<RectangleLabels name="box" toName="image" smartOnly="true"><Label value="table"/><Label value="cup"/>
<Label value="plate"/></RectangleLabels>
<TextArea name="prompt" toName="image"/></View>"""


def grid_rect(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(H // 2, W // 2, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


# in image pixels: table rows 20-80, cup rows 30-44 x 40-56, plate rows 50-64 x 80-104
MASKS = [grid_rect(10, 40, 0, 60), grid_rect(15, 22, 20, 28), grid_rect(25, 32, 40, 52)]
# ODISE thinks the cup query is a plate: a picked label must win over this; the phrase favours query 2
PROBS = torch.tensor([[0.8, 0.05, 0.05, 0.1], [0.1, 0.2, 0.6, 0.1], [0.05, 0.05, 0.8, 0.1]])


def full(mask: torch.Tensor) -> np.ndarray:
    return np.kron(mask.numpy(), np.ones((2, 2), dtype=bool)).astype(bool)


class KnownQueries:
    """A model whose queries are MASKS with PROBS; counts full passes and phrase scorings."""

    FROZEN_PREFIXES = ()

    def __init__(self, delay: float = 0.0):
        self.passes = 0
        self.phrases: list[str] = []
        self.delay = delay
        self.cfg = None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(1)}

    def query_state(self, image: np.ndarray, vocab) -> QueryState:
        assert image.shape[:2] == (H, W) and vocab.names == ["table", "cup", "plate"]
        self.passes += 1
        time.sleep(self.delay)
        logits = torch.stack([torch.where(m, 5.0, -5.0) for m in MASKS]).half()
        return QueryState(mask_logits=logits, class_probs=PROBS.clone(), mask_embed=torch.zeros(3, 4),
                          clip_embeds=torch.zeros(3, 4), logit_scale=10.0, image_size=(H, W))

    def phrase_probabilities(self, state: QueryState, vocab, phrase: str) -> torch.Tensor:
        self.phrases.append(phrase)
        probs = torch.full((3, 5), 0.05)
        probs[2, 3] = 0.8  # the phrase wins on the plate's query
        return probs

    def predict_raw(self, image, vocab, mode="panoptic") -> RawPrediction:
        raise AssertionError("an interactive request must not run the full prediction")


def keypoint(x_px: float, y_px: float, label: str | None = "cup", positive: bool = True,
             size: tuple[int, int] = (H, W)) -> dict:
    """A KeyPointLabels click as the editor serialises it (percent of the (h, w) image)."""
    h, w = size
    value = {"x": x_px / w * 100, "y": y_px / h * 100, "width": 0.5}
    if label:
        value["keypointlabels"] = [label]
    return {"id": "k1", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "original_width": w, "original_height": h, "value": value, "is_positive": positive}


def rectangle(x0: float, y0: float, x1: float, y1: float, label: str | None = None,
              size: tuple[int, int] = (H, W)) -> dict:
    """A RectangleLabels box as the editor serialises it (percent of the (h, w) image)."""
    h, w = size
    value = {"x": x0 / w * 100, "y": y0 / h * 100, "width": (x1 - x0) / w * 100, "height": (y1 - y0) / h * 100,
             "rotation": 0}
    if label:
        value["rectanglelabels"] = [label]
    return {"id": "r1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "value": value}


def text(phrase: str) -> dict:
    """A TextArea submission as the editor serialises it."""
    return {"id": "t1", "from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [phrase]}}
