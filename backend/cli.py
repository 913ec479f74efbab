"""`odise-ls` command line: serve, predict and the dataset/learning tools."""
from __future__ import annotations

import argparse
import logging
import sys

from backend.flags import add_feature_cache_flags, add_model_dir_flag, add_model_flags, add_training_flags
from backend.learning_cli import add_commands as add_learning_commands
from backend.ls_client import LabelStudioAuthError, add_label_studio_flags
from backend.settings import SettingsError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odise-ls", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_label_config(sub)
    _add_predict(sub)
    _add_prelabel(sub)
    _add_refresh(sub)
    _add_export(sub)
    add_learning_commands(sub)
    _add_cache(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP); connect it in Settings > Model")
    p.add_argument("--host", help="bind address (env HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port, 0 for any free one (env PORT, default 9090)")
    add_model_dir_flag(p)
    add_label_studio_flags(p)
    add_model_flags(p)
    add_training_flags(p, webhooks=True)
    p.add_argument("--refresh-on-promote", choices=["auto", "true", "false"],
                   help="after a promotion, re-predict the project's tasks stored with an older version: auto = "
                        "when the Label Studio URL and key are known (env REFRESH_ON_PROMOTE, default auto)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import signal

    from werkzeug.serving import make_server

    from backend.app import create_app
    from backend.model import ODISEBackend
    from backend.settings import BackendSettings
    from odise_core.weights import WeightsMissingError, check_weights_available

    try:  # fail at once, before listening, when the weights cannot be had (a few seconds at most)
        settings = BackendSettings.resolve(args)
        check_weights_available(settings.model_config())
    except (SettingsError, WeightsMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = ODISEBackend(settings)
    backend.start_loading(background=True)
    server = make_server(settings.host, settings.port, create_app(backend), threaded=True)
    logging.getLogger("odise-ls").info("ODISE ML backend (%s) on http://%s:%d", settings.preset, settings.host,
                                       server.port)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `docker stop` sends SIGTERM: stop serving and cancel training jobs cleanly

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        backend.shutdown(timeout=10)
    return 0


def _add_label_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label-config", help="print a Label Studio label config for a label list or dataset")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--labels", help='labels, e.g. "cat, dog:puppy|doggy, grass (stuff)"')
    vocab.add_argument("--dataset", choices=["coco", "ade20k"], help="COCO panoptic 133 or ADE20K 150 with synonyms")
    p.add_argument("--kind", choices=["polygon", "brush", "rectangle"], default="polygon", help="control tag")
    p.set_defaults(func=_run_label_config)


def _run_label_config(args: argparse.Namespace) -> int:
    from backend.label_config import make_label_config
    from odise_core.vocabulary import Vocabulary

    try:
        vocab = Vocabulary.from_text(args.labels) if args.labels else (
            Vocabulary.coco_panoptic() if args.dataset == "coco" else Vocabulary.ade20k_150())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(vocab) == 0:
        print("error: --labels is empty", file=sys.stderr)
        return 2
    sys.stdout.write(make_label_config(vocab, kind=args.kind))
    return 0


def _add_prelabel(sub: argparse._SubParsersAction) -> None:
    from backend import prelabel_cli

    p = sub.add_parser("prelabel", help="pre-label a Label Studio project, or a folder into an import JSON")
    prelabel_cli.add_arguments(p)
    add_model_flags(p)
    p.set_defaults(func=_run_prelabel)


def _run_prelabel(args: argparse.Namespace) -> int:
    from backend.model import ModelLoadFailed
    from backend.prelabel_cli import run_command
    from backend.ray_prelabel import RayUnavailable, WorkersDisagree

    try:
        summary = run_command(args)
    except (ValueError, FileNotFoundError, ModelLoadFailed, LabelStudioAuthError, RayUnavailable,
            WorkersDisagree) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any image was predicted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary.format())
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return 1 if summary.failures else 0


