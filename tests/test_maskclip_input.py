"""What MaskCLIP is given: the decoder's raw masks by default (as the reference), or image-aligned masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from odise_core.config import get_config
from odise_core.modeling.odise import ODISE
from odise_core.vocabulary import TextEmbeddingCache


@pytest.fixture(scope="module")
def model() -> ODISE:
    return ODISE.from_config(get_config("tiny"), device="cpu", text_cache=TextEmbeddingCache(None))


def test_default_gives_maskclip_the_raw_quarter_resolution_masks_and_the_unpadded_image(model):
    assert get_config("odise-label-coco").head.maskclip_input == "reference"
    padded, pred = torch.rand(1, 3, 128, 192), torch.randn(1, 5, 32, 48)
    image, masks = model.maskclip_inputs(padded, (100, 192), pred)
    assert torch.equal(image, padded[..., :100, :]) and torch.equal(masks, pred)


def test_aligned_option_crops_canvas_masks_to_the_image(model, monkeypatch):
    padded, pred = torch.rand(1, 3, 128, 192), torch.randn(1, 5, 32, 48)
    monkeypatch.setattr(model.cfg.head, "maskclip_input", "aligned")
    image, masks = model.maskclip_inputs(padded, (100, 192), pred)
    expected = F.interpolate(pred, size=(128, 192), mode="bilinear", align_corners=False)[..., :100, :]
    assert image.shape == (1, 3, 100, 192) and torch.equal(masks, expected)
    monkeypatch.setattr(model.cfg.head, "maskclip_input", "cropped")
    with pytest.raises(ValueError, match="'reference' or 'aligned'"):
        model.maskclip_inputs(padded, (100, 192), pred)
