"""A reference-equivalent ODISE: the same outputs, with the redundant work the reference pipeline does.

Used only as the speed baseline: it measures what the optimised `ODISE` saves (benchmarks/latency.py;
run it through an ODISEPredictor). Being a subclass of `ODISE`, it shifts with it, so it is no
numerical oracle: fidelity to the official code is tested against its own outputs (tests/test_golden.py).
The reference builds CLIP three times (captioner, category-head text, MaskCLIP), keeps SD's text
encoder and re-encodes "" on every forward, re-encodes the vocabulary on every call, runs the whole
UNet and the whole VAE decoder, processes sliding-window crops one at a time, and runs MaskCLIP's
whole transformer over the mask, class and patch tokens together (nothing of it cached per image).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from odise_core import weights
from odise_core.config import ModelConfig
from odise_core.modeling.clip import ClipModel
from odise_core.modeling.odise import ODISE
from odise_core.vocabulary import Vocabulary


class ReferenceEquivalentODISE(ODISE):
    """ODISE paying the reference pipeline's costs; `predict` gives the same segments as `ODISE`."""

    def __init__(self, cfg: ModelConfig, clips: tuple[ClipModel, ClipModel, ClipModel], unet: nn.Module,
                 vae: nn.Module, text_encoder: nn.Module):
        empty = weights.encode_empty_prompt(text_encoder)
        super().__init__(cfg, clips[0], unet, vae, empty, full_networks=True)
        self.backbone.crop_batch_size = 1
        # Held outside the module tree so the trainable state dict keeps the official layout.
        object.__setattr__(self, "text_clip", clips[1])
        object.__setattr__(self, "mask_clip", clips[2])
        object.__setattr__(self, "sd_text_encoder", text_encoder)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device = "cpu", text_cache: Any = None
                    ) -> "ReferenceEquivalentODISE":
        """Built like ODISE.from_config, with precision "fp32": the reference pipeline runs in float32 on the
        CPU whatever `cfg.precision` says. `text_cache` is ignored: the reference re-encodes every call."""
        cfg = dataclasses.replace(cfg, precision="fp32")
        weights.check_weights_available(cfg)
        where = weights.WeightsLocation.of(cfg)
        torch.manual_seed(cfg.seed)
        clips = tuple(ClipModel(cfg.clip, weights.load_clip(cfg.clip, where)) for _ in range(3))
        unet, vae, _ = weights.load_stable_diffusion(cfg.diffusion, where=where)
        model = cls(cfg, clips, unet, vae, weights.load_sd_text_encoder(cfg.diffusion, where))
        if cfg.checkpoint is not None:
            weights.load_odise_checkpoint(model, cfg.checkpoint, where)
        model.eval()
        return model.to(device)

    def to(self, *args: Any, **kwargs: Any) -> "ReferenceEquivalentODISE":
        for extra in (self.text_clip, self.mask_clip, self.sd_text_encoder):
            extra.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def text_embeddings(self, vocab: Vocabulary, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        texts, syn_to_class = vocab.synonyms_flat()
        clip = self.mask_clip if prompt == self.cfg.head.clip_prompt else self.text_clip
        with torch.no_grad():
            emb = clip.encode_text([prompt.format(t) for t in texts], normalize=False)
        return emb.to(self.device), syn_to_class.to(self.device)

    def extract_features(self, image01: torch.Tensor) -> dict[str, torch.Tensor]:
        extractor = self.backbone.feature_extractor
        with torch.no_grad():
            empty = weights.encode_empty_prompt(self.sd_text_encoder).to(self.device)
        extractor.empty_embedding.copy_(empty.reshape(extractor.empty_embedding.shape))
        return super().extract_features(image01)

    def maskclip_stream(self, image01: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nothing: the reference runs MaskCLIP's whole transformer per call (`mask_embeddings`)."""
        return {}

    def mask_embeddings(self, image01: torch.Tensor, mask_logits: torch.Tensor,
                        stream: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.mask_clip.mask_embeddings_full(image01.to(self.device), mask_logits)
