"""How a job trains its candidate: odise_core's fine-tune with options from the environment.

The fine-tune's steps, learning rate, batch size, augmented views per image and points per mask
come from ODISE_TRAIN_STEPS / _LR / _BATCH / _VIEWS / _POINTS when set.
"""
from __future__ import annotations

import os
from typing import Any, ContextManager

from backend.learning.jobs import Job
from backend.training_data import TrainingData

TRAIN_ENV = {"ODISE_TRAIN_STEPS": ("steps", int), "ODISE_TRAIN_LR": ("lr", float),
             "ODISE_TRAIN_BATCH": ("batch_size", int), "ODISE_TRAIN_VIEWS": ("views_per_image", int),
             "ODISE_TRAIN_POINTS": ("num_points", int)}


def default_finetune_options() -> Any:
    """FinetuneOptions, with the fields named in TRAIN_ENV taken from those env vars when set."""
    from odise_core.training.finetune import FinetuneOptions

    opts = FinetuneOptions()
    for env, (attr, kind) in TRAIN_ENV.items():
        if os.environ.get(env):
            setattr(opts, attr, kind(os.environ[env]))
    return opts


def run_finetune(model: Any, data: TrainingData, vocab: Any, job: Job, feature_lock: ContextManager,
                 options: Any | None = None) -> Any:
    """Fine-tune `model` (a predictor: its network is trained) on the job's training samples, reporting
    progress into `job`.

    `feature_lock` is held around each pass through the backbone the serving model shares; view
    features go to the predictor's feature cache (odise_core/feature_cache.py) when it has one.
    """
    from odise_core.predictor import ODISEPredictor
    from odise_core.training.finetune import finetune

    def progress(step: int, total: int, loss: float) -> None:
        job.step, job.total_steps, job.loss = int(step), int(total), float(loss)

    opts = options if options is not None else default_finetune_options()
    job.total_steps = opts.steps
    network, cache = (model.model, model.feature_cache) if isinstance(model, ODISEPredictor) else (model, None)
    return finetune(network, data.train, opts, progress=progress, should_stop=lambda: job.stop_requested,
                    vocab=vocab, feature_cache=cache, feature_lock=feature_lock)
