"""Vocabularies (classes with synonyms and a thing/stuff flag) and a cache of their CLIP text embeddings.

Text syntax for `Vocabulary.from_text`: classes separated by commas or new lines; a class may list
synonyms after a colon, separated by `|`, and is marked as stuff (amorphous region, merged per
class in panoptic output) by a trailing `(stuff)`:

    "cat, dog:puppy|doggy, grass (stuff), sky:clouds (stuff)"
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from odise_core.modeling.clip import ClipModel

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
_STUFF_SUFFIX = re.compile(r"\s*\((stuff|thing)\)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class VocabClass:
    """One class: display name, synonyms used as text prompts (name first), thing or stuff, and
    whether it counts as seen in ODISE's COCO training (base: CLIP weight alpha, novel: beta).

    `is_base=None` decides by the reference's rule, `seen_in_coco_training(synonyms)`; callers with
    their own rule (the backend's case-insensitive one) pass the flag."""

    name: str
    synonyms: tuple[str, ...] = field(default=())
    is_thing: bool = True
    is_base: bool | None = None

    def __post_init__(self) -> None:
        name = self.name.strip()
        if not name:
            raise ValueError("class names must not be empty")
        syns = tuple(dict.fromkeys(s.strip() for s in (name, *self.synonyms) if s.strip()))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "synonyms", syns)
        if self.is_base is None:
            object.__setattr__(self, "is_base", seen_in_coco_training(syns))


class Vocabulary:
    """An ordered list of classes; class index i is the model's output class i."""

    def __init__(self, classes: Sequence[VocabClass]) -> None:
        if not classes:
            raise ValueError("a vocabulary needs at least one class")
        names = [c.name for c in classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate class names: {duplicates}")
        self.classes: tuple[VocabClass, ...] = tuple(classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[VocabClass]:
        return iter(self.classes)

    def __getitem__(self, index: int) -> VocabClass:
        return self.classes[index]

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} classes: {', '.join(self.names[:5])}{', ...' if len(self) > 5 else ''})"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def is_thing(self) -> torch.Tensor:
        """(K,) bool: True for things, False for stuff."""
        return torch.tensor([c.is_thing for c in self.classes], dtype=torch.bool)

    @property
    def is_base(self) -> torch.Tensor:
        """(K,) bool: True for classes counted as seen in ODISE's COCO training (ensemble weight alpha)."""
        return torch.tensor([bool(c.is_base) for c in self.classes], dtype=torch.bool)

    def synonyms_flat(self) -> tuple[list[str], torch.Tensor]:
        """All synonyms in class order and the (S,) class index of each."""
        texts = [s for c in self.classes for s in c.synonyms]
        owner = [i for i, c in enumerate(self.classes) for _ in c.synonyms]
        return texts, torch.tensor(owner, dtype=torch.long)

    def fingerprint(self) -> str:
        """Stable hash of names, synonyms, thing and base flags."""
        payload = json.dumps([[c.name, list(c.synonyms), c.is_thing, c.is_base] for c in self.classes])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def from_names(cls, names: Sequence[str], is_thing: Sequence[bool] | None = None) -> "Vocabulary":
        flags = list(is_thing) if is_thing is not None else [True] * len(names)
        if len(flags) != len(names):
            raise ValueError("is_thing must have one flag per name")
        return cls([VocabClass(n, (), t) for n, t in zip(names, flags)])

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        """Parse the syntax in the module docstring."""
        classes = []
        for item in re.split(r"[,\n]", text):
            item = item.strip()
            if not item:
                continue
            is_thing = True
            match = _STUFF_SUFFIX.search(item)
            if match:
                is_thing = match.group(1).lower() == "thing"
                item = item[: match.start()]
            name, _, syns = item.partition(":")
            classes.append(VocabClass(name, tuple(s for s in syns.split("|")), is_thing))
        return cls(classes)

    @classmethod
    def coco_panoptic(cls) -> "Vocabulary":
        """COCO panoptic 133 classes (80 things, 53 stuff) with the reference's synonyms."""
        return cls(_bundled("coco_panoptic_133.tsv"))

    @classmethod
    def ade20k_150(cls) -> "Vocabulary":
        """ADE20K 150 classes (100 things, 50 stuff) with the reference's synonyms."""
        return cls(_bundled("ade20k_150.tsv"))


def _parse_list(text: str) -> list[VocabClass]:
    classes = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kind, _, names = line.partition("\t")
        if kind not in ("thing", "stuff") or not names.strip():
            raise ValueError(f"line {line_no}: expected 'thing|stuff<TAB>name,synonyms', got {line!r}")
        syns = [s for s in names.split(",") if s.strip()]
        classes.append(VocabClass(syns[0], tuple(syns[1:]), kind == "thing"))
    return classes


@lru_cache(maxsize=None)
def _bundled(name: str) -> tuple[VocabClass, ...]:
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    return tuple(_parse_list(text))


@lru_cache(maxsize=1)
def _coco_training_labels() -> frozenset[str]:
    """ODISE's COCO panoptic training labels (prompt-engineered synonyms), as the reference spells them."""
    lines = (DATA_DIR / "coco_panoptic_133.tsv").read_text(encoding="utf-8").splitlines()
    rows = [line.partition("\t")[2] for line in lines if line.strip() and not line.startswith("#")]
    return frozenset(s.strip() for row in rows for s in row.split(",") if s.strip())


def seen_in_coco_training(synonyms: Sequence[str], case_sensitive: bool = True) -> bool:
    """Whether any synonym is one of ODISE's COCO training labels.

    The reference compares exact strings ("Person" and "TV" are novel); `case_sensitive=False` ignores
    case, for label sets that capitalise COCO names."""
    labels = _coco_training_labels()
    if case_sensitive:
        return any(s in labels for s in synonyms)
    lowered = {label.lower() for label in labels}
    return any(s.lower() in lowered for s in synonyms)


class TextEmbeddingCache:
    """Raw (unnormalised) CLIP text embeddings, cached in memory and on disk by model key, prompt and texts.

    Raw, because the category head projects the raw embeddings (as the reference does); consumers that
    need cosine similarities normalise themselves."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0  # served from memory
        self.disk_hits = 0  # loaded from disk
        self.misses = 0  # computed with CLIP

    @staticmethod
    def key(model_key: str, prompt: str, texts: Sequence[str]) -> str:
        payload = json.dumps(["raw", model_key, prompt, list(texts)])
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get(self, clip: "ClipModel", model_key: str, prompt: str, texts: list[str]) -> torch.Tensor:
        """(N,D) embeddings of `prompt.format(t)` for each text, computed once per (model, prompt, texts)."""
        key = self.key(model_key, prompt, texts)
        device = clip.mean.device
        if key in self._memory:
            self.hits += 1
            return self._memory[key].to(device)
        path = self.cache_dir / f"{key}.pt" if self.cache_dir is not None else None
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable in training too
            if path is not None and path.is_file():
                embeds = torch.load(path, map_location="cpu", weights_only=True)
                self.disk_hits += 1
            else:
                embeds = clip.encode_text([prompt.format(t) for t in texts], normalize=False).float().cpu()
                self.misses += 1
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    torch.save(embeds, tmp)
                    tmp.replace(path)
        self._memory[key] = embeds
        return embeds.to(device)
