"""ODISE: assembles backbone, heads and the CLIP classifier; `predict(image, vocabulary)`."""
from __future__ import annotations

import functools
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from odise_core.backbone import ODISEBackbone
from odise_core.clip import ClipModel
from odise_core.config import ModelConfig
from odise_core.diffusion import DiffusionFeatureExtractor
from odise_core.head import CategoryHead, clip_class_logits, geometric_ensemble
from odise_core.phrase import phrase_probabilities
from odise_core.mask_decoder import SemSegHead
from odise_core.postprocess import instance_inference, panoptic_inference, resize_mask_logits, semantic_inference
from odise_core.preprocess import Prepared, load_image, prepare
from odise_core.query_state import QueryState, bounded_mask_logits
from odise_core.training import SetCriterion
from odise_core.types import RawPrediction, Segment
from odise_core.vocabulary import TextEmbeddingCache, Vocabulary, is_base
from odise_core import weights

log = logging.getLogger(__name__)

# Classes of the COCO panoptic training set; the criterion's no-object weight vector has K_train + 1 entries.
COCO_TRAIN_CLASSES = 133
MODES = ("panoptic", "instance", "semantic")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_plan(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(whole-model autocast dtype or None, dtype of the frozen SD networks) for `precision` on `device`.

    - fp32: everything in float32: the same numbers as the reference pipeline.
    - auto: on CUDA, autocast in bf16 (fp16 without bf16 support); on a CPU with native bf16, the
      frozen UNet and VAE in bf16 and the rest in float32; float32 otherwise.
    - bf16: as auto, but the SD networks run in bf16 on any CPU.
    On the CPU only SD goes to bf16: whole-model autocast made the CLIP ViT 20x slower there.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None, torch.float32
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), torch.float32
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return None, torch.bfloat16
    return None, torch.float32


@dataclass
class _Forward:
    """What one full pass computes, before any output mode."""

    prep: Prepared
    out: dict[str, Any]  # forward_heads' outputs
    mask_logits: torch.Tensor  # (Q, h, w) at the resized size, unpadded
    clip_embeds: torch.Tensor | None  # (1, Q, D) when kept
    probs: torch.Tensor  # (Q, K+1)
    timings: dict[str, float]


