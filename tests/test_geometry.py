"""Mask <-> polygon round trips on real shapes, holes, caps, and COCO RLE."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.filters

from odise_core.geometry import (
    PolygonOptions,
    coco_rle_decode,
    coco_rle_encode,
    connected_parts,
    mask_bbox,
    mask_iou,
    mask_to_polygons,
    mask_to_shapes,
    polygons_to_mask,
)


def _horse() -> np.ndarray:
    return ~skimage.data.horse()


def _coins() -> np.ndarray:
    img = skimage.data.coins()
    return img > skimage.filters.threshold_otsu(img)


def _chelsea_cat() -> np.ndarray:
    """The cat's fur: Otsu on the smoothed red channel of chelsea(), a large irregular region with holes."""
    red = skimage.filters.gaussian(skimage.data.chelsea()[..., 0], sigma=3)
    return red > skimage.filters.threshold_otsu(red)


REAL_SHAPES = {"horse": _horse, "coins": _coins, "chelsea": _chelsea_cat}


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_exact_outline_round_trip_is_lossless(name: str) -> None:
    mask = REAL_SHAPES[name]()
    polys = mask_to_polygons(mask, PolygonOptions(tolerance=0, max_points=0, min_area=0))
    assert mask_iou(polygons_to_mask(polys, *mask.shape), mask) == 1.0


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_simplified_round_trip_iou_at_least_095(name: str) -> None:
    mask = REAL_SHAPES[name]()
    options = PolygonOptions(tolerance=1.0, max_points=500, min_area=16)
    polys = mask_to_polygons(mask, options)
    # The reference is the mask without the parts below min_area, which the options drop on purpose.
    kept = np.zeros_like(mask)
    for part in connected_parts(mask, min_area=16):
        kept |= part
    iou = mask_iou(polygons_to_mask(polys, *mask.shape), kept)
    assert iou >= 0.95, f"{name}: IoU {iou:.4f}"
    assert all(len(p) <= 500 for p in polys)


def test_simplification_reduces_points_and_max_points_caps_them() -> None:
    mask = _horse()
    exact = mask_to_polygons(mask, PolygonOptions(tolerance=0, max_points=0, min_area=0))
    simple = mask_to_polygons(mask, PolygonOptions(tolerance=1.0, max_points=0, min_area=0))
    capped = mask_to_polygons(mask, PolygonOptions(tolerance=1.0, max_points=40, min_area=0))
    assert len(exact) == len(simple) == len(capped) == 1
    assert len(simple[0]) < len(exact[0]) / 5
    assert 3 <= len(capped[0]) <= 40
    assert mask_iou(polygons_to_mask(capped, *mask.shape), mask) > 0.85


def test_one_polygon_per_connected_part_and_min_area() -> None:
    mask = _disk(100, 200, 50, 50, 30) | _disk(100, 200, 50, 150, 30)
    mask[5:7, 95:97] = True  # a 4-pixel speck
    parts = mask_to_polygons(mask, PolygonOptions(min_area=10))
    assert len(parts) == 2
    assert {round(float(p[:, 0].mean()) // 100) for p in parts} == {0, 1}
    assert len(mask_to_polygons(mask, PolygonOptions(min_area=0))) == 3


def test_holes_are_spliced_so_one_ring_excludes_them() -> None:
    ring = _disk(120, 120, 60, 60, 50) & ~_disk(120, 120, 60, 60, 20)
    shapes = mask_to_shapes(ring)
    assert len(shapes) == 1 and len(shapes[0].interiors) == 1
    polys = mask_to_polygons(ring, PolygonOptions(tolerance=0.5, min_area=16, keep_holes=True))
    assert len(polys) == 1
    back = polygons_to_mask(polys, 120, 120)
    assert not back[60, 60], "the hole must stay empty"
    assert mask_iou(back, ring) > 0.97
    filled = polygons_to_mask(mask_to_polygons(ring, PolygonOptions(keep_holes=False)), 120, 120)
    assert filled[60, 60]


def test_small_holes_are_filled() -> None:
    mask = _disk(80, 80, 40, 40, 30)
    mask[40:42, 40:42] = False  # 4-pixel hole
    polys = mask_to_polygons(mask, PolygonOptions(tolerance=0, min_area=10))
    assert polygons_to_mask(polys, 80, 80)[40, 40]


def test_empty_mask_and_bad_input() -> None:
    assert mask_to_polygons(np.zeros((10, 10), bool)) == []
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 10, 10), bool))


def test_bbox_and_connected_parts() -> None:
    mask = np.zeros((50, 60), bool)
    mask[10:20, 5:30] = True
    mask[40:45, 50:55] = True
    assert mask_bbox(mask[:30]) == (5, 10, 25, 10)
    assert mask_bbox(np.zeros((3, 3), bool)) == (0, 0, 0, 0)
    parts = connected_parts(mask)
    assert [int(p.sum()) for p in parts] == [250, 25]
    assert connected_parts(mask, min_area=100)[0].sum() == 250


def test_coco_rle_round_trip() -> None:
    mask = _coins()
    rle = coco_rle_encode(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    assert np.array_equal(coco_rle_decode(rle), mask)
