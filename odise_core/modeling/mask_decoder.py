"""Mask2Former's masked-attention transformer decoder with ODISE's pooled mask embedding.

Parameter names follow the official checkpoint (`sem_seg_head.predictor.*`). The label model has
no class projection (its classes come from the category head); the caption model has a 2-way
foreground/background `class_embed`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import DecoderConfig, ModelConfig
from odise_core.modeling.pixel_decoder import MSDeformAttnPixelDecoder, c2_xavier_fill, sine_position_embedding


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among queries (query positions added to q and k)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = x + query_pos
        return self.norm(x + self.self_attn(q, q, x, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    """Post-norm masked cross-attention from queries to one feature level."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        out = self.multihead_attn(x + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(x + out)


class FFNLayer(nn.Module):
    """Post-norm ReLU feed-forward block."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (key layout `layers.{i}`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def hard_mask_pooling(features: torch.Tensor, mask_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Average of features (B,C,H,W) inside each binarised mask sigmoid(mask) > threshold: (B,Q,C).

    The masks are detached: pooling is not differentiable with respect to them.
    """
    mask = (mask_logits.detach().sigmoid() > threshold).to(features.dtype)
    denom = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("bchw,bqhw->bqc", features, mask / denom)


class PooledMaskEmbed(nn.Module):
    """ODISE's mask embedding: pooled mask features (LayerNorm+Linear) plus the query, then LayerNorm+MLP."""

    def __init__(self, hidden_dim: int, mask_dim: int, projection_dim: int,
                 logit_scale_init: float = math.log(1 / 0.07), max_scale: float = 100.0):
        super().__init__()
        self.pool_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim))
        self.mask_embed = nn.Sequential(nn.LayerNorm(hidden_dim), MLP(hidden_dim, hidden_dim, projection_dim, 3))
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.max_scale = max_scale

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to max_scale."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def forward(self, decoder_output: torch.Tensor, mask_features: torch.Tensor,
                mask_logits: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_proj(hard_mask_pooling(mask_features, mask_logits)) + decoder_output
        return self.mask_embed(pooled)


class MaskedTransformerDecoder(nn.Module):
    """Queries attend round-robin to 3 feature levels under their own predicted masks (official `predictor`)."""

    num_levels = 3

    def __init__(self, cfg: DecoderConfig, in_channels: int, num_classes: int | None = None,
                 logit_scale_init: float = math.log(1 / 0.07), logit_scale_max: float = 100.0):
        """`num_classes` set (caption model: 1) adds `class_embed` = Linear(hidden, num_classes + 1)."""
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        if cfg.pre_norm:
            raise ValueError("only the post-norm decoder (pre_norm=False) of the reference is implemented")
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.num_heads) for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.num_heads) for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(d, cfg.ffn_dim) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(self.num_levels, d)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_levels):
            if in_channels != d:
                conv = nn.Conv2d(in_channels, d, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        if num_classes is not None:
            self.class_embed = nn.Linear(d, num_classes + 1)
        else:
            self.class_embed = None
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)
        self.post_mask_embed = PooledMaskEmbed(d, cfg.mask_dim, cfg.mask_dim, logit_scale_init, logit_scale_max)

    def _heads(self, output: torch.Tensor, mask_features: torch.Tensor,
               target_size: tuple[int, int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-layer predictions plus the attention mask for the next cross-attention (True = blocked)."""
        decoded = self.decoder_norm(output)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        pred: dict[str, torch.Tensor] = {
            "pred_masks": mask_logits,
            "mask_embed": self.post_mask_embed(decoded, mask_features, mask_logits),
        }
        if self.class_embed is not None:
            pred["pred_logits"] = self.class_embed(decoded)
        small = F.interpolate(mask_logits, size=target_size, mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2) < 0.5
        blocked = blocked.unsqueeze(1).expand(-1, self.cfg.num_heads, -1, -1).flatten(0, 1)
        return pred, blocked.detach()

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor) -> dict[str, Any]:
        """multi_scale: 3 maps (B,C,h,w) lowest resolution first; mask_features (B,mask_dim,H/4,W/4).

        Returns pred_masks (B,Q,H/4,W/4), mask_embed (B,Q,E), logit_scale, optionally pred_logits,
        and aux_outputs: the same per intermediate prediction (dec_layers of them).
        """
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(multi_scale)}")
        srcs, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale):
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
            pos.append(sine_position_embedding(x, self.cfg.hidden_dim // 2).flatten(2).transpose(1, 2))
            src = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            srcs.append(src.transpose(1, 2))
        b = srcs[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)

        predictions = []
        pred, attn_mask = self._heads(output, mask_features, sizes[0])
        predictions.append(pred)
        for i in range(self.cfg.dec_layers):
            level = i % self.num_levels
            attn_mask = attn_mask.clone()
            attn_mask[attn_mask.all(-1)] = False  # a query with an empty mask attends everywhere
            output = self.transformer_cross_attention_layers[i](output, srcs[level], attn_mask, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            pred, attn_mask = self._heads(output, mask_features, sizes[(i + 1) % self.num_levels])
            predictions.append(pred)
        result: dict[str, Any] = dict(predictions[-1])
        result["logit_scale"] = self.post_mask_embed.scale()
        result["aux_outputs"] = predictions[:-1]
        return result


class SemSegHead(nn.Module):
    """Container matching the official `sem_seg_head`: pixel decoder + transformer predictor."""

    def __init__(self, cfg: ModelConfig, in_channels: dict[str, int] | int, in_strides: dict[str, int]):
        super().__init__()
        channels = in_channels if isinstance(in_channels, dict) else {k: int(in_channels) for k in in_strides}
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, channels, dict(in_strides))
        self.predictor = MaskedTransformerDecoder(
            cfg.decoder, cfg.pixel_decoder.conv_dim,
            num_classes=1 if cfg.head.kind == "caption" else None,
            logit_scale_init=cfg.head.logit_scale_init, logit_scale_max=cfg.head.logit_scale_max,
        )

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, Any]:
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features)
