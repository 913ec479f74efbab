"""The uncertainty score: its direction, range and the kept-query selection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.active_learning import rank, task_score
from odise_core.types import RawPrediction, Segment


def raw(probs: list[list[float]], kept: list[int]) -> RawPrediction:
    p = torch.tensor(probs)
    segs = [Segment(np.ones((4, 4), bool), int(p[q, :-1].argmax()), float(p[q].max()), True, q) for q in kept]
    return RawPrediction(segments=segs, class_probs=p, mask_logits=torch.zeros(len(probs), 4, 4), image_size=(4, 4))


def test_margin_of_kept_queries_only():
    probs = [[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.34, 0.33, 0.33]]
    assert task_score(raw(probs, [0, 1])) == pytest.approx(((0.9 - 0.05) + (0.5 - 0.4)) / 2)
    assert task_score(raw(probs, [2])) == pytest.approx(0.01)


def test_no_object_column_counts_as_a_competitor():
    # query 0 is sure of its class among objects but nearly as likely "no object"
    assert task_score(raw([[0.5, 0.0, 0.5]], [0])) == pytest.approx(0.0)


def test_confident_scores_higher_than_uncertain_and_rank_puts_uncertain_first():
    sure = task_score(raw([[0.98, 0.01, 0.01]], [0]))
    unsure = task_score(raw([[0.4, 0.35, 0.25]], [0]))
    assert 0.0 <= unsure < sure <= 1.0
    assert rank([(1, sure), (2, unsure), (3, 0.0)]) == [(3, 0.0), (2, unsure), (1, sure)]


def test_nothing_kept_is_most_informative():
    assert task_score(raw([[0.1, 0.1, 0.8]], [])) == 0.0


def test_segments_without_query_index_fall_back_to_object_queries():
    p = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.1, 0.8]])
    r = RawPrediction([Segment(np.ones((2, 2), bool), 0, 0.7, False, -1)], p, torch.zeros(2, 2, 2), (2, 2))
    assert task_score(r) == pytest.approx(0.5)
