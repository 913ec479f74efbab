"""The interaction Label Studio sends with an interactive /predict: smart-tool clicks, boxes or typed text.

With "Interactive preannotations" on, the editor posts `{"task", "context": {"result": [...]}}` to
Label Studio's /api/ml/{id}/interactive-annotating, which forwards it to /predict as
`params.context`. `context.result` holds the region just drawn with a smart tool together with its
connected regions (same tool, same label, same image), serialised like annotation results:

- KeyPointLabels: `{"type": "keypointlabels", "value": {"x", "y", "width", "keypointlabels": [label]},
  "is_positive": bool}`, one per click (a negative click has `is_positive` false);
- RectangleLabels: `{"type": "rectanglelabels", "value": {"x", "y", "width", "height", "rotation",
  "rectanglelabels": [label]}}`;
- TextArea: `{"type": "textarea", "value": {"text": [phrase, ...]}}`.

Coordinates are percent of the image. Each result also names its tool (`from_name`) and image (`to_name`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CLICK_TYPES = ("keypointlabels", "keypoint")
BOX_TYPES = ("rectanglelabels", "rectangle")
TEXT_TYPES = ("textarea",)


class InteractionError(ValueError):
    """The interactive context cannot be answered; the message says what is wrong with it."""


@dataclass(frozen=True)
class Interaction:
    """One smart-tool action. Coordinates in percent of the image; `label` is the label picked on the tool."""

    kind: str  # "click" | "box" | "text"
    from_name: str
    to_name: str
    clicks: tuple[tuple[float, float, bool], ...] = ()  # (x, y, positive)
    box: tuple[float, float, float, float] | None = None  # (x, y, width, height)
    text: str = ""
    label: str | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value: dict, key: str, where: str) -> float:
    number = value.get(key)
    if not _is_number(number):
        raise InteractionError(f'{where}: value.{key} must be a number (percent of the image), got {number!r}')
    if not -1e-6 <= number <= 100 + 1e-6:
        raise InteractionError(f"{where}: value.{key}={number} is outside the image (0-100 percent)")
    return float(min(max(number, 0.0), 100.0))


def _picked_label(result: dict) -> str | None:
    """The label chosen on the tool: the value's "<type>" list, else its "labels" list."""
    value = result.get("value") or {}
    for key in (result.get("type"), "labels"):
        labels = value.get(key) if isinstance(key, str) else None
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def _prompt_results(context: Any) -> list[dict]:
    if not isinstance(context, dict):
        raise InteractionError(f"the interactive context must be an object with a \"result\" list, got "
                               f"{type(context).__name__}")
    results = context.get("result")
    if results is None:
        return []
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise InteractionError('context.result must be a list of result objects')
    return [r for r in results if r.get("type") in CLICK_TYPES + BOX_TYPES + TEXT_TYPES]


def parse_context(context: Any) -> Interaction | None:
    """The interaction in `context`, or None when it carries no smart-tool result (an ordinary prediction).

    The first prompt result decides the kind; every click on the same image joins it, a box or a
    text takes the last one given. Raises InteractionError on malformed values.
    """
    if context is None or context == {}:
        return None
    results = _prompt_results(context)
    if not results:
        return None
    first = results[0]
    kind_types = next(t for t in (CLICK_TYPES, BOX_TYPES, TEXT_TYPES) if first["type"] in t)
    to_name = first.get("to_name")
    from_name = first.get("from_name")
    if not isinstance(to_name, str) or not isinstance(from_name, str):
        raise InteractionError("each context result needs its from_name (the tool) and to_name (the image)")
    same = [r for r in results if r["type"] in kind_types and r.get("to_name") == to_name]
    for r in same:
        if not isinstance(r.get("value"), dict):
            raise InteractionError(f'context result of type {r["type"]} has no "value" object')
    label = next((lab for lab in map(_picked_label, reversed(same)) if lab), None)
    if kind_types is CLICK_TYPES:
        clicks = tuple((_percent(r["value"], "x", "click"), _percent(r["value"], "y", "click"),
                        r.get("is_positive", True) is not False) for r in same)
        return Interaction("click", from_name, to_name, clicks=clicks, label=label)
    if kind_types is BOX_TYPES:
        value = same[-1]["value"]
        rotation = value.get("rotation") or 0.0
        if not _is_number(rotation):
            raise InteractionError(f"box: value.rotation must be a number (degrees), got {rotation!r}")
        if min(rotation % 360.0, 360.0 - rotation % 360.0) > 1e-6:
            raise InteractionError("rotated boxes are not supported as prompts: draw the box without rotation")
        x, y = _percent(value, "x", "box"), _percent(value, "y", "box")
        w, h = _percent(value, "width", "box"), _percent(value, "height", "box")
        if w <= 0 or h <= 0:
            raise InteractionError(f"the prompt box is empty (width {w}, height {h} percent)")
        return Interaction("box", from_name, to_name, box=(x, y, min(w, 100 - x), min(h, 100 - y)), label=label)
    texts = same[-1]["value"].get("text")
    if isinstance(texts, str):
        texts = [texts]
    if texts is not None and not isinstance(texts, list):
        raise InteractionError(f"text: value.text must be a string or a list of strings, got {texts!r}")
    phrases = [t.strip() for t in texts or [] if isinstance(t, str) and t.strip()]
    if not phrases:
        raise InteractionError("the text prompt is empty: type what to look for")
    return Interaction("text", from_name, to_name, text=phrases[-1], label=label)
