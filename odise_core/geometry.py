"""Mask geometry: mask <-> polygons (shapely), COCO RLE, boxes.

Coordinates are pixel-edge coordinates: pixel (row r, column c) covers the square
[c, c+1] x [r, r+1], so a polygon traced around a mask's pixels rasterises back to the
same pixels when each pixel is tested at its centre.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import shapely
from pycocotools import mask as coco_mask
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolygonOptions:
    """How masks become polygons.

    tolerance: Douglas-Peucker tolerance in pixels (0 keeps the exact pixel staircase).
    max_points: cap on vertices per ring; the tolerance is doubled until the ring fits.
    min_area: connected parts (and holes) smaller than this many pixels are dropped (filled).
    keep_holes: splice holes into the exterior ring through a zero-width cut ("keyhole"),
        so one Label Studio polygon still excludes them; otherwise holes are filled.
    """

    tolerance: float = 1.0
    max_points: int = 500
    min_area: float = 16.0
    keep_holes: bool = True


def mask_to_shapes(mask: np.ndarray) -> list[Polygon]:
    """Exact outlines of a boolean mask: one shapely Polygon (with holes) per connected part."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        return []
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))
    # Each row's transitions alternate start, end: the runs of True pixels.
    starts, ends = cols[0::2], cols[1::2]
    run_rows = rows[0::2]
    boxes = shapely.box(starts, run_rows, ends, run_rows + 1)
    merged = shapely.unary_union(boxes)
    parts = list(merged.geoms) if isinstance(merged, MultiPolygon) else [merged]
    return [shapely.geometry.polygon.orient(p, 1.0) for p in parts if isinstance(p, Polygon) and not p.is_empty]


def _simplify_ring(coords: np.ndarray, tolerance: float, max_points: int) -> np.ndarray:
    """Douglas-Peucker on a closed ring, loosening the tolerance until it has <= max_points vertices."""
    ring = shapely.LinearRing(coords)
    tol = tolerance
    while True:
        out = ring.simplify(tol, preserve_topology=False) if tol > 0 else ring
        pts = np.asarray(out.coords)[:-1] if not out.is_empty else np.empty((0, 2))
        if len(pts) >= 3 and (max_points <= 0 or len(pts) <= max_points):
            return pts
        if len(pts) < 3:
            # Over-simplified a thin ring: fall back to its minimum rotated rectangle corners.
            return np.asarray(shapely.minimum_rotated_rectangle(Polygon(coords)).exterior.coords)[:-1]
        tol = max(tol * 2.0, 0.5)


def _splice_hole(ring: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Join `hole` into `ring` through a zero-width cut between their closest vertices."""
    d = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(d.argmin()), d.shape)
    hole_loop = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([ring[: i + 1], hole_loop, ring[i:]])


def polygon_rings(shape: Polygon, options: PolygonOptions) -> np.ndarray | None:
    """One closed ring (N,2) of x,y vertices for a shape, holes spliced in or filled per `options`."""
    if shape.area < options.min_area:
        return None
    exterior = _simplify_ring(np.asarray(shape.exterior.coords), options.tolerance, options.max_points)
    if not options.keep_holes:
        return exterior
    holes = sorted((h for h in shape.interiors if Polygon(h).area >= options.min_area),
                   key=lambda h: -Polygon(h).area)
    ring = exterior
    for hole in holes:
        # A spliced hole costs its own vertices plus the two repeated cut vertices.
        room = options.max_points - len(ring) - 2 if options.max_points > 0 else 0
        if options.max_points > 0 and room < 3:
            log.debug("max_points reached: smaller holes are filled")
            break
        ring = _splice_hole(ring, _simplify_ring(np.asarray(hole.coords), options.tolerance, room))
    return ring


def mask_to_polygons(mask: np.ndarray, options: PolygonOptions = PolygonOptions()) -> list[np.ndarray]:
    """Polygons (each an (N,2) array of x,y pixel-edge coordinates) of a mask, one per connected part."""
    rings = []
    for shape in mask_to_shapes(mask):
        ring = polygon_rings(shape, options)
        if ring is not None:
            rings.append(ring)
    return rings


def polygons_to_mask(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise polygons (x,y pixel-edge coordinates) with the even-odd rule at pixel centres."""
    out = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        out |= _fill_even_odd(np.asarray(poly, dtype=np.float64), height, width)
    return out


def _fill_even_odd(poly: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scanline fill of one closed ring at row centres y = r + 0.5."""
    out = np.zeros((height, width), dtype=bool)
    if len(poly) < 3:
        return out
    p0, p1 = poly, np.roll(poly, -1, axis=0)
    y0, y1 = p0[:, 1], p1[:, 1]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Rows whose centre r + 0.5 lies in [lo, hi) of an edge: r in [ceil(lo - 0.5), ceil(hi - 0.5)).
    r_start = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    r_stop = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)
    counts = np.maximum(r_stop - r_start, 0)
    if counts.sum() == 0:
        return out
    edge = np.repeat(np.arange(len(poly)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = r_start[edge] + offsets
    yc = rows + 0.5
    t = (yc - y0[edge]) / (y1[edge] - y0[edge])
    xs = p0[edge, 0] + t * (p1[edge, 0] - p0[edge, 0])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Crossings pair up within each row: fill columns whose centre c + 0.5 is in [x_in, x_out).
    c0 = np.clip(np.ceil(xs[0::2] - 0.5), 0, width).astype(np.int64)
    c1 = np.clip(np.ceil(xs[1::2] - 0.5), 0, width).astype(np.int64)
    r = rows[0::2]
    diff = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(diff, (r, c0), 1)
    np.add.at(diff, (r, c1), -1)
    out = np.cumsum(diff[:, :-1], axis=1) % 2 == 1
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the mask's pixels in pixel-edge coordinates; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0, 0, 0
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def connected_parts(mask: np.ndarray, min_area: int = 0) -> list[np.ndarray]:
    """8-connected components of a mask with at least `min_area` pixels, largest first."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")
    return [labels == i + 1 for i in order if areas[i] >= min_area]


# --------------------------------------------------------------------------- COCO RLE
def coco_rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE ({"size": [h, w], "counts": str}) of a boolean mask."""
    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def coco_rle_decode(rle: dict) -> np.ndarray:
    """Boolean mask of a COCO RLE (compressed string or uncompressed list counts)."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = coco_mask.frPyObjects(rle, h, w)
    elif isinstance(counts, str):
        rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return coco_mask.decode(rle).astype(bool)
