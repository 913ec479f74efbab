"""Flags > environment > preset defaults, resolved once; the one function that builds the model.

Every command that builds a model (serve, predict, prelabel, train, rank, evaluate) and the
benchmarks go through `BackendSettings.resolve` and `build_model`, so a flag or variable that
works for one works for all. Nothing here writes `os.environ`: weight locations reach the
loaders as fields of the model configuration.

| env var | flag | default | meaning |
|---|---|---|---|
| PRESET | --preset | odise-label-coco | model preset (odise-label-coco, odise-caption-coco, tiny) |
| DEVICE | --device | auto | cpu, cuda, cuda:N, mps or auto |
| FAST | --fast | false | process at the window size (one crop instead of four) |
| PRECISION | --precision | auto | auto, bf16 or fp32 (see odise_core precision_plan) |
| ODISE_WEIGHTS_DIR | --weights-dir | ~/.cache/odise-label-studio | SD / CLIP / ODISE weights and caches |
| ODISE_SD_WEIGHTS / ODISE_CLIP_WEIGHTS / ODISE_CHECKPOINT | | preset | weight sources |
| ODISE_OFFLINE | | false | never touch the network (HF_HUB_OFFLINE is read by the hub library) |
| MODEL_DIR | --model-dir | ~/.cache/odise-label-studio/backend | fine-tuned versions per project |
| LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY | --label-studio-url / --api-key | from /setup | Label Studio |
| PREDICTION_MODE | (predict: --mode) | panoptic | panoptic, instance or semantic |
| OVERLAP_THRESHOLD | | 0.8 | panoptic: share of a query's mask it must win to become a region |
| POLYGON_TOLERANCE, MAX_POINTS, MIN_AREA, SCORE_THRESHOLD, KEEP_HOLES | | 1.0, 500, 64, 0.0, true | result shaping |
| IMAGE_TIMEOUT, MAX_IMAGE_MB, ALLOW_LOCAL_PATHS | | 30, 50, true | image fetching |
| INTERACTIVE_CACHE_MB | | 512 | memory kept for interactive answers (per-task query states, LRU) |
| WEBHOOK_SECRET | | unset | with basic auth: lets Label Studio's webhooks into /webhook by X-Webhook-Secret or ?secret= |
| MAX_REQUEST_MB | | 100 | largest request body; a larger one is answered 413 before it is read |
| FEATURE_CACHE_MB | --feature-cache-mb | 16384 | disk for cached backbone features (0 disables), LRU |
| FEATURE_CACHE_DTYPE | --feature-cache-dtype | fp16 | storage of cached features: fp16, bf16 or fp32 (exact) |
| FEATURE_CACHE_DIR | --feature-cache-dir | MODEL_DIR/feature_cache | where cached features live |
| HOST / PORT | --host / --port (serve) | 127.0.0.1 / 9090 | where the server listens |
| BASIC_AUTH_USER / BASIC_AUTH_PASS | | unset | basic auth on every endpoint but /health (both or neither) |
| LOCAL_FILES_DOCUMENT_ROOT | --document-root (prelabel) | the folder's parent | local-files root of folder mode |
| ODISE_TRAIN_ON_ANNOTATION, _MIN_ANNOTATIONS, _DEBOUNCE | --[no-]train-on-annotation, --min-annotations, --debounce (serve) | true, 8, 30 | TrainPolicy: when webhooks fine-tune |
| ODISE_HOLDOUT_FRACTION | --holdout (serve, train) | 0.2 | TrainPolicy: share held out to judge a fine-tune |
| ODISE_TRAIN_STEPS, _LR, _BATCH, _VIEWS, _POINTS | --steps, --lr, --batch-size, --views, --points (serve, train) | FinetuneOptions | fine-tune options |
| REFRESH_ON_PROMOTE | (serve) --refresh-on-promote | auto | re-predict a project's tasks after a promotion: auto (when Label Studio URL and key are known), true, false |
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from backend.ls_format import ResultOptions
from odise_core.training.finetune import FinetuneOptions

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "odise-label-studio" / "backend"
# 16 GB: ~120 3:2 photos at 1024 on the full preset in fp16 (134 MB each), ~490 with --fast (README).
DEFAULT_FEATURE_CACHE_MB = 16384.0
FEATURE_CACHE_DTYPES = ("fp16", "bf16", "fp32")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
REFRESH_CHOICES = ("auto", "true", "false")


class SettingsError(ValueError):
    """A flag or environment variable has a value that cannot be used; the message names it."""


def parse_bool(value: str, name: str = "value") -> bool:
    """The one yes/no parser: 1/true/yes/on and 0/false/no/off (any case); anything else is an error."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name}={value!r} is not a yes/no value: use one of {', '.join(TRUE_WORDS + FALSE_WORDS[:-1])}")


