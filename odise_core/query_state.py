"""What interactive answers need from one full ODISE pass, kept per image: QueryState.

Clicks and boxes pick among the query masks; a typed phrase is scored over the per-query mask
embeddings (category head) and MaskCLIP embeddings, so no later interaction reruns the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Longest side of the kept mask logits: bounds memory per image (100 queries x 256 x 256 in fp16 = 13 MB).
MAX_MASK_SIDE = 256


def bounded_mask_logits(mask_logits: torch.Tensor, max_side: int = MAX_MASK_SIDE) -> torch.Tensor:
    """(Q,h,w) logits shrunk (bilinear, aspect kept) so the longest side is at most `max_side`, as float16 on CPU."""
    h, w = mask_logits.shape[-2:]
    scale = max_side / max(h, w)
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        mask_logits = F.interpolate(mask_logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return mask_logits.detach().to("cpu", torch.float16).contiguous()


@dataclass
class QueryState:
    """Per-query outputs of one image, everything a click, box or phrase needs.

    mask_logits cover the whole image (no padding) at a bounded resolution; image_size is the
    original (H, W). binary_logits is only set for the caption model (its fg/bg decoder logits).
    """

    mask_logits: torch.Tensor  # (Q, h, w) float16
    class_probs: torch.Tensor  # (Q, K+1) ensembled probabilities over the vocabulary, last = no object
    mask_embed: torch.Tensor  # (Q, E) pooled mask embeddings the category head scores
    clip_embeds: torch.Tensor  # (Q, D) MaskCLIP embeddings, L2-normalised
    logit_scale: float  # the decoder's category-head temperature
    image_size: tuple[int, int]  # (H, W)
    binary_logits: torch.Tensor | None = None  # (Q, 2) caption model only

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the kept mask logits: the grid selection rules work in."""
        return tuple(self.mask_logits.shape[-2:])

    @property
    def is_object(self) -> torch.Tensor:
        """(Q,) bool: the query's best class is not "no object"."""
        return self.class_probs.argmax(-1) != self.class_probs.shape[-1] - 1

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors."""
        tensors = [self.mask_logits, self.class_probs, self.mask_embed, self.clip_embeds, self.binary_logits]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to_grid(self, x: float, y: float) -> tuple[float, float]:
        """Image pixel coordinates -> mask-grid coordinates."""
        (h, w), (ih, iw) = self.grid_size, self.image_size
        return x * w / iw, y * h / ih

    def full_mask(self, query: int) -> np.ndarray:
        """(H, W) bool mask of `query` at the original image size (bilinear logits, > 0)."""
        logits = self.mask_logits[query][None, None].float()
        if tuple(logits.shape[-2:]) != tuple(self.image_size):
            logits = F.interpolate(logits, size=tuple(self.image_size), mode="bilinear", align_corners=False)
        return (logits[0, 0] > 0).numpy()
