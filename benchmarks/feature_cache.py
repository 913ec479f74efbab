"""What the feature cache saves: per-stage time of a pass that computes the backbone features and MaskCLIP's
stream and of one that loads them, and the bytes an image takes, on random weights (cost does not depend
on weight values).

    python benchmarks/feature_cache.py                                 # full odise-label-coco preset, 1024
    python benchmarks/feature_cache.py --preset tiny --size 256 --storage fp32 --json

Passes per photo: one without the cache (it also encodes the 133-class vocabulary, so it is not
timed for comparison), then one miss (computes and stores) and `--repeats` hits.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import random_weights  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="odise-label-coco")
    ap.add_argument("--size", type=int, default=1024, help="shortest edge the image is processed at")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--storage", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=2, help="hit passes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import skimage.data
    import torch

    from backend.settings import build_model
    from odise_core.feature_cache import FeatureCache, maskclip_key
    from odise_core.predictor import precision_plan
    from odise_core.preprocess import prepare
    from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

    t0 = time.perf_counter()
    model = build_model(random_weights(args.preset, "cpu", min_size=args.size, precision=args.precision),
                        text_cache=TextEmbeddingCache(None))
    build_s = time.perf_counter() - t0
    vocab = Vocabulary.coco_panoptic()
    image = np.ascontiguousarray(skimage.data.coffee())  # 400x600: processed at size x 1.5 size
    model.predict_raw(image, vocab)  # encodes the vocabulary; the features are computed, not cached

    with tempfile.TemporaryDirectory() as root:
        model.feature_cache = FeatureCache(root, max_bytes=2**40, storage=args.storage)
        runs = []
        for i in range(1 + args.repeats):
            t = time.perf_counter()
            raw = model.predict_raw(image, vocab)
            runs.append({"cache": raw.feature_cache, "total": time.perf_counter() - t,
                         **{k: round(v, 3) for k, v in raw.timings.items()}})
        stats = model.feature_cache.stats()
        prep = prepare(image, model.cfg.backbone)
        clip_image, _ = model.model.maskclip_inputs(prep.tensor, prep.resized_size, torch.zeros(1, 1, 1, 1))
        key = maskclip_key(model.model, clip_image, args.storage, precision_plan(args.precision, model.device)[0])
        maskclip_bytes = model.feature_cache.path_for(key).stat().st_size
    miss, hits = runs[0], runs[1:]
    hit_total = statistics.median(r["total"] for r in hits)
    report = {
        "preset": args.preset, "size": args.size, "precision": args.precision,
        "plan": [str(d) for d in precision_plan(args.precision, torch.device("cpu"))], "storage": args.storage,
        "build_s": round(build_s, 1), "bytes_per_image": stats.bytes, "maskclip_bytes": maskclip_bytes,
        "entries": stats.entries, "miss": miss, "hits": hits,
        "miss_s": round(miss["total"], 3), "hit_s": round(hit_total, 3),
        "speedup": round(miss["total"] / hit_total, 2), "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.preset} ({args.precision}: {report['plan']}), coffee 400x600 at shortest edge {args.size}, "
          f"{args.storage} storage: {stats.bytes / 2**20:.1f} MB per image, of which MaskCLIP's stream "
          f"{maskclip_bytes / 2**20:.1f} MB")
    for name, run in [("miss", miss)] + [(f"hit {i + 1}", r) for i, r in enumerate(hits)]:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in run.items() if k not in ("cache", "total"))
        print(f"  {name:6s} {run['total']:7.2f} s  ({stages})")
    print(f"  a hit is {report['speedup']:.2f}x cheaper than a miss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
