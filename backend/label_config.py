"""A project's label config -> what to predict: per image, a vocabulary and the control tags to fill.

Supported control tags: PolygonLabels (polygons), BrushLabels (RLE masks) and RectangleLabels
(boxes around masks), each attached to an <Image>. Attributes read on <Label>:

- ``predicted_values="man,woman,person"``: extra names (synonyms) the model looks for; the
  label's ``value`` is always one of them.
- ``hint="..."``: Label Studio's tooltip; also used as comma-separated synonyms.
- ``category="stuff"`` (or ``"thing"``, the default): stuff classes (sky, grass, road) are merged
  into one region per class; things (person, car) get one region per instance.
- ``ignore="true"``: the label stays available to annotators but the model never predicts it.

Other control tags (Choices, TextArea, KeyPointLabels, ...) are left alone, and so is a control
with ``smartOnly="true"``: it is an interactive prompt tool (backend/interactive.py), not an
output. A config with nothing to predict raises LabelConfigError, which /setup reports to Label Studio.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from label_studio_sdk.label_interface import LabelInterface

from odise_core.vocabulary import VocabClass, Vocabulary, seen_in_coco_training

log = logging.getLogger(__name__)

KINDS = {"PolygonLabels": "polygon", "BrushLabels": "brush", "RectangleLabels": "rectangle"}
TAG_OF_KIND = {kind: tag for tag, kind in KINDS.items()}
# Geometry-only tags that need a separate <Labels>; we ask for the combined tag instead.
_UNLABELED = {"Polygon": "PolygonLabels", "Brush": "BrushLabels", "Rectangle": "RectangleLabels"}
_TRUE = {"true", "1", "yes"}


class LabelConfigError(ValueError):
    """The label config cannot be predicted for; the message says what to change."""


def label_vocab_class(name: str, synonyms: tuple[str, ...] = (), is_thing: bool = True) -> VocabClass:
    """A class for a Label Studio label, counted as seen in COCO training (base) ignoring case: Label
    Studio labels are usually capitalised ("Person", "Dining Table"), which the reference's exact
    match would count as novel."""
    return VocabClass(name=name, synonyms=synonyms, is_thing=is_thing,
                      is_base=seen_in_coco_training((name, *synonyms), case_sensitive=False))


@dataclass(frozen=True)
class LabelSpec:
    """One <Label>: its value in results and the names the model searches for."""

    value: str
    synonyms: tuple[str, ...]
    is_thing: bool = True

    def vocab_class(self) -> VocabClass:
        return label_vocab_class(self.value, self.synonyms, self.is_thing)


@dataclass(frozen=True)
class ControlSpec:
    """One supported control tag and its predictable labels."""

    name: str
    tag: str  # PolygonLabels | BrushLabels | RectangleLabels
    to_name: str
    labels: tuple[LabelSpec, ...]
    ignored: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return KINDS[self.tag]


@dataclass
class ImageTarget:
    """One <Image> of the config: the vocabulary predicted on it and which controls receive which class.

    `label_of[c][k]` is the label value control `controls[c]` gets for vocabulary class k (absent when
    that control does not have the class).
    """

    to_name: str
    data_key: str
    vocabulary: Vocabulary
    controls: list[ControlSpec]
    label_of: list[dict[int, str]] = field(default_factory=list)


@dataclass
class ProjectConfig:
    """The parsed config: the images to predict, with their controls and vocabularies."""

    targets: list[ImageTarget]

    @property
    def controls(self) -> list[ControlSpec]:
        return [c for t in self.targets for c in t.controls]


def _split_names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _label_spec(control_name: str, value: str, attr: dict[str, str]) -> LabelSpec:
    names = [value] + _split_names(attr.get("predicted_values")) + _split_names(attr.get("hint"))
    synonyms = tuple(dict.fromkeys(names))
    category = (attr.get("category") or "thing").strip().lower()
    if category not in ("thing", "stuff"):
        raise LabelConfigError(
            f'<Label value="{value}"> in "{control_name}": category must be "thing" or "stuff", got "{category}"')
    return LabelSpec(value=value, synonyms=synonyms, is_thing=category == "thing")


def parse_label_config(xml: str) -> ProjectConfig:
    """Parse a Label Studio label config; raises LabelConfigError when nothing in it can be predicted."""
    if not xml or not xml.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as e:  # the SDK raises lxml, KeyError or its own errors on broken configs
        raise LabelConfigError(f"the label config cannot be parsed: {e}") from e

    images = {o.name: o for o in interface.objects if o.tag == "Image"}
    controls: list[ControlSpec] = []
    skipped: list[str] = []
    for ctrl in interface.controls:
        if (ctrl.attr.get("smartOnly") or "").strip().lower() in _TRUE:
            skipped.append(f'<{ctrl.tag} name="{ctrl.name}"> (smartOnly: an interactive prompt tool)')
            continue
        if ctrl.tag not in KINDS:
            if ctrl.tag in _UNLABELED:
                skipped.append(f"<{ctrl.tag} name=\"{ctrl.name}\"> (use <{_UNLABELED[ctrl.tag]}> instead)")
            elif ctrl.tag != "Labels":
                skipped.append(f"<{ctrl.tag} name=\"{ctrl.name}\">")
            continue
        targets = [n for n in ctrl.to_name if n in images]
        if len(targets) != 1:
            raise LabelConfigError(f'<{ctrl.tag} name="{ctrl.name}"> must point toName at exactly one <Image>, '
                                   f"got toName={','.join(ctrl.to_name)}")
        labels, ignored = [], []
        for value, label in ctrl.labels_attrs.items():
            if (label.attr.get("ignore") or "").strip().lower() in _TRUE:
                ignored.append(value)
                continue
            labels.append(_label_spec(ctrl.name, value, label.attr))
        if not labels:
            raise LabelConfigError(f'<{ctrl.tag} name="{ctrl.name}"> has no label the model may predict '
                                   "(add <Label value=...> children without ignore=\"true\")")
        controls.append(ControlSpec(ctrl.name, ctrl.tag, targets[0], tuple(labels), tuple(ignored)))
    if skipped:
        log.info("label config: not predicted: %s", ", ".join(skipped))
    if not controls:
        found = ", ".join(skipped) or "no control tags"
        raise LabelConfigError("the label config has no PolygonLabels, BrushLabels or RectangleLabels tag attached "
                               f"to an <Image>; found: {found}")

    targets: list[ImageTarget] = []
    for to_name in dict.fromkeys(c.to_name for c in controls):
        image = images[to_name]
        if image.attr.get("valueList"):
            raise LabelConfigError(f'<Image name="{to_name}"> uses valueList (several images in one tag), '
                                   "which this backend does not support: use one <Image> per image")
        value = image.attr.get("value") or ""
        if not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(f'<Image name="{to_name}"> must take its URL from task data, e.g. value="$image"')
        targets.append(_image_target(to_name, value[1:], [c for c in controls if c.to_name == to_name]))
    return ProjectConfig(targets=targets)


def _image_target(to_name: str, data_key: str, controls: list[ControlSpec]) -> ImageTarget:
    """Union vocabulary of the controls on one image; a label shared by two controls is predicted once
    (with the union of its synonyms)."""
    classes: list[LabelSpec] = []
    index: dict[str, int] = {}
    label_of: list[dict[int, str]] = []
    for ctrl in controls:
        mapping: dict[int, str] = {}
        for spec in ctrl.labels:
            k = index.get(spec.value)
            if k is None:
                k = index[spec.value] = len(classes)
                classes.append(spec)
            elif classes[k].is_thing != spec.is_thing:
                raise LabelConfigError(f'label "{spec.value}" is a thing in one control tag and stuff in another on '
                                       f'<Image name="{to_name}">: give it the same category')
            else:
                merged = tuple(dict.fromkeys(classes[k].synonyms + spec.synonyms))
                classes[k] = LabelSpec(spec.value, merged, spec.is_thing)
            mapping[k] = spec.value
        label_of.append(mapping)
    vocab = Vocabulary([s.vocab_class() for s in classes])
    return ImageTarget(to_name=to_name, data_key=data_key, vocabulary=vocab, controls=controls, label_of=label_of)


# --------------------------------------------------------------------------- writing configs
_PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
            "#808000", "#ffd8b1", "#000075", "#808080")


def make_label_config(vocabulary: Vocabulary, kind: str = "polygon", image_key: str = "image") -> str:
    """A ready-to-paste label config predicting `vocabulary` with one control of `kind` on one image."""
    if kind not in TAG_OF_KIND:
        raise ValueError(f"kind must be one of {', '.join(TAG_OF_KIND)}, got {kind!r}")
    tag = TAG_OF_KIND[kind]
    extra = {"polygon": ' strokeWidth="2" pointSize="small" opacity="0.4"',
             "brush": ' opacity="0.5"', "rectangle": ' strokeWidth="2"'}[kind]
    lines = ["<View>", f'  <Image name="{image_key}" value="${image_key}" zoom="true" zoomControl="true"/>',
             f'  <{tag} name="label" toName="{image_key}"{extra}>']
    for i, cls in enumerate(vocabulary.classes):
        others = [s for s in cls.synonyms if s != cls.name]
        attrs = f"value={quoteattr(cls.name)}"
        if others:
            attrs += f" predicted_values={quoteattr(','.join(others))}"
        if not cls.is_thing:
            attrs += ' category="stuff"'
        attrs += f' background="{_PALETTE[i % len(_PALETTE)]}"'
        lines.append(f"    <Label {attrs}/>")
    lines += [f"  </{tag}>", "</View>"]
    return "\n".join(lines) + "\n"
