"""Post-processing on hand-made probabilities and mask logits with known answers."""
import numpy as np
import torch

from odise_core.postprocess import (instance_inference, panoptic_inference, panoptic_segments, resize_mask_logits,
                                   semantic_inference)

BIG = 10.0


def _mask(h, w, rows=slice(None), cols=slice(None)):
    m = torch.full((h, w), -BIG)
    m[rows, cols] = BIG
    return m


def _probs(rows):
    """rows: list of (class index or -1 for no object, score); K = 3 classes + null."""
    probs = torch.zeros(len(rows), 4)
    for i, (cls, score) in enumerate(rows):
        col = 3 if cls < 0 else cls
        probs[i, col] = score
        probs[i, [c for c in range(4) if c != col]] = (1 - score) / 3
    return probs


IS_THING = torch.tensor([True, False, True])  # class 1 is stuff


def test_stuff_of_one_class_merges_things_stay_separate():
    h, w = 8, 8
    masks = torch.stack([
        _mask(h, w, slice(0, 4), slice(0, 4)),  # thing 0
        _mask(h, w, slice(0, 4), slice(4, 8)),  # thing 0, another instance
        _mask(h, w, slice(4, 8), slice(0, 4)),  # stuff 1
        _mask(h, w, slice(4, 8), slice(4, 8)),  # stuff 1 again -> merges
    ])
    probs = _probs([(0, 0.9), (0, 0.8), (1, 0.7), (1, 0.6)])
    pan, segs = panoptic_inference(probs, masks, IS_THING, 0.0, 0.8)
    assert [(s.class_index, s.is_thing, s.area) for s in segs] == [(0, True, 16), (0, True, 16), (1, False, 32)]
    assert abs(segs[2].score - 0.7) < 1e-6 and segs[2].query_index == 2
    assert pan.dtype == torch.int32 and set(np.unique(pan.numpy())) == {1, 2, 3}
    for i, s in enumerate(segs, start=1):
        assert np.array_equal(pan.numpy() == i, s.mask)


def test_no_object_and_object_mask_threshold_drop_queries():
    h, w = 4, 4
    masks = torch.stack([_mask(h, w, slice(0, 2)), _mask(h, w, slice(2, 4)), _mask(h, w, cols=slice(0, 2))])
    probs = _probs([(-1, 0.9), (2, 0.45), (0, 0.6)])
    pan, segs = panoptic_inference(probs, masks, IS_THING, object_mask_threshold=0.5, overlap_threshold=0.0)
    assert [(s.class_index, s.query_index) for s in segs] == [(0, 2)]
    assert segs[0].area == 8
    _, segs_low = panoptic_inference(probs, masks, IS_THING, object_mask_threshold=0.0, overlap_threshold=0.0)
    assert sorted(s.query_index for s in segs_low) == [1, 2]  # the no-object query never survives


def test_overlap_threshold_drops_mostly_covered_segments_and_void_stays_zero():
    h, w = 4, 10
    big = _mask(h, w, cols=slice(0, 10))  # 40 px
    small = _mask(h, w, cols=slice(0, 6))  # 24 px, higher score wins them
    masks = torch.stack([big, small])
    probs = _probs([(0, 0.5), (2, 0.9)])
    _, segs = panoptic_inference(probs, masks, IS_THING, 0.0, overlap_threshold=0.8)
    assert [s.query_index for s in segs] == [1]  # big keeps 16/40 = 0.4 < 0.8
    _, segs = panoptic_inference(probs, masks, IS_THING, 0.0, overlap_threshold=0.3)
    assert sorted((s.query_index, s.area) for s in segs) == [(0, 16), (1, 24)]
    only = torch.stack([_mask(h, w, cols=slice(0, 3))])
    pan, segs = panoptic_inference(_probs([(0, 0.9)]), only, IS_THING, 0.0, 0.8)
    assert (pan[:, 3:] == 0).all() and (pan[:, :3] == 1).all()


def test_pixels_below_mask_threshold_stay_void():
    masks = torch.stack([torch.tensor([[BIG, -0.5], [-0.5, -BIG]])])  # sigmoid(-0.5) < 0.5
    pan, segs = panoptic_inference(_probs([(0, 0.9)]), masks, IS_THING, 0.0, 0.0)
    assert pan.tolist() == [[1, 0], [0, 0]]


def test_instance_top_k_things_only_with_mask_score():
    h, w = 4, 4
    m0 = torch.full((h, w), -BIG)
    m0[:2] = 2.0  # sigmoid(2) = 0.8808 inside
    masks = torch.stack([m0, _mask(h, w, slice(2, 4)), _mask(h, w, cols=slice(0, 1))])
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.6, 0.3], [0.2, 0.5, 0.2, 0.1]])
    inst = instance_inference(probs, masks, IS_THING, max_instances=3)
    # top-3 pairs: (q0,c0)=.7, (q1,c2)=.6, (q2,c1)=.5 -> the stuff pair is dropped
    assert [(s.query_index, s.class_index) for s in inst] == [(0, 0), (1, 2)]
    assert abs(inst[0].score - 0.7 * torch.sigmoid(torch.tensor(2.0)).item()) < 1e-5
    assert inst[0].area == 8 and inst[1].area == 8
    assert len(instance_inference(probs, masks, IS_THING, max_instances=1)) == 1
    assert len(instance_inference(probs, masks, IS_THING, max_instances=3, things_only=False)) == 3


