"""Mask2Former's multi-scale deformable-attention pixel decoder, in pure PyTorch.

The deformable attention samples its values with `grid_sample` instead of the compiled CUDA op;
parameter names follow the official checkpoint (`sem_seg_head.pixel_decoder.*`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import PixelDecoderConfig


def sine_position_embedding(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Normalised 2-D sine/cosine position encoding (B, 2*num_pos_feats, H, W) for a (B, C, H, W) map."""
    b, _, h, w = x.shape
    scale = 2 * math.pi
    eps = 1e-6
    y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device).view(1, h, 1).expand(b, h, w)
    x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device).view(1, 1, w).expand(b, h, w)
    y_embed = y_embed / (h + eps) * scale
    x_embed = x_embed / (w + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class Conv2dNorm(nn.Conv2d):
    """Conv2d followed by an optional norm (stored as `.norm`, detectron2 key layout) and activation."""

    def __init__(self, *args, norm: nn.Module | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Caffe2 Xavier init (kaiming uniform with a=1) and zero bias, as detectron2 does."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def deformable_sample(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                      attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core via bilinear `grid_sample`.

    value (B, sum HW, M, D); sampling_locations (B, Lq, M, L, P, 2) in [0, 1] as (x, y);
    attention_weights (B, Lq, M, L, P). Returns (B, Lq, M*D).
    """
    b, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(b * m, lq, levels, points)
    out = None
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M,D,Lq,P)
        level_out = (sampled * weights[:, None, :, lvl]).sum(-1)
        out = level_out if out is None else out + level_out
    return out.reshape(b, m * d, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) with a grid_sample core."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_levels, self.num_heads, self.num_points = dim, num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of directions, one per head, growing with the point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Lq, C), reference_points (B, Lq, L, 2) normalised (x, y), value_in (B, sum HW, C)."""
        b, lq, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_in).view(b, value_in.shape[1], m, self.dim // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, lq, m, lv * p).softmax(-1).view(b, lq, m, lv, p)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(deformable_sample(value, spatial_shapes, locations, weights))


class DeformEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then a ReLU FFN."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + F.dropout(attn, drop))
        ffn = self.linear2(F.dropout(F.relu(self.linear1(src)), drop))
        return self.norm2(src + F.dropout(ffn, drop))


class DeformEncoder(nn.Module):
    """A stack of deformable encoder layers sharing reference points."""

    def __init__(self, layers: list[DeformEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalised to [0, 1]: (B, sum HW, L, 2) as (x, y)."""
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        ref = torch.cat(refs, 0)
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        ref = self.reference_points(spatial_shapes, src.shape[0], src.device).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes)
        return src


class DeformEncoderOnly(nn.Module):
    """Level embeddings + the deformable encoder (official name `transformer`)."""

    def __init__(self, cfg: PixelDecoderConfig, num_levels: int):
        super().__init__()
        d = cfg.conv_dim
        self.encoder = DeformEncoder([
            DeformEncoderLayer(d, cfg.ffn_dim, cfg.dropout, num_levels, cfg.num_heads, cfg.num_points)
            for _ in range(cfg.enc_layers)
        ])
        self.level_embed = nn.Parameter(torch.empty(num_levels, d))
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encode the levels jointly; returns each level as (B, C, H, W)."""
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                         for i, p in enumerate(pos_embeds)], 1)
        memory = self.encoder(flat, pos, shapes)
        b, _, c = memory.shape
        chunks = memory.split([h * w for h, w in shapes], dim=1)
        return [z.transpose(1, 2).reshape(b, c, h, w) for z, (h, w) in zip(chunks, shapes)]


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder over the strides in `cfg.in_strides` plus FPN levels down to stride 4."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: dict[str, int], in_strides: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        names = sorted(in_strides, key=lambda k: in_strides[k])
        self.transformer_in_features = [k for k in names if in_strides[k] in cfg.in_strides]
        self.fpn_in_features = [k for k in names if in_strides[k] in cfg.fpn_strides]
        if len(self.transformer_in_features) != len(cfg.in_strides):
            raise ValueError(f"pixel decoder needs features at strides {cfg.in_strides}, got {in_strides}")
        d = cfg.conv_dim
        self.input_proj = nn.ModuleList()
        for name in reversed(self.transformer_in_features):  # lowest resolution first
            conv = nn.Conv2d(in_channels[name], d, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(cfg.norm_groups, d)))
        self.transformer = DeformEncoderOnly(cfg, len(self.transformer_in_features))
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        for idx, name in enumerate(self.fpn_in_features):
            lateral = Conv2dNorm(in_channels[name], d, kernel_size=1, bias=False,
                                 norm=nn.GroupNorm(cfg.norm_groups, d))
            output = Conv2dNorm(d, d, kernel_size=3, padding=1, bias=False,
                                norm=nn.GroupNorm(cfg.norm_groups, d), activation=F.relu)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
        self.num_multi_scale = 3

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns mask features (B, mask_dim, H/4, W/4) and 3 multi-scale maps, lowest resolution first."""
        srcs, pos = [], []
        for idx, name in enumerate(reversed(self.transformer_in_features)):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(sine_position_embedding(x, self.cfg.conv_dim // 2))
        outs = self.transformer(srcs, pos)
        for idx in reversed(range(len(self.fpn_in_features))):
            x = features[self.fpn_in_features[idx]].float()
            lateral = getattr(self, f"adapter_{idx + 1}")(x)
            y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(getattr(self, f"layer_{idx + 1}")(y))
        return self.mask_features(outs[-1]), outs[: self.num_multi_scale]
