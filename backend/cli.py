"""`odise-ls` command line: serve, predict and the dataset/learning tools."""
from __future__ import annotations

import argparse
import logging
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds a model."""
    import os

    p.add_argument("--preset", default=os.environ.get("PRESET", "odise-label-coco"),
                   help="model preset: odise-label-coco, odise-caption-coco or tiny (env PRESET)")
    p.add_argument("--device", default=os.environ.get("DEVICE", "auto"),
                   help="cpu, cuda, cuda:N, mps or auto (env DEVICE)")
    p.add_argument("--weights-dir", default=os.environ.get("ODISE_WEIGHTS_DIR"),
                   help="where weights are looked up and cached (env ODISE_WEIGHTS_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odise-ls", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _ = sub
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
