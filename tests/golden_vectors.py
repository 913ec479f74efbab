"""Golden vectors of the official ODISE code: locate the package, build the matching model through the
public loaders, and compute odise_core's value of every stored output (keys as in the package).

The package lives beside the repository (../shared/reference/golden); ODISE_GOLDEN_DIR overrides it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from odise_core.config import ModelConfig, get_config
from odise_core.modeling.head import geometric_mix
from odise_core.modeling.odise import ODISE
from odise_core.predictor import ODISEPredictor, build_predictor
from odise_core.postprocess import resize_mask_logits, semantic_inference
from odise_core.preprocess import load_image, prepare
from odise_core.vocabulary import TextEmbeddingCache, VocabClass, Vocabulary

ENV_GOLDEN = "ODISE_GOLDEN_DIR"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "golden"
SUMMARISED = ("s2", "s3")  # fused levels stored as summaries, not in full
# manifest settings the project reads off the weights instead of its config; checked on the built model
DERIVED = {("clip", "patch_size"): lambda predictor: predictor.model.clip.model.visual.conv1.kernel_size[0]}


def golden_dir() -> Path:
    """Where the golden package is expected (it may be missing)."""
    return Path(os.environ.get(ENV_GOLDEN) or DEFAULT_DIR).resolve()


def load_manifest(pkg: Path) -> dict[str, Any]:
    return json.loads((pkg / "manifest.json").read_text(encoding="utf-8"))


def golden_config(pkg: Path, manifest: dict[str, Any]) -> ModelConfig:
    """The manifest's project_config applied to its base preset, with file paths under `pkg`."""
    spec = manifest["project_config"]
    cfg = get_config(spec["base_preset"])
    cfg.precision = spec["precision"]
    for section in ("diffusion", "clip", "backbone", "pixel_decoder", "decoder", "head"):
        target = getattr(cfg, section)
        for key, value in spec.get(section, {}).items():
            if (section, key) in DERIVED:
                continue
            current = getattr(target, key)
            if isinstance(current, dict) and key != "custom":
                current.update(value)
            else:
                setattr(target, key, tuple(value) if isinstance(current, tuple) else value)
    cfg.diffusion.pretrained = str(pkg / spec["diffusion"]["pretrained"])
    cfg.diffusion.empty_prompt = str(pkg / "weights" / "sd_constants.safetensors")
    cfg.clip.pretrained = str(pkg / spec["clip"]["pretrained"])
    cfg.checkpoint = str(pkg / spec["checkpoint"])
    cfg.offline = True  # every file is local: never touch the network
    return cfg


def golden_vocabulary(manifest: dict[str, Any]) -> Vocabulary:
    """The manifest's vocabulary through the default builder (base-ness by the reference's rule)."""
    return Vocabulary([VocabClass(c["name"], tuple(c["synonyms"][1:]), c["is_thing"]) for c in manifest["vocabulary"]])


def build_model(pkg: Path, manifest: dict[str, Any], **head_changes: Any) -> ODISEPredictor:
    """The predictor on the golden weights (fp32, CPU, no disk text cache), built as every caller builds it."""
    cfg = golden_config(pkg, manifest)
    for key, value in head_changes.items():
        setattr(cfg.head, key, value)
    predictor = build_predictor(cfg, device="cpu", text_cache=TextEmbeddingCache(None))
    for (section, key), read in DERIVED.items():
        expected = manifest["project_config"].get(section, {}).get(key)
        if expected is not None and read(predictor) != expected:
            raise AssertionError(f"{section}.{key}: the built model has {read(predictor)}, the manifest {expected}")
    return predictor


@dataclass
class Outputs:
    """odise_core's values for one image: tensors keyed as in outputs/<image>.safetensors, and maps."""

    tensors: dict[str, torch.Tensor]
    resized_uint8: np.ndarray
    panoptic: np.ndarray  # (H,W) ids 1..N in segment order, 0 = void
    segments: list[dict[str, Any]]
    semantic: np.ndarray  # (H,W) argmax class


