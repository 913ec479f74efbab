"""Fine-tuning on a project's annotations and the model versions it produces.

store       on-disk versions (weights + config.json + metadata), atomic writes, promote / rollback
jobs        a job's progress payload and the on-disk record of every job id handed out
policy      what triggers a fine-tune; one job per round of annotations (the coalescing rule)
training    how a job trains its candidate (odise_core's fine-tune with the settings' FinetuneOptions)
promotion   held-out evaluation and the promotion rule
serving     the model serving each project; copies that share the frozen backbone
runner      JobManager: threads, coalescing, debounce, judging against the version serving then
"""
from backend.learning.jobs import Job
from backend.learning.promotion import evaluate_model, is_better
from backend.learning.runner import JobManager
from backend.learning.serving import ServingModels, VersionIncompatible, copy_sharing_frozen, load_version
from backend.learning.store import VersionStore
from backend.learning.training import run_finetune

__all__ = ["Job", "JobManager", "ServingModels", "VersionIncompatible", "VersionStore",
           "copy_sharing_frozen", "evaluate_model", "is_better", "load_version", "run_finetune"]
