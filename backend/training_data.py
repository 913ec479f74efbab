"""Label Studio annotations -> training samples (per-instance masks with vocabulary class indices).

Polygon, brush and rectangle results are decoded to masks by `backend.ls_format.result_mask`.
Per task the most recent annotation that is neither cancelled nor empty is used. A deterministic fraction of tasks, chosen by a hash of the task id (so a task never moves
between the sets as the project grows), is held out for evaluation.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from backend.ls_format import result_mask
from backend.tasks import ImageFetchError
from odise_core.training.finetune import TrainSample

log = logging.getLogger(__name__)

LABEL_KEYS = ("polygonlabels", "brushlabels", "rectanglelabels", "labels")


@dataclass
class TrainingData:
    """Samples for training and for the held-out evaluation, with why tasks were skipped."""

    train: list[TrainSample]
    holdout: list[TrainSample]
    train_task_ids: list[int] = field(default_factory=list)
    holdout_task_ids: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    fingerprint: str | None = None  # identifies the annotations used; None when the source cannot tell

    @property
    def count(self) -> int:
        return len(self.train) + len(self.holdout)


def holdout_key(task_id: int) -> float:
    """A stable pseudo-random number in [0, 1) per task id."""
    return int(hashlib.sha1(str(task_id).encode()).hexdigest()[:8], 16) / 2**32


def select_annotation(task: dict) -> dict | None:
    """The latest annotation that is not cancelled and has at least one result, or None."""
    usable = [a for a in task.get("annotations") or []
              if not a.get("was_cancelled") and a.get("result")]
    if not usable:
        return None
    return max(usable, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def annotations_fingerprint(used: Iterable[tuple[int, dict]]) -> str:
    """Hash of (task id, annotation id, last change) of the annotations used: equal for the same data."""
    h = hashlib.sha1()
    for task_id, a in sorted(used, key=lambda ta: ta[0]):
        h.update(f"{task_id}:{a.get('id')}:{a.get('updated_at') or a.get('created_at')};".encode())
    return h.hexdigest()[:16]


def _label_of(value: dict) -> str | None:
    for key in LABEL_KEYS:
        labels = value.get(key)
        if labels:
            return str(labels[0])
    return None


def _class_lookup(class_names: Sequence[str]) -> Callable[[str], int | None]:
    exact = {n: i for i, n in enumerate(class_names)}
    folded = {n.casefold(): i for i, n in enumerate(class_names)}

    def lookup(label: str) -> int | None:
        return exact.get(label, folded.get(label.casefold()))

    return lookup


def annotation_to_sample(annotation: dict, image: np.ndarray, class_names: Sequence[str],
                         is_thing: Sequence[bool] | None = None,
                         from_names: Iterable[str] | None = None) -> TrainSample | None:
    """Per-instance masks of one annotation on `image`; stuff regions of one class are merged.

    Results whose label is not in `class_names` (or whose from_name is not in `from_names`) are
    skipped with a log line. Returns None when no region remains.
    """
    h, w = image.shape[:2]
    lookup = _class_lookup(class_names)
    allowed = set(from_names) if from_names is not None else None
    masks: list[np.ndarray] = []
    classes: list[int] = []
    stuff_slot: dict[int, int] = {}
    for result in annotation.get("result") or []:
        if allowed is not None and result.get("from_name") not in allowed:
            continue
        label = _label_of(result.get("value") or {})
        if label is None:
            continue
        cls = lookup(label)
        if cls is None:
            log.warning("label %r is not in the project vocabulary; region skipped", label)
            continue
        mask = result_mask(result, h, w)
        if mask is None or not mask.any():
            continue
        if is_thing is not None and not is_thing[cls]:
            if cls in stuff_slot:
                masks[stuff_slot[cls]] |= mask
                continue
            stuff_slot[cls] = len(masks)
        masks.append(mask)
        classes.append(cls)
    if not masks:
        return None
    return TrainSample(image=image, masks=np.stack(masks), classes=np.asarray(classes, dtype=np.int64))


def build_training_data(tasks: Iterable[dict], class_names: Sequence[str], load_image: Callable[[dict], np.ndarray],
                        is_thing: Sequence[bool] | None = None, holdout_fraction: float = 0.2,
                        from_names: Iterable[str] | None = None) -> TrainingData:
    """Turn annotated tasks into train and held-out samples.

    `load_image(task)` returns the task's image as uint8 HxWx3; a task whose image it cannot give (OSError,
    ValueError, ImageFetchError) is skipped and counted. With at least two usable tasks and a positive
    fraction, at least one task is held out and at least one is trained on.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    skipped: Counter = Counter()
    usable: list[tuple[int, TrainSample]] = []
    used: list[tuple[int, dict]] = []
    for task in tasks:
        annotation = select_annotation(task)
        if annotation is None:
            skipped["no usable annotation (none, cancelled or empty)"] += 1
            continue
        used.append((int(task["id"]), annotation))
        try:
            image = load_image(task)
        except (OSError, ValueError, ImageFetchError) as exc:
            log.warning("task %s: image not loadable (%s); skipped", task.get("id"), exc)
            skipped["image not loadable"] += 1
            continue
        sample = annotation_to_sample(annotation, image, class_names, is_thing, from_names)
        if sample is None:
            skipped["no region with a known label"] += 1
            continue
        usable.append((int(task["id"]), sample))

    data = split_samples(usable, holdout_fraction)
    data.skipped = skipped
    data.fingerprint = annotations_fingerprint(used)
    log.info("training data: %d train, %d held out, skipped %s", len(data.train), len(data.holdout), dict(skipped))
    return data


def split_samples(items: Sequence[tuple[int, TrainSample]], holdout_fraction: float) -> TrainingData:
    """Split (id, sample) pairs by `holdout_key(id) < holdout_fraction`.

    With at least two samples and a positive fraction, at least one is held out and at least one is
    trained on.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    held = {tid for tid, _ in items if holdout_key(tid) < holdout_fraction}
    if holdout_fraction > 0 and len(items) >= 2:
        ordered = sorted(items, key=lambda ts: holdout_key(ts[0]))
        if not held:
            held = {ordered[0][0]}
        if len(held) == len(items):
            held.discard(ordered[-1][0])
    data = TrainingData(train=[], holdout=[])
    for tid, sample in items:
        if tid in held:
            data.holdout.append(sample)
            data.holdout_task_ids.append(tid)
        else:
            data.train.append(sample)
            data.train_task_ids.append(tid)
    return data


def fetch_tasks(client: Any, project_id: int, only_annotated: bool = False) -> list[dict]:
    """Tasks of a project with their annotations, as plain dicts, via a label-studio-sdk client."""
    tasks = []
    for task in client.tasks.list(project=project_id, fields="all"):
        item = task.model_dump() if hasattr(task, "model_dump") else dict(task)
        if item.get("annotations") or not only_annotated:
            tasks.append(item)
    return tasks


def fetch_annotated_tasks(client: Any, project_id: int) -> list[dict]:
    """All tasks of a project that have annotations."""
    return fetch_tasks(client, project_id, only_annotated=True)
