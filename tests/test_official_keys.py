"""Strict key test: our trainable state dict equals the official ODISE label-model checkpoint layout.

The expected list (odise_core/data/official_keys_label_coco.txt) was derived from the reference
code, not from our modules. The full preset is built on the meta device (shapes, no memory).
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

import odise_core
from odise_core import weights
from odise_core.config import get_config
from odise_core.modeling import clip as clip_module
from odise_core.modeling import diffusion as diffusion_module
from odise_core.modeling import odise as model_module
from odise_core.modeling.head import CategoryHead
from odise_core.modeling.mask_decoder import SemSegHead
from odise_core.training.losses import SetCriterion

KEY_FILE = Path(odise_core.__file__).parent / "data" / "official_keys_label_coco.txt"
STRIDES = {"s2": 4, "s3": 8, "s4": 16, "s5": 32}


def official_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in KEY_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        keys[name] = tuple(int(x) for x in shape.split(",") if x)
    return keys


def _shapes(module: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _compare(ours: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    wrong = {k: (ours[k], expected[k]) for k in expected if k in ours and ours[k] != expected[k]}
    assert (missing, unexpected, wrong) == ([], [], {})


def test_key_list_totals_the_reported_parameter_count():
    keys = official_keys()
    params = sum(torch.Size(s).numel() for k, s in keys.items() if k != "criterion.empty_weight")
    assert len(keys) == 399
    assert round(params / 1e6, 1) == 28.1  # "about 28.1M parameters" (spec)


def test_head_modules_match_official_keys():
    cfg = get_config("odise-label-coco")
    with torch.device("meta"):
        ours = {
            **_shapes(SemSegHead(cfg, {k: 512 for k in STRIDES}, STRIDES), "sem_seg_head."),
            **_shapes(CategoryHead(cfg.head, clip_dim=cfg.clip.embed_dim), "category_head."),
            **_shapes(SetCriterion(133), "criterion."),
        }
    expected = {k: v for k, v in official_keys().items()
                if k.startswith(("sem_seg_head.", "category_head.", "criterion."))}
    _compare(ours, expected)


def test_whole_label_model_matches_official_keys(monkeypatch, tmp_path):
    """Build `odise-label-coco` (random weights, meta device) through ODISE.from_config."""
    cfg = get_config("odise-label-coco").replace(weights_dir=str(tmp_path))
    cfg.diffusion.pretrained = None
    cfg.clip.pretrained = None
    cfg.checkpoint = None

    def meta_sd(dcfg, *args, **kwargs):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        return (UNet2DConditionModel(**dcfg.unet).requires_grad_(False),
                AutoencoderKL(**dcfg.vae).requires_grad_(False), torch.zeros(1, 77, dcfg.context_dim))

    def meta_clip(ccfg, *args, **kwargs):
        return open_clip.CLIP(**open_clip.get_model_config(ccfg.model_name)).requires_grad_(False)

    for module in (weights, diffusion_module, clip_module, model_module):
        if hasattr(module, "load_stable_diffusion"):
            monkeypatch.setattr(module, "load_stable_diffusion", meta_sd)
        if hasattr(module, "load_clip"):
            monkeypatch.setattr(module, "load_clip", meta_clip)
    with torch.device("meta"):
        model = model_module.ODISE.from_config(cfg, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    _compare(ours, official_keys())
