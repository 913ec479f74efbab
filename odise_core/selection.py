"""Interactive selection rules: which query masks answer a click, a box or a typed phrase.

Pure functions over a QueryState's per-query outputs. Masks are (Q,h,w) logits (a pixel is in
query q's mask when its logit is > 0); points and boxes are given in the same (h,w) grid, so
callers scale image pixels to it first. All queries compete, not only the panoptic survivors:
a click on a cup standing on a table can get the cup even where the table's mask covers it too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A box answer must keep at least this share of its mask inside the box ("mostly inside").
BOX_INSIDE_FRACTION = 0.6
# Two phrase answers overlapping more than this (IoU) are the same region: the weaker one is dropped.
PHRASE_OVERLAP_IOU = 0.5
PHRASE_MAX_REGIONS = 10


@dataclass(frozen=True)
class Click:
    """One click in mask-grid pixels; `positive` False for a click that says "not this"."""

    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in mask-grid pixels, corners (x0, y0) top-left and (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float

    def grid_mask(self, size: tuple[int, int]) -> torch.Tensor:
        """(h,w) bool: grid cells whose centre lies inside the box."""
        h, w = size
        ys = torch.arange(h, dtype=torch.float32) + 0.5
        xs = torch.arange(w, dtype=torch.float32) + 0.5
        rows = (ys >= self.y0) & (ys <= self.y1)
        cols = (xs >= self.x0) & (xs <= self.x1)
        return rows[:, None] & cols[None, :]


def _areas(masks: torch.Tensor) -> torch.Tensor:
    return masks.flatten(1).sum(1)


def _prefer(candidates: torch.Tensor, is_object: torch.Tensor) -> torch.Tensor:
    """The candidates that are objects (best class is not "no object") when there are any, else all of them."""
    objects = candidates & is_object.to(candidates.device)
    return objects if bool(objects.any()) else candidates


def select_click(mask_logits: torch.Tensor, is_object: torch.Tensor, clicks: list[Click],
                 min_pixels: int = 1) -> int | None:
    """The query answering `clicks`, or None when no mask fits.

    A candidate mask contains no negative click and as many positive clicks as any mask does (at
    least one); among candidates, object queries are preferred, then the smallest mask wins, so a
    click on a small object inside a large region gets the small object and further positive
    clicks grow the answer to the smallest mask holding them all.
    """
    positives = [c for c in clicks if c.positive]
    if not positives:
        raise ValueError("an interactive click needs at least one positive point")
    masks = mask_logits > 0
    q, h, w = masks.shape

    def hits(points: list[Click]) -> torch.Tensor:  # (Q, P) bool: point p inside mask q
        if not points:
            return torch.zeros(q, 0, dtype=torch.bool, device=masks.device)
        ys = torch.tensor([min(max(int(p.y), 0), h - 1) for p in points], device=masks.device)
        xs = torch.tensor([min(max(int(p.x), 0), w - 1) for p in points], device=masks.device)
        return masks[:, ys, xs]

    count = hits(positives).sum(1)
    allowed = ~hits([c for c in clicks if not c.positive]).any(1) & (_areas(masks) >= min_pixels)
    count = torch.where(allowed, count, torch.zeros_like(count))
    best = int(count.max())
    if best == 0:
        return None
    candidates = _prefer(count == best, is_object)
    areas = torch.where(candidates, _areas(masks), torch.full_like(count, h * w + 1))
    return int(areas.argmin())


def select_box(mask_logits: torch.Tensor, is_object: torch.Tensor, box: Box, min_pixels: int = 1) -> int | None:
    """The query whose mask lies mostly inside `box` (BOX_INSIDE_FRACTION) and matches it best (IoU), or None.

    Object queries are preferred; the caller clips the answer to the box.
    """
    masks = mask_logits > 0
    inside_box = box.grid_mask(tuple(masks.shape[-2:])).to(masks.device)
    areas = _areas(masks)
    inside = _areas(masks & inside_box)
    box_area = int(inside_box.sum())
    if box_area == 0:
        return None
    candidates = (inside >= min_pixels) & (inside >= BOX_INSIDE_FRACTION * areas)
    if not bool(candidates.any()):
        return None
    candidates = _prefer(candidates, is_object)
    iou = inside.float() / (areas + box_area - inside).clamp_min(1).float()
    return int(torch.where(candidates, iou, torch.full_like(iou, -1.0)).argmax())


def select_phrase(probs: torch.Tensor, phrase_class: int, mask_logits: torch.Tensor, min_pixels: int = 1,
                  max_regions: int = PHRASE_MAX_REGIONS) -> list[int]:
    """Queries answering a typed phrase that was added as class `phrase_class` to the vocabulary.

    `probs` (Q,C+1) are class probabilities over the extended vocabulary (last column "no object").
    The answer is every query whose best class is the phrase, strongest first, with a query dropped
    when it overlaps a stronger answer by more than PHRASE_OVERLAP_IOU; when no query prefers the
    phrase, the single query with the highest phrase probability. Empty masks never answer.
    """
    masks = mask_logits > 0
    areas = _areas(masks)
    usable = areas >= min_pixels
    if not bool(usable.any()):
        return []
    score = probs[:, phrase_class].float()
    winners = usable & (probs.argmax(-1) == phrase_class)
    if not bool(winners.any()):
        return [int(torch.where(usable, score, torch.full_like(score, -1.0)).argmax())]
    order = [int(i) for i in score.argsort(descending=True) if bool(winners[i])]
    kept: list[int] = []
    for i in order:
        overlaps = [float((masks[i] & masks[j]).sum()) / float((masks[i] | masks[j]).sum()) for j in kept]
        if all(o <= PHRASE_OVERLAP_IOU for o in overlaps):
            kept.append(i)
        if len(kept) == max_regions:
            break
    return kept
