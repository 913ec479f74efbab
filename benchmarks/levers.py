"""Measure the speed levers of the diffusion feature extractor (the dominant cost) one at a time.

Full `odise-label-coco` SD on random weights, 512 crops, this machine's CPU (or CUDA when present):
early stop vs whole networks, batched vs one-at-a-time crops, channels_last, the VAE encoder
batched vs crop by crop, SDPA vs classic attention, bf16 autocast, and bf16 SD weights (what `precision="auto"` does on a
CPU with native bf16).
Prints ms per crop and the speed-up of each lever against the baseline in the same run.

    python benchmarks/levers.py [--preset odise-label-coco] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odise_core import weights  # noqa: E402
from odise_core.config import get_config  # noqa: E402
from odise_core.modeling.diffusion import DiffusionFeatureExtractor  # noqa: E402


def time_call(fn, repeats: int) -> float:
    """Best-of-`repeats` seconds of `fn()` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="odise-label-coco")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = get_config(args.preset)
    cfg.diffusion.pretrained = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet, vae, empty = weights.load_stable_diffusion(cfg.diffusion)
    window = cfg.backbone.window
    gen = torch.Generator().manual_seed(0)
    crops = torch.rand(4, 3, window, window, generator=gen).to(device)
    clip_embed = torch.randn(4, cfg.clip.embed_dim, generator=gen).to(device)

    def extractor(**kw) -> DiffusionFeatureExtractor:
        return DiffusionFeatureExtractor(cfg.diffusion, cfg.clip.embed_dim, sd=(unet, vae, empty), **kw).to(device)

    def run(ext: DiffusionFeatureExtractor, batch: int, autocast: bool = False):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()

        def fn():
            with torch.inference_mode(), ctx:
                for i in range(0, 4, batch):
                    ext(crops[i:i + batch], clip_embed[i:i + batch])
        return fn

    def vae_encoder(chunk: int):
        def fn():
            with torch.inference_mode():
                for i in range(0, 4, chunk):
                    vae.encoder(crops[i:i + chunk] * 2 - 1)
        return fn

    base = extractor()
    rows = [("baseline: early stop, 4 crops batched", time_call(run(base, 4), args.repeats))]
    rows.append(("whole UNet + VAE decoder (reference)", time_call(run(extractor(full_networks=True), 4), args.repeats)))
    rows.append(("one crop at a time (reference)", time_call(run(base, 1), args.repeats)))
    rows.append(("channels_last", time_call(run(extractor(channels_last=True), 4), args.repeats)))
    unet.to(memory_format=torch.contiguous_format)
    vae.to(memory_format=torch.contiguous_format)
    rows.append(("fp32 VAE encoder alone, 4 crops batched", time_call(vae_encoder(4), args.repeats)))
    rows.append(("fp32 VAE encoder alone, crop by crop", time_call(vae_encoder(1), args.repeats)))
    rows.append(("bf16 autocast (whole extractor)", time_call(run(base, 4, autocast=True), args.repeats)))
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for net in (unet, vae):  # diffusers' default is SDPA (AttnProcessor2_0); the classic one materialises QK^T
        net.set_attn_processor(AttnProcessor())
    rows.append(("no SDPA: classic attention in UNet and VAE", time_call(run(base, 4), args.repeats)))
    for net in (unet, vae):
        net.set_attn_processor(AttnProcessor2_0())
    base.set_sd_dtype(torch.bfloat16)  # one-way: the float32 rows are above
    rows.append(("bf16 SD weights (precision auto here)", time_call(run(base, 4), args.repeats)))
    baseline = rows[0][1]
    if args.json:
        print(json.dumps([{"lever": n, "ms_per_crop": s / 4 * 1000, "vs_baseline": s / baseline} for n, s in rows]))
        return
    print(f"diffusion features of 4 {window}px crops, {args.preset} on {device} (best of {args.repeats})")
    print(f"{'variant':<40}{'ms/crop':>10}{'time vs baseline':>18}")
    for name, seconds in rows:
        print(f"{name:<40}{seconds / 4 * 1000:10.0f}{seconds / baseline:17.2f}x")


if __name__ == "__main__":
    main()
