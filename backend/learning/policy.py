"""What makes a project fine-tune, and how requests for the same round are merged into one job.

Events: START_TRAINING always asks for a fine-tune; ANNOTATION_CREATED/UPDATED ask for one when the
TrainPolicy (backend.settings: flags and ODISE_TRAIN_* variables) has `on_annotation` (default), after
`debounce_seconds` without a further event (default 30), and train only with at least
`min_annotations` usable annotated tasks (default 8). `holdout_fraction` of the tasks (default 0.2) is
held out to judge the result.

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

START_TRAINING = "START_TRAINING"
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
