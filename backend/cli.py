"""`odise-ls` command line: serve, predict and the dataset/learning tools."""
from __future__ import annotations

import argparse
import logging
import sys

from backend.learning_cli import add_commands as add_learning_commands


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds a model."""
    import os

    p.add_argument("--preset", default=os.environ.get("PRESET", "odise-label-coco"),
                   help="model preset: odise-label-coco, odise-caption-coco or tiny (env PRESET)")
    p.add_argument("--device", default=os.environ.get("DEVICE", "auto"),
                   help="cpu, cuda, cuda:N, mps or auto (env DEVICE)")
    p.add_argument("--weights-dir", default=os.environ.get("ODISE_WEIGHTS_DIR"),
                   help="where weights are looked up and cached (env ODISE_WEIGHTS_DIR)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=os.environ.get("PRECISION", "auto"),
                   help="auto: bf16/fp16 autocast on CUDA, frozen SD networks in bf16 on CPUs with native bf16; "
                        "bf16: SD in bf16 on any CPU; fp32: float32 everywhere (env PRECISION)")
    p.add_argument("--fast", action="store_true", default=os.environ.get("FAST", "") in ("1", "true", "yes"),
                   help="process at the window size (512 shortest edge): 1 crop instead of 4 (env FAST=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odise-ls", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_label_config(sub)
    _add_predict(sub)
    _add_prelabel(sub)
    _add_export(sub)
    add_learning_commands(sub, _add_model_args)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    import os

    p = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP); connect it in Settings > Model")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="bind address (env HOST)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")), help="port (env PORT)")
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR"),
                   help="fine-tuned model versions (env MODEL_DIR)")
    p.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="Label Studio address for uploaded images and annotations (env LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="Label Studio personal access token or legacy token (env LABEL_STUDIO_API_KEY)")
    _add_model_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    from pathlib import Path

    from werkzeug.serving import make_server

    from backend.app import create_app
    from backend.model import BackendSettings, ODISEBackend

    if args.weights_dir:
        os.environ["ODISE_WEIGHTS_DIR"] = args.weights_dir
    settings = BackendSettings.from_env(preset=args.preset, device=args.device, fast=args.fast or None,
                                        precision=args.precision,
                                        label_studio_url=args.label_studio_url,
                                        api_key=args.api_key, model_dir=Path(args.model_dir) if args.model_dir else None)
    from odise_core.config import get_config
    from odise_core.weights import WeightsMissingError, check_weights_available

    try:  # fail at once, before listening, when the weights cannot be had (a few seconds at most)
        check_weights_available(get_config(settings.preset, fast=settings.fast))
    except WeightsMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = ODISEBackend(settings)
    backend.start_loading(background=True)
    server = make_server(args.host, args.port, create_app(backend), threaded=True)
    logging.getLogger("odise-ls").info("ODISE ML backend (%s) on http://%s:%d", args.preset, args.host, server.port)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `docker stop` sends SIGTERM: stop serving and cancel training jobs cleanly

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        backend.jobs.shutdown(timeout=10)
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
    from backend import prelabel

    p = sub.add_parser("prelabel", help="pre-label a Label Studio project, or a folder into an import JSON")
    prelabel.add_arguments(p)
    _add_model_args(p)
    p.set_defaults(func=_run_prelabel)


def _run_prelabel(args: argparse.Namespace) -> int:
    from backend.model import ModelLoadFailed
    from backend.prelabel import run_command

    try:
        summary = run_command(args)
    except (ValueError, FileNotFoundError, ModelLoadFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 1 if summary.failures else 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from backend import exports

    p = sub.add_parser("export", help="Label Studio predictions/annotations -> COCO panoptic and instances")
    exports.add_arguments(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from backend.exports import run_command

    try:
        paths = run_command(args)
    except (ValueError, FileNotFoundError) as e:
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
    p.add_argument("--mode", choices=["panoptic", "instance", "semantic"], default="panoptic")
    p.add_argument("--out", default="out", help="output directory")
    _add_model_args(p)
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from odise_core.config import get_config
    from odise_core.predictor import build_predictor
    from odise_core.preprocess import load_image
    from odise_core.tools.visualize import overlay
    from odise_core.vocabulary import Vocabulary
    from odise_core.weights import WeightsMissingError

    from backend.exports import segments_to_coco_json

    if args.weights_dir:
        import os
        os.environ["ODISE_WEIGHTS_DIR"] = args.weights_dir
    vocab = Vocabulary.from_text(args.labels) if args.labels else (
        Vocabulary.coco_panoptic() if args.dataset == "coco" else Vocabulary.ade20k_150())
    try:
        cfg = get_config(args.preset, fast=args.fast)
        cfg.precision = args.precision
        model = build_predictor(cfg, device=args.device)
    except WeightsMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in tqdm(args.images, desc="predict", unit="img"):
        try:
            image = load_image(path)
            raw = model.predict_raw(image, vocab, mode=args.mode)
        except (OSError, ValueError) as e:
            failures += 1
            logging.getLogger("odise-ls").error("%s: %s", path, e)
            continue
        stem = Path(path).stem
        overlay(image, raw.segments, vocab.names).save(out / f"{stem}.png")
        record = segments_to_coco_json(raw.segments, vocab, file_name=Path(path).name, image_size=raw.image_size)
        record["model_version"] = model.version
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print(f"{len(args.images) - failures} image(s) written to {out}, {failures} failed", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