def _add_refresh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refresh", help="re-predict a project's tasks stored with an older model version of this "
                                       "backend, and delete those older predictions (what a promotion starts)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    add_label_studio_flags(p)
    add_model_dir_flag(p, "fine-tuned model versions; the project's promoted version predicts")
    p.add_argument("--workers", type=int, default=2, help="image fetching threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flags(p)
    p.set_defaults(func=_run_refresh)


def _run_refresh(args: argparse.Namespace) -> int:
    from backend.learning.refresh import refresh_project
    from backend.ls_client import make_client
    from backend.model import ModelLoadFailed, ODISEBackend
    from backend.settings import BackendSettings

    try:
        settings = BackendSettings.resolve(args)
        client = make_client(settings.label_studio_url, settings.api_key)
        backend = ODISEBackend(settings)
        backend.start_loading(background=False)
        if backend.error:
            raise ModelLoadFailed(backend.error)
        summary = refresh_project(backend, client, args.project, workers=args.workers, progress=not args.no_progress)
    except (SettingsError, ModelLoadFailed, LabelStudioAuthError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 1 if summary.failures or summary.delete_errors else 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from backend import exports

    p = sub.add_parser("export", help="Label Studio predictions/annotations -> COCO panoptic and instances")
    exports.add_arguments(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from backend.exports import run_command

    try:
        paths = run_command(args)
    except (ValueError, FileNotFoundError, LabelStudioAuthError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment images: overlay PNG + COCO-style panoptic/RLE JSON per image")
    p.add_argument("images", nargs="+", help="image files")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--labels", help='vocabulary, e.g. "cat,dog:puppy|doggy,grass"')
    vocab.add_argument("--dataset", choices=["coco", "ade20k"], help="a bundled vocabulary with synonyms")
    p.add_argument("--mode", choices=["panoptic", "instance", "semantic"],
                   help="output mode (env PREDICTION_MODE, default panoptic)")
    p.add_argument("--out", default="out", help="output directory")
    add_model_flags(p)
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from backend.exports import segments_to_coco_json
    from backend.model import base_model_version
    from backend.settings import BackendSettings, build_model
    from odise_core.preprocess import load_image
    from odise_core.tools.visualize import overlay
    from odise_core.vocabulary import Vocabulary
    from odise_core.weights import WeightsMissingError

    vocab = Vocabulary.from_text(args.labels) if args.labels else (
        Vocabulary.coco_panoptic() if args.dataset == "coco" else Vocabulary.ade20k_150())
    try:
        settings = BackendSettings.resolve(args)
        model = build_model(settings)
    except (SettingsError, WeightsMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    version = base_model_version(settings, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in tqdm(args.images, desc="predict", unit="img"):
        try:
            image = load_image(path)
            raw = model.predict_raw(image, vocab, mode=settings.mode)
        except (OSError, ValueError) as e:
            failures += 1
            logging.getLogger("odise-ls").error("%s: %s", path, e)
            continue
        stem = Path(path).stem
        overlay(image, raw.segments, vocab.names).save(out / f"{stem}.png")
        record = segments_to_coco_json(raw.segments, vocab, file_name=Path(path).name, image_size=raw.image_size)
        record["model_version"] = version
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print(f"{len(args.images) - failures} image(s) written to {out}, {failures} failed", file=sys.stderr)
    return 1 if failures else 0


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show (default) or clear the backbone feature cache")
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_model_dir_flag(p, "fine-tuned model versions; the feature cache defaults to MODEL_DIR/feature_cache")
    add_feature_cache_flags(p)
    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    import json

    from backend.settings import BackendSettings

    try:
        cache = BackendSettings.resolve(args).feature_cache()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    removed = cache.clear() if args.action == "clear" else None
    stats = cache.stats()
    if args.json:
        print(json.dumps({**stats.to_dict(), **({"removed": removed} if removed is not None else {})}))
        return 0
    if removed is not None:
        print(f"removed {removed} entries from {stats.root}")
        return 0
    mb = 2**20
    print(f"feature cache {stats.root}\n"
          f"  entries   {stats.entries}\n"
          f"  size      {stats.bytes / mb:.1f} MB of {stats.max_bytes / mb:.0f} MB max"
          f"{' (disabled)' if not stats.max_bytes else ''}\n"
          f"  hit rate  {100 * stats.hit_rate:.1f}% ({stats.hits} hits, {stats.misses} misses) predicting\n"
          f"  training  {100 * stats.train_hit_rate:.1f}% ({stats.train_hits} hits, {stats.train_misses} misses) "
          f"fine-tune view reads\n"
          f"  storage   {stats.storage}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
