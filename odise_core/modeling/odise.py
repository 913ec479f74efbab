"""The ODISE network: frozen SD + CLIP features, mask heads and the MaskCLIP classifier; tensors in, tensors out.

Images, the precision policy and output modes are the predictor's (odise_core/predictor.py).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odise_core import weights
from odise_core.config import ModelConfig
from odise_core.modeling.backbone import ODISEBackbone
from odise_core.modeling.clip import ClipModel
from odise_core.modeling.diffusion import DiffusionFeatureExtractor
from odise_core.modeling.head import CategoryHead, clip_class_logits
from odise_core.modeling.mask_decoder import SemSegHead
from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

# Classes of the COCO panoptic training set; the checkpoint's no-object weight vector has K_train + 1 entries.
COCO_TRAIN_CLASSES = 133


class CheckpointCriterion(nn.Module):
    """The official checkpoint's `criterion.empty_weight` (no-object weight per training class), kept so
    checkpoints load strictly; inference never reads it and fine-tuning builds its own SetCriterion."""

    def __init__(self, num_classes: int, eos_coef: float = 0.1):
        super().__init__()
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)


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
        self.criterion = CheckpointCriterion(COCO_TRAIN_CLASSES if cfg.head.kind == "label" else 1)
        # class names a fine-tune trained on: ensembled like COCO's "seen in training" classes (alpha)
        self.trained_classes: set[str] = set()
        self.text_cache = text_cache or TextEmbeddingCache(weights.weights_dir(cfg.weights_dir) / "text_embeddings")
        self.version = "random" if cfg.checkpoint is None else Path(str(cfg.checkpoint)).stem
        self._backbone_digests: dict[bool, str] = {}
        for p in self.clip.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device = "cpu",
                    text_cache: TextEmbeddingCache | None = None) -> "ODISE":
        """Build the network with the weights named by `cfg` on `device`, in eval mode; fails at once when
        weights are missing. The precision policy is applied by the predictor (odise_core/predictor.py)."""
        weights.check_weights_available(cfg)
        where = weights.WeightsLocation.of(cfg)
        torch.manual_seed(cfg.seed)
        clip = ClipModel(cfg.clip, weights.load_clip(cfg.clip, where))
        unet, vae, empty = weights.load_stable_diffusion(cfg.diffusion, where=where)
        model = cls(cfg, clip, unet, vae, empty, text_cache=text_cache)
        if cfg.checkpoint is not None:
            weights.load_odise_checkpoint(model, cfg.checkpoint, where)
        model.eval()
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.category_head.parameters()).device

    @functools.cached_property
    def model_key(self) -> str:
        """Identifies the CLIP weights (source, and file size/mtime for local files) for the text cache."""
        kind, location = weights.resolve_clip_source(self.cfg.clip, weights.WeightsLocation.of(self.cfg))
        return f"{self.cfg.clip.model_name}:{kind}:{weights.source_identity(kind, location)}"

    @functools.cached_property
    def clip_weights_key(self) -> str:
        """Identifies the frozen CLIP weights alone (with random weights also the preset and seed), for
        MaskCLIP's cached stream, which depends on nothing else of the model."""
        if self.model_key.split(":")[1] == "random":
            return f"{self.model_key};random={self.cfg.name}:{self.cfg.seed}"
        return self.model_key

    @functools.cached_property
    def frozen_weights_key(self) -> str:
        """Identifies the frozen SD and CLIP weights (sources with size/mtime of local files; with random
        weights the preset and seeds that drew them), for the backbone feature cache."""
        kind, location = weights.resolve_sd_source(self.cfg.diffusion, weights.WeightsLocation.of(self.cfg))
        key = f"sd={kind}:{weights.source_identity(kind, location)};clip={self.model_key}"
        if kind == "random" or self.model_key.split(":")[1] == "random":
            key += f";random={self.cfg.name}:{self.cfg.seed}:{self.cfg.diffusion.noise_seed}"
        return key

    def backbone_digest(self, include_projections: bool = True) -> str:
        """Hash of the backbone's trainable weights (captioner, and the fusion's feature projections unless
        `include_projections` is False): the fused features change with them. Cached until the weights are
        loaded again or `forget_backbone_digest` is called (after training them)."""
        if include_projections not in self._backbone_digests:
            h = hashlib.sha256()
            for name, tensor in sorted(self.trainable_state_dict().items()):
                if name.startswith("backbone.") and (include_projections or
                                                     not name.startswith("backbone.feature_projections.")):
                    h.update(name.encode())
                    h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._backbone_digests[include_projections] = h.hexdigest()[:16]
        return self._backbone_digests[include_projections]

    def forget_backbone_digest(self) -> None:
        """Call after changing the backbone's trainable weights in place (a fine-tune of the projections)."""
        self._backbone_digests.clear()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the official checkpoint's layout: everything but frozen SD/CLIP."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.FROZEN_PREFIXES)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load trainable weights, requiring exactly the keys and shapes of `trainable_state_dict`."""
        problem = weights.state_dict_mismatch(self.trainable_state_dict(), state)
        if problem:
            raise ValueError(f"checkpoint does not match the model: {problem}")
        self.load_state_dict(state, strict=False)
        self.forget_backbone_digest()

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

    def maskclip_inputs(self, padded01: torch.Tensor, resized_size: tuple[int, int], pred_masks: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, mask logits) MaskCLIP classifies: the unpadded image and, per `cfg.head.maskclip_input`,
        the decoder's raw masks (B,Q,Hp/4,Wp/4) ("reference") or masks cropped to the image ("aligned")."""
        h, w = resized_size
        image01 = padded01[..., :h, :w].to(self.device)
        kind = self.cfg.head.maskclip_input
        if kind == "reference":
            return image01, pred_masks.float()
        if kind == "aligned":
            canvas = nn.functional.interpolate(pred_masks.float(), size=tuple(padded01.shape[-2:]), mode="bilinear",
                                               align_corners=False)
            return image01, canvas[..., :h, :w]
        raise ValueError(f"head.maskclip_input must be 'reference' or 'aligned', got {kind!r}")

    def maskclip_stream(self, image01: torch.Tensor) -> dict[str, torch.Tensor]:
        """MaskCLIP's mask-independent part of an image (as `maskclip_inputs` gives it): frozen CLIP only, so
        the predictor caches it per image (odise_core/feature_cache.py, `maskclip_key`)."""
        with torch.no_grad():
            return self.clip.maskclip_stream(self.clip.maskclip_image(image01.to(self.device)))

    def mask_embeddings(self, image01: torch.Tensor, mask_logits: torch.Tensor,
                        stream: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """MaskCLIP embeddings (B,Q,D) of an image and mask logits (as `maskclip_inputs` gives them), from
        `stream` (`maskclip_stream` of that image, e.g. cached) or computing it."""
        return self.clip.embed_masks(self.maskclip_stream(image01) if stream is None else stream, mask_logits)

    def classify_with_clip(self, image01: torch.Tensor, mask_logits: torch.Tensor, vocab: Vocabulary,
                           stream: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """MaskCLIP logits (B,Q,K) of an image and mask logits (as `maskclip_inputs` gives them)."""
        return self.clip_logits(self.mask_embeddings(image01, mask_logits, stream), vocab)

    def clip_logits(self, embeds: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """MaskCLIP logits (B,Q,K) of MaskCLIP embeddings (B,Q,D) against `vocab`'s prompted text embeddings."""
        text, syn_to_class = self.text_embeddings(vocab, self.cfg.head.clip_prompt)
        return clip_class_logits(embeds, text, syn_to_class, len(vocab))
