"""Export segments as COCO panoptic (PNG + JSON) and COCO instances (RLE) datasets.

Lets a dataset bootstrapped in Label Studio leave it for training elsewhere. Panoptic ids are
encoded in the PNG as id = R + 256 * G + 256**2 * B, as in the COCO panoptic format.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from odise_core.geometry import coco_rle_encode, mask_bbox
from odise_core.tools.visualize import palette
from odise_core.types import Segment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Category:
    """One COCO category; `Segment.class_index` indexes the exporter's category list."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)


@dataclass
class ExportImage:
    """One image and its segments (masks at the image's size)."""

    id: int
    file_name: str
    height: int
    width: int
    segments: list[Segment] = field(default_factory=list)


def make_categories(names: Sequence[str], is_thing: Sequence[bool]) -> list[Category]:
    """Categories with ids 1..K in vocabulary order and well-separated display colours."""
    out = []
    colours = palette(len(names))
    for i, (name, thing) in enumerate(zip(names, is_thing, strict=True)):
        out.append(Category(i + 1, str(name), bool(thing), colours[i]))
    return out


def categories_from_vocabulary(vocab: Any) -> list[Category]:
    """Categories of an odise_core Vocabulary (names and thing/stuff flags), ids 1..K."""
    return make_categories(list(vocab.names), [bool(t) for t in vocab.is_thing])


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Panoptic segment ids (H, W) -> RGB uint8 (H, W, 3) with id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("panoptic ids must lie in [0, 256**3)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) -> panoptic segment ids (H, W) int64; inverse of `id_to_rgb`."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _check(image: ExportImage, categories: Sequence[Category]) -> None:
    for seg in image.segments:
        if seg.mask.shape != (image.height, image.width):
            raise ValueError(f"{image.file_name}: mask shape {seg.mask.shape} != image size "
                             f"{(image.height, image.width)}")
        if not 0 <= seg.class_index < len(categories):
            raise ValueError(f"{image.file_name}: class index {seg.class_index} outside the "
                             f"{len(categories)} categories")


def panoptic_map(image: ExportImage, categories: Sequence[Category]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Paint the segments into one id map (0 = void) and describe them as COCO `segments_info`.

    Overlaps go to the higher-scoring segment; the segments of one stuff category merge into one,
    as the panoptic format allows a single segment per stuff class.
    """
    _check(image, categories)
    groups: dict[tuple[int, int], list[Segment]] = {}
    for i, seg in enumerate(image.segments):
        key = (seg.class_index, -1) if not categories[seg.class_index].isthing else (seg.class_index, i)
        groups.setdefault(key, []).append(seg)
    ids = np.zeros((image.height, image.width), dtype=np.int64)
    order = sorted(groups.values(), key=lambda segs: max(s.score for s in segs))
    info = []
    for new_id, segs in enumerate(order, start=1):
        mask = np.logical_or.reduce([s.mask for s in segs])
        ids[mask] = new_id
        info.append({"id": new_id, "category_id": categories[segs[0].class_index].id, "iscrowd": 0})
    kept = []
    for entry in info:
        mask = ids == entry["id"]
        if mask.any():
            kept.append({**entry, "area": int(mask.sum()), "bbox": list(mask_bbox(mask))})
    return ids, kept


def _categories_json(categories: Sequence[Category]) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.name, "supercategory": "thing" if c.isthing else "stuff",
             "isthing": int(c.isthing), "color": list(c.color)} for c in categories]


def _image_json(image: ExportImage) -> dict[str, Any]:
    return {"id": image.id, "file_name": image.file_name, "height": image.height, "width": image.width}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def export_coco_panoptic(images: Iterable[ExportImage], categories: Sequence[Category], out_dir: str | Path,
                         name: str = "panoptic") -> Path:
    """Write `out_dir/<name>/<image stem>.png` and `out_dir/<name>.json`; returns the JSON path."""
    out_dir = Path(out_dir)
    png_dir = out_dir / name
    png_dir.mkdir(parents=True, exist_ok=True)
    images_json, annotations = [], []
    used: set[str] = set()
    for image in images:
        ids, info = panoptic_map(image, categories)
        png_name = f"{Path(image.file_name).stem}.png"
        if png_name in used:
            png_name = f"{Path(image.file_name).stem}_{image.id}.png"
        used.add(png_name)
        Image.fromarray(id_to_rgb(ids)).save(png_dir / png_name)
        images_json.append(_image_json(image))
        annotations.append({"image_id": image.id, "file_name": png_name, "segments_info": info})
    path = out_dir / f"{name}.json"
    _write_json(path, {"info": {"description": "exported by odise-label-studio"}, "licenses": [],
                       "images": images_json, "annotations": annotations,
                       "categories": _categories_json(categories)})
    log.info("wrote COCO panoptic: %d images, %d segments -> %s", len(images_json),
             sum(len(a["segments_info"]) for a in annotations), path)
    return path


def export_coco_instances(images: Iterable[ExportImage], categories: Sequence[Category], out_path: str | Path,
                          with_scores: bool = False) -> Path:
    """Write the thing segments as COCO instances JSON (RLE masks); stuff segments are left out."""
    images_json, annotations = [], []
    for image in images:
        _check(image, categories)
        images_json.append(_image_json(image))
        for seg in image.segments:
            if not categories[seg.class_index].isthing or not seg.mask.any():
                continue
            rle = coco_rle_encode(seg.mask)
            ann = {"id": len(annotations) + 1, "image_id": image.id, "category_id": categories[seg.class_index].id,
                   "segmentation": rle, "area": float(mask_utils.area({**rle, "counts": rle["counts"].encode()})),
                   "bbox": [float(v) for v in mask_bbox(seg.mask)], "iscrowd": 0}
            if with_scores:
                ann["score"] = float(seg.score)
            annotations.append(ann)
    things = [c for c in categories if c.isthing]
    path = Path(out_path)
    _write_json(path, {"info": {"description": "exported by odise-label-studio"}, "licenses": [],
                       "images": images_json, "annotations": annotations, "categories": _categories_json(things)})
    log.info("wrote COCO instances: %d images, %d instances -> %s", len(images_json), len(annotations), path)
    return path


def segments_to_coco_json(segments: Sequence[Segment], vocab: Any, file_name: str,
                          image_size: tuple[int, int]) -> dict[str, Any]:
    """One image's segments as a self-contained COCO-style record: categories + RLE segments with scores."""
    categories = categories_from_vocabulary(vocab)
    h, w = image_size
    _check(ExportImage(0, file_name, h, w, list(segments)), categories)
    out = []
    for i, seg in enumerate(segments, start=1):
        if not seg.mask.any():
            continue
        cat = categories[seg.class_index]
        out.append({"id": i, "category_id": cat.id, "category": cat.name, "isthing": int(cat.isthing),
                    "score": round(float(seg.score), 4), "area": int(seg.mask.sum()),
                    "bbox": list(mask_bbox(seg.mask)), "segmentation": coco_rle_encode(seg.mask)})
    return {"file_name": file_name, "height": h, "width": w, "categories": _categories_json(categories),
            "segments": out}


# ----------------------------------------------------------------------------- Label Studio tasks
FORMATS = ("panoptic", "instances")
SOURCES = ("predictions", "annotations")


def file_name_of(url: str) -> str:
    """A dataset file name for a task image URL: the local-files path, else the URL's last path part."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")
    if local:
        return unquote(local[0])
    return Path(unquote(parsed.path)).name or url


def _chosen_results(task: dict[str, Any], source: str, model_version: str | None) -> tuple[list[dict], float] | None:
    """(results, default score) of the task's latest annotation or prediction, None when there is none."""
    from backend.training_data import select_annotation

    if source == "annotations":
        annotation = select_annotation(task)
        return (annotation["result"], 1.0) if annotation else None
    predictions = [p for p in task.get("predictions") or []
                   if model_version is None or p.get("model_version") == model_version]
    if not predictions:
        return None
    latest = max(enumerate(predictions), key=lambda ip: (str(ip[1].get("created_at") or ""), ip[0]))[1]
    return latest.get("result") or [], float(latest.get("score") or 1.0)


def tasks_to_export(tasks: Sequence[dict[str, Any]], label_config: str, source: str = "predictions",
                    model_version: str | None = None,
                    image_size: Callable[[dict[str, Any], str], tuple[int, int]] | None = None,
                    ) -> tuple[list[ExportImage], list[Category]]:
    """Label Studio tasks (an export JSON or `odise-ls prelabel --folder` output) -> images with segments.

    Uses the first polygon or brush control of the config (boxes carry no masks). Tasks without a
    prediction/annotation are skipped. A task whose prediction/annotation has no region still is
    an image of the dataset; its size comes from `image_size(task, url)` (e.g. by downloading the
    image), and without that callable such tasks are skipped with a warning.
    """
    from backend.label_config import parse_label_config
    from backend.training_data import result_mask

    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    config = parse_label_config(label_config)
    if len(config.targets) != 1:
        raise ValueError(f"export needs a label config with one <Image>, this one has {len(config.targets)}")
    target = config.targets[0]
    masks = [(c, m) for c, m in zip(target.controls, target.label_of) if c.kind in ("polygon", "brush")]
    if not masks:
        raise ValueError("the label config has only RectangleLabels: boxes carry no masks to export")
    control, label_of = masks[0]
    class_of = {label: k for k, label in label_of.items()}
    is_thing = [bool(t) for t in target.vocabulary.is_thing]
    images: list[ExportImage] = []
    unlabeled = unsized = 0
    for i, task in enumerate(tasks):
        chosen = _chosen_results(task, source, model_version)
        if chosen is None:
            unlabeled += 1
            continue
        url = str((task.get("data") or {}).get(target.data_key, f"task_{task.get('id', i + 1)}"))
        regions = [r for r in chosen[0] if r.get("from_name") == control.name and r.get("to_name") == control.to_name]
        if regions:
            h, w = int(regions[0]["original_height"]), int(regions[0]["original_width"])
        elif image_size is not None:
            try:
                h, w = image_size(task, url)
            except Exception as e:  # noqa: BLE001 - one unreachable image must not stop the export
                log.warning("task %s: no region and the image size is unknown (%s); skipped", task.get("id"), e)
                unsized += 1
                continue
        else:
            unsized += 1
            continue
        segments = []
        for region in regions:
            labels = (region.get("value") or {}).get(control.tag.lower()) or []
            k = class_of.get(labels[0]) if labels else None
            if k is None:
                log.warning("task %s: label %s is not in the label config; region skipped", task.get("id"), labels)
                continue
            mask = result_mask(region, h, w)
            if mask is not None and mask.any():
                segments.append(Segment(mask, k, float(region.get("score", chosen[1])), is_thing[k]))
        images.append(ExportImage(int(task.get("id") or i + 1), file_name_of(url), h, w, segments))
    if unlabeled:
        log.warning("%d task(s) without %s were skipped", unlabeled, source)
    if unsized:
        log.warning("%d task(s) with no region and no known image size were skipped", unsized)
    return images, categories_from_vocabulary(target.vocabulary)


def export_tasks(tasks: Sequence[dict[str, Any]], label_config: str, out_dir: str | Path,
                 formats: Sequence[str] = FORMATS, source: str = "predictions", model_version: str | None = None,
                 image_size: Callable[[dict[str, Any], str], tuple[int, int]] | None = None) -> list[Path]:
    """Write the chosen COCO formats for Label Studio tasks into `out_dir`; returns the JSON paths."""
    bad = set(formats) - set(FORMATS)
    if bad:
        raise ValueError(f"unknown export format(s) {', '.join(sorted(bad))}; choose from {', '.join(FORMATS)}")
    images, categories = tasks_to_export(tasks, label_config, source, model_version, image_size)
    out_dir = Path(out_dir)
    paths = []
    if "panoptic" in formats:
        paths.append(export_coco_panoptic(images, categories, out_dir))
    if "instances" in formats:
        paths.append(export_coco_instances(images, categories, out_dir / "instances.json",
                                           with_scores=source == "predictions"))
    return paths


# ----------------------------------------------------------------------------- command line
def add_arguments(p: Any) -> None:
    """The `odise-ls export` flags."""
    from backend.ls_client import add_label_studio_flags

    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tasks", help="Label Studio JSON export, or the import JSON of `odise-ls prelabel --folder`")
    where.add_argument("--project", type=int, help="read the tasks of this Label Studio project")
    p.add_argument("--label-config", help="label config XML file (required with --tasks; read from the project "
                                          "otherwise)")
    add_label_studio_flags(p)
    p.add_argument("--format", choices=[*FORMATS, "both"], default="both",
                   help="COCO panoptic (PNG + JSON), COCO instances (RLE JSON) or both")
    p.add_argument("--source", choices=SOURCES, default="predictions",
                   help="export the latest prediction or the latest accepted annotation of each task")
    p.add_argument("--model-version", help="only predictions of this model version")
    p.add_argument("--out", default="coco", help="output directory")


def run_command(args: Any) -> list[Path]:
    """`odise-ls export`: read tasks (file or project), write the COCO files; returns their JSON paths."""
    from backend.settings import BackendSettings
    from backend.tasks import ImageFetcher

    settings = BackendSettings.resolve(args)
    if args.project is not None:
        from backend.ls_client import make_client
        from backend.prelabel import project_tasks

        client = make_client(settings.label_studio_url, settings.api_key)
        xml = Path(args.label_config).read_text() if args.label_config else \
            client.projects.get(id=args.project).label_config
        tasks = project_tasks(client, args.project)
    else:
        if not args.label_config:
            raise ValueError("--tasks needs --label-config (the project's label config XML)")
        xml = Path(args.label_config).read_text()
        tasks = json.loads(Path(args.tasks).read_text())
        if isinstance(tasks, dict):
            tasks = [tasks]
    fetcher = ImageFetcher(settings.label_studio_url, settings.api_key, cache_size=0)
    formats = FORMATS if args.format == "both" else (args.format,)
    return export_tasks(tasks, xml, args.out, formats=formats, source=args.source, model_version=args.model_version,
                        image_size=lambda task, url: fetcher.fetch(url, task_id=task.get("id")).shape[:2])
