"""Segmentation quality: panoptic quality (things/stuff), mask AP (pycocotools) and mIoU.

Predictions and ground truth are both lists of `Segment` per image. Ground-truth pixels that no
segment covers are void: they are ignored by mIoU, and a predicted segment lying mostly on void
is not a false positive for PQ (the COCO panoptic rules). Stuff segments of one class in one
image are merged before matching, as in the COCO panoptic format.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from odise_core.geometry import coco_rle_decode, coco_rle_encode, mask_bbox
from odise_core.types import Segment

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Summary figures in percent (NaN when undefined, e.g. no thing class present)."""

    pq: float
    sq: float
    rq: float
    pq_things: float
    pq_stuff: float
    mask_ap: float
    mask_ap50: float
    miou: float
    num_images: int
    per_class_pq: dict[str, float] = field(default_factory=dict)
    per_class_iou: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-friendly dict with NaN turned into None."""
        def clean(v: object) -> object:
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return {k: clean(v) for k, v in self.__dict__.items()}


def merge_stuff(segments: Sequence[Segment]) -> list[Segment]:
    """Merge the stuff segments of each class into one segment; things are kept as they are."""
    out = [s for s in segments if s.is_thing]
    stuff: dict[int, Segment] = {}
    for s in segments:
        if s.is_thing:
            continue
        if s.class_index in stuff:
            prev = stuff[s.class_index]
            stuff[s.class_index] = Segment(prev.mask | s.mask, s.class_index, max(prev.score, s.score), False)
        else:
            stuff[s.class_index] = Segment(s.mask.astype(bool), s.class_index, s.score, False, s.query_index)
    return out + list(stuff.values())


def _non_overlapping(segments: Sequence[Segment]) -> list[Segment]:
    """Give every pixel to at most one segment (the first claiming it), dropping emptied ones."""
    if not segments:
        return []
    taken = np.zeros_like(segments[0].mask, dtype=bool)
    out = []
    for s in segments:
        m = s.mask.astype(bool) & ~taken
        taken |= m
        if m.any():
            out.append(Segment(m, s.class_index, s.score, s.is_thing, s.query_index))
    return out


class Evaluator:
    """Accumulates PQ, mask AP and mIoU statistics over images, then `summarize()`."""

    def __init__(self, class_names: Sequence[str], is_thing: Sequence[bool]):
        if len(class_names) != len(is_thing):
            raise ValueError(f"{len(class_names)} class names but {len(is_thing)} is_thing flags")
        self.class_names = list(class_names)
        self.is_thing = [bool(t) for t in is_thing]
        k = len(class_names)
        self._iou_sum = np.zeros(k)
        self._tp = np.zeros(k, dtype=np.int64)
        self._fp = np.zeros(k, dtype=np.int64)
        self._fn = np.zeros(k, dtype=np.int64)
        # confusion[gt, pred]; the extra pred column counts labelled pixels nothing predicted
        self._confusion = np.zeros((k, k + 1), dtype=np.int64)
        self._coco_images: list[dict] = []
        self._coco_gt: list[dict] = []
        self._coco_dt: list[dict] = []
        self.num_images = 0

    def add(self, predicted: Sequence[Segment], ground_truth: Sequence[Segment],
            instances: Sequence[Segment] | None = None) -> None:
        """Add one image. `instances` (scored, possibly overlapping) feed mask AP; default: the
        thing segments of `predicted`."""
        k = len(self.class_names)
        for s in list(predicted) + list(ground_truth):
            if not 0 <= s.class_index < k:
                raise ValueError(f"class index {s.class_index} outside the {k} evaluated classes")
        self.num_images += 1
        gt = _non_overlapping(merge_stuff(ground_truth))
        pred = _non_overlapping(merge_stuff(predicted))
        shape = gt[0].mask.shape if gt else (pred[0].mask.shape if pred else None)
        if shape is None:
            return
        self._add_pq(pred, gt, shape)
        self._add_semantic(pred, gt, shape)
        inst = [s for s in predicted if s.is_thing] if instances is None else list(instances)
        self._add_coco(inst, [s for s in gt if self.is_thing[s.class_index]], shape)

    def _add_pq(self, pred: list[Segment], gt: list[Segment], shape: tuple[int, ...]) -> None:
        void = np.ones(shape, dtype=bool)
        for g in gt:
            void &= ~g.mask
        matched_pred: set[int] = set()
        matched_gt: set[int] = set()
        for gi, g in enumerate(gt):
            for pi, p in enumerate(pred):
                if pi in matched_pred or p.class_index != g.class_index:
                    continue
                inter = int((g.mask & p.mask).sum())
                if inter == 0:
                    continue
                union = g.area + p.area - inter - int((p.mask & void).sum())
                iou = inter / union
                if iou > 0.5:
                    self._tp[g.class_index] += 1
                    self._iou_sum[g.class_index] += iou
                    matched_pred.add(pi)
                    matched_gt.add(gi)
                    break
        for gi, g in enumerate(gt):
            if gi not in matched_gt:
                self._fn[g.class_index] += 1
        for pi, p in enumerate(pred):
            if pi in matched_pred:
                continue
            if (p.mask & void).sum() / max(p.area, 1) > 0.5:
                continue
            self._fp[p.class_index] += 1

    def _add_semantic(self, pred: list[Segment], gt: list[Segment], shape: tuple[int, ...]) -> None:
        k = len(self.class_names)
        gt_map = np.full(shape, -1, dtype=np.int64)
        for g in gt:
            gt_map[g.mask] = g.class_index
        pred_map = np.full(shape, k, dtype=np.int64)
        for p in pred:
            pred_map[p.mask] = p.class_index
        valid = gt_map >= 0
        idx = gt_map[valid] * (k + 1) + pred_map[valid]
        self._confusion += np.bincount(idx, minlength=k * (k + 1)).reshape(k, k + 1)

    def _add_coco(self, inst: list[Segment], gt_things: list[Segment], shape: tuple[int, ...]) -> None:
        image_id = self.num_images
        self._coco_images.append({"id": image_id, "height": int(shape[0]), "width": int(shape[1])})

        for g in gt_things:
            self._coco_gt.append({
                "id": len(self._coco_gt) + 1, "image_id": image_id, "category_id": g.class_index + 1,
                "segmentation": coco_rle_encode(g.mask), "area": float(g.area), "iscrowd": 0,
                "bbox": [float(v) for v in mask_bbox(g.mask)],
            })
        for s in inst:
            if not self.is_thing[s.class_index] or not s.mask.any():
                continue
            self._coco_dt.append({"image_id": image_id, "category_id": s.class_index + 1,
                                  "segmentation": coco_rle_encode(s.mask), "score": float(s.score)})

    def _mask_ap(self) -> tuple[float, float]:
        if not self._coco_gt:
            return float("nan"), float("nan")
        if not self._coco_dt:
            return 0.0, 0.0
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names) if self.is_thing[i]]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {"images": self._coco_images, "annotations": self._coco_gt, "categories": cats}
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(list(self._coco_dt))
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return 100.0 * max(float(ev.stats[0]), 0.0), 100.0 * max(float(ev.stats[1]), 0.0)

    def summarize(self) -> EvalResult:
        """Compute the figures from everything added so far."""
        denom = self._tp + 0.5 * self._fp + 0.5 * self._fn
        present = denom > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            pq_c = np.where(present, self._iou_sum / np.maximum(denom, 1e-12), np.nan)
            sq_c = np.where(self._tp > 0, self._iou_sum / np.maximum(self._tp, 1), 0.0)
            rq_c = np.where(present, self._tp / np.maximum(denom, 1e-12), np.nan)
        things = np.array(self.is_thing, dtype=bool)

        def mean(values: np.ndarray, sel: np.ndarray) -> float:
            sel = sel & present
            return float(100.0 * values[sel].mean()) if sel.any() else float("nan")

        all_sel = np.ones_like(things)
        tp_c = np.diag(self._confusion[:, : len(self.class_names)]).astype(np.float64)
        union = self._confusion.sum(1) + self._confusion[:, : len(self.class_names)].sum(0) - tp_c
        has = union > 0
        iou_c = np.where(has, tp_c / np.maximum(union, 1), np.nan)
        miou = float(100.0 * iou_c[has].mean()) if has.any() else float("nan")
        ap, ap50 = self._mask_ap()
        return EvalResult(
            pq=mean(pq_c, all_sel), sq=mean(sq_c, all_sel), rq=mean(rq_c, all_sel),
            pq_things=mean(pq_c, things), pq_stuff=mean(pq_c, ~things),
            mask_ap=ap, mask_ap50=ap50, miou=miou, num_images=self.num_images,
            per_class_pq={n: float(100 * pq_c[i]) for i, n in enumerate(self.class_names) if present[i]},
            per_class_iou={n: float(100 * iou_c[i]) for i, n in enumerate(self.class_names) if has[i]},
        )


def evaluate(pairs: Iterable[tuple[Sequence[Segment], Sequence[Segment]]], class_names: Sequence[str],
             is_thing: Sequence[bool]) -> EvalResult:
    """Evaluate (predicted, ground_truth) segment lists, one pair per image."""
    ev = Evaluator(class_names, is_thing)
    for pred, gt in pairs:
        ev.add(pred, gt)
    return ev.summarize()


@dataclass
class CocoDataset:
    """A COCO-format folder: class names/flags and, per image, its path and ground-truth segments."""

    class_names: list[str]
    is_thing: list[bool]
    images: list[tuple[Path, list[Segment]]]


def load_coco_folder(folder: str | Path, annotations: str | Path | None = None) -> CocoDataset:
    """Read a COCO instances-format folder (as Label Studio's COCO export writes it).

    The JSON is `annotations` or the only ``*.json`` in the folder (``result.json`` preferred);
    image `file_name`s are resolved relative to the folder. A category's optional ``isthing``
    (COCO panoptic categories) marks stuff; without it every category is a thing.
    """
    from pycocotools import mask as mask_utils

    folder = Path(folder)
    if annotations is None:
        candidates = [folder / "result.json"] if (folder / "result.json").exists() else sorted(folder.glob("*.json"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"expected one COCO annotation JSON in {folder} (or pass annotations=), "
                                    f"found {[c.name for c in candidates]}")
        annotations = candidates[0]
    data = json.loads(Path(annotations).read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    names = [c["name"] for c in cats]
    is_thing = [bool(c.get("isthing", 1)) for c in cats]
    by_image: dict[int, list[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    images = []
    for img in data["images"]:
        h, w = int(img["height"]), int(img["width"])
        path = _resolve_image(folder, img["file_name"])
        segs = []
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd", 0):
                continue
            seg = ann["segmentation"]
            if isinstance(seg, list):  # polygons
                if not seg:
                    continue
                m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
            else:
                m = coco_rle_decode(seg)
            if m.any():
                ci = cat_index[ann["category_id"]]
                segs.append(Segment(m, ci, 1.0, is_thing[ci]))
        images.append((path, segs))
    return CocoDataset(names, is_thing, images)


def _resolve_image(folder: Path, file_name: str) -> Path:
    """Find an image named in a COCO file: as given, relative to the folder, or by base name."""
    for cand in (Path(file_name), folder / file_name, folder / "images" / Path(file_name).name):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"image {file_name!r} not found under {folder}")
