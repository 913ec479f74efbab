"""Label Studio results <-> masks: percent coordinates, parts, holes, brush RLE, boxes, scores."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.filters
import torch

from backend.label_config import parse_label_config
from backend.ls_format import (ResultOptions, brush_rle_decode, brush_rle_encode, image_regions, result_mask,
                                segment_regions, task_score)
from odise_core.geometry import mask_iou, polygons_to_mask
from odise_core.types import RawPrediction, Segment

CONFIG = """<View><Image name="img" value="$image"/>
<PolygonLabels name="poly" toName="img"><Label value="Donut"/><Label value="Sky" category="stuff"/></PolygonLabels>
<BrushLabels name="brush" toName="img"><Label value="Donut"/></BrushLabels>
<RectangleLabels name="box" toName="img"><Label value="Sky" category="stuff"/></RectangleLabels>
</View>"""
H, W = 120, 200


def _donuts() -> np.ndarray:
    """Two rings (with holes) side by side."""
    yy, xx = np.mgrid[:H, :W]
    mask = np.zeros((H, W), bool)
    for cx in (50, 150):
        r2 = (yy - 60) ** 2 + (xx - cx) ** 2
        mask |= (r2 <= 40 ** 2) & (r2 > 15 ** 2)
    return mask


def _sky() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[:10, 20:180] = True
    return mask


def _points_px(region: dict) -> np.ndarray:
    pts = np.asarray(region["value"]["points"], dtype=float)
    return pts / 100.0 * np.array([region["original_width"], region["original_height"]])


def test_polygons_in_percent_one_per_part_with_holes() -> None:
    target = parse_label_config(CONFIG).targets[0]
    seg = Segment(mask=_donuts(), class_index=0, score=0.8765432, is_thing=True)
    regions = segment_regions(seg, "Donut", target.controls[0], ResultOptions(tolerance=0.5, min_area=16))
    assert len(regions) == 2
    for r in regions:
        assert r["from_name"] == "poly" and r["to_name"] == "img" and r["type"] == "polygonlabels"
        assert (r["original_width"], r["original_height"]) == (W, H)
        assert r["value"]["polygonlabels"] == ["Donut"] and r["value"]["closed"] is True
        assert r["score"] == 0.8765
        pts = np.asarray(r["value"]["points"])
        assert pts.min() >= 0 and pts.max() <= 100
    back = polygons_to_mask([_points_px(r) for r in regions], H, W)
    assert mask_iou(back, seg.mask) > 0.95
    assert not back[60, 50] and not back[60, 150], "the holes stay holes"
    assert len({r["id"] for r in regions}) == 2


def test_brush_and_rectangle_regions() -> None:
    target = parse_label_config(CONFIG).targets[0]
    donut = Segment(mask=_donuts(), class_index=0, score=0.5, is_thing=True)
    brush = segment_regions(donut, "Donut", target.controls[1], ResultOptions())
    assert len(brush) == 2 and brush[0]["value"]["format"] == "rle"
    decoded = np.logical_or.reduce([brush_rle_decode(r["value"]["rle"], H, W) for r in brush])
    assert np.array_equal(decoded, donut.mask)
    sky = Segment(mask=_sky(), class_index=1, score=0.9, is_thing=False)
    (box,) = segment_regions(sky, "Sky", target.controls[2], ResultOptions())
    assert box["type"] == "rectanglelabels"
    assert box["value"] == {"x": 10.0, "y": 0.0, "width": 80.0, "height": 8.3333, "rotation": 0,
                            "rectanglelabels": ["Sky"]}


def test_image_regions_route_classes_to_controls_and_filter() -> None:
    target = parse_label_config(CONFIG).targets[0]
    segs = [Segment(mask=_sky(), class_index=1, score=0.3, is_thing=False),
            Segment(mask=_donuts(), class_index=0, score=0.9, is_thing=True)]
    regions = image_regions(segs, target.controls, target.label_of, ResultOptions())
    kinds = [(r["from_name"], r["value"].get("polygonlabels") or r["value"].get("brushlabels")
              or r["value"].get("rectanglelabels")) for r in regions]
    # Best score first; Donut -> poly + brush (2 parts each), Sky -> poly + box.
    assert kinds == [("poly", ["Donut"])] * 2 + [("brush", ["Donut"])] * 2 + [("poly", ["Sky"]), ("box", ["Sky"])]
    assert image_regions(segs, target.controls, target.label_of, ResultOptions(score_threshold=0.5))[0]["score"] == 0.9
    assert len(image_regions(segs, target.controls, target.label_of, ResultOptions(score_threshold=0.5))) == 4
    tiny = Segment(mask=np.pad(np.ones((3, 3), bool), ((0, H - 3), (0, W - 3))), class_index=0, score=1.0,
                   is_thing=True)
    assert image_regions([tiny], target.controls, target.label_of, ResultOptions(min_area=16)) == []


def test_task_score_is_certainty_mean_over_images() -> None:
    probs_sure = torch.tensor([[0.96, 0.02, 0.02], [0.1, 0.1, 0.8]])
    probs_unsure = torch.tensor([[0.45, 0.40, 0.15], [0.1, 0.1, 0.8]])
    mask = np.ones((4, 4), bool)

    def raw(probs: torch.Tensor) -> RawPrediction:
        return RawPrediction(segments=[Segment(mask, 0, 0.9, True, query_index=0)], class_probs=probs,
                             mask_logits=torch.zeros(2, 4, 4), image_size=(4, 4))

    sure, unsure = task_score([raw(probs_sure)]), task_score([raw(probs_unsure)])
    assert sure == 0.94 and unsure == 0.05
    assert task_score([raw(probs_sure), raw(probs_unsure)]) == round((0.94 + 0.05) / 2, 4)
    assert task_score([]) == 0.0


def test_empty_instance_masks_give_no_regions() -> None:
    """Instance mode keeps the reference's empty masks (score 0) for mask AP; Label Studio gets no region for them."""
    target = parse_label_config(CONFIG).targets[0]
    empty = Segment(mask=np.zeros((H, W), bool), class_index=0, score=0.0, is_thing=True, query_index=3)
    donut = Segment(mask=_donuts(), class_index=0, score=0.5, is_thing=True, query_index=1)
    regions = image_regions([empty, donut], target.controls, target.label_of, ResultOptions(score_threshold=0.0))
    assert len(regions) == 4 and all(r["score"] == 0.5 for r in regions)
    assert image_regions([empty], target.controls, target.label_of, ResultOptions(score_threshold=0.0)) == []


