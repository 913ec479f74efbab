"""Label Studio results <-> masks: polygon, brush RLE and rectangle regions, both directions.

Encoding (predictions): coordinates are percent of the original image width/height. Each connected part of a segment
becomes its own region (parts under `min_area` pixels are dropped). Label Studio polygons have
no holes: holes of at least `min_area` pixels are spliced into the outer ring through a zero-width
cut ("keyhole"), so the drawn region excludes them; smaller holes are filled. Brush masks keep
holes exactly. Boxes are the bounding boxes of the parts.

Decoding (annotations): polygon `points` and rectangle `x, y, width, height` in percent
(`rotation` in degrees around the top-left corner) are rasterised at pixel centres; brush RLE is
decoded at its `original_width/height` and resized to the image. Brush RLE itself is
label-studio-sdk's (`mask2rle` / `decode_rle`), byte-identical to the editor's encoder.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from backend.active_learning import task_score as certainty
from backend.label_config import ControlSpec
from odise_core.geometry import PolygonOptions, connected_parts, mask_bbox, mask_to_polygons, polygons_to_mask
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


# ----------------------------------------------------------------------------- brush RLE
def brush_rle_encode(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a non-empty boolean (H, W) mask (every RGBA channel 255 inside it)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"brush RLE needs a non-empty 2-D mask, got shape {mask.shape}")
    return mask2rle(mask.astype(np.uint8) * 255)


def brush_rle_decode(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of a Label Studio brush RLE (alpha channel > 0)."""
    try:
        flat = decode_rle(bytes(bytearray(rle)))
    except ValueError as e:  # the SDK's bit reader fails on a truncated stream
        raise ValueError(f"brush RLE is malformed: {e}") from e
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


# ----------------------------------------------------------------------------- annotations -> masks
def polygon_mask(points: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    """Mask (h, w) of a polygon given as [x%, y%] points."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2) * [w / 100.0, h / 100.0]
    if len(xy) < 3:
        return np.zeros((h, w), dtype=bool)
    return polygons_to_mask([xy], h, w)


def rectangle_mask(value: dict, h: int, w: int) -> np.ndarray:
    """Mask (h, w) of a rectangle value (percent, rotated about its top-left corner)."""
    x, y = float(value["x"]) * w / 100.0, float(value["y"]) * h / 100.0
    bw, bh = float(value["width"]) * w / 100.0, float(value["height"]) * h / 100.0
    a = math.radians(float(value.get("rotation") or 0.0))
    c, s = math.cos(a), math.sin(a)
    corners = [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    return polygons_to_mask([np.asarray(corners)], h, w)


def brush_mask(result: dict, value: dict, h: int, w: int) -> np.ndarray:
    """Mask (h, w) of a brush result, decoded at its original size and resized when the image differs."""
    rle = value.get("rle") if value.get("rle") is not None else result.get("rle")
    oh = int(result.get("original_height") or h)
    ow = int(result.get("original_width") or w)
    mask = brush_rle_decode(rle, oh, ow)
    if (oh, ow) != (h, w):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    return mask


def result_mask(result: dict, h: int, w: int) -> np.ndarray | None:
    """Mask (h, w) of one Label Studio result region, or None for types that carry no region."""
    value = result.get("value") or {}
    kind = str(result.get("type", "")).lower()
    if "points" in value and kind in ("polygonlabels", "polygon", "labels", ""):
        return polygon_mask(value["points"], h, w)
    if kind in ("brushlabels", "brush") or value.get("format") == "rle" or "rle" in result:
        return brush_mask(result, value, h, w)
    if kind in ("rectanglelabels", "rectangle") or {"x", "y", "width", "height"} <= set(value):
        return rectangle_mask(value, h, w)
    return None