def _stats(prefix: str, feat: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = feat.flatten(2)
    return {f"{prefix}/mean": flat.mean(-1), f"{prefix}/absmean": flat.abs().mean(-1),
            f"{prefix}/min": flat.amin(-1), f"{prefix}/max": flat.amax(-1)}


def _summary(prefix: str, feat: torch.Tensor) -> dict[str, torch.Tensor]:
    x = feat[0]
    c, h, w = x.shape
    flat = x.reshape(c, -1)
    return {f"{prefix}/channel_mean": flat.mean(-1), f"{prefix}/channel_absmean": flat.abs().mean(-1),
            f"{prefix}/channel_min": flat.amin(-1), f"{prefix}/channel_max": flat.amax(-1),
            f"{prefix}/spatial_mean": x.mean(0), f"{prefix}/row_mid": x[:, h // 2, :], f"{prefix}/col_mid": x[:, :, w // 2]}


def _window_captures(model: ODISE) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], Any]:
    """Hook the diffusion feature extractor: CLIP embeddings (its input) and SD features (its output) per call."""
    embeds: list[torch.Tensor] = []
    features: list[list[torch.Tensor]] = []

    def hook(module: Any, args: tuple, output: list[torch.Tensor]) -> None:
        embeds.append(args[1].detach().float())
        features.append([f.detach().float() for f in output])

    return embeds, features, model.backbone.feature_extractor.register_forward_hook(hook)


@torch.inference_mode()
def run_image(predictor: ODISEPredictor, pkg: Path, manifest: dict[str, Any], name: str) -> Outputs:
    """Every stage of the network on one golden image, then the predictor's whole `predict_raw` in each mode."""
    model = predictor.model
    info = manifest["images"][name]
    vocab = golden_vocabulary(manifest)
    image = load_image(pkg / info["input"])
    prep = prepare(image, model.cfg.backbone)
    h, w = prep.resized_size
    resized = (prep.tensor[0, :, :h, :w] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    t: dict[str, torch.Tensor] = {}

    embeds, sd_features, handle = _window_captures(model)
    try:
        features = model.extract_features(prep.tensor)
    finally:
        handle.remove()
    clip_embed = torch.cat(embeds)
    t["backbone/clip_image_embed"] = clip_embed
    context, time_offset = model.backbone.feature_extractor.conditioning(clip_embed)
    t["backbone/sd_context"], t["backbone/time_embed_offset"] = context, time_offset
    for i in range(len(sd_features[0])):
        t.update(_stats(f"backbone/sd_feature{i}", torch.cat([call[i] for call in sd_features])))
    for level, feat in features.items():
        t.update(_summary(f"backbone/{level}", feat) if level in SUMMARISED else {f"backbone/{level}": feat})

    mask_features, multi_scale = model.sem_seg_head.pixel_decoder(features)
    t["pixel_decoder/mask_features"] = mask_features
    t.update({f"pixel_decoder/multi_scale_{i}": x for i, x in enumerate(multi_scale)})
    dec = model.sem_seg_head.predictor(multi_scale, mask_features)
    t["decoder/pred_masks"], t["decoder/mask_embed"] = dec["pred_masks"], dec["mask_embed"]
    t["decoder/logit_scale"] = torch.as_tensor(dec["logit_scale"]).reshape(())
    t["decoder/aux_mask_embed"] = torch.stack([a["mask_embed"] for a in dec["aux_outputs"]])
    aux_masks = torch.stack([a["pred_masks"] for a in dec["aux_outputs"]])
    t["decoder/aux_pred_masks_mean"] = aux_masks.flatten(3).mean(-1)
    t["decoder/aux_pred_masks_positive"] = (aux_masks > 0).flatten(3).sum(-1)

    t["text/category_raw"] = model.text_embeddings(vocab, model.cfg.head.label_prompt)[0]
    t["text/clip_raw"] = model.text_embeddings(vocab, model.cfg.head.clip_prompt)[0]
    heads = model.forward_heads(features, vocab)
    t["category_head/pred_logits"] = heads["pred_logits"]

    clip_image, clip_masks = model.maskclip_inputs(prep.tensor, prep.resized_size, heads["pred_masks"])
    t["maskclip/mask_embed"] = model.clip.mask_embeddings(clip_image, clip_masks)
    t["maskclip/logits"] = model.classify_with_clip(clip_image, clip_masks, vocab)
    size = (model.clip.image_size, model.clip.image_size)
    clip_masks_at_input = F.interpolate(clip_masks, size=size, mode="bilinear", align_corners=False)
    t["maskclip/patch_keep"] = model.clip.patch_keep(clip_masks_at_input).to(torch.uint8)
    t["ensemble/is_base"] = vocab.is_base.to(torch.uint8)
    t["ensemble/log_probs_open"] = geometric_mix(heads["pred_logits"], t["maskclip/logits"], vocab.is_base,
                                                 model.cfg.head.alpha, model.cfg.head.beta)

    raw = predictor.predict_raw(image, vocab, "panoptic")
    t["ensemble/class_probs"] = raw.class_probs[None]
    full = resize_mask_logits(raw.mask_logits, prep.resized_size, prep.resized_size, prep.original_size)
    t["postprocess/mask_logits_mean"] = full.flatten(1).mean(-1)
    t["postprocess/mask_positive"] = (full > 0).flatten(1).sum(-1)
    t["semantic/class_mean"] = semantic_inference(raw.class_probs, full).flatten(1).mean(-1)

    panoptic = np.zeros(prep.original_size, dtype=np.int64)
    for i, seg in enumerate(raw.segments, 1):
        panoptic[seg.mask] = i
    segments = [{"category_id": s.class_index, "isthing": s.is_thing, "score": s.score, "area": s.area}
                for s in raw.segments]
    semantic = np.zeros(prep.original_size, dtype=np.int64)
    for seg in predictor.predict(image, vocab, "semantic"):
        semantic[seg.mask] = seg.class_index
    instances = predictor.predict(image, vocab, "instance")
    t["instances/scores"] = torch.tensor([s.score for s in instances])
    t["instances/classes"] = torch.tensor([s.class_index for s in instances])
    t["instances/mask_area"] = torch.tensor([s.area for s in instances])
    return Outputs({k: v.detach().cpu() for k, v in t.items()}, resized, panoptic, segments, semantic)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def rel_error(ours: torch.Tensor, golden: torch.Tensor) -> tuple[float, float]:
    """(max |ours - golden|, that divided by max |golden|): the package's tolerance metric."""
    diff = float((ours.double() - golden.double()).abs().max()) if golden.numel() else 0.0
    scale = float(golden.double().abs().max()) if golden.numel() else 0.0
    return diff, diff / scale if scale > 0 else diff
