"""The command-line flags shared by the `odise-ls` commands; BackendSettings.resolve puts their values over
the environment (each flag's help names its variable and default)."""
from __future__ import annotations

import argparse
import dataclasses

from backend.settings import (DEFAULT_FEATURE_CACHE_MB, DEFAULT_MODEL_DIR, FEATURE_CACHE_DTYPES, FINETUNE_ENV, POLICY_ENV,
                              TrainPolicy)
from odise_core.training.finetune import FinetuneOptions


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds a model; unset flags fall back to the environment."""
    p.add_argument("--preset", help="model preset: odise-label-coco, odise-caption-coco or tiny "
                                    "(env PRESET, default odise-label-coco)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (env DEVICE, default auto)")
    p.add_argument("--weights-dir", help="where weights are looked up and cached (env ODISE_WEIGHTS_DIR)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16/fp16 autocast on CUDA, frozen SD networks in bf16 on CPUs with native bf16; "
                        "bf16: SD in bf16 on any CPU; fp32: float32 everywhere (env PRECISION, default auto)")
    p.add_argument("--fast", action="store_true", default=None,
                   help="process at the window size (512 shortest edge): 1 crop instead of 4 (env FAST=1)")
    add_feature_cache_flags(p)


def add_feature_cache_flags(p: argparse.ArgumentParser) -> None:
    """--feature-cache-mb / -dtype / -dir (env FEATURE_CACHE_MB / _DTYPE / _DIR): the backbone feature cache."""
    p.add_argument("--feature-cache-mb", type=float,
                   help=f"disk for cached backbone features, least recently used dropped first; 0 disables "
                        f"(env FEATURE_CACHE_MB, default {DEFAULT_FEATURE_CACHE_MB:g})")
    p.add_argument("--feature-cache-dtype", choices=FEATURE_CACHE_DTYPES,
                   help="storage of cached features: fp16, bf16 or fp32 (exact) (env FEATURE_CACHE_DTYPE, default fp16)")
    p.add_argument("--feature-cache-dir", help="where cached features live (env FEATURE_CACHE_DIR, "
                                               "default MODEL_DIR/feature_cache)")


def add_model_dir_flag(p: argparse.ArgumentParser, what: str = "fine-tuned model versions") -> None:
    """--model-dir (env MODEL_DIR): where fine-tuned versions live."""
    p.add_argument("--model-dir", help=f"{what} (env MODEL_DIR, default {DEFAULT_MODEL_DIR})")


# flag, attribute (of TrainPolicy or FinetuneOptions, see POLICY_ENV / FINETUNE_ENV), type, meaning
_FINETUNE_FLAGS = (("--steps", "steps", int, "fine-tune optimizer steps"),
                   ("--lr", "lr", float, "fine-tune AdamW learning rate"),
                   ("--batch-size", "batch_size", int, "fine-tune images per step"),
                   ("--views", "views_per_image", int, "augmented views per image (their features are cached)"),
                   ("--points", "num_points", int, "points sampled per mask in the matcher and mask losses"),
                   ("--holdout", "holdout_fraction", float, "share of annotated tasks held out to judge the result"))
_WEBHOOK_FLAGS = (("--min-annotations", "min_annotations", int, "usable annotated tasks an annotation webhook "
                                                                 "needs to start a fine-tune"),
                  ("--debounce", "debounce_seconds", float, "seconds without annotation events before it starts"))


def add_training_flags(p: argparse.ArgumentParser, webhooks: bool = False) -> None:
    """Fine-tune options (train, serve); with `webhooks` also when annotation events start one (serve)."""
    defaults = {**dataclasses.asdict(TrainPolicy()), **dataclasses.asdict(FinetuneOptions())}
    envs = {**POLICY_ENV, **FINETUNE_ENV}
    for flag, attr, kind, meaning in _FINETUNE_FLAGS + (_WEBHOOK_FLAGS if webhooks else ()):
        p.add_argument(flag, dest=attr, type=kind, metavar=kind.__name__.upper(),
                       help=f"{meaning} (env {envs[attr]}, default {defaults[attr]:g})")
    if webhooks:
        p.add_argument("--train-on-annotation", dest="on_annotation", action=argparse.BooleanOptionalAction,
                       help="annotation webhooks start fine-tunes; Start Training always does "
                            "(env ODISE_TRAIN_ON_ANNOTATION, default true)")
