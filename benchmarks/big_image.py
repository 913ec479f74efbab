"""Peak memory of one big photo (6000x4000 by default) before/after bounding post-processing memory.

"before" upsamples every kept query's mask logits to the original size at once (the old path,
budget None); "after" is the default budget, past which panoptic inference goes query by query.
Each mode runs in its own process on random weights (cost does not depend on weight values): the
model is built, warmed up on a small image (the vocabulary's text encoding is cached then), and the
big image is predicted while a thread samples the RSS. Both modes must give identical segments.

    python benchmarks/big_image.py --preset tiny
    python benchmarks/big_image.py --preset odise-label-coco     # ~7 GB for the model, minutes on a CPU
    python benchmarks/big_image.py --output-mode semantic        # the semantic map, made in bands of rows
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import random_weights  # noqa: E402
from memory import PeakMemory, current_rss  # noqa: E402

MODES = ("before", "after")


def photo(width: int, height: int):
    """A real photo (scikit-image's coffee) resized to width x height, as a camera would deliver it."""
    import numpy as np
    import skimage.data
    from PIL import Image

    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((width, height), Image.BICUBIC))


def segments_digest(segments) -> str:
    """Hash of every segment's class, score (to 5 decimals: semantic bands round in another order than one
    whole-image interpolation, a few float32 ulps), query and mask: equal digests mean the same output."""
    h = hashlib.sha256()
    for s in segments:
        h.update(f"{s.class_index}:{s.score:.5f}:{s.is_thing}:{s.query_index}:{s.mask.shape}".encode())
        h.update(s.mask.tobytes())
    return h.hexdigest()[:16]


def child(preset: str, mode: str, width: int, height: int, device: str, output: str = "panoptic") -> dict:
    """Build, warm up, predict the big image once; figures in MB and seconds."""
    import torch

    from backend.settings import build_model
    from odise_core.postprocess import DIRECT_BUDGET_BYTES
    from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

    torch.manual_seed(0)
    model = build_model(random_weights(preset, device), text_cache=TextEmbeddingCache(None))
    model.mask_budget_bytes = None if mode == "before" else DIRECT_BUDGET_BYTES
    vocab = Vocabulary.coco_panoptic()
    model.predict_raw(photo(640, 427), vocab)
    image = photo(width, height)
    model_rss = current_rss()
    with PeakMemory() as peak:
        raw = model.predict_raw(image, vocab, mode=output)
    return {"mode": mode, "output": output, "preset": preset, "image": f"{width}x{height}",
            "queries": model.cfg.decoder.num_queries,
            "classes": len(vocab), "device": str(model.device), "model_and_image_rss_mb": round(model_rss / 2**20),
            "peak_rss_mb": round(peak.peak_rss / 2**20),
            "above_model_mb": round((peak.peak_rss - model_rss) / 2**20), "seconds": round(peak.seconds, 1),
            "postprocess_s": round(raw.timings["postprocess"], 2), "segments": len(raw.segments),
            "digest": segments_digest(raw.segments)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT of the photo")
    parser.add_argument("--modes", default=",".join(MODES), help="before, after or both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-mode", default="panoptic", choices=("panoptic", "instance", "semantic"),
                        help="the output mode predicted (semantic mode bands rows under the same budget)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(child(args.preset, args.child, width, height, args.device, args.output_mode)))
        return 0
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}: use {', '.join(MODES)}")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--size", args.size,
                               "--device", args.device, "--output-mode", args.output_mode, "--child", mode], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode}: the child process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        results.append({**json.loads(proc.stdout.strip().splitlines()[-1]),
                        "process_s": round(time.perf_counter() - t0, 1)})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['preset']} {r['image']} {r['output']} {r['mode']:>6}: peak RSS {r['peak_rss_mb']} MB, "
                  f"{r['above_model_mb']} MB above model+image ({r['model_and_image_rss_mb']} MB), "
                  f"predict {r['seconds']} s (post-processing {r['postprocess_s']} s), "
                  f"{r['segments']} segments, digest {r['digest']}")
    digests = {r["digest"] for r in results}
    if len(digests) > 1:
        print("the modes gave different segments", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
