"""Category head (mask embedding vs. projected CLIP text) and its geometric ensemble with MaskCLIP.

Official names: `category_head.text_proj`, `category_head.null_embed` (label model). The reference
feeds CLIP text embeddings to `text_proj` as `encode_text` returns them (not L2-normalised), and
`null_embed` starts as the CLIP embedding of the empty string.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import HeadConfig

PROB_EPS = 1e-8  # the reference's floor before its final log/softmax


def max_over_synonyms(logits: torch.Tensor, syn_to_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Reduce (..., S) synonym logits to (..., K) class logits by taking each class's best synonym."""
    if syn_to_class.numel() != logits.shape[-1]:
        raise ValueError(f"{logits.shape[-1]} synonym logits but {syn_to_class.numel()} synonym->class entries")
    index = syn_to_class.to(logits.device).long().expand_as(logits)
    out = torch.full((*logits.shape[:-1], num_classes), float("-inf"), dtype=logits.dtype, device=logits.device)
    return out.scatter_reduce(-1, index, logits, reduce="amax", include_self=False)


class CategoryHead(nn.Module):
    """Scores each query's mask embedding against the vocabulary: logit_scale * cos, plus "no object"."""

    def __init__(self, cfg: HeadConfig, clip_dim: int):
        super().__init__()
        self.kind = cfg.kind
        self.text_proj = nn.Linear(clip_dim, cfg.embed_dim)
        if cfg.kind == "label":
            # Replaced by the checkpoint; ODISE initialises it with CLIP's embedding of "".
            self.null_embed = nn.Parameter(torch.randn(1, clip_dim) * clip_dim ** -0.5)
        elif cfg.kind != "caption":
            raise ValueError(f"unknown head kind {cfg.kind!r}; use 'label' or 'caption'")

    def forward(self, mask_embed: torch.Tensor, text_embeds: torch.Tensor, syn_to_class: torch.Tensor,
                num_classes: int, logit_scale: torch.Tensor | float,
                binary_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B,Q,K+1), last column "no object".

        Label model: the null column is scale*cos with the projected `null_embed`. Caption model:
        `binary_logits` (B,Q,2) from the decoder's fg/bg `class_embed` give log-probabilities
        log(softmax(open) * p_fg) and log(p_bg), so a softmax over K+1 reproduces the reference.
        """
        emb = F.normalize(mask_embed, dim=-1)
        text = F.normalize(self.text_proj(text_embeds.to(emb.dtype)), dim=-1)
        open_logits = max_over_synonyms(logit_scale * emb @ text.t(), syn_to_class, num_classes)
        if self.kind == "label":
            null = F.normalize(self.text_proj(self.null_embed.to(emb.dtype)), dim=-1)
            return torch.cat([open_logits, logit_scale * emb @ null.t()], dim=-1)
        if binary_logits is None:
            raise ValueError("the caption head needs the decoder's 2-way binary_logits")
        fg_bg = binary_logits.log_softmax(-1)
        return torch.cat([open_logits.log_softmax(-1) + fg_bg[..., :1], fg_bg[..., 1:]], dim=-1)


def clip_class_logits(mask_clip_embeds: torch.Tensor, text_embeds: torch.Tensor, syn_to_class: torch.Tensor,
                      num_classes: int, scale: float = 100.0) -> torch.Tensor:
    """MaskCLIP class logits (B,Q,K): scale * cos(mask embedding, text), max over each class's synonyms."""
    sims = F.normalize(mask_clip_embeds, dim=-1) @ F.normalize(text_embeds.to(mask_clip_embeds.dtype), dim=-1).t()
    return max_over_synonyms(scale * sims, syn_to_class, num_classes)


def geometric_mix(odise_logits: torch.Tensor, clip_logits: torch.Tensor, is_base: torch.Tensor,
                  alpha: float, beta: float) -> torch.Tensor:
    """log(p^(1-w) q^w) (B,Q,K) before normalisation: p = softmax(ODISE logits over K), q = softmax(CLIP
    logits), w = alpha for base classes and beta for novel ones.

    Computed in log space, so it stays finite where a probability underflows to 0; the reference
    takes log(p^(1-w) q^w) and multiplies it by a 0/1 base mask, which gives -inf * 0 = NaN there.
    """
    log_p = odise_logits[..., :-1].log_softmax(-1)
    log_q = clip_logits.log_softmax(-1)
    base = is_base.to(device=log_p.device, dtype=log_p.dtype)
    w = base * alpha + (1 - base) * beta
    return (1 - w) * log_p + w * log_q


def geometric_ensemble(odise_logits: torch.Tensor, clip_logits: torch.Tensor, is_base: torch.Tensor,
                       alpha: float, beta: float) -> torch.Tensor:
    """Class probabilities (B,Q,K+1) mixing ODISE and CLIP per ODISE's geometric ensemble.

    The mix of `geometric_mix` renormalised over K and scaled by 1 - p(no object); then, as the
    reference, softmax(log(x + 1e-8)) of the K+1 values: every probability stays above 0.
    """
    p_null = odise_logits.softmax(-1)[..., -1:]
    mixed = geometric_mix(odise_logits, clip_logits, is_base, alpha, beta).softmax(-1)
    probs = torch.cat([mixed * (1 - p_null), p_null], dim=-1) + PROB_EPS
    return probs / probs.sum(-1, keepdim=True)
