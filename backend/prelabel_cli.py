"""`odise-ls prelabel`: its flags, and the run they ask for (one process, or Ray actors with --ray)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from backend.batch import MAX_PREFETCH, PrelabelSummary
from backend.prelabel import LOCAL_FILES_PREFIX, prelabel_folder, prelabel_project


def add_arguments(p: Any) -> None:
    """The `odise-ls prelabel` flags (model flags are added by the CLI)."""
    from backend.flags import add_model_dir_flag
    from backend.ls_client import add_label_studio_flags

    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--project", type=int, help="Label Studio project id: predictions are created on its tasks")
    where.add_argument("--folder", help="folder of images: predictions go to an import JSON (--out)")
    add_label_studio_flags(p)
    config = p.add_mutually_exclusive_group()
    config.add_argument("--label-config", help="folder mode: the project's label config XML file")
    config.add_argument("--labels", help='folder mode: vocabulary instead of a config, e.g. "cat,dog:puppy,grass"')
    p.add_argument("--kind", choices=["polygon", "brush", "rectangle"], default="polygon",
                   help="folder mode with --labels: the region type to predict")
    p.add_argument("--out", default="prelabel.json", help="folder mode: import JSON to write or extend")
    p.add_argument("--document-root",
                   help="folder mode: Label Studio's local-files root on this machine (env LOCAL_FILES_DOCUMENT_ROOT; "
                        "default: the folder's parent)")
    p.add_argument("--url-prefix", default=LOCAL_FILES_PREFIX, help="folder mode: image URL prefix in the JSON")
    add_model_dir_flag(p, "fine-tuned model versions; a project's promoted version is used")
    p.add_argument("--workers", type=int, default=2, help="image fetching threads; with --ray: Ray actors, one model each")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray: ADDRESS 'auto' (the cluster of `ray start`), ray://host:port, or nothing for "
                        "a local cluster (needs odise-label-studio[ray])")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="with --ray: GPUs per actor (0.5 = two per GPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="with --ray: CPUs Ray reserves per actor; the actor's torch threads (default 1)")
    p.add_argument("--prefetch", type=int, default=4, help=f"images read ahead of the model (max {MAX_PREFETCH})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(args: Any) -> PrelabelSummary:
    """`odise-ls prelabel`: build the backend from flags/env, run one mode, return the summary.

    Raises ValueError (bad flags/config), LabelStudioAuthError (no Label Studio credentials) or
    backend.model.ModelLoadFailed (weights missing).
    """
    from backend.ls_client import make_client
    from backend.model import ModelLoadFailed, ODISEBackend
    from backend.settings import BackendSettings

    if not getattr(args, "verbose", False):
        logging.getLogger("backend.model").setLevel(logging.WARNING)  # one line per task would bury the bar
    if args.folder is not None and not (args.label_config or args.labels):
        raise ValueError("--folder needs --label-config FILE or --labels TEXT to know what to predict")
    settings = BackendSettings.resolve(args)
    client = make_client(settings.label_studio_url, settings.api_key) if args.project is not None else None
    if args.ray is not None:
        from backend.ray_prelabel import run_command as run_on_ray

        return run_on_ray(args, settings, client, None if client is not None else folder_label_config(args))
    backend = ODISEBackend(settings)
    backend.start_loading(background=False)
    if backend.error:
        raise ModelLoadFailed(backend.error)
    options = dict(workers=args.workers, prefetch=args.prefetch, progress=not args.no_progress)
    if client is not None:
        return prelabel_project(backend, client, args.project, **options)
    return prelabel_folder(backend, folder_label_config(args), args.folder, args.out,
                           document_root=settings.document_root, url_prefix=args.url_prefix, **options)


def folder_label_config(args: Any) -> str:
    """Folder mode's label config: the --label-config file, or one made from --labels and --kind."""
    from backend.label_config import make_label_config
    from odise_core.vocabulary import Vocabulary

    if args.label_config:
        return Path(args.label_config).read_text()
    return make_label_config(Vocabulary.from_text(args.labels), kind=args.kind)
