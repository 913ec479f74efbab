"""Label Studio annotations -> TrainSamples: region types, annotation choice, hold-out split."""
from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from backend.training_data import (annotation_to_sample, build_training_data, holdout_key, result_mask,
                                   select_annotation)

NAMES = ["Cat", "dog", "grass"]
THING = [True, True, False]
H, W = 40, 50


def polygon(label: str, points, from_name: str = "label") -> dict:
    return {"type": "polygonlabels", "from_name": from_name, "to_name": "image", "original_width": W,
            "original_height": H, "value": {"points": points, "polygonlabels": [label]}}


def rect(label: str, x: float, y: float, w: float, h: float, rotation: float = 0.0) -> dict:
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def brush(label: str, mask: np.ndarray) -> dict:
    rle = mask2rle((mask * 255).astype(np.uint8))
    return {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}


def image() -> np.ndarray:
    return np.zeros((H, W, 3), np.uint8)


def test_polygon_in_percent():
    m = result_mask(polygon("Cat", [[0, 0], [50, 0], [50, 50], [0, 50]]), H, W)
    assert m.shape == (H, W)
    ys, xs = np.nonzero(m)
    assert ys.min() == 0 and xs.min() == 0 and abs(ys.max() - 20) <= 1 and abs(xs.max() - 25) <= 1
    assert abs(int(m.sum()) - 20 * 25) <= 50


def test_rectangle_and_rotation_about_top_left():
    m = result_mask(rect("dog", 20, 25, 40, 50), H, W)  # x 10..30, y 10..30
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min()) == (10, 10) and abs(xs.max() - 30) <= 1 and abs(ys.max() - 30) <= 1
    rotated = result_mask(rect("dog", 50, 0, 20, 25, rotation=90), H, W)  # 10 px wide, 10 tall, turned clockwise
    ys, xs = np.nonzero(rotated)
    assert abs(xs.max() - 25) <= 1 and abs(xs.min() - 15) <= 1 and abs(ys.max() - 10) <= 1


