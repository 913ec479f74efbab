"""Big and thin images through the tiny model: bounded post-processing memory gives the same segments."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from odise_core.config import get_config
from odise_core.postprocess import DIRECT_BUDGET_BYTES, UpsampledLogits, instance_inference, resize_mask_logits
from odise_core.predictor import ODISEPredictor, build_predictor
from odise_core.preprocess import resized_shape
from odise_core.vocabulary import Vocabulary

VOCAB = Vocabulary.from_text("cat, cup, person, table, dog, car, chair")  # seed 0: 8 regions on the photo


@pytest.fixture(scope="module")
def model() -> ODISEPredictor:
    cfg = get_config("tiny")
    cfg.precision = "fp32"
    cfg.head.overlap_threshold = 0.0  # every query that wins pixels becomes a region: more to compare
    return build_predictor(cfg, device="cpu")


def _photo(width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((width, height), Image.BICUBIC))


def _as_tuples(segments) -> list[tuple]:
    return [(s.class_index, s.score, s.is_thing, s.query_index, s.mask.shape, s.mask.tobytes()) for s in segments]


def test_query_by_query_panoptic_gives_the_segments_of_the_direct_path(model: ODISEPredictor) -> None:
    image = _photo(900, 700)  # upsampled from the 640 px resize, as a big photo is
    model.mask_budget_bytes = None
    direct = model.predict_raw(image, VOCAB)
    model.mask_budget_bytes = 0
    try:
        chunked = model.predict_raw(image, VOCAB)
    finally:
        model.mask_budget_bytes = DIRECT_BUDGET_BYTES
    assert len(direct.segments) >= 5 and all(s.mask.shape == (700, 900) for s in direct.segments)
    assert _as_tuples(chunked.segments) == _as_tuples(direct.segments)
    # Instance mode reads the same logits one query at a time.
    resized = tuple(direct.mask_logits.shape[-2:])
    full = resize_mask_logits(direct.mask_logits, resized, resized, (700, 900))
    is_thing = VOCAB.is_thing
    assert _as_tuples(instance_inference(direct.class_probs, UpsampledLogits(direct.mask_logits, resized, (700, 900)),
                                         is_thing)) == _as_tuples(instance_inference(direct.class_probs, full, is_thing))


@pytest.mark.parametrize("height,width", [(3, 4000), (4000, 3), (1, 1)])
def test_thin_and_tiny_images_are_segmented_at_their_own_size(model: ODISEPredictor, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    raw = model.predict_raw(image, VOCAB)
    assert raw.image_size == (height, width)
    assert raw.segments and all(s.mask.shape == (height, width) for s in raw.segments)
    covered = np.zeros((height, width), bool)
    for s in raw.segments:
        assert not (covered & s.mask).any(), "panoptic segments do not overlap"
        covered |= s.mask


def test_resized_shape_keeps_at_least_one_pixel_per_side() -> None:
    assert resized_shape(3, 4000, 256, 640) == (1, 640)  # 0.48 rows used to round to 0
    assert resized_shape(4000, 3, 1024, 2560) == (2560, 2)
    assert resized_shape(480, 640, 1024, 2560) == (1024, 1365)
    with pytest.raises(ValueError, match="0x5 pixels"):
        resized_shape(5, 0, 256, 640)
