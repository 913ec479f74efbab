"""COCO panoptic / instances exports decode back to the masks and classes that went in."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from backend.exports import (ExportImage, export_coco_instances, export_coco_panoptic, id_to_rgb, make_categories,
                             panoptic_map, rgb_to_id)
from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, make_scene
from odise_core.types import Segment

CATEGORIES = make_categories(CLASS_NAMES, IS_THING)


def _scenes(n: int = 3) -> list[ExportImage]:
    out = []
    for i in range(n):
        scene = make_scene(seed=10 + i, size=(96, 128), max_shapes=3)
        segs = [Segment(m, int(c), 0.5 + 0.1 * j, IS_THING[int(c)]) for j, (m, c) in
                enumerate(zip(scene.masks, scene.classes))]
        out.append(ExportImage(i + 1, f"scene_{i}.jpg", 96, 128, segs))
    return out


def test_id_rgb_encoding_uses_all_three_channels():
    assert id_to_rgb(np.array([[1 + 256 * 2 + 256**2 * 3]])).tolist() == [[[1, 2, 3]]]
    ids = np.arange(0, 70_000, 7, dtype=np.int64).reshape(1, -1)
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    with pytest.raises(ValueError):
        id_to_rgb(np.array([256**3]))


def test_panoptic_round_trip(tmp_path):
    images = _scenes()
    path = export_coco_panoptic(images, CATEGORIES, tmp_path)
    data = json.loads(path.read_text())
    assert [c["isthing"] for c in data["categories"]] == [int(t) for t in IS_THING]
    assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
    cat_index = {c["id"]: i for i, c in enumerate(data["categories"])}
    for image, img_json, ann in zip(images, data["images"], data["annotations"]):
        assert img_json == {"id": image.id, "file_name": image.file_name, "height": 96, "width": 128}
        assert ann["image_id"] == image.id
        rgb = np.asarray(Image.open(tmp_path / "panoptic" / ann["file_name"]).convert("RGB"))
        ids = rgb_to_id(rgb)
        decoded = sorted((cat_index[s["category_id"]], (ids == s["id"]).tobytes()) for s in ann["segments_info"])
        expected = sorted((s.class_index, s.mask.tobytes()) for s in image.segments)
        assert decoded == expected
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum()
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert set(np.unique(ids)) <= {0} | {s["id"] for s in ann["segments_info"]}


def test_panoptic_overlaps_go_to_higher_score_and_stuff_merges():
    h, w = 20, 30
    left = np.zeros((h, w), bool)
    left[:, :10] = True
    right = np.zeros((h, w), bool)
    right[:, 20:] = True
    low = np.zeros((h, w), bool)
    low[5:15, 5:25] = True
    high = np.zeros((h, w), bool)
    high[8:12, 8:22] = True
    stuff = CLASS_NAMES.index("stripes background")
    segs = [Segment(left, stuff, 0.5, False), Segment(right, stuff, 0.2, False),
            Segment(low, 0, 0.6, True), Segment(high, 1, 0.8, True)]
    ids, info = panoptic_map(ExportImage(1, "x.png", h, w, segs), CATEGORIES)
    by_cat = {s["category_id"]: s for s in info}
    assert len(info) == 3
    assert np.array_equal(ids == by_cat[stuff + 1]["id"], (left | right) & ~low)
    assert np.array_equal(ids == by_cat[2]["id"], high)
    assert np.array_equal(ids == by_cat[1]["id"], low & ~high)
    assert (ids == 0).sum() == h * w - ((left | right | low)).sum()


def test_instances_round_trip_through_pycocotools(tmp_path):
    images = _scenes()
    path = export_coco_instances(images, CATEGORIES, tmp_path / "instances.json", with_scores=True)
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == [c.id for c in CATEGORIES if c.isthing]
    for image in images:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image.id]))
        things = [s for s in image.segments if IS_THING[s.class_index]]
        assert len(anns) == len(things)
        for ann, seg in zip(anns, things):
            assert ann["category_id"] == seg.class_index + 1
            assert np.array_equal(coco.annToMask(ann).astype(bool), seg.mask)
            assert ann["area"] == seg.mask.sum()
            assert ann["score"] == pytest.approx(seg.score)
    assert coco.loadImgs([2])[0]["file_name"] == "scene_1.jpg"


def test_mask_of_wrong_size_is_rejected(tmp_path):
    bad = ExportImage(1, "a.jpg", 10, 10, [Segment(np.ones((5, 5), bool), 0, 1.0, True)])
    with pytest.raises(ValueError, match="mask shape"):
        export_coco_instances([bad], CATEGORIES, tmp_path / "i.json")


def test_segments_to_coco_json_record_decodes_back():
    from types import SimpleNamespace

    from pycocotools import mask as mask_utils

    from backend.exports import segments_to_coco_json

    vocab = SimpleNamespace(names=list(CLASS_NAMES), is_thing=list(IS_THING))
    image = _scenes(1)[0]
    record = json.loads(json.dumps(segments_to_coco_json(image.segments, vocab, "scene_0.jpg", (96, 128))))
    assert (record["file_name"], record["height"], record["width"]) == ("scene_0.jpg", 96, 128)
    assert len(record["segments"]) == len(image.segments)
    for rec, seg in zip(record["segments"], image.segments):
        assert rec["category"] == CLASS_NAMES[seg.class_index] and rec["isthing"] == int(seg.is_thing)
        rle = {**rec["segmentation"], "counts": rec["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), seg.mask)
        assert rec["score"] == pytest.approx(seg.score, abs=1e-4)


def _ls_tasks(kind: str) -> tuple[list[dict], list[ExportImage], str]:
    """Label Studio tasks whose predictions are the synthetic scenes, shaped by backend.ls_format."""
    from backend.label_config import make_label_config, parse_label_config
    from backend.ls_format import ResultOptions, image_regions
    from odise_core.vocabulary import VocabClass, Vocabulary

    vocab = Vocabulary([VocabClass(n, (n,), t) for n, t in zip(CLASS_NAMES, IS_THING)])
    xml = make_label_config(vocab, kind=kind)
    target = parse_label_config(xml).targets[0]
    options = ResultOptions(tolerance=0.0, min_area=0)
    images = _scenes()
    tasks = [{"id": 100 + im.id, "data": {"image": f"/data/local-files/?d=photos/{im.file_name}"},
              "predictions": [{"model_version": "old", "score": 0.1, "result": []},
                              {"model_version": "v1", "score": 0.7,
                               "result": image_regions(im.segments, target.controls, target.label_of, options)}]}
             for im in images]
    return tasks, images, xml


def test_label_studio_brush_predictions_export_exactly(tmp_path):
    from backend.exports import export_tasks

    tasks, images, xml = _ls_tasks("brush")
    pan, inst = export_tasks(tasks, xml, tmp_path, model_version="v1")
    data = json.loads(pan.read_text())
    assert [im["file_name"] for im in data["images"]] == [f"photos/{im.file_name}" for im in images]
    assert [im["id"] for im in data["images"]] == [100 + im.id for im in images]
    cat_index = {c["id"]: i for i, c in enumerate(data["categories"])}
    for image, ann in zip(images, data["annotations"]):
        ids = rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic" / ann["file_name"]).convert("RGB")))
        decoded = sorted((cat_index[s["category_id"]], (ids == s["id"]).tobytes()) for s in ann["segments_info"])
        assert decoded == sorted((s.class_index, s.mask.tobytes()) for s in image.segments)
    coco = COCO(str(inst))
    for image in images:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[100 + image.id]))
        got = sorted((a["category_id"] - 1, coco.annToMask(a).astype(bool).tobytes()) for a in anns)
        assert got == sorted((s.class_index, s.mask.tobytes()) for s in image.segments if s.is_thing)


def test_label_studio_polygon_predictions_export_close_and_empty_tasks_are_skipped(tmp_path):
    from backend.exports import tasks_to_export

    tasks, images, xml = _ls_tasks("polygon")
    tasks.append({"id": 999, "data": {"image": "/data/upload/1/x.jpg"}, "predictions": []})
    exported, categories = tasks_to_export(tasks, xml, model_version="v1")
    assert [c.name for c in categories] == list(CLASS_NAMES)
    assert len(exported) == len(images)
    for got, want in zip(exported, images):
        assert sorted(s.class_index for s in got.segments) == sorted(s.class_index for s in want.segments)
        for seg in want.segments:
            iou = max((s.mask & seg.mask).sum() / (s.mask | seg.mask).sum()
                      for s in got.segments if s.class_index == seg.class_index)
            assert iou > 0.8, (seg.class_index, iou)
    with pytest.raises(ValueError, match="only RectangleLabels"):
        tasks_to_export(_ls_tasks("rectangle")[0], _ls_tasks("rectangle")[2])


def test_tasks_with_an_empty_prediction_need_the_image_size():
    from backend.exports import tasks_to_export

    tasks, images, xml = _ls_tasks("brush")
    tasks[0]["predictions"][1]["result"] = []
    without, _ = tasks_to_export(tasks, xml, model_version="v1")
    assert [im.id for im in without] == [t["id"] for t in tasks[1:]]
    sizes = []
    with_size, _ = tasks_to_export(tasks, xml, model_version="v1",
                                   image_size=lambda task, url: sizes.append(url) or (96, 128))
    assert sizes == [tasks[0]["data"]["image"]]
    assert [im.id for im in with_size] == [t["id"] for t in tasks]
    assert (with_size[0].height, with_size[0].width, with_size[0].segments) == (96, 128, [])
