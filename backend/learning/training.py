"""How a job trains its candidate: odise_core's fine-tune with the options it is given.

The options (steps, learning rate, batch size, views, points) are resolved by backend.settings
(flags and ODISE_TRAIN_* variables) and bound by whoever builds the JobManager.
"""
from __future__ import annotations

from typing import Any, ContextManager

from backend.learning.jobs import Job
from backend.training_data import TrainingData
from odise_core.training.finetune import FinetuneOptions, finetune


def run_finetune(model: Any, data: TrainingData, vocab: Any, job: Job, feature_lock: ContextManager,
                 options: FinetuneOptions | None = None) -> Any:
    """Fine-tune `model` (a predictor: its network is trained) on the job's training samples, reporting
    progress into `job`.

    `feature_lock` is held around each pass through the backbone the serving model shares; view
    features go to the predictor's feature cache (odise_core/feature_cache.py) when it has one.
    """
    from odise_core.predictor import ODISEPredictor

    def progress(step: int, total: int, loss: float) -> None:
        job.step, job.total_steps, job.loss = int(step), int(total), float(loss)

    opts = options if options is not None else FinetuneOptions()
    job.total_steps = opts.steps
    network, cache = (model.model, model.feature_cache) if isinstance(model, ODISEPredictor) else (model, None)
    return finetune(network, data.train, opts, progress=progress, should_stop=lambda: job.stop_requested,
                    vocab=vocab, feature_cache=cache, feature_lock=feature_lock)