class ODISE(nn.Module):
    """The trainable ODISE parts plus references to the frozen SD and CLIP networks."""

    FROZEN_PREFIXES = ("clip.", "backbone.feature_extractor.unet.", "backbone.feature_extractor.vae.")

    def __init__(self, cfg: ModelConfig, clip: ClipModel, unet: nn.Module, vae: nn.Module,
                 empty_prompt_embedding: torch.Tensor, text_cache: TextEmbeddingCache | None = None,
                 full_networks: bool = False):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        extractor = DiffusionFeatureExtractor(cfg.diffusion, clip.dim, full_networks=full_networks,
                                              sd=(unet, vae, empty_prompt_embedding))
        self.backbone = ODISEBackbone(cfg, clip, feature_extractor=extractor)
        self.sem_seg_head = SemSegHead(cfg, self.backbone.out_channels, self.backbone.out_strides)
        self.category_head = CategoryHead(cfg.head, clip_dim=cfg.clip.embed_dim)
        # The caption model classifies foreground/background only: its no-object weights have 2 entries.
        self.criterion = SetCriterion(COCO_TRAIN_CLASSES if cfg.head.kind == "label" else 1)
        # class names a fine-tune trained on: ensembled like COCO's "seen in training" classes (alpha)
        self.trained_classes: set[str] = set()
        self.text_cache = text_cache or TextEmbeddingCache(weights.weights_dir(cfg.weights_dir) / "text_embeddings")
        self.version = "random" if cfg.checkpoint is None else Path(str(cfg.checkpoint)).stem
        for p in self.clip.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device = "auto",
                    text_cache: TextEmbeddingCache | None = None) -> "ODISE":
        """Build the model with the weights named by `cfg`; fails at once when weights are missing."""
        weights.check_weights_available(cfg)
        where = weights.WeightsLocation.of(cfg)
        torch.manual_seed(cfg.seed)
        clip = ClipModel(cfg.clip, weights.load_clip(cfg.clip, where))
        unet, vae, empty = weights.load_stable_diffusion(cfg.diffusion, where=where)
        model = cls(cfg, clip, unet, vae, empty, text_cache=text_cache)
        if cfg.checkpoint is not None:
            weights.load_odise_checkpoint(model, cfg.checkpoint, where)
        model.eval()
        model = model.to(resolve_device(device))
        model.apply_precision()
        return model

    def apply_precision(self) -> tuple[torch.dtype | None, torch.dtype]:
        """Cast the frozen SD networks as `cfg.precision` asks on this device; returns the plan."""
        autocast_dtype, sd_dtype = precision_plan(self.cfg.precision, self.device)
        self.backbone.feature_extractor.set_sd_dtype(sd_dtype)
        return autocast_dtype, sd_dtype

    @property
    def device(self) -> torch.device:
        return next(self.category_head.parameters()).device

    @functools.cached_property
    def model_key(self) -> str:
        """Identifies the CLIP weights (source, and file size/mtime for local files) for the text cache."""
        kind, location = weights.resolve_clip_source(self.cfg.clip, weights.WeightsLocation.of(self.cfg))
        ident = location
        if kind == "file":
            stat = Path(location).stat()
            ident = f"{Path(location).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
        return f"{self.cfg.clip.model_name}:{kind}:{ident}"

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the official checkpoint's layout: everything but frozen SD/CLIP."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.FROZEN_PREFIXES)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load trainable weights, requiring exactly the keys and shapes of `trainable_state_dict`."""
        problem = weights.state_dict_mismatch(self.trainable_state_dict(), state)
        if problem:
            raise ValueError(f"checkpoint does not match the model: {problem}")
        self.load_state_dict(state, strict=False)

    # ----------------------------------------------------------------- stages
    def text_embeddings(self, vocab: Vocabulary, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text embeddings of every synonym with `prompt`, cached per vocabulary."""
        texts, syn_to_class = vocab.synonyms_flat()
        emb = self.text_cache.get(self.clip, self.model_key, prompt, texts)
        return emb.to(self.device), syn_to_class.to(self.device)

    def extract_features(self, image01: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fused multi-scale diffusion features of padded images (B,3,Hp,Wp) in [0,1]; frozen, no grad."""
        with torch.no_grad():
            return self.backbone(image01.to(self.device))

    def forward_heads(self, features: dict[str, torch.Tensor], vocab: Vocabulary) -> dict[str, Any]:
        """Pixel decoder, transformer decoder and category head; differentiable (used by training)."""
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(features)
        out = self.sem_seg_head.predictor(multi_scale, mask_features)
        text, syn_to_class = self.text_embeddings(vocab, self.cfg.head.label_prompt)
        k = len(vocab)
        result = {
            "pred_masks": out["pred_masks"],
            "mask_embed": out["mask_embed"],
            "logit_scale": out["logit_scale"],
            "binary_logits": out.get("pred_logits"),  # the caption model's fg/bg logits, else None
            "pred_logits": self.category_head(out["mask_embed"], text, syn_to_class, k, logit_scale=out["logit_scale"],
                                              binary_logits=out.get("pred_logits")),
            "aux_outputs": [
                {"pred_masks": aux["pred_masks"],
                 "pred_logits": self.category_head(aux["mask_embed"], text, syn_to_class, k,
                                                   logit_scale=out["logit_scale"],
                                                   binary_logits=aux.get("pred_logits"))}
                for aux in out["aux_outputs"]
            ],
        }
        return result

    def classify_with_clip(self, image01: torch.Tensor, mask_logits: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """MaskCLIP logits (B,Q,K) of the unpadded image with masks cropped to the same region."""
        text, syn_to_class = self.text_embeddings(vocab, self.cfg.head.clip_prompt)
        embeds = self.clip.mask_embeddings(image01, mask_logits)
        return clip_class_logits(embeds, text, syn_to_class, len(vocab))

    # ----------------------------------------------------------------- inference
    def _autocast(self):
        autocast_dtype, _ = self.apply_precision()
        return torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def _forward(self, image: Any, vocab: Vocabulary, keep_clip_embeds: bool = False) -> _Forward:
        """One full pass: features, heads, MaskCLIP and the ensembled probabilities of one image."""
        if len(vocab) == 0:
            raise ValueError("the vocabulary is empty: give at least one class")
        timings: dict[str, float] = {}
        t = time.perf_counter()
        array = load_image(image)
        prep: Prepared = prepare(array, self.cfg.backbone)
        timings["preprocess"] = time.perf_counter() - t

        with self._autocast():
            t = time.perf_counter()
            features = self.extract_features(prep.tensor)
            timings["backbone"] = time.perf_counter() - t
            t = time.perf_counter()
            out = self.forward_heads(features, vocab)
            timings["heads"] = time.perf_counter() - t

            t = time.perf_counter()
            h, w = prep.resized_size
            hp, wp = prep.tensor.shape[-2:]
            masks = nn.functional.interpolate(out["pred_masks"].float(), size=(hp, wp), mode="bilinear",
                                              align_corners=False)[..., :h, :w]
            image01 = prep.tensor[..., :h, :w].to(self.device)
            clip_embeds = None
            if keep_clip_embeds:  # the same logits as classify_with_clip, keeping the embeddings
                clip_embeds = self.clip.mask_embeddings(image01, masks)
                text, syn_to_class = self.text_embeddings(vocab, self.cfg.head.clip_prompt)
                clip_logits = clip_class_logits(clip_embeds, text, syn_to_class, len(vocab))
            else:
                clip_logits = self.classify_with_clip(image01, masks, vocab)
            timings["clip_classifier"] = time.perf_counter() - t

        seen = is_base(vocab) | torch.tensor([n in self.trained_classes for n in vocab.names], dtype=torch.bool)
        probs = geometric_ensemble(out["pred_logits"].float(), clip_logits.float(), seen.to(self.device),
                                   self.cfg.head.alpha, self.cfg.head.beta)[0]
        return _Forward(prep, out, masks[0], clip_embeds, probs, timings)

    @torch.inference_mode()
    def predict_raw(self, image: Any, vocab: Vocabulary, mode: str = "panoptic") -> RawPrediction:
        """Segments plus per-query class probabilities and mask logits for one image."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        run = self._forward(image, vocab)
        t = time.perf_counter()
        segments = self._postprocess(run.probs, run.mask_logits, vocab, run.prep, mode)
        run.timings["postprocess"] = time.perf_counter() - t
        return RawPrediction(segments=segments, class_probs=run.probs.cpu(), mask_logits=run.mask_logits.cpu(),
                             image_size=run.prep.original_size, timings=run.timings)

    @torch.inference_mode()
    def query_state(self, image: Any, vocab: Vocabulary) -> QueryState:
        """One full pass keeping what interactive clicks, boxes and phrases need (odise_core/query_state.py).

        The query mask logits cover the whole image at most MAX_MASK_SIDE pixels on a side; the
        mask and MaskCLIP embeddings let phrase_probabilities() score a new phrase without the network.
        """
        run = self._forward(image, vocab, keep_clip_embeds=True)
        binary = run.out["binary_logits"]
        return QueryState(mask_logits=bounded_mask_logits(run.mask_logits), class_probs=run.probs.float().cpu(),
                          mask_embed=run.out["mask_embed"][0].float().cpu(), clip_embeds=run.clip_embeds[0].float().cpu(),
                          logit_scale=float(run.out["logit_scale"]), image_size=run.prep.original_size,
                          binary_logits=None if binary is None else binary[0].float().cpu())

    def phrase_probabilities(self, state: QueryState, vocab: Vocabulary, phrase: str) -> torch.Tensor:
        """(Q, K+2) probabilities of `state`'s queries over `vocab` + `phrase` (class K) + no object."""
        return phrase_probabilities(self, state, vocab, phrase)

    def predict(self, image: Any, vocab: Vocabulary, mode: str = "panoptic") -> list[Segment]:
        """Panoptic (or instance/semantic) segments of one image at its original size."""
        return self.predict_raw(image, vocab, mode).segments

    def _postprocess(self, probs: torch.Tensor, mask_logits: torch.Tensor, vocab: Vocabulary, prep: Prepared,
                     mode: str) -> list[Segment]:
        head = self.cfg.head
        is_thing = vocab.is_thing.to(probs.device)
        if mode == "semantic":
            full = resize_mask_logits(mask_logits, prep.resized_size, prep.resized_size, prep.original_size)
            sem = semantic_inference(probs, full)
            sem = sem / sem.sum(0, keepdim=True).clamp_min(1e-6)  # per-pixel class distribution: scores in [0,1]
            labels = sem.argmax(0).cpu().numpy()
            return [Segment(mask=labels == k, class_index=int(k), score=float(sem[k][labels == k].mean()),
                            is_thing=bool(vocab.is_thing[k])) for k in np.unique(labels)]
        if mode == "instance":
            full = resize_mask_logits(mask_logits, prep.resized_size, prep.resized_size, prep.original_size)
            return instance_inference(probs, full, is_thing, head.max_instances)
        # Only queries that can survive panoptic filtering are upsampled to full size: saves memory on big images.
        scores, labels = probs[:, :-1].max(-1)
        keep = (probs.argmax(-1) != probs.shape[-1] - 1) & (scores > head.object_mask_threshold)
        index = keep.nonzero().flatten()
        full = resize_mask_logits(mask_logits[index], prep.resized_size, prep.resized_size, prep.original_size)
        _, segments = panoptic_inference(probs[index], full, is_thing, head.object_mask_threshold,
                                         head.overlap_threshold, head.mask_threshold)
        for seg in segments:
            seg.query_index = int(index[seg.query_index]) if seg.query_index >= 0 else seg.query_index
        return segments
