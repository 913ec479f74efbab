"""Masked transformer decoder: outputs per layer, pooled mask embedding, logit scale, caption class head."""
import math

import torch

from odise_core.config import HeadConfig, get_config
from odise_core.modeling.mask_decoder import MaskedTransformerDecoder, SemSegHead, hard_mask_pooling


def _inputs(cfg, batch=2, h=64, w=96):
    g = torch.Generator().manual_seed(1)
    d = cfg.pixel_decoder.conv_dim
    multi = [torch.randn(batch, d, h // s, w // s, generator=g) for s in (32, 16, 8)]
    mask_features = torch.randn(batch, cfg.decoder.mask_dim, h // 4, w // 4, generator=g)
    return multi, mask_features


def test_outputs_every_layer():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(cfg.decoder, cfg.pixel_decoder.conv_dim)
    multi, mf = _inputs(cfg)
    out = dec(multi, mf)
    q, e = cfg.decoder.num_queries, cfg.decoder.mask_dim
    assert out["pred_masks"].shape == (2, q, 16, 24)
    assert out["mask_embed"].shape == (2, q, e)
    assert len(out["aux_outputs"]) == cfg.decoder.dec_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_masks"].shape == (2, q, 16, 24) and aux["mask_embed"].shape == (2, q, e)
    assert "pred_logits" not in out  # the label model has no class projection
    assert dec.class_embed is None


def test_logit_scale_init_and_clamp():
    cfg = get_config("tiny")
    dec = MaskedTransformerDecoder(cfg.decoder, cfg.pixel_decoder.conv_dim)
    assert math.isclose(dec.post_mask_embed.scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        dec.post_mask_embed.logit_scale.fill_(10.0)
    assert dec.post_mask_embed.scale().item() == 100.0


def test_empty_masks_attend_everywhere_without_nan():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(cfg.decoder, cfg.pixel_decoder.conv_dim)
    with torch.no_grad():  # every mask logit strongly negative: all attention would be blocked
        dec.mask_embed.layers[-1].weight.zero_()
        dec.mask_embed.layers[-1].bias.fill_(-1.0)
    multi, mf = _inputs(cfg)
    out = dec(multi, torch.full_like(mf, 10.0))
    assert torch.isfinite(out["mask_embed"]).all()
    assert (out["pred_masks"] < 0).all()


def test_hard_mask_pooling_known_average():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    logits = torch.full((1, 2, 3, 4), -5.0)
    logits[0, 0, 0, :2] = 5.0  # query 0 covers pixels (0,0) and (0,1)
    pooled = hard_mask_pooling(feats, logits)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([0.5, 12.5]))
    torch.testing.assert_close(pooled[0, 1], torch.zeros(2))  # empty mask pools to zero


def test_mask_embedding_depends_on_pooled_region():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(cfg.decoder, cfg.pixel_decoder.conv_dim)
    b, q, e = 1, 3, cfg.decoder.mask_dim
    decoded = torch.zeros(b, q, cfg.decoder.hidden_dim)
    feats = torch.randn(b, e, 8, 8)
    masks = torch.full((b, q, 8, 8), -5.0)
    masks[0, 0, :4] = 5.0
    masks[0, 1, :4] = 3.0  # same region as query 0 (binarised)
    masks[0, 2, 4:] = 5.0
    emb = dec.post_mask_embed(decoded, feats, masks)
    torch.testing.assert_close(emb[0, 0], emb[0, 1])
    assert not torch.allclose(emb[0, 0], emb[0, 2])


def test_caption_head_has_binary_class_embed():
    cfg = get_config("tiny")
    cfg.head = HeadConfig(kind="caption", embed_dim=32)
    head = SemSegHead(cfg, 32, {"s2": 4, "s3": 8, "s4": 16, "s5": 32})
    assert head.predictor.class_embed.weight.shape == (2, cfg.decoder.hidden_dim)
    g = torch.Generator().manual_seed(0)
    feats = {f"s{i}": torch.randn(1, 32, 128 // 2 ** i, 128 // 2 ** i, generator=g) for i in range(2, 6)}
    out = head(feats)
    assert out["pred_logits"].shape == (1, cfg.decoder.num_queries, 2)
    assert all(a["pred_logits"].shape == (1, cfg.decoder.num_queries, 2) for a in out["aux_outputs"])