def env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no environment variable; `default` when unset."""
    value = environ.get(name)
    return default if value is None else parse_bool(value, name)


def _env_number(environ: Mapping[str, str], name: str, kind: type, default: Any) -> Any:
    value = environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}") from None


@dataclass
class TrainPolicy:
    """When the server fine-tunes a project (the rule itself: backend.learning.policy)."""

    on_annotation: bool = True  # annotation webhooks ask for a fine-tune (START_TRAINING always does)
    min_annotations: int = 8  # usable annotated tasks a webhook fine-tune needs
    debounce_seconds: float = 30.0  # quiet time after the last annotation event before it starts
    holdout_fraction: float = 0.2  # share of annotated tasks held out to judge the candidate


# attribute of TrainPolicy / FinetuneOptions -> its environment variable; a flag of the same dest overrides it
POLICY_ENV = {"on_annotation": "ODISE_TRAIN_ON_ANNOTATION", "min_annotations": "ODISE_TRAIN_MIN_ANNOTATIONS",
              "debounce_seconds": "ODISE_TRAIN_DEBOUNCE", "holdout_fraction": "ODISE_HOLDOUT_FRACTION"}
FINETUNE_ENV = {"steps": "ODISE_TRAIN_STEPS", "lr": "ODISE_TRAIN_LR", "batch_size": "ODISE_TRAIN_BATCH",
                "views_per_image": "ODISE_TRAIN_VIEWS", "num_points": "ODISE_TRAIN_POINTS"}


def _env_fields(obj: Any, env: Mapping[str, str], names: Mapping[str, str], flags: Mapping[str, Any]) -> Any:
    """A copy of dataclass `obj` with each attribute in `names` from its variable, then from `flags` (not None)."""
    values = {}
    for attr, var in names.items():
        default = getattr(obj, attr)
        kind = type(default)
        values[attr] = env_bool(env, var, default) if kind is bool else _env_number(env, var, kind, default)
    values.update({k: v for k, v in flags.items() if k in names and v is not None})
    return dataclasses.replace(obj, **values)


@dataclass
class BackendSettings:
    """Everything that shapes the model and its results, plus where the backend finds its inputs."""

    preset: str = "odise-label-coco"
    device: str = "auto"
    fast: bool = False
    precision: str = "auto"
    overlap_threshold: float = 0.8
    weights_dir: Path | None = None  # None: odise_core's default cache directory
    sd_weights: str | None = None  # None: the preset's source
    clip_weights: str | None = None
    checkpoint: str | None = None
    offline: bool = False
    random_weights: bool = False  # no variable: benchmarks (cost does not depend on weight values) and tests
    min_size: int | None = None  # no variable: shortest image edge processed; None: the preset's (FAST: its window)
    model_dir: Path = DEFAULT_MODEL_DIR
    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # repr-free: settings are logged and sent to Ray workers
    mode: str = "panoptic"
    result: ResultOptions = field(default_factory=ResultOptions)
    image_timeout: float = 30.0
    max_image_mb: float = 50.0
    allow_local_paths: bool = True
    interactive_cache_mb: float = 512.0
    webhook_secret: str | None = field(default=None, repr=False)
    max_request_mb: float = 100.0
    feature_cache_mb: float = DEFAULT_FEATURE_CACHE_MB
    feature_cache_dtype: str = "fp16"
    feature_cache_dir: Path | None = None  # None: model_dir / "feature_cache"
    host: str = "127.0.0.1"
    port: int = 9090
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    document_root: Path | None = None  # prelabel folder mode; None: the folder's parent
    policy: TrainPolicy = field(default_factory=TrainPolicy)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    refresh_on_promote: str = "auto"  # auto | true | false: see refresh_enabled

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "BackendSettings":
        """Environment over defaults, then every override that is not None over both.

        Overrides name fields of the settings, of TrainPolicy (POLICY_ENV) or of FinetuneOptions (FINETUNE_ENV).
        """
        env = os.environ if environ is None else environ
        d = cls()
        result = ResultOptions(
            tolerance=_env_number(env, "POLYGON_TOLERANCE", float, d.result.tolerance),
            max_points=_env_number(env, "MAX_POINTS", int, d.result.max_points),
            min_area=_env_number(env, "MIN_AREA", int, d.result.min_area),
            score_threshold=_env_number(env, "SCORE_THRESHOLD", float, d.result.score_threshold),
            keep_holes=env_bool(env, "KEEP_HOLES", d.result.keep_holes),
        )
        weights_dir = env.get("ODISE_WEIGHTS_DIR")
        document_root = env.get("LOCAL_FILES_DOCUMENT_ROOT")
        settings = cls(
            preset=env.get("PRESET") or d.preset,
            device=env.get("DEVICE") or d.device,
            fast=env_bool(env, "FAST", d.fast),
            precision=env.get("PRECISION") or d.precision,
            overlap_threshold=_env_number(env, "OVERLAP_THRESHOLD", float, d.overlap_threshold),
            weights_dir=Path(weights_dir) if weights_dir else None,
            sd_weights=env.get("ODISE_SD_WEIGHTS") or None,
            clip_weights=env.get("ODISE_CLIP_WEIGHTS") or None,
            checkpoint=env.get("ODISE_CHECKPOINT") or None,
            offline=env_bool(env, "ODISE_OFFLINE", d.offline),
            model_dir=Path(env["MODEL_DIR"]) if env.get("MODEL_DIR") else d.model_dir,
            label_studio_url=env.get("LABEL_STUDIO_URL") or env.get("LABEL_STUDIO_HOST") or None,
            api_key=env.get("LABEL_STUDIO_API_KEY") or env.get("LABEL_STUDIO_ACCESS_TOKEN") or None,
            mode=env.get("PREDICTION_MODE") or d.mode,
            result=result,
            image_timeout=_env_number(env, "IMAGE_TIMEOUT", float, d.image_timeout),
            max_image_mb=_env_number(env, "MAX_IMAGE_MB", float, d.max_image_mb),
            allow_local_paths=env_bool(env, "ALLOW_LOCAL_PATHS", d.allow_local_paths),
            interactive_cache_mb=_env_number(env, "INTERACTIVE_CACHE_MB", float, d.interactive_cache_mb),
            webhook_secret=env.get("WEBHOOK_SECRET") or None,
            max_request_mb=_env_number(env, "MAX_REQUEST_MB", float, d.max_request_mb),
            feature_cache_mb=_env_number(env, "FEATURE_CACHE_MB", float, d.feature_cache_mb),
            feature_cache_dtype=env.get("FEATURE_CACHE_DTYPE") or d.feature_cache_dtype,
            feature_cache_dir=Path(env["FEATURE_CACHE_DIR"]) if env.get("FEATURE_CACHE_DIR") else None,
            host=env.get("HOST") or d.host,
            port=_env_number(env, "PORT", int, d.port),
            basic_auth_user=env.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=env.get("BASIC_AUTH_PASS") or None,
            document_root=Path(document_root) if document_root else None,
            policy=_env_fields(d.policy, env, POLICY_ENV, overrides),
            finetune=_env_fields(d.finetune, env, FINETUNE_ENV, overrides),
            refresh_on_promote=_refresh_word(env.get("REFRESH_ON_PROMOTE") or d.refresh_on_promote),
        )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names - set(POLICY_ENV) - set(FINETUNE_ENV)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        for key, value in overrides.items():
            if key in names and value is not None:
                setattr(settings, key, value)
        settings.validate()
        return settings

    @classmethod
    def resolve(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "BackendSettings":
        """Settings of a command: its flags (those it has and the user gave) over `from_env`."""
        names = {f.name for f in dataclasses.fields(cls)} | set(POLICY_ENV) | set(FINETUNE_ENV)
        flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
        for key in ("weights_dir", "model_dir", "document_root", "feature_cache_dir"):
            if key in flags:
                flags[key] = Path(flags[key])
        return cls.from_env(environ, **flags)

    def validate(self) -> None:
        """Raise SettingsError for values no command could use."""
        from odise_core.postprocess import MODES
        from odise_core.predictor import PRECISIONS

        checks = (("PRECISION", self.precision, PRECISIONS), ("PREDICTION_MODE", self.mode, MODES),
                  ("FEATURE_CACHE_DTYPE", self.feature_cache_dtype, FEATURE_CACHE_DTYPES))
        for name, value, allowed in checks:
            if value not in allowed:
                raise SettingsError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        p, f = self.policy, self.finetune
        limits = (("MAX_REQUEST_MB", self.max_request_mb, self.max_request_mb > 0, "above 0"),
                  ("PORT/--port", self.port, 0 <= self.port <= 65535, "in 0..65535"),
                  ("ODISE_TRAIN_MIN_ANNOTATIONS/--min-annotations", p.min_annotations, p.min_annotations >= 0,
                   "at least 0"),
                  ("ODISE_TRAIN_DEBOUNCE/--debounce", p.debounce_seconds, p.debounce_seconds >= 0, "at least 0"),
                  ("ODISE_HOLDOUT_FRACTION/--holdout", p.holdout_fraction, 0 <= p.holdout_fraction < 1, "in [0, 1)"),
                  ("ODISE_TRAIN_STEPS/--steps", f.steps, f.steps >= 1, "at least 1"),
                  ("ODISE_TRAIN_LR/--lr", f.lr, f.lr > 0, "above 0"),
                  ("ODISE_TRAIN_BATCH/--batch-size", f.batch_size, f.batch_size >= 1, "at least 1"),
                  ("ODISE_TRAIN_VIEWS/--views", f.views_per_image, f.views_per_image >= 1, "at least 1"),
                  ("ODISE_TRAIN_POINTS/--points", f.num_points, f.num_points >= 1, "at least 1"),
                  ("FEATURE_CACHE_MB/--feature-cache-mb", self.feature_cache_mb, self.feature_cache_mb >= 0,
                   "at least 0 (0 disables it)"))
        for name, value, ok, rule in limits:
            if not ok:
                raise SettingsError(f"{name}={value:g} must be {rule}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (one alone would leave "
                                "every endpoint open)")
        self.refresh_on_promote = _refresh_word(self.refresh_on_promote)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """(user, password) every endpoint but /health asks for, or None: open."""
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user and self.basic_auth_pass else None

    def refresh_enabled(self, label_studio_known: bool) -> bool:
        """Whether a promotion starts a refresh of the project's predictions (REFRESH_ON_PROMOTE):
        "auto" when the Label Studio URL and key are known (from settings or /setup), else as set."""
        if self.refresh_on_promote == "auto":
            return label_studio_known
        return self.refresh_on_promote == "true"

    def model_config(self) -> Any:
        """The odise_core ModelConfig these settings ask for (a fresh copy of the preset, changed)."""
        from odise_core.config import get_config

        cfg = get_config(self.preset, fast=self.fast)
        cfg.head.overlap_threshold = self.overlap_threshold
        cfg.precision = self.precision
        if self.sd_weights:
            cfg.diffusion.pretrained = self.sd_weights
        if self.clip_weights:
            cfg.clip.pretrained = self.clip_weights
        if self.checkpoint:
            cfg.checkpoint = self.checkpoint
        if self.random_weights:
            cfg.diffusion.pretrained = cfg.clip.pretrained = cfg.checkpoint = None
        if self.min_size:
            cfg.backbone.min_size = self.min_size
            cfg.backbone.max_size = max(cfg.backbone.max_size, self.min_size)
        cfg.weights_dir = str(self.weights_dir) if self.weights_dir else None
        cfg.offline = self.offline
        return cfg

    def resolved_precision(self) -> str:
        """What `precision` means on this device: e.g. "sd-bf16" for auto on a CPU with native bf16."""
        from odise_core.predictor import precision_plan, resolve_device

        autocast, sd_dtype = precision_plan(self.precision, resolve_device(self.device))
        parts = ([f"autocast-{str(autocast).removeprefix('torch.')}"] if autocast is not None else []) + \
            [f"sd-{str(sd_dtype).removeprefix('torch.')}"]
        return "+".join(parts)

    def feature_cache(self) -> Any:
        """The backbone feature cache these settings ask for (odise_core FeatureCache; disabled at 0 MB)."""
        from odise_core.feature_cache import FeatureCache

        root = self.feature_cache_dir or self.model_dir / "feature_cache"
        return FeatureCache(root, max_bytes=int(self.feature_cache_mb * 2**20), storage=self.feature_cache_dtype)

    def results_digest(self) -> str:
        """Short hash of every setting that changes predictions; stable across restarts.

        The feature cache's storage dtype is in it only when the cache rounds: fp16/bf16 features are
        used as stored, first pass or not, so they change results slightly (README, Feature cache);
        an exact (fp32) or disabled cache, its size and folder change nothing."""
        shaping = {
            "preset": self.preset,
            "fast": self.fast,
            "precision": self.resolved_precision(),
            "overlap_threshold": self.overlap_threshold,
            "mode": self.mode,
            "result": dataclasses.asdict(self.result),
            **({"min_size": self.min_size} if self.min_size else {}),  # keeps earlier digests when unset
        }
        if self.feature_cache_mb > 0 and self.feature_cache_dtype != "fp32":
            shaping["feature_storage"] = self.feature_cache_dtype
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:6]


def _refresh_word(value: str) -> str:
    """REFRESH_ON_PROMOTE as "auto", "true" or "false" (any yes/no word is accepted for the last two)."""
    word = str(value).strip().lower()
    if word == "auto":
        return word
    try:
        return "true" if parse_bool(word, "REFRESH_ON_PROMOTE") else "false"
    except SettingsError:
        raise SettingsError(f"REFRESH_ON_PROMOTE={value!r} is not one of {', '.join(REFRESH_CHOICES)}") from None


def build_model(settings: BackendSettings, text_cache: Any = None, network: type | None = None) -> Any:
    """The one function that builds the model for every command and benchmark: config from `settings`, on its
    device. `text_cache` (default: on disk in the weights dir) and `network` (an ODISE subclass) are for benchmarks."""
    from odise_core.predictor import build_predictor

    return build_predictor(settings.model_config(), device=settings.device, text_cache=text_cache, network=network,
                           feature_cache=settings.feature_cache())
