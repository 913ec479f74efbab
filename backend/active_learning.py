"""Per-task uncertainty score for active learning.

score = mean over kept queries q of ( p1(q) - p2(q) )

where p1 and p2 are the largest and second-largest entries of query q's ensembled class
probabilities over K classes + "no object" (so doubt about whether a region is an object at all
counts too), and the kept queries are those that produced a segment. The score lies in [0, 1]:
1 = every region is classified with certainty, 0 = coin flips. An image where nothing was kept
scores 0. Label Studio's "sort by prediction score" ASCENDING therefore puts the most
informative (least certain) tasks first; `rank` orders tasks the same way.
"""
from __future__ import annotations

from typing import Iterable

import torch

from odise_core.types import RawPrediction


def task_score(raw: RawPrediction) -> float:
    """Mean top-1 minus top-2 class-probability margin of the kept queries; low = uncertain."""
    probs = raw.class_probs
    kept = sorted({s.query_index for s in raw.segments if 0 <= s.query_index < probs.shape[0]})
    if not kept:
        if not raw.segments:
            return 0.0
        # segments without query provenance: fall back to queries not predicting "no object"
        kept = (probs.argmax(-1) != probs.shape[-1] - 1).nonzero().flatten().tolist()
        if not kept:
            return 0.0
    top2 = torch.topk(probs[kept].float(), k=min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, 1] if top2.shape[-1] == 2 else top2[:, 0]
    return float(margin.mean().clamp(0.0, 1.0))


def rank(scores: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """(task_id, score) pairs, most informative (lowest score) first; ties by task id."""
    return sorted(scores, key=lambda ts: (ts[1], ts[0]))
