"""What makes a project fine-tune, and how requests for the same round are merged into one job.

Events: START_TRAINING always asks for a fine-tune; ANNOTATION_CREATED/UPDATED ask for one when
ODISE_TRAIN_ON_ANNOTATION is true (default), after ODISE_TRAIN_DEBOUNCE seconds without a further
event (default 30), and train only with at least ODISE_TRAIN_MIN_ANNOTATIONS usable annotated tasks
(default 8). ODISE_HOLDOUT_FRACTION of the tasks (default 0.2) is held out to judge the result.

One job per round of annotations (the coalescing rule, applied per project):
- A request while the project's job has not yet started reading its data attaches to that job:
  the job will read every annotation made so far. The request gets that job's id.
- A request while the job is reading data or training queues ONE follow-up job (later requests
  attach to it); a debounced annotation request whose last event came before the running job
  started reading its data attaches to the running job instead, as that job already has them.
- A job asked for by Label Studio (webhook or Start Training) that finds exactly the annotations
  the project's latest fine-tune was trained on ends as "skipped" naming that job: identical data
  never trains twice. `odise-ls train` always trains.
- Running jobs are never cancelled by newer requests (only by shutdown).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from backend.settings import env_bool

START_TRAINING = "START_TRAINING"
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


@dataclass
class TrainPolicy:
    """When webhooks start training; defaults from env vars (see the module docstring)."""

    on_annotation: bool = field(default_factory=lambda: env_bool(os.environ, "ODISE_TRAIN_ON_ANNOTATION", True))
    min_annotations: int = field(default_factory=lambda: int(os.environ.get("ODISE_TRAIN_MIN_ANNOTATIONS", "8")))
    debounce_seconds: float = field(default_factory=lambda: float(os.environ.get("ODISE_TRAIN_DEBOUNCE", "30")))
    holdout_fraction: float = field(default_factory=lambda: float(os.environ.get("ODISE_HOLDOUT_FRACTION", "0.2")))
