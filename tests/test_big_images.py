"""Big and thin images through the tiny model: bounded post-processing memory gives the same segments."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from odise_core import postprocess

from odise_core.config import get_config
from odise_core.postprocess import (DIRECT_BUDGET_BYTES, UpsampledLogits, instance_inference, resize_mask_logits,
                                   semantic_inference, semantic_segments)
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


def _old_semantic(probs, mask_logits, resized, original) -> list[tuple]:
    """The previous semantic path: every query upsampled to the original size at once."""
    full = resize_mask_logits(mask_logits, resized, resized, original)
    sem = semantic_inference(probs, full)
    sem = sem / sem.sum(0, keepdim=True).clamp_min(1e-6)
    labels = sem.argmax(0).numpy()
    return [(int(k), float(sem[k][labels == k].mean()), labels == k) for k in np.unique(labels)]


def test_semantic_mode_in_bands_gives_the_map_of_the_whole_image_path(model: ODISEPredictor) -> None:
    raw = model.predict_raw(_photo(900, 700), VOCAB, mode="semantic")  # one band: the default budget holds it
    resized = tuple(raw.mask_logits.shape[-2:])
    expected = _old_semantic(raw.class_probs, raw.mask_logits, resized, (700, 900))
    assert [(s.class_index, s.mask.tobytes()) for s in raw.segments] == [(k, m.tobytes()) for k, _, m in expected]
    assert [s.score for s in raw.segments] == pytest.approx([sc for _, sc, _ in expected], abs=1e-6)
    # Several classes (the tiny random model paints one): smooth random logits of 12 queries over 6 classes.
    gen = torch.Generator().manual_seed(0)
    logits = torch.nn.functional.interpolate(torch.randn(1, 12, 6, 8, generator=gen) * 6, size=(60, 80),
                                             mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(torch.randn(12, 7, generator=gen) * 3, -1)
    is_thing = torch.tensor([True, False] * 3)
    expected = _old_semantic(probs, logits, (60, 80), (700, 900))
    assert len(expected) >= 4
    row_bytes = (12 + 6) * 900 * 4
    for budget in (None, 1, 37 * row_bytes):  # one band, bands of 1 row, of 37 rows
        banded = semantic_segments(probs, logits, is_thing, (60, 80), (700, 900), budget)
        assert [s.class_index for s in banded] == [k for k, _, _ in expected]
        assert [s.is_thing for s in banded] == [bool(is_thing[k]) for k, _, _ in expected]
        differ = sum(int((s.mask != m).sum()) for s, (_, _, m) in zip(banded, expected))
        assert differ <= (0 if budget is None else 2), f"{differ} pixels changed class against the whole-image map"
        assert [s.score for s in banded] == pytest.approx([sc for _, sc, _ in expected], abs=1e-5)
        assert sum(int(s.mask.sum()) for s in banded) == 700 * 900


def test_semantic_bands_never_hold_every_query_at_full_size() -> None:
    """A band is sized from the budget: (queries + classes) x width x 4 bytes per row."""
    probs = torch.softmax(torch.randn(10, 4), -1)
    logits = torch.randn(10, 20, 30)
    seen: list[int] = []
    real = postprocess.bilinear_rows

    def spy(x, size, rows):
        seen.append(len(range(*rows.indices(size[0]))))
        return real(x, size, rows)

    postprocess.bilinear_rows = spy
    try:
        segments = semantic_segments(probs, logits, torch.zeros(3, dtype=torch.bool), (20, 30), (400, 600),
                                     budget_bytes=(10 + 3) * 600 * 4 * 50)
    finally:
        postprocess.bilinear_rows = real
    assert seen == [50] * 8
    assert sum(int(s.mask.sum()) for s in segments) == 400 * 600
