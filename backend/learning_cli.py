"""The learning-loop commands of `odise-ls`: train, models, rank, evaluate.

Data comes from a Label Studio project (--project with --url/--api-key, env LABEL_STUDIO_URL /
LABEL_STUDIO_API_KEY) or a COCO-format folder (--coco DIR). Fine-tuned versions live in
--model-dir (env MODEL_DIR) under a project key: the Label Studio project id, or for a COCO
folder --key (default: the folder name).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from backend.flags import add_model_dir_flag, add_model_flags, add_training_flags
from backend.ls_client import LabelStudioAuthError, add_label_studio_flags
from backend.settings import BackendSettings, build_model

log = logging.getLogger("odise-ls")


class CommandError(RuntimeError):
    """A user-facing error: printed without a traceback, exit code 2."""


@dataclass
class Source:
    """Where annotated data comes from: vocabulary, project key, and (id, image loader, gt) items."""

    key: str
    vocab: Any
    fetch: Callable[[float], Any]  # holdout_fraction -> TrainingData


def _add_source_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--project", type=int, help="Label Studio project id")
    src.add_argument("--coco", type=Path, help="COCO-format folder (annotations JSON + images)")
    p.add_argument("--key", help="project key for a COCO folder's model versions (default: folder name)")
    add_label_studio_flags(p, older_url_spelling=True)


def _add_version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", default="current",
                   help="model version to use: 'current' (the promoted one), 'base', or a name like v0003")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register train, models, rank and evaluate."""
    p = sub.add_parser("train", help="fine-tune on a project's annotations; promote if better on held-out data")
    _add_source_args(p)
    add_model_dir_flag(p)
    add_training_flags(p)
    add_model_flags(p)
    p.set_defaults(func=_run_train)

    p = sub.add_parser("models", help="list a project's model versions, or roll back")
    p.add_argument("key", help="project key (Label Studio project id, or the COCO folder key)")
    add_model_dir_flag(p)
    p.add_argument("--rollback", nargs="?", const="previous", metavar="VERSION",
                   help="serve VERSION, or without a value the previously promoted version ('base' = base model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_models)

    p = sub.add_parser("rank", help="tasks or images by uncertainty, most informative first")
    _add_source_args(p, required=False)
    p.add_argument("images", nargs="*", help="image files (instead of --project)")
    p.add_argument("--labels", help='vocabulary for image files, e.g. "cat,dog,grass"')
    p.add_argument("--all", action="store_true", help="include already annotated tasks")
    p.add_argument("--limit", type=int, default=0, help="print only the first N")
    add_model_dir_flag(p)
    _add_version_arg(p)
    add_model_flags(p)
    p.set_defaults(func=_run_rank)

    p = sub.add_parser("evaluate", help="PQ (things/stuff), mask AP and mIoU against accepted annotations")
    _add_source_args(p)
    add_model_dir_flag(p)
    _add_version_arg(p)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_model_flags(p)
    p.set_defaults(func=_run_evaluate)


# ------------------------------------------------------------------------------------------ helpers
def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from odise_core.weights import WeightsMissingError

        try:
            return fn(args)
        except (CommandError, WeightsMissingError, LabelStudioAuthError, FileNotFoundError, KeyError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def _build_model(args: argparse.Namespace) -> tuple[BackendSettings, Any, str]:
    """The command's settings (flags > environment > defaults), the model they build and its base version."""
    from backend.model import base_model_version

    settings = BackendSettings.resolve(args)
    model = build_model(settings)
    return settings, model, base_model_version(settings, model)


def _use_version(model: Any, store: Any, key: str, version: str) -> str:
    """Load the requested version's weights into `model`; returns the version served."""
    from backend.learning import load_version

    if version == "base":
        return "base"
    name = store.current(key) if version == "current" else version
    if name is None:
        return "base"
    load_version(model, store, key, name)
    return name


def _version_name(base: str, key: str, stored: str) -> str:
    """The model version as the server names it: the base version, plus "+<key>-<stored>" for a fine-tune."""
    from backend.model import version_name

    return version_name(base, key, None if stored == "base" else stored)


def _label_studio(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(client, target, fetcher) of a Label Studio project."""
    from backend.label_config import parse_label_config
    from backend.ls_client import make_client
    from backend.tasks import ImageFetcher

    settings = BackendSettings.resolve(args)
    client = make_client(settings.label_studio_url, settings.api_key)
    project = client.projects.get(id=args.project)
    target = parse_label_config(project.label_config).targets[0]
    return client, target, ImageFetcher(settings.label_studio_url, settings.api_key)


def _source(args: argparse.Namespace) -> Source:
    from backend.training_data import build_training_data, fetch_annotated_tasks, split_samples
    from odise_core.tools.evaluation import load_coco_folder, merge_stuff
    from odise_core.preprocess import load_image
    from odise_core.training.finetune import TrainSample
    from backend.label_config import label_vocab_class
    from odise_core.vocabulary import Vocabulary

    import numpy as np

    if args.coco is not None:
        ds = load_coco_folder(args.coco)
        vocab = Vocabulary([label_vocab_class(n, (), t) for n, t in zip(ds.class_names, ds.is_thing)])

        def fetch_coco(fraction: float) -> Any:
            items = []
            for i, (path, segs) in enumerate(ds.images):
                segs = merge_stuff(segs)
                if not segs:
                    continue
                sample = TrainSample(image=load_image(path), masks=np.stack([s.mask for s in segs]),
                                     classes=np.array([s.class_index for s in segs], dtype=np.int64))
                items.append((i, sample))
            return split_samples(items, fraction)

        return Source(key=args.key or args.coco.resolve().name, vocab=vocab, fetch=fetch_coco)

    client, target, fetcher = _label_studio(args)

    def fetch_ls(fraction: float) -> Any:
        return build_training_data(
            fetch_annotated_tasks(client, args.project), target.vocabulary.names,
            lambda task: fetcher.fetch(task["data"].get(target.data_key), task_id=task.get("id")),
            is_thing=[bool(t) for t in target.vocabulary.is_thing], holdout_fraction=fraction,
            from_names=[c.name for c in target.controls])

    return Source(key=str(args.project), vocab=target.vocabulary, fetch=fetch_ls)


def _print_figures(r: Any) -> None:
    def f(v: float) -> str:
        return "  n/a" if v != v else f"{v:5.1f}"

    print(f"images {r.num_images}")
    print(f"PQ {f(r.pq)}  SQ {f(r.sq)}  RQ {f(r.rq)}  PQ_th {f(r.pq_things)}  PQ_st {f(r.pq_stuff)}")
    print(f"mask AP {f(r.mask_ap)}  AP50 {f(r.mask_ap50)}  mIoU {f(r.miou)}")


# ------------------------------------------------------------------------------------------ commands
@_guard
def _run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backend.learning import JobManager, ServingModels, run_finetune

    source = _source(args)
    settings, model, base = _build_model(args)
    manager = JobManager(settings.model_dir, policy=settings.policy,
                         finetune_fn=functools.partial(run_finetune, options=settings.finetune))
    serving = ServingModels(manager.store, lambda: model)
    log.info("project %s: fine-tuning %s from %s", source.key, base, serving.get(source.key)[0] or "base")
    try:
        job = manager.submit(source.key, source.fetch, functools.partial(serving.get, source.key), source.vocab,
                             reason="cli")
        with tqdm(total=settings.finetune.steps, desc="train", unit="step") as bar:
            while not job.wait(0.5):
                bar.set_postfix_str(job.state + (f" loss {job.loss:.3f}" if job.loss is not None else ""))
                bar.update(job.step - bar.n)
            bar.update(job.step - bar.n)
    finally:  # the job thread must end before the interpreter exits (else the process aborts)
        manager.shutdown()
    print(json.dumps(job.as_dict(), indent=1))
    print(job.message, file=sys.stderr)
    return 0 if job.state in ("done", "skipped") else 1


@_guard
def _run_models(args: argparse.Namespace) -> int:
    from backend.learning import VersionStore

    model_dir = BackendSettings.resolve(args).model_dir
    store = VersionStore(model_dir)
    if args.rollback is not None:
        if args.rollback == "previous":
            now = store.rollback(args.key)
        elif args.rollback == "base":
            store.serve_base(args.key)
            now = None
        else:
            now = store.rollback(args.key, args.rollback)
        print(f"project {args.key} now serves {now or 'the base model'}", file=sys.stderr)
    current = store.current(args.key)
    rows = []
    for v in store.versions(args.key):
        meta = store.metadata(args.key, v)
        ev = meta.get("eval") or {}
        before, after = ev.get("holdout_before") or {}, ev.get("holdout_after") or {}
        rows.append({"version": v, "serving": v == current, "promoted": bool(meta.get("promoted")),
                     "created": meta.get("created"), "base_preset": meta.get("base_preset"),
                     "train": (meta.get("data") or {}).get("train"), "holdout": (meta.get("data") or {}).get("holdout"),
                     "pq_before": before.get("pq"), "pq_after": after.get("pq")})
    if args.json:
        print(json.dumps({"project": args.key, "current": current, "versions": rows}, indent=1))
        return 0
    if not rows:
        print(f"project {args.key}: no fine-tuned versions in {model_dir}; the base model serves")
        return 0

    def pq(v: Any) -> str:
        return "  n/a" if v is None else f"{v:5.1f}"

    print(f"{'':2}{'version':8} {'created':25} {'promoted':8} {'train':>5} {'held':>5} {'PQ before':>9} {'PQ after':>8}")
    for r in rows:
        mark = "* " if r["serving"] else "  "
        print(f"{mark}{r['version']:8} {r['created'] or '':25} {'yes' if r['promoted'] else 'no':8} "
              f"{r['train'] or 0:>5} {r['holdout'] or 0:>5} {pq(r['pq_before']):>9} {pq(r['pq_after']):>8}")
    print(f"(* = serving; {'base model serves' if current is None else current})")
    return 0


@_guard
def _run_rank(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backend.active_learning import rank, task_score
    from backend.learning import VersionStore
    from backend.tasks import ImageFetchError
    from backend.training_data import fetch_tasks
    from odise_core.preprocess import load_image
    from odise_core.vocabulary import Vocabulary

    if args.project is None and not args.images:
        raise CommandError("give --project (Label Studio) or image files")
    if args.project is not None:
        client, target, fetcher = _label_studio(args)
        vocab = target.vocabulary
        tasks = fetch_tasks(client, args.project, only_annotated=False)
        if not args.all:
            tasks = [t for t in tasks if not t.get("annotations")]
        items = [(int(t["id"]), str(t["data"].get(target.data_key)),
                  functools.partial(fetcher.fetch, t["data"].get(target.data_key), t["id"])) for t in tasks]
        key = str(args.project)
    else:
        if not args.labels:
            raise CommandError("ranking image files needs --labels")
        vocab = Vocabulary.from_text(args.labels)
        items = [(i, p, functools.partial(load_image, p)) for i, p in enumerate(args.images)]
        key = args.key or ""
    settings, model, base = _build_model(args)
    stored = _use_version(model, VersionStore(settings.model_dir), key, args.version) if key else "base"
    version = _version_name(base, key, stored)
    label = "task" if args.project is not None else "index"
    scores, names, counts, failed = [], {}, {}, 0
    for item_id, name, load in tqdm(items, desc="rank", unit="img"):
        try:  # one unreadable image is listed; the others are still ranked
            raw = model.predict_raw(load(), vocab, mode=settings.mode)
        except (ImageFetchError, OSError, ValueError) as e:
            failed += 1
            print(f"error: {label} {item_id} not ranked: {e}", file=sys.stderr)
            continue
        scores.append((item_id, task_score(raw)))
        names[item_id], counts[item_id] = name, len(raw.segments)
    ranked = rank(scores)[: args.limit or None]
    print(f"# model version {version}; score = mean top-1 minus top-2 class probability margin "
          f"(low = uncertain = most informative first)")
    if failed:
        print(f"# {failed} of {len(items)} {'tasks' if args.project is not None else 'images'} could not be ranked "
              "(errors on stderr)")
    print(f"{label:>6} {'score':>7} {'segments':>8}  image")
    for item_id, s in ranked:
        print(f"{item_id:>6} {s:7.4f} {counts[item_id]:>8}  {names[item_id]}")
    return 1 if failed else 0


@_guard
def _run_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backend.learning import VersionStore, evaluate_model

    source = _source(args)
    settings, model, base = _build_model(args)
    stored = _use_version(model, VersionStore(settings.model_dir), source.key, args.version)
    version = _version_name(base, source.key, stored)
    data = source.fetch(0.0)
    samples = data.train + data.holdout
    if not samples:
        raise CommandError(f"no usable annotations in {source.key} (skipped: {dict(data.skipped)})")
    t0 = time.perf_counter()
    result = evaluate_model(model, tqdm(samples, desc="evaluate", unit="img"), source.vocab)  # one pass per image
    print(f"project {source.key}, model version {version}, {time.perf_counter() - t0:.1f} s")
    _print_figures(result)
    if args.json:
        args.json.write_text(json.dumps({"project": source.key, "version": version, **result.as_dict()}, indent=1))
    return 0
