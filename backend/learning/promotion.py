"""Held-out evaluation of a model and the rule that decides whether a fine-tune is promoted."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import numpy as np
import torch

from odise_core.tools.evaluation import EvalResult, Evaluator
from odise_core.types import Segment


def ground_truth_segments(sample: Any, is_thing: Any) -> list[Segment]:
    """A TrainSample's masks as ground-truth Segments."""
    flags = [bool(t) for t in is_thing]
    return [Segment(np.asarray(m, dtype=bool), int(c), 1.0, flags[int(c)]) for m, c in zip(sample.masks, sample.classes)]


def instances_from_raw(raw: Any, is_thing: torch.Tensor, max_instances: int = 100) -> list[Segment]:
    """Scored, possibly overlapping thing instances (for mask AP) from a panoptic RawPrediction."""
    from odise_core.postprocess import instance_inference

    logits = raw.mask_logits.float()
    if tuple(logits.shape[-2:]) != tuple(raw.image_size):
        logits = torch.nn.functional.interpolate(logits[None], size=tuple(raw.image_size), mode="bilinear",
                                                 align_corners=False)[0]
    return instance_inference(raw.class_probs.float(), logits, is_thing, max_instances)


def evaluate_model(model: Any, samples: list[Any], vocab: Any, lock: ContextManager | None = None) -> EvalResult:
    """PQ / mask AP / mIoU of `model` on samples: one panoptic forward pass per image, whose
    per-query outputs also give the scored instances for mask AP. `lock` is held around each pass.
    """
    flags = [bool(t) for t in vocab.is_thing]
    is_thing = torch.as_tensor(flags, dtype=torch.bool)
    ev = Evaluator(list(vocab.names), flags)
    for s in samples:
        with lock if lock is not None else contextlib.nullcontext():
            raw = model.predict_raw(s.image, vocab, mode="panoptic")
        ev.add(raw.segments, ground_truth_segments(s, flags), instances=instances_from_raw(raw, is_thing))
    return ev.summarize()


def is_better(after: EvalResult, before: EvalResult) -> bool:
    """The promotion rule: higher held-out PQ; at equal PQ (e.g. both 0 early on), higher mIoU."""
    def key(r: EvalResult) -> tuple[float, float]:
        return tuple(-1.0 if v != v else v for v in (r.pq, r.miou))

    return key(after) > key(before)
