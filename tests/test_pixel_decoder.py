"""Pixel decoder: shapes, the grid_sample deformable attention core on known answers, position encoding."""
import math

import torch

from odise_core.config import get_config
from odise_core.modeling.pixel_decoder import MSDeformAttnPixelDecoder, deformable_sample, sine_position_embedding

STRIDES = {"s2": 4, "s3": 8, "s4": 16, "s5": 32}


def _features(channels: int, h: int, w: int, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(batch, channels, h // s, w // s, generator=g) for k, s in STRIDES.items()}


def test_output_shapes_and_order():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(cfg.pixel_decoder, {k: 32 for k in STRIDES}, STRIDES)
    mask_features, multi = dec(_features(32, 128, 192))
    assert mask_features.shape == (2, cfg.pixel_decoder.mask_dim, 32, 48)
    assert [tuple(m.shape) for m in multi] == [(2, 32, 4, 6), (2, 32, 8, 12), (2, 32, 16, 24)]
    assert torch.isfinite(mask_features).all()


def test_every_parameter_receives_gradient():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(cfg.pixel_decoder, {k: 32 for k in STRIDES}, STRIDES)
    # Non-zero attention weights so the offset/attention linears get gradient too.
    for layer in dec.transformer.encoder.layers:
        torch.nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.1)
        torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.1)
    mask_features, multi = dec(_features(32, 128, 128))
    (mask_features.square().mean() + sum(m.square().mean() for m in multi)).backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_deformable_sample_reads_pixel_centres_and_mixes_points():
    h, w, d = 3, 4, 5
    value_map = torch.arange(h * w * d, dtype=torch.float32).view(h * w, d)
    value = value_map.view(1, h * w, 1, d)
    # point 0 at the centre of pixel (row 1, col 2), point 1 at pixel (row 2, col 0)
    loc = torch.tensor([[(2 + 0.5) / w, (1 + 0.5) / h], [(0 + 0.5) / w, (2 + 0.5) / h]]).view(1, 1, 1, 1, 2, 2)
    weights = torch.tensor([0.3, 0.7]).view(1, 1, 1, 1, 2)
    out = deformable_sample(value, [(h, w)], loc, weights)
    expected = 0.3 * value_map[1 * w + 2] + 0.7 * value_map[2 * w + 0]
    torch.testing.assert_close(out[0, 0], expected)


def test_deformable_sample_outside_the_map_is_zero():
    value = torch.ones(1, 4, 1, 2)
    loc = torch.tensor([5.0, 5.0]).view(1, 1, 1, 1, 1, 2)
    out = deformable_sample(value, [(2, 2)], loc, torch.ones(1, 1, 1, 1, 1))
    assert out.abs().max() == 0


def test_sine_position_embedding_values():
    x = torch.zeros(1, 3, 4, 6)
    pos = sine_position_embedding(x, num_pos_feats=8)
    assert pos.shape == (1, 16, 4, 6)
    # channel 0: sin of the normalised row index (1-based) times 2*pi; channel 8 the same for columns
    rows = torch.arange(1, 5, dtype=torch.float32) / 4 * 2 * math.pi
    cols = torch.arange(1, 7, dtype=torch.float32) / 6 * 2 * math.pi
    torch.testing.assert_close(pos[0, 0, :, 0], rows.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 1, :, 0], rows.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 8, 0, :], cols.sin(), atol=1e-5, rtol=0)
