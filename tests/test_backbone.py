"""Backbone: output strides/channels, official projection keys, sliding-window averaging."""
from __future__ import annotations

import pytest
import skimage.data
import torch

from odise_core.config import get_config
from odise_core.modeling.backbone import Bottleneck, ODISEBackbone, sliding_window
from odise_core.modeling.clip import ClipModel
from odise_core.preprocess import prepare


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def backbone(cfg) -> ODISEBackbone:
    return ODISEBackbone(cfg, ClipModel(cfg.clip)).eval()


def test_outputs_strides_and_channels(backbone, cfg):
    image = prepare(skimage.data.chelsea(), cfg.backbone).tensor  # 300x451 -> 256x385 -> padded 256x448
    assert image.shape[-2:] == (256, 448)
    with torch.inference_mode():
        out = backbone(image)
    assert backbone.out_strides == {"s2": 4, "s3": 8, "s4": 16, "s5": 32}
    assert backbone.out_channels == {k: cfg.backbone.fusion_out_channels for k in out}
    for name, stride in backbone.out_strides.items():
        assert out[name].shape == (1, cfg.backbone.fusion_out_channels, 256 // stride, 448 // stride)
        assert torch.isfinite(out[name]).all()
    assert "clip" not in dict(backbone.named_children())  # shared CLIP is not a submodule here


def test_projection_keys_follow_the_official_layout(cfg):
    full = get_config("odise-label-coco")
    specs = full.diffusion.features
    mid, width = full.backbone.fusion_mid_channels, full.backbone.fusion_out_channels
    with torch.device("meta"):
        projections = torch.nn.ModuleList(
            torch.nn.Sequential(Bottleneck(s.channels, mid, width, 32))
            for s in specs
        )
    keys = {k: tuple(v.shape) for k, v in projections.state_dict().items()}
    assert keys["2.0.conv1.weight"] == (128, 2560, 1, 1)
    assert keys["2.0.conv2.weight"] == (128, 128, 3, 3)
    assert keys["2.0.conv3.weight"] == (512, 128, 1, 1)
    assert keys["2.0.conv3.norm.weight"] == (512,)
    assert keys["2.0.shortcut.weight"] == (512, 2560, 1, 1)
    assert keys["2.0.shortcut.norm.bias"] == (512,)
    # 512-channel VAE features keep an identity shortcut, as detectron2's BottleneckBlock does
    assert not any(k.startswith(("0.0.shortcut", "1.0.shortcut", "6.0.shortcut", "7.0.shortcut")) for k in keys)
    assert all(k.split(".")[2] in ("conv1", "conv2", "conv3", "shortcut") for k in keys)
    assert sum(k.endswith("conv1.weight") for k in keys) == 8


def test_fusion_groups_sum_same_stride_features(backbone):
    assert {n: idx for n, (_, idx) in backbone.groups.items()} == {
        "s2": [0, 7], "s3": [1, 5, 6], "s4": [4], "s5": [2, 3]
    }


def test_sliding_window_averages_overlaps():
    image = torch.zeros(1, 3, 128, 320)  # window 128: columns start at 0, 128 and 192 (shifted to the edge)
    calls = []

    def numbered(crops: torch.Tensor) -> dict[str, torch.Tensor]:
        values = torch.arange(len(calls) + 1, len(calls) + 1 + crops.shape[0], dtype=torch.float32)
        calls.extend(values.tolist())
        return {"s2": values.view(-1, 1, 1, 1).expand(-1, 2, 32, 32).clone()}

    out = sliding_window(image, 128, {"s2": 4}, numbered, batch_size=2)["s2"]
    assert calls == [1.0, 2.0, 3.0]
    assert out.shape == (1, 2, 32, 80)
    row = out[0, 0, 5]
    assert (row[:32] == 1).all()  # x in [0, 128): window 1 only
    assert (row[32:48] == 2).all()  # [128, 192): window 2 only
    assert (row[48:64] == 2.5).all()  # [192, 256): windows 2 and 3 averaged
    assert (row[64:] == 3).all()


def test_sliding_window_places_crops_like_one_pass():
    image = torch.rand(2, 3, 256, 384)

    def pooled(crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"s3": torch.nn.functional.avg_pool2d(crops, 8), "s4": torch.nn.functional.avg_pool2d(crops, 16)}

    for batch_size in (1, 4):
        out = sliding_window(image, 128, {"s3": 8, "s4": 16}, pooled, batch_size=batch_size)
        torch.testing.assert_close(out["s3"], torch.nn.functional.avg_pool2d(image, 8))
        torch.testing.assert_close(out["s4"], torch.nn.functional.avg_pool2d(image, 16))


def test_batched_crops_match_one_at_a_time(backbone):
    image = torch.rand(1, 3, 128, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        backbone.crop_batch_size = 1
        single = backbone(image)
        backbone.crop_batch_size = 4
        batched = backbone(image)
    for name in single:
        torch.testing.assert_close(single[name], batched[name], atol=1e-4, rtol=1e-4)


def test_small_image_uses_one_upsampled_window(backbone, cfg):
    image = torch.rand(1, 3, 64, 192)  # shorter than the 128 window: crops of 64, upsampled to 128
    with torch.inference_mode():
        out = backbone(image)
    assert out["s2"].shape == (1, cfg.backbone.fusion_out_channels, 16, 48)
    assert out["s5"].shape[-2:] == (2, 6)
