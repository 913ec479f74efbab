"""What running the frozen SD networks in bf16 costs in fidelity, against float32.

Two measurements in one run:
1. Features: the full `odise-label-coco` SD (random weights) on one 512 crop of a real photo,
   float32 vs bf16; per captured feature the cosine similarity and the relative L2 error.
2. Segments: a whole prediction with the `tiny` preset on skimage photos, float32 vs bf16 SD;
   class agreement of matched segments (same query), their mask IoU, the largest class
   probability difference, and the speed of both.

Random weights make this a measure of numerical drift, not of accuracy on real data.

    python benchmarks/precision.py [--skip-full] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.settings import BackendSettings, build_model  # noqa: E402
from odise_core.config import get_config  # noqa: E402
from odise_core.modeling.diffusion import DiffusionFeatureExtractor  # noqa: E402
from odise_core.vocabulary import TextEmbeddingCache, Vocabulary  # noqa: E402


def photo_crop(size: int) -> torch.Tensor:
    import skimage.data

    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 255.0
    return torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


def feature_drift(preset: str) -> list[dict]:
    """Cosine similarity and relative error of each captured feature, bf16 SD vs float32 SD."""
    cfg = get_config(preset)
    cfg.diffusion.pretrained = None
    torch.manual_seed(0)
    extractor = DiffusionFeatureExtractor(cfg.diffusion, cfg.clip.embed_dim).eval()
    crop = photo_crop(cfg.backbone.window)
    clip_embed = torch.randn(1, cfg.clip.embed_dim, generator=torch.Generator().manual_seed(1))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        extractor.set_sd_dtype(dtype)
        with torch.inference_mode():
            t = time.perf_counter()
            feats = extractor(crop, clip_embed)
            seconds = time.perf_counter() - t
        out[dtype] = ([f.float() for f in feats], seconds)
    rows = []
    for spec, a, b in zip(cfg.diffusion.features, out[torch.float32][0], out[torch.bfloat16][0]):
        a, b = a.double(), b.double()  # float32 sums over millions of values overshoot 1.0
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        rel = ((a - b).norm() / a.norm()).item()
        rows.append({"feature": f"{spec.source}.{spec.block}", "cosine": cos, "rel_l2": rel})
    rows.append({"seconds_fp32": out[torch.float32][1], "seconds_bf16": out[torch.bfloat16][1]})
    return rows


def segment_drift(preset: str) -> dict:
    """Segments of whole predictions with float32 vs bf16 SD on three skimage photos."""
    import skimage.data

    cache = TextEmbeddingCache(None)
    fp32, bf16 = (build_model(BackendSettings.from_env({}, preset=preset, device="cpu", precision=precision,
                                                       feature_cache_mb=0),
                              text_cache=cache) for precision in ("fp32", "bf16"))
    vocab = Vocabulary.from_text("person,cat,cup,table,rocket,sky,wall,grass")
    same_class, ious, prob_diff, counts = [], [], [], [0, 0]
    seconds = {"fp32": 0.0, "bf16": 0.0}
    for image in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
        preds = {}
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            model.predict_raw(image, vocab)  # warm
            t = time.perf_counter()
            preds[name] = model.predict_raw(image, vocab)
            seconds[name] += time.perf_counter() - t
        a, b = preds["fp32"], preds["bf16"]
        prob_diff.append((a.class_probs - b.class_probs).abs().max().item())
        by_query = {s.query_index: s for s in b.segments}
        counts[0] += len(a.segments)
        counts[1] += len(b.segments)
        for seg in a.segments:
            other = by_query.get(seg.query_index)
            if other is None:
                same_class.append(False)
                continue
            same_class.append(other.class_index == seg.class_index)
            union = np.logical_or(seg.mask, other.mask).sum()
            ious.append(float(np.logical_and(seg.mask, other.mask).sum() / union) if union else 1.0)
    return {"segments_fp32": counts[0], "segments_bf16": counts[1],
            "matched_same_class": float(np.mean(same_class)) if same_class else 1.0,
            "mean_mask_iou": float(np.mean(ious)) if ious else 1.0,
            "max_class_prob_diff": max(prob_diff), "seconds_fp32": seconds["fp32"], "seconds_bf16": seconds["bf16"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="odise-label-coco", help="preset for the feature comparison")
    ap.add_argument("--skip-full", action="store_true", help="only the tiny-preset segment comparison")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = {"segments_tiny": segment_drift("tiny")}
    if not args.skip_full:
        result["features"] = feature_drift(args.preset)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    seg = result["segments_tiny"]
    print("whole predictions, tiny preset, 3 skimage photos, float32 vs bf16 SD:")
    print(f"  segments {seg['segments_fp32']} vs {seg['segments_bf16']}; matched with the same class "
          f"{seg['matched_same_class']:.1%}; mean mask IoU {seg['mean_mask_iou']:.4f}; "
          f"largest class-probability difference {seg['max_class_prob_diff']:.4f}; "
          f"time {seg['seconds_fp32']:.2f} s vs {seg['seconds_bf16']:.2f} s")
    if "features" in result:
        *rows, times = result["features"]
        print(f"\ncaptured features, {args.preset} SD, one {get_config(args.preset).backbone.window} px crop "
              f"({times['seconds_fp32']:.1f} s fp32, {times['seconds_bf16']:.1f} s bf16):")
        print(f"{'feature':<40}{'cosine':>10}{'rel. L2 error':>16}")
        for row in rows:
            print(f"{row['feature']:<40}{row['cosine']:10.5f}{row['rel_l2']:16.4f}")


if __name__ == "__main__":
    main()
