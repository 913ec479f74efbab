"""The model each project is served with: its promoted fine-tune loaded into a copy of the base model.

A fine-tuned version is served only under the architecture it was trained under: its config.json
is compared with the serving model's configuration, and a version from another architecture is
refused with VersionIncompatible (naming what differs) instead of failing on tensor shapes.
Serving-time settings (precision, fast window, thresholds, weight sources) may differ.
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Callable

from backend.learning.store import VersionStore
from odise_core.predictor import ODISEPredictor

log = logging.getLogger(__name__)

SHARED_SUBMODULES = ("backbone", "clip", "text_cache")
# Configuration fields that change how a model is run, not the weights it has.
SERVING_FIELDS = ("name", "precision", "seed", "checkpoint", "weights_dir", "offline", "diffusion.pretrained",
                  "clip.pretrained", "backbone.min_size", "backbone.max_size", "head.object_mask_threshold",
                  "head.overlap_threshold", "head.mask_threshold", "head.max_instances")


class VersionIncompatible(ValueError):
    """A stored version was trained under a model architecture other than the serving one."""


def copy_sharing_frozen(model: Any) -> Any:
    """Copy of `model` (a network, or a predictor over one) whose trainable parts are independent and
    whose frozen parts are shared.

    The backbone (SD + captioner), CLIP, the text-embedding cache, the predictor's feature cache and
    every frozen parameter/buffer are the same objects as in `model`, so a copy costs only the memory of the heads: used for
    fine-tune candidates and for serving a project's fine-tuned version beside the base model.
    """
    if isinstance(model, ODISEPredictor):
        return ODISEPredictor(copy_sharing_frozen(model.model), feature_cache=model.feature_cache)
    memo: dict[int, Any] = {}
    frozen_prefixes = tuple(getattr(model, "FROZEN_PREFIXES", ()))
    for name in SHARED_SUBMODULES:
        if hasattr(model, name):
            memo[id(getattr(model, name))] = getattr(model, name)
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(frozen_prefixes):
            memo[id(p)] = p
    for name, b in model.named_buffers():
        if name.startswith(frozen_prefixes):
            memo[id(b)] = b
    return copy.deepcopy(model, memo)


def model_config(model: Any) -> dict[str, Any]:
    """The full configuration `model` was built from, as a JSON-ready dict (ModelConfig.to_dict)."""
    return model.cfg.to_dict()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in ("diffusion.unet", "diffusion.vae", "clip.custom"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def architecture_differences(trained: dict[str, Any], serving: dict[str, Any]) -> list[str]:
    """Configuration fields (outside SERVING_FIELDS) whose values differ, as "field: trained vs serving"."""
    a, b = _flatten(trained), _flatten(serving)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in SERVING_FIELDS and a.get(k) != b.get(k)]


def load_version(model: Any, store: VersionStore, project: str | int, version: str) -> None:
    """Load `version`'s trainable weights and trained class names into `model`.

    Raises VersionIncompatible when the version was trained under another architecture.
    """
    stored = store.config(project, version)
    if stored is not None:
        trained = type(model.cfg).from_dict(stored).to_dict()  # rebuilt exactly, defaults for newer fields
        serving = model_config(model)
        differences = architecture_differences(trained, serving)
        if differences:
            raise VersionIncompatible(
                f"project {project} version {version} was trained under model {trained.get('name')!r} and cannot "
                f"be served by {serving.get('name')!r}: {'; '.join(differences[:6])}"
                f"{' ...' if len(differences) > 6 else ''} (trained vs serving). Serve it with the preset it was "
                f"trained under, or roll back with `odise-ls models {project} --rollback`.")
    model.load_trainable_state_dict(store.load_state_dict(project, version))
    model.trained_classes = set(store.metadata(project, version).get("trained_classes") or ())


class ServingModels:
    """Per project, (version, model): the promoted fine-tune in a frozen-sharing copy, else the base.

    `base()` returns the base model (it may raise while the model is still loading). Copies are
    cached per project and rebuilt when the project's promoted version changes.
    """

    def __init__(self, store: VersionStore, base: Callable[[], Any]):
        self.store = store
        self.base = base
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[str, Any]] = {}

    def get(self, project: str | int | None) -> tuple[str | None, Any]:
        """(stored version or None for the base model, model) serving `project` now."""
        base = self.base()
        version = self.store.current(project) if project else None
        if version is None:
            return None, base
        key = str(project)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None or cached[0] != version:
            model = copy_sharing_frozen(base)
            load_version(model, self.store, key, version)  # a copy of the eval-mode base: eval mode too
            cached = (version, model)
            with self._lock:
                self._cache[key] = cached
        return cached

    def forget(self, project: str | int) -> None:
        """Drop the cached copy of `project` (after a promotion)."""
        with self._lock:
            self._cache.pop(str(project), None)