def test_brush_rle_round_trip_and_resize():
    truth = np.zeros((H, W), bool)
    truth[5:17, 8:31] = True
    truth[30:, 40:] = True
    assert np.array_equal(result_mask(brush("grass", truth), H, W), truth)
    half = result_mask(brush("grass", truth), H // 2, W // 2)  # image loaded at half size
    assert half.shape == (H // 2, W // 2) and abs(int(half.sum()) * 4 - int(truth.sum())) <= 60


def test_select_latest_usable_annotation():
    task = {"id": 1, "annotations": [
        {"id": 1, "updated_at": "2026-01-01T00:00:00Z", "result": [polygon("Cat", [[0, 0], [9, 0], [9, 9]])]},
        {"id": 2, "updated_at": "2026-01-03T00:00:00Z", "was_cancelled": True, "result": [rect("dog", 0, 0, 5, 5)]},
        {"id": 3, "updated_at": "2026-01-02T00:00:00Z", "result": [rect("dog", 0, 0, 5, 5)]},
        {"id": 4, "updated_at": "2026-01-04T00:00:00Z", "result": []},
    ]}
    assert select_annotation(task)["id"] == 3
    assert select_annotation({"id": 2, "annotations": [{"id": 5, "was_cancelled": True, "result": []}]}) is None
    assert select_annotation({"id": 3, "annotations": []}) is None


def test_annotation_to_sample_classes_merging_and_filters():
    ann = {"result": [
        rect("dog", 0, 0, 20, 20), rect("Dog", 50, 50, 20, 20),  # two instances; label case differs
        polygon("grass", [[0, 60], [100, 60], [100, 80], [0, 80]]),
        polygon("grass", [[0, 85], [100, 85], [100, 100], [0, 100]]),  # stuff: merged with the above
        polygon("unicorn", [[0, 0], [10, 0], [10, 10]]),  # not in the vocabulary
        {"type": "choices", "from_name": "c", "value": {"choices": ["x"]}},  # no region
    ]}
    s = annotation_to_sample(ann, image(), NAMES, THING)
    assert s.masks.shape == (3, H, W) and s.masks.dtype == bool
    assert s.classes.tolist() == [1, 1, 2]
    assert s.masks[2].sum() > s.masks[0].sum()  # both grass strips in one mask
    only_boxes = annotation_to_sample(ann, image(), NAMES, THING, from_names=["box"])
    assert only_boxes.classes.tolist() == [1, 1]
    assert annotation_to_sample({"result": [polygon("unicorn", [[0, 0], [9, 0], [9, 9]])]}, image(), NAMES) is None


def tasks(n: int, start: int = 1) -> list[dict]:
    return [{"id": i, "data": {"image": f"img{i}"},
             "annotations": [{"id": i, "result": [rect("Cat", 10, 10, 30, 30)]}]} for i in range(start, start + n)]


def test_build_training_data_split_is_deterministic_and_stable():
    loads = []

    def load(task: dict) -> np.ndarray:
        loads.append(task["id"])
        return image()

    extra = [{"id": 900, "annotations": [{"id": 1, "was_cancelled": True, "result": [rect("Cat", 0, 0, 5, 5)]}]},
             {"id": 901, "annotations": [{"id": 2, "result": [polygon("unicorn", [[0, 0], [9, 0], [9, 9]])]}]}]
    data = build_training_data(tasks(40) + extra, NAMES, load, THING, holdout_fraction=0.25)
    assert 900 not in loads  # cancelled annotations never load their image
    assert data.count == 40 and len(data.train) + len(data.holdout) == 40
    assert sum(data.skipped.values()) == 2
    expected = sorted(i for i in range(1, 41) if holdout_key(i) < 0.25)
    assert sorted(data.holdout_task_ids) == expected and 3 <= len(expected) <= 20
    again = build_training_data(tasks(40), NAMES, lambda t: image(), THING, holdout_fraction=0.25)
    assert again.holdout_task_ids == data.holdout_task_ids
    grown = build_training_data(tasks(60), NAMES, lambda t: image(), THING, holdout_fraction=0.25)
    assert set(data.holdout_task_ids) <= set(grown.holdout_task_ids)  # a task never changes sides
    assert data.train[0].classes.tolist() == [0] and data.train[0].masks.shape == (1, H, W)


def test_small_projects_still_hold_one_out_and_train_on_one():
    two = build_training_data(tasks(2), NAMES, lambda t: image(), THING, holdout_fraction=0.2)
    assert len(two.train) == 1 and len(two.holdout) == 1
    none = build_training_data(tasks(5), NAMES, lambda t: image(), THING, holdout_fraction=0.0)
    assert len(none.holdout) == 0 and len(none.train) == 5
    with pytest.raises(ValueError, match="holdout_fraction"):
        build_training_data(tasks(2), NAMES, lambda t: image(), THING, holdout_fraction=1.0)


def test_unloadable_images_are_skipped():
    def load(task: dict) -> np.ndarray:
        if task["id"] == 2:
            raise OSError("404")
        return image()

    data = build_training_data(tasks(3), NAMES, load, THING, holdout_fraction=0.0)
    assert sorted(data.train_task_ids) == [1, 3] and data.skipped["image not loadable"] == 1


def test_keyhole_polygon_from_predictions_keeps_its_hole():
    from odise_core.geometry import PolygonOptions, mask_to_polygons

    truth = np.zeros((H, W), bool)
    truth[5:35, 5:45] = True
    truth[15:25, 20:30] = False  # a hole, as stuff around a thing has
    (ring,) = mask_to_polygons(truth, PolygonOptions(tolerance=0, min_area=1))
    points = (ring / [W, H] * 100).tolist()
    assert np.array_equal(result_mask(polygon("grass", points), H, W), truth)
