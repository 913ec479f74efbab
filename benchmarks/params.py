"""Parameter counts per stage of a preset (built on the meta device: no memory, no weights needed).

    python benchmarks/params.py [--preset odise-label-coco]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odise_core.config import get_config  # noqa: E402
from odise_core.modeling.odise import ODISE  # noqa: E402
from odise_core.vocabulary import TextEmbeddingCache  # noqa: E402


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_counts(model: ODISE) -> list[tuple[str, int, bool]]:
    """(stage, parameters, trainable-in-ODISE) rows."""
    ext = model.backbone.feature_extractor
    captioner = sum(count(getattr(ext, n)) for n in ("clip_project", "time_embed_project"))
    captioner += ext.alpha_cond.numel() + ext.alpha_cond_time_embed.numel()
    return [
        ("CLIP ViT (shared: captioner, text, MaskCLIP)", count(model.clip), False),
        ("SD VAE", count(ext.vae), False),
        ("SD UNet", count(ext.unet), False),
        ("implicit captioner", captioner, True),
        ("feature projections (fusion)", count(model.backbone.feature_projections), True),
        ("pixel decoder (MSDeformAttn)", count(model.sem_seg_head.pixel_decoder), True),
        ("transformer decoder + pooled embed", count(model.sem_seg_head.predictor), True),
        ("category head", count(model.category_head), True),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="odise-label-coco")
    args = ap.parse_args()
    cfg = get_config(args.preset)
    cfg.diffusion.pretrained, cfg.clip.pretrained, cfg.checkpoint = None, None, None
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from odise_core.modeling.clip import ClipModel

    clip_cfg = cfg.clip.custom or open_clip.get_model_config(cfg.clip.model_name)
    with torch.device("meta"):
        clip = ClipModel(cfg.clip, open_clip.CLIP(**clip_cfg))
        model = ODISE(cfg, clip, UNet2DConditionModel(**cfg.diffusion.unet), AutoencoderKL(**cfg.diffusion.vae),
                      torch.zeros(1, 77, cfg.diffusion.context_dim), text_cache=TextEmbeddingCache(None))
    rows = stage_counts(model)
    print(f"{'stage':<44}{'params':>14}  trainable")
    for name, n, trainable in rows:
        print(f"{name:<44}{n / 1e6:13.2f}M  {'yes' if trainable else 'frozen'}")
    trainable = sum(v.numel() for k, v in model.trainable_state_dict().items() if k != "criterion.empty_weight")
    print(f"{'trainable state dict (checkpoint)':<44}{trainable / 1e6:13.2f}M")
    print(f"{'total':<44}{sum(n for _, n, _ in rows) / 1e6:13.2f}M")


if __name__ == "__main__":
    main()
