"""One shared frozen CLIP: image embedding for the implicit captioner, text embeddings, MaskCLIP."""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import ClipConfig
from odise_core.weights import load_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_BATCH = 256


class ClipModel(nn.Module):
    """Frozen open_clip model; all inputs are images in [0, 1], outputs are projected embeddings."""

    def __init__(self, cfg: ClipConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else load_clip(cfg)
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)

    @property
    def dim(self) -> int:
        return int(self.cfg.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    def train(self, mode: bool = True) -> "ClipModel":
        """CLIP stays frozen in eval mode whatever the parent does."""
        super().train(False)
        return self

    def _to_clip_input(self, image01: torch.Tensor) -> torch.Tensor:
        """Resize the shortest edge to image_size (bicubic), centre-crop, CLIP mean/std."""
        size = self.image_size
        h, w = image01.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            image01 = F.interpolate(image01, size=new, mode="bicubic", align_corners=False)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            image01 = image01[..., top : top + size, left : left + size]
        dtype = self.mean.dtype
        return (image01.to(dtype) - self.mean) / self.std

    def encode_image(self, image01: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,D) projected class token, not normalised."""
        return self.model.encode_image(self._to_clip_input(image01)).float()

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (N,D) projected embeddings, L2-normalised unless `normalize` is False."""
        device = self.mean.device
        chunks = []
        for i in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(texts[i : i + TEXT_BATCH]).to(device)
            chunks.append(self.model.encode_text(tokens).float())
        embeds = torch.cat(chunks)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class + patch tokens after positional embedding and ln_pre: (B, 1+P, W)."""
        visual = self.model.visual
        x = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def patch_keep(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(B,Q,P) bool: the patches mask token q attends to, max-pooled sigmoid(mask) >= 0.5 over each
        patch of mask logits (B,Q,S,S) at the CLIP input size."""
        patch = self.model.visual.conv1.kernel_size
        return (F.max_pool2d(mask_logits.sigmoid(), kernel_size=patch, stride=patch) >= 0.5).flatten(2)

    def mask_attention(self, mask_logits: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Additive attention mask (B*heads, L, L), L = Q + 1 + P, for MaskCLIP.

        Every token ignores the Q mask tokens; mask token q attends to the class token and to the
        patches whose max-pooled sigmoid(mask) is >= 0.5 (only the class token when its mask is empty).
        """
        b, q = mask_logits.shape[:2]
        blocked = ~self.patch_keep(mask_logits)  # (B, Q, P)
        length = q + 1 + blocked.shape[-1]
        mask = torch.zeros(b, length, length, dtype=torch.bool, device=mask_logits.device)
        mask[:, :, :q] = True
        mask[:, :q, q + 1 :] = blocked
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask, float("-inf"))
        return additive.unsqueeze(1).expand(b, num_heads, length, length).reshape(b * num_heads, length, length)

    def mask_embeddings(self, image01: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP: (B,3,H,W) in [0,1] and mask logits (B,Q,h,w) -> (B,Q,D) normalised embeddings."""
        size = (self.image_size, self.image_size)
        image = F.interpolate(image01.float(), size=size, mode="bilinear", align_corners=False)
        masks = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)
        visual = self.model.visual
        x = self._patch_tokens(self._to_clip_input(image))
        q = masks.shape[1]
        x = torch.cat([x[:, :1].expand(-1, q, -1), x], dim=1)
        transformer = visual.transformer
        num_heads = transformer.resblocks[0].attn.num_heads
        attn_mask = self.mask_attention(masks, num_heads).to(x.dtype)
        if getattr(transformer, "batch_first", False):
            x = transformer(x, attn_mask=attn_mask)
        else:
            x = transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        x = visual.ln_post(x[:, :q])
        if visual.proj is not None:
            x = x @ visual.proj
        return F.normalize(x.float(), dim=-1)
