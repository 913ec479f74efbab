"""PQ, mask AP and mIoU on hand-made cases whose answers are worked out by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from odise_core.tools.evaluation import Evaluator, evaluate, load_coco_folder, merge_stuff
from odise_core.types import Segment

NAMES = ["circle", "square", "sky"]
THING = [True, True, False]


def box(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def seg(mask: np.ndarray, cls: int, score: float = 1.0) -> Segment:
    return Segment(mask, cls, score, THING[cls])


def test_perfect_prediction_scores_100():
    gt = [seg(box(0, 10, 0, 10), 0), seg(box(10, 20, 10, 20), 1), seg(~(box(0, 10, 0, 10) | box(10, 20, 10, 20)), 2)]
    r = evaluate([(gt, gt)], NAMES, THING)
    assert r.pq == pytest.approx(100) and r.pq_things == pytest.approx(100) and r.pq_stuff == pytest.approx(100)
    assert r.miou == pytest.approx(100)
    assert r.mask_ap == pytest.approx(100)


def test_partial_overlap_gives_iou_as_pq():
    gt = [seg(box(0, 10, 0, 10), 0)]
    pred = [seg(box(0, 6, 0, 10), 0)]  # inside the GT: IoU = 60 / 100
    r = evaluate([(pred, gt)], NAMES, THING)
    assert r.pq == pytest.approx(60.0)
    assert r.sq == pytest.approx(60.0) and r.rq == pytest.approx(100.0)
    assert math.isnan(r.pq_stuff)


def test_iou_at_most_half_is_false_positive_and_negative():
    gt = [seg(box(0, 10, 0, 10), 0)]
    pred = [seg(box(0, 5, 0, 10), 0)]  # IoU = 0.5 exactly: not a match
    r = evaluate([(pred, gt)], NAMES, THING)
    # one FP and one FN: PQ = 0 / (0 + 0.5 + 0.5)
    assert r.pq == pytest.approx(0.0) and r.rq == pytest.approx(0.0)


def test_wrong_class_counts_fp_and_fn_and_pq_averages_over_classes():
    gt = [seg(box(0, 10, 0, 10), 0), seg(box(10, 20, 10, 20), 1)]
    pred = [seg(box(0, 10, 0, 10), 1), seg(box(10, 20, 10, 20), 1)]
    r = evaluate([(pred, gt)], NAMES, THING)
    # circle: 1 FN -> 0; square: 1 TP (IoU 1) + 1 FP -> 1 / 1.5
    assert r.per_class_pq["circle"] == pytest.approx(0.0)
    assert r.per_class_pq["square"] == pytest.approx(100 / 1.5)
    assert r.pq == pytest.approx((0 + 100 / 1.5) / 2)


def test_prediction_mostly_on_void_is_not_a_false_positive():
    gt = [seg(box(0, 10, 0, 10), 0)]  # rest of the image is unlabelled (void)
    pred = [seg(box(0, 10, 0, 10), 0), seg(box(12, 20, 12, 20), 1)]
    r = evaluate([(pred, gt)], NAMES, THING)
    assert r.pq == pytest.approx(100.0)
    assert "square" not in r.per_class_pq


def test_void_part_of_prediction_leaves_union():
    gt = [seg(box(0, 10, 0, 10), 0)]
    pred = [seg(box(0, 10, 0, 14), 0)]  # 40 extra pixels, all on void
    r = evaluate([(pred, gt)], NAMES, THING)
    assert r.pq == pytest.approx(100.0)


def test_stuff_segments_of_one_class_are_merged():
    left, right = box(0, 20, 0, 10), box(0, 20, 10, 20)
    gt = [seg(left, 2), seg(right, 2)]
    pred = [seg(left | right, 2)]
    assert len(merge_stuff(gt)) == 1
    r = evaluate([(pred, gt)], NAMES, THING)
    assert r.pq_stuff == pytest.approx(100.0)


def test_miou_from_confusion():
    top, bottom = box(0, 10, 0, 20), box(10, 20, 0, 20)  # 200 px each
    gt = [seg(top, 0), seg(bottom, 2)]
    pred = [seg(box(0, 15, 0, 20), 0), seg(box(15, 20, 0, 20), 2)]
    r = evaluate([(pred, gt)], NAMES, THING)
    # circle: tp 200, union 300 -> 2/3; sky: tp 100, union 200 -> 1/2
    assert r.per_class_iou["circle"] == pytest.approx(200 / 3)
    assert r.per_class_iou["sky"] == pytest.approx(50.0)
    assert r.miou == pytest.approx((200 / 3 + 50) / 2)


def test_unpredicted_pixels_count_against_miou():
    gt = [seg(box(0, 20, 0, 20), 2)]
    pred = [seg(box(0, 10, 0, 20), 2)]
    r = evaluate([(pred, gt)], NAMES, THING)
    assert r.miou == pytest.approx(50.0)


def test_mask_ap_depends_on_score_ranking():
    gt = [seg(box(0, 10, 0, 10), 0)]
    tp, fp = box(0, 10, 0, 10), box(12, 20, 12, 20)
    good = Evaluator(NAMES, THING)
    good.add([], gt, instances=[seg(tp, 0, 0.9), seg(fp, 0, 0.1)])
    assert good.summarize().mask_ap == pytest.approx(100.0)
    bad = Evaluator(NAMES, THING)
    bad.add([], gt, instances=[seg(tp, 0, 0.1), seg(fp, 0, 0.9)])
    # the TP is second: precision 1/2 at recall 1 at every IoU threshold
    assert bad.summarize().mask_ap == pytest.approx(50.0, abs=0.5)


def test_mask_ap_undefined_without_thing_ground_truth():
    gt = [seg(box(0, 20, 0, 20), 2)]
    r = evaluate([(gt, gt)], NAMES, THING)
    assert math.isnan(r.mask_ap)
    assert r.as_dict()["mask_ap"] is None
    json.dumps(r.as_dict())


def test_rejects_class_outside_vocabulary():
    with pytest.raises(ValueError, match="class index 5"):
        evaluate([([seg(box(0, 2, 0, 2), 0)], [Segment(box(0, 2, 0, 2), 5, 1.0, True)])], NAMES, THING)


def test_load_coco_folder_polygon_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    rle = mask_utils.encode(np.asfortranarray(box(5, 15, 5, 25, (20, 30)).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                   {"id": 2, "file_name": "images/b.png", "height": 20, "width": 30}],
        "categories": [{"id": 7, "name": "square"}, {"id": 3, "name": "sky", "isthing": 0}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
             "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
            {"id": 2, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": rle},
            {"id": 3, "image_id": 2, "category_id": 7, "iscrowd": 1, "segmentation": rle},
        ],
    }
    (tmp_path / "result.json").write_text(json.dumps(data))
    ds = load_coco_folder(tmp_path)
    assert ds.class_names == ["sky", "square"] and ds.is_thing == [False, True]
    (p1, s1), (p2, s2) = ds.images
    assert p1.name == "a.png" and p2.name == "b.png"
    assert len(s1) == 1 and s1[0].class_index == 1 and s1[0].is_thing
    assert 90 <= s1[0].area <= 121  # a 10x10 polygon, rasterised
    assert len(s2) == 1 and s2[0].class_index == 0 and not s2[0].is_thing and s2[0].area == 200
