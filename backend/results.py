"""Segments -> Label Studio prediction JSON (polygons, brush RLE masks, boxes).

Coordinates are percent of the original image width/height. Each connected part of a segment
becomes its own region (parts under `min_area` pixels are dropped). Label Studio polygons have
no holes: holes of at least `min_area` pixels are spliced into the outer ring through a zero-width
cut ("keyhole"), so the drawn region excludes them; smaller holes are filled. Brush masks keep
holes exactly. Boxes are the bounding boxes of the parts.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from backend.active_learning import task_score as certainty
from backend.label_config import ControlSpec
from odise_core.geometry import PolygonOptions, brush_rle_encode, connected_parts, mask_bbox, mask_to_polygons
from odise_core.types import RawPrediction, Segment


@dataclass(frozen=True)
class ResultOptions:
    """Output shaping; the defaults suit interactive correction in the Label Studio editor."""

    tolerance: float = 1.0  # polygon simplification, pixels
    max_points: int = 500  # per polygon
    min_area: int = 64  # pixels per region (and per polygon hole)
    score_threshold: float = 0.0  # segments scoring below are dropped
    keep_holes: bool = True

    @property
    def polygon(self) -> PolygonOptions:
        return PolygonOptions(tolerance=self.tolerance, max_points=self.max_points, min_area=self.min_area,
                              keep_holes=self.keep_holes)


def _pct(value: float, size: int) -> float:
    return round(float(value) / size * 100.0, 4)


def _region(control: ControlSpec, image_size: tuple[int, int], value: dict[str, Any], score: float) -> dict:
    h, w = image_size
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.tag.lower(),
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 4),
        "readonly": False,
    }


def segment_regions(segment: Segment, label: str, control: ControlSpec, options: ResultOptions) -> list[dict]:
    """The Label Studio regions of one segment for one control tag (one per connected part)."""
    h, w = segment.mask.shape
    key = control.tag.lower()
    regions = []
    if control.kind == "polygon":
        for ring in mask_to_polygons(segment.mask, options.polygon):
            points = [[_pct(x, w), _pct(y, h)] for x, y in ring]
            regions.append(_region(control, (h, w), {"points": points, "closed": True, key: [label]}, segment.score))
        return regions
    for part in connected_parts(segment.mask, options.min_area):
        if control.kind == "brush":
            value = {"format": "rle", "rle": brush_rle_encode(part), key: [label]}
        else:
            x, y, bw, bh = mask_bbox(part)
            value = {"x": _pct(x, w), "y": _pct(y, h), "width": _pct(bw, w), "height": _pct(bh, h),
                     "rotation": 0, key: [label]}
        regions.append(_region(control, (h, w), value, segment.score))
    return regions


def image_regions(segments: Iterable[Segment], controls: list[ControlSpec], label_of: list[dict[int, str]],
                  options: ResultOptions) -> list[dict]:
    """Regions of one image's segments for every control on that image, best-scoring segments first."""
    out: list[dict] = []
    for seg in sorted(segments, key=lambda s: -s.score):
        if seg.score < options.score_threshold:
            continue
        for control, mapping in zip(controls, label_of):
            label = mapping.get(seg.class_index)
            if label is not None:
                out.extend(segment_regions(seg, label, control, options))
    return out


def task_score(raws: list[RawPrediction]) -> float:
    """Task-level score Label Studio sorts by: the active-learning certainty, averaged over the task's images."""
    if not raws:
        return 0.0
    return round(float(np.mean([certainty(r) for r in raws])), 4)
