"""MaskCLIP alone: the whole transformer (the reference's way) against the split the predictor runs (the class
and patch stream once per image, then the mask tokens), and what a hit costs with each cached layout, on
random CLIP weights (cost does not depend on weight values).

    python benchmarks/maskclip.py                          # the full presets' ViT-L-14-336, 100 masks
    python benchmarks/maskclip.py --preset tiny --json

Each round runs, in turn: the whole transformer; the stream (what a miss adds); the mask tokens from the
stored per-layer keys and values (a hit, as cached); and each layer's keys and values recomputed from
its hidden states (what a hit would add had the entry stored the hidden states, half the bytes).
Reported: medians over --repeats rounds, and the bytes of either layout in the storage dtype.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STORAGE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _seconds(run: Callable[[], object]) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="odise-label-coco", help="whose CLIP and number of queries")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--storage", default="fp16", choices=sorted(STORAGE_BYTES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from odise_core.config import get_config
    from odise_core.modeling.clip import ClipModel

    cfg = get_config(args.preset)
    clip = ClipModel(dataclasses.replace(cfg.clip, pretrained=None))
    queries = cfg.decoder.num_queries
    g = torch.Generator().manual_seed(0)
    image01 = torch.rand(1, 3, 1024, 1536, generator=g)
    masks = torch.randn(1, queries, 256, 384, generator=g) * 4  # about half the patches kept per mask
    blocks = clip.model.visual.transformer.resblocks
    width = clip.model.visual.transformer.width

    def recompute_keys_values(hidden: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(b.ln_1(hidden[:, i]), b.attn.in_proj_weight[width:], b.attn.in_proj_bias[width:])
                for i, b in enumerate(blocks)]

    rounds: dict[str, list[float]] = {"whole": [], "stream": [], "hit": [], "keys_values_from_hidden": []}
    with torch.inference_mode():
        image = clip.maskclip_image(image01)
        stream = clip.maskclip_stream(image)
        hidden = torch.randn(1, len(blocks), stream["keys"].shape[2], width, generator=g)
        whole, split = clip.mask_embeddings_full(image01, masks), clip.embed_masks(stream, masks)
        for _ in range(args.repeats):
            rounds["whole"].append(_seconds(lambda: clip.mask_embeddings_full(image01, masks)))
            rounds["stream"].append(_seconds(lambda: clip.maskclip_stream(image)))
            rounds["hit"].append(_seconds(lambda: clip.embed_masks(stream, masks)))
            rounds["keys_values_from_hidden"].append(_seconds(lambda: recompute_keys_values(hidden)))
    median = {name: round(statistics.median(times), 3) for name, times in rounds.items()}
    per_value = STORAGE_BYTES[args.storage]
    report = {
        "preset": args.preset, "clip": cfg.clip.model_name, "queries": queries, "layers": len(blocks),
        "tokens": int(stream["keys"].shape[2]), "width": width, "threads": torch.get_num_threads(),
        "seconds": median, "rounds": rounds, "miss_s": round(median["stream"] + median["hit"], 3),
        "hit_hidden_layout_s": round(median["hit"] + median["keys_values_from_hidden"], 3),
        "max_abs_diff": float((whole - split).abs().max()), "storage": args.storage,
        "bytes_keys_values": sum(t.numel() for t in stream.values()) * per_value,
        "bytes_hidden": (hidden.numel() + stream["cls"].numel()) * per_value,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"MaskCLIP on {report['clip']} ({report['layers']} layers, {report['tokens']} class+patch tokens, "
          f"{queries} masks, {report['threads']} threads), median of {args.repeats}:")
    print(f"  whole transformer            {median['whole']:7.2f} s")
    print(f"  split, miss (stream + masks) {report['miss_s']:7.2f} s")
    print(f"  split, hit from keys/values  {median['hit']:7.2f} s   {report['bytes_keys_values'] / 2**20:7.1f} MB "
          f"{args.storage} per image")
    print(f"  split, hit from hidden       {report['hit_hidden_layout_s']:7.2f} s   "
          f"{report['bytes_hidden'] / 2**20:7.1f} MB {args.storage} per image")
    print(f"  largest difference split vs whole: {report['max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
