"""The reference-equivalent mode (the speed baseline) does the reference's redundant work but gives the
same segments as the optimised model. Fidelity to the official code: test_golden.py."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from odise_core.config import get_config
from odise_core.predictor import ODISEPredictor, build_predictor
from odise_core.reference_mode import ReferenceEquivalentODISE
from odise_core.vocabulary import TextEmbeddingCache, Vocabulary


@pytest.fixture(scope="module")
def models():
    cfg = get_config("tiny")
    cfg.head.overlap_threshold = 0.0  # keep every segment so the comparison covers many
    cfg.precision = "fp32"  # the same arithmetic as the reference; bf16 is a separate lever (test_precision)
    fast = build_predictor(cfg, device="cpu", text_cache=TextEmbeddingCache(None))
    ref = ODISEPredictor(ReferenceEquivalentODISE.from_config(cfg, device="cpu"))
    return fast, ref


def test_reference_mode_does_the_extra_work(models):
    fast, ref = models
    assert ref.model.backbone.feature_extractor.full_networks
    assert not fast.model.backbone.feature_extractor.full_networks
    assert ref.model.text_clip is not ref.model.clip and ref.model.mask_clip is not ref.model.clip
    calls = []
    ref.model.sd_text_encoder.register_forward_hook(lambda *a: calls.append(1))
    vocab = Vocabulary.from_text("person,rocket,sky")
    ref.predict(skimage.data.coffee(), vocab)
    ref.predict(skimage.data.coffee(), vocab)
    assert len(calls) == 2  # "" re-encoded on every forward


def test_same_segments_as_optimised(models):
    fast, ref = models
    assert fast.trainable_state_dict().keys() == ref.trainable_state_dict().keys()
    for k, v in fast.trainable_state_dict().items():
        torch.testing.assert_close(v, ref.trainable_state_dict()[k], rtol=0, atol=0)
    vocab = Vocabulary.from_text("person,rocket,sky:clouds|blue sky")
    for image in (skimage.data.astronaut(), skimage.data.chelsea()):
        a = fast.predict_raw(image, vocab)
        b = ref.predict_raw(image, vocab)
        torch.testing.assert_close(a.class_probs, b.class_probs, rtol=1e-4, atol=1e-5)
        assert len(a.segments) == len(b.segments) > 0
        for sa, sb in zip(a.segments, b.segments):
            assert (sa.class_index, sa.query_index, sa.is_thing) == (sb.class_index, sb.query_index, sb.is_thing)
            # batched vs one-at-a-time crops round differently: only pixels at the 0.5 boundary may flip
            assert np.count_nonzero(sa.mask != sb.mask) <= 1e-4 * sa.mask.size
            assert sa.score == pytest.approx(sb.score, rel=1e-4)


def test_semantic_mode_scores_are_probabilities(models):
    fast, _ = models
    segments = fast.predict(skimage.data.coffee(), Vocabulary.from_text("cup,table,saucer"), mode="semantic")
    union = np.zeros(segments[0].mask.shape, dtype=int)
    for seg in segments:
        assert 0.0 <= seg.score <= 1.0
        union += seg.mask
    assert (union == 1).all()  # semantic output partitions the image