def test_instance_keeps_empty_masks_with_score_zero_as_the_reference():
    masks = torch.stack([_mask(4, 4, slice(0, 2)), torch.full((4, 4), -BIG), _mask(4, 4, cols=slice(0, 1))])
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.8, 0.1], [0.5, 0.2, 0.2, 0.1]])
    inst = instance_inference(probs, masks, IS_THING, max_instances=3)
    assert [(s.query_index, s.class_index) for s in inst] == [(0, 0), (2, 0), (1, 2)]
    assert inst[-1].score == 0.0 and inst[-1].area == 0 and inst[1].score > 0
    dropped = instance_inference(probs, masks, IS_THING, max_instances=3, keep_empty=False)
    assert [(s.query_index, s.class_index) for s in dropped] == [(0, 0), (2, 0)]


def test_semantic_inference_weights_masks_by_class_prob():
    masks = torch.stack([_mask(2, 2, slice(0, 1)), _mask(2, 2, slice(1, 2))])
    probs = torch.tensor([[0.8, 0.1, 0.0, 0.1], [0.0, 0.9, 0.0, 0.1]])
    sem = semantic_inference(probs, masks)
    assert sem.shape == (3, 2, 2)
    assert sem.argmax(0).tolist() == [[0, 0], [1, 1]]
    assert abs(sem[0, 0, 0].item() - 0.8) < 1e-3


def test_resize_crops_padding_before_resizing():
    low = torch.zeros(1, 4, 4)
    low[0, 3] = 100.0  # bottom row lies in the padding
    out = resize_mask_logits(low, padded_size=(8, 8), resized_size=(5, 8), original_size=(10, 16))
    assert out.shape == (1, 10, 16)
    assert out.abs().max() < 1e-4  # nothing of the padded row leaks into the valid image
    uncropped = resize_mask_logits(low, padded_size=(8, 8), resized_size=(8, 8), original_size=(10, 16))
    assert uncropped.max() > 50


def _segments_as_tuples(segments):
    return [(s.class_index, s.score, s.is_thing, s.query_index, s.mask.shape, s.mask.tobytes()) for s in segments]


def test_panoptic_by_query_gives_the_same_segments_as_upsampling_all_queries_at_once():
    torch.manual_seed(0)
    q, k = 40, 6
    # Each query a blob at a random place (some overlap); a copy of query 3 tests that ties go to the first.
    yy, xx = torch.meshgrid(torch.arange(45.0), torch.arange(61.0), indexing="ij")
    centres, radii = torch.rand(q, 2) * torch.tensor([45.0, 61.0]), 4 + torch.rand(q) * 10
    centres[3], radii[3] = torch.tensor([22.0, 30.0]), 12.0
    logits = 6 - 12 * ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).sqrt() / radii[:, None, None]
    logits[7] = logits[3]
    probs = torch.softmax(torch.randn(q, k + 1) * 3, -1)
    probs[3] = torch.tensor([0.97, 0.005, 0.005, 0.005, 0.005, 0.005, 0.005])
    probs[7] = probs[3]
    probs[5, :] = 0.0
    probs[5, -1] = 1.0  # "no object": never upsampled
    is_thing = torch.tensor([True, False, True, False, True, True])
    for overlap in (0.0, 0.5, 0.8):
        args = (probs, logits, (45, 61), (137, 190), is_thing, 0.1, overlap, 0.5)
        direct = panoptic_segments(*args, budget_bytes=None)
        chunked = panoptic_segments(*args, budget_bytes=0)
        assert len(direct) >= 3, "the scene must have several segments to compare"
        assert _segments_as_tuples(chunked) == _segments_as_tuples(direct)
        assert all(s.mask.shape == (137, 190) for s in direct)
        assert 3 in [s.query_index for s in direct] and 7 not in [s.query_index for s in direct], "ties: first query"
        assert 5 not in [s.query_index for s in direct]
    stuff = [s.class_index for s in direct if not s.is_thing]
    assert len(stuff) == len(set(stuff)), "stuff of one class is merged into one segment"


def test_panoptic_segments_switches_to_query_by_query_past_the_budget(monkeypatch):
    import odise_core.postprocess as post

    calls = []
    real = post.panoptic_by_query
    monkeypatch.setattr(post, "panoptic_by_query", lambda *a, **k: calls.append(1) or real(*a, **k))
    probs, logits = _probs([(0, 0.9), (1, 0.8)]), torch.stack([_mask(8, 8, rows=slice(0, 4)), _mask(8, 8)])
    per_query = 80 * 80 * 4
    assert len(post.panoptic_segments(probs, logits, (8, 8), (80, 80), IS_THING, overlap_threshold=0.0,
                                  budget_bytes=2 * per_query)) == 2
    assert calls == []
    segments = post.panoptic_segments(probs, logits, (8, 8), (80, 80), IS_THING, overlap_threshold=0.0,
                                     budget_bytes=2 * per_query - 1)
    assert calls == [1] and [s.class_index for s in segments] == [0, 1]
    assert segments[0].mask[:35].all() and not segments[0].mask[45:].any() and segments[1].mask[45:].all()