# Encoded by this project's own numpy encoder (written from Label Studio's bit layout) before brush
# RLE moved to label-studio-sdk's helpers: the SDK must keep producing exactly these bytes.
SMALL_MASK_RLE = [0, 0, 0, 80, 57, 27, 254, 23, 0, 183, 255, 56, 5, 191, 248, 192, 35, 255, 190, 0]


def _small_mask() -> np.ndarray:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    mask[3, 0] = True
    return mask


def _coins() -> np.ndarray:
    img = skimage.data.coins()
    return img > skimage.filters.threshold_otsu(img)


def test_brush_rle_is_byte_identical_to_the_former_encoder_and_round_trips():
    assert brush_rle_encode(_small_mask()) == SMALL_MASK_RLE
    assert np.array_equal(brush_rle_decode(SMALL_MASK_RLE, 4, 5), _small_mask())
    coins = _coins()
    assert np.array_equal(brush_rle_decode(brush_rle_encode(coins), *coins.shape), coins)


def test_brush_rle_long_runs_and_bad_input():
    mask = np.zeros((300, 400), bool)  # 480,000 values: runs longer than 2**16 are split
    mask[100:110, :] = True
    rle = brush_rle_encode(mask)
    assert np.array_equal(brush_rle_decode(rle, 300, 400), mask)
    with pytest.raises(ValueError, match="expected 10x10x4"):
        brush_rle_decode(rle, 10, 10)
    with pytest.raises(ValueError, match="malformed"):
        brush_rle_decode(rle[:12], 300, 400)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        brush_rle_encode(np.zeros((0, 4), bool))


def test_brush_result_decodes_at_its_original_size_and_resizes():
    truth = np.zeros((H, W), bool)
    truth[5:17, 8:31] = True
    truth[30:, 40:] = True
    result = {"type": "brushlabels", "original_width": W, "original_height": H,
              "value": {"format": "rle", "rle": brush_rle_encode(truth), "brushlabels": ["Donut"]}}
    assert np.array_equal(result_mask(result, H, W), truth)
    half = result_mask(result, H // 2, W // 2)
    assert half.shape == (H // 2, W // 2) and abs(int(half.sum()) * 4 - int(truth.sum())) <= 60
