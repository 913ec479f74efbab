"""Answer one interaction on one task with labeled regions, from the task's cached QueryState.

The model serving interactions provides `query_state(image, vocabulary) -> QueryState` (one full
pass) and `phrase_probabilities(state, vocabulary, phrase) -> (Q, K+2)` (class probabilities with
the phrase appended as class K). Regions go to the project's output control on the clicked image
(PolygonLabels or BrushLabels, else RectangleLabels), encoded exactly as ordinary predictions.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
from scipy import ndimage

from backend.interactive import Interaction, InteractionError
from backend.label_config import ControlSpec, ImageTarget, ProjectConfig
from backend.ls_format import ResultOptions, segment_regions
from backend.query_cache import CacheKey, QueryStateCache, image_digest
from backend.tasks import ImageFetchError
from odise_core.query_state import QueryState
from odise_core.selection import Box, Click, select_box, select_click, select_phrase
from odise_core.types import Segment

log = logging.getLogger(__name__)

_PREFERRED_KINDS = ("polygon", "brush", "rectangle")
Answer = tuple[np.ndarray, int, float, int]  # (mask at image size, class, score, query)


def output_control(target: ImageTarget, tool: str) -> tuple[ControlSpec, dict[int, str]]:
    """The control receiving interactive regions on `target` (never the prompt tool itself when another exists)."""
    pairs = [(c, m) for c, m in zip(target.controls, target.label_of) if c.name != tool] or \
        list(zip(target.controls, target.label_of))
    return min(pairs, key=lambda pair: _PREFERRED_KINDS.index(pair[0].kind))


def class_of_label(label: str | None, mapping: dict[int, str]) -> int | None:
    """Vocabulary class of an output label value (exact, then case-insensitive), or None."""
    if not label:
        return None
    for exact in (True, False):
        for k, value in mapping.items():
            if value == label if exact else value.lower() == label.strip().lower():
                return k
    return None


def clicked_parts(mask: np.ndarray, points: list[tuple[int, int]]) -> np.ndarray:
    """The 8-connected parts of `mask` holding one of the (x, y) `points`; all of `mask` when none does."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    h, w = mask.shape
    ids = {int(labels[min(max(y, 0), h - 1), min(max(x, 0), w - 1)]) for x, y in points} - {0}
    return np.isin(labels, sorted(ids)) if ids else mask


def best_class(probs: torch.Tensor, mapping: dict[int, str]) -> int:
    """The output control's class with the highest probability in `probs` (one query's row)."""
    return max(mapping, key=lambda k: float(probs[k]))


