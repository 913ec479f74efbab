"""ODISE backbone: sliding-window diffusion features fused into s2..s5 by bottleneck blocks."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import ModelConfig
from odise_core.modeling.clip import ClipModel
from odise_core.modeling.diffusion import DiffusionFeatureExtractor
from odise_core.preprocess import window_origins

MIN_STRIDE, MAX_STRIDE = 4, 32


class ConvNorm(nn.Conv2d):
    """Bias-free conv followed by GroupNorm, keyed like detectron2's Conv2d(norm=...): `.weight`, `.norm.*`."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, groups: int) -> None:
        super().__init__(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, out_ch)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 with GN); 1x1 projection shortcut only when channels change."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_ch, out_ch, 1, groups) if in_ch != out_ch else None
        self.conv1 = ConvNorm(in_ch, mid_ch, 1, groups)
        self.conv2 = ConvNorm(mid_ch, mid_ch, 3, groups)
        self.conv3 = ConvNorm(mid_ch, out_ch, 1, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        return F.relu_(out + (self.shortcut(x) if self.shortcut is not None else x))


def sliding_window(
    image: torch.Tensor,
    window: int,
    strides: dict[str, int],
    features_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Run `features_fn` on square crops of side min(window, H, W) (batched) and average overlaps.

    `features_fn` maps crops (N,3,c,c) to {name: (N,C,c/stride,c/stride)}; crops of one image are
    stacked window-major, `batch_size` crops at a time.
    """
    b, _, h, w = image.shape
    crop = min(window, h, w)
    origins = window_origins(h, w, crop)
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for start in range(0, len(origins), max(1, batch_size)):
        chunk = origins[start : start + batch_size]
        crops = torch.cat([image[:, :, y : y + crop, x : x + crop] for y, x in chunk])
        feats = features_fn(crops)
        for name, feat in feats.items():
            s = strides[name]
            if name not in out:
                out[name] = feat.new_zeros(b, feat.shape[1], h // s, w // s)
                counts[name] = feat.new_zeros(1, 1, h // s, w // s)
            for k, (y, x) in enumerate(chunk):
                ys, xs = y // s, x // s
                part = feat[k * b : (k + 1) * b]
                out[name][:, :, ys : ys + part.shape[-2], xs : xs + part.shape[-1]] += part
                counts[name][:, :, ys : ys + part.shape[-2], xs : xs + part.shape[-1]] += 1
    return {name: out[name] / counts[name] for name in out}


class ODISEBackbone(nn.Module):
    """Frozen diffusion features + trainable captioner and projections -> {"s2".."s5"} at strides 4..32."""

    def __init__(
        self,
        cfg: ModelConfig,
        clip: ClipModel,
        full_networks: bool = False,
        feature_extractor: DiffusionFeatureExtractor | None = None,
        crop_batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.cfg = cfg.backbone
        object.__setattr__(self, "clip", clip)  # shared, owned by the parent model: not a submodule
        self.feature_extractor = feature_extractor or DiffusionFeatureExtractor(cfg.diffusion, clip.dim, full_networks)
        self.crop_batch_size = crop_batch_size
        specs = cfg.diffusion.features
        self.feature_projections = nn.ModuleList(
            nn.Sequential(Bottleneck(s.channels, self.cfg.fusion_mid_channels, self.cfg.fusion_out_channels,
                                     self.cfg.norm_groups))
            for s in specs
        )
        groups: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(specs):
            groups[min(max(s.target_stride, MIN_STRIDE), MAX_STRIDE)].append(i)
        self.groups = {f"s{int(math.log2(stride))}": (stride, idx) for stride, idx in sorted(groups.items())}
        self.out_strides = {name: stride for name, (stride, _) in self.groups.items()}
        self.out_channels = {name: self.cfg.fusion_out_channels for name in self.groups}

    def fuse(self, features: list[torch.Tensor], crop: int) -> dict[str, torch.Tensor]:
        """Nearest-resize each feature to crop/stride, project it, and sum features of one stride."""
        out = {}
        for name, (stride, indices) in self.groups.items():
            size = (crop // stride, crop // stride)
            out[name] = sum(
                self.feature_projections[i](F.interpolate(features[i].float(), size=size, mode="nearest"))
                for i in indices
            )
        return out

    def window_features(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fused features of square crops (N,3,c,c); crops smaller than the window are upsampled to it."""
        crop = crops.shape[-1]
        if crop != self.cfg.window:
            crops = F.interpolate(crops, size=(self.cfg.window, self.cfg.window), mode="bicubic", align_corners=False)
        with torch.no_grad():
            clip_embed = self.clip.encode_image(crops)
        return self.fuse(self.feature_extractor(crops, clip_embed), crop)

    def forward(self, image01: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,3,Hp,Wp) padded image in [0,1] -> {"s2","s3","s4","s5"} (B,C,Hp/stride,Wp/stride)."""
        return sliding_window(image01, self.cfg.window, self.out_strides, self.window_features, self.crop_batch_size)