class InteractivePredictor:
    """Turns interactions into regions; shares the backend's image fetching and forward-pass lock."""

    def __init__(self, cache: QueryStateCache, image_of: Callable[[dict, ImageTarget], np.ndarray],
                 model_lock: threading.Lock, options: ResultOptions):
        self.cache = cache
        self._image_of = image_of
        self._model_lock = model_lock
        self.options = options

    def state(self, task: dict, target: ImageTarget, model: Any, version: str, project: str | None) -> QueryState:
        """The task image's QueryState: cached, else one full pass (under the forward-pass lock)."""
        image = self._image_of(task, target)
        key = CacheKey(project, image_digest(image), version, target.vocabulary.fingerprint())

        def compute() -> QueryState:
            with self._model_lock:
                return model.query_state(image, target.vocabulary)

        return self.cache.get_or_compute(key, compute)

    def answer(self, task: dict, config: ProjectConfig, model: Any, version: str, interaction: Interaction,
               project: str | None) -> dict:
        """{"result": regions, "score", "model_version"} answering `interaction` on `task`, or an error entry."""
        try:
            return self._answer(task, config, model, version, interaction, project)
        except Exception as e:  # one failed interaction must not take the server down
            expected = isinstance(e, (ValueError, ImageFetchError))
            log.log(logging.WARNING if expected else logging.ERROR, "task %s: interactive %s failed: %s",
                    task.get("id"), interaction.kind, e, exc_info=not expected)
            message = str(e) if expected else f"interactive prediction failed: {type(e).__name__}: {e}"
            return {"error": message, "task": task.get("id"), "model_version": version}

    def _answer(self, task: dict, config: ProjectConfig, model: Any, version: str, interaction: Interaction,
                project: str | None) -> dict:
        t0 = time.perf_counter()
        target = next((t for t in config.targets if t.to_name == interaction.to_name), None)
        if target is None:
            raise InteractionError(f'the smart tool "{interaction.from_name}" points at image '
                                   f'"{interaction.to_name}", which no output control of the label config labels')
        state = self.state(task, target, model, version, project)
        control, mapping = output_control(target, interaction.from_name)
        picked = class_of_label(interaction.label, mapping)
        if interaction.kind == "text":
            answers = self._text(state, target, model, interaction.text, picked, mapping)
        elif interaction.kind == "click":
            answers = self._click(state, interaction, picked, mapping)
        else:
            answers = self._box(state, interaction, picked, mapping)
        regions: list[dict] = []
        for mask, k, score, query in answers:
            segment = Segment(mask=mask, class_index=k, score=score,
                              is_thing=bool(target.vocabulary.is_thing[k]), query_index=query)
            regions.extend(segment_regions(segment, mapping[k], control, self.options))
        log.info("task %s: interactive %s -> %d regions in %.3f s", task.get("id"), interaction.kind,
                 len(regions), time.perf_counter() - t0)
        score = max((r["score"] for r in regions), default=0.0)
        return {"result": regions, "score": score, "model_version": version}

    def _min_pixels(self, state: QueryState) -> int:
        """The result min_area (image pixels) in grid cells."""
        (h, w), (ih, iw) = state.grid_size, state.image_size
        return max(1, int(self.options.min_area * h * w / (ih * iw)))

    @staticmethod
    def _labeled(state: QueryState, query: int, mask: np.ndarray, picked: int | None,
                 mapping: dict[int, str]) -> list[Answer]:
        """One answer for `query`: the picked label's class, else the query's best output class."""
        k = picked if picked is not None else best_class(state.class_probs[query], mapping)
        return [(mask, k, float(state.class_probs[query, k]), query)]

    def _click(self, state: QueryState, interaction: Interaction, picked: int | None,
               mapping: dict[int, str]) -> list[Answer]:
        ih, iw = state.image_size
        pixels = [(x / 100 * iw, y / 100 * ih, positive) for x, y, positive in interaction.clicks]
        if not any(positive for _, _, positive in pixels):
            raise InteractionError("only negative clicks: add a positive click on the object you want")
        clicks = [Click(*state.to_grid(x, y), positive=positive) for x, y, positive in pixels]
        query = select_click(state.mask_logits, state.is_object, clicks, self._min_pixels(state))
        if query is None:
            return []
        # the part of the query's mask the clicks fell on, not its other parts elsewhere in the image
        mask = clicked_parts(state.full_mask(query), [(int(x), int(y)) for x, y, positive in pixels if positive])
        return self._labeled(state, query, mask, picked, mapping)

    def _box(self, state: QueryState, interaction: Interaction, picked: int | None,
             mapping: dict[int, str]) -> list[Answer]:
        ih, iw = state.image_size
        x, y, w, h = interaction.box
        x0, y0 = x / 100 * iw, y / 100 * ih
        x1, y1 = (x + w) / 100 * iw, (y + h) / 100 * ih
        grid = Box(*state.to_grid(x0, y0), *state.to_grid(x1, y1))
        query = select_box(state.mask_logits, state.is_object, grid, self._min_pixels(state))
        if query is None:
            return []
        mask = state.full_mask(query) & Box(x0, y0, x1, y1).grid_mask(state.image_size).numpy()
        return self._labeled(state, query, mask, picked, mapping)

    def _text(self, state: QueryState, target: ImageTarget, model: Any, phrase: str, picked: int | None,
              mapping: dict[int, str]) -> list[Answer]:
        vocab = target.vocabulary
        known = next((k for k, c in enumerate(vocab.classes) if phrase.lower() in (s.lower() for s in c.synonyms)),
                     None)
        if known is not None:
            probs, phrase_class = state.class_probs, known
        else:
            probs, phrase_class = model.phrase_probabilities(state, vocab, phrase), len(vocab)
        queries = select_phrase(probs, phrase_class, state.mask_logits, self._min_pixels(state))
        fixed = picked if picked is not None else (known if known in mapping else None)
        answers = []
        for q in queries:
            k = fixed if fixed is not None else best_class(state.class_probs[q], mapping)
            answers.append((state.full_mask(q), k, float(probs[q, phrase_class]), q))
        return answers
