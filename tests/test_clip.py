"""Shared CLIP wrapper: image/text embeddings and MaskCLIP's masked attention."""
from __future__ import annotations

import math

import pytest
import skimage.data
import torch

from odise_core.config import get_config
from odise_core.modeling.clip import ClipModel


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return ClipModel(get_config("tiny").clip)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    imgs = [skimage.data.astronaut(), skimage.data.chelsea()[:300, :300], skimage.data.coffee()[:400, :400]]
    tensors = [torch.nn.functional.interpolate(torch.from_numpy(i).permute(2, 0, 1)[None].float() / 255, size=(128, 128))
               for i in imgs]
    return torch.cat(tensors)


def test_clip_is_frozen_and_stays_eval(clip):
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.model.training


def test_encode_image_not_normalised(clip, photos):
    emb = clip.encode_image(photos)
    assert emb.shape == (3, clip.dim)
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(emb[0], emb[1])
    # images are encoded independently of their batch
    torch.testing.assert_close(clip.encode_image(photos[1:2])[0], emb[1], atol=1e-5, rtol=1e-5)


def test_encode_text_normalised(clip):
    emb = clip.encode_text(["a cat", "a dog", "a cat"])
    assert emb.shape == (3, clip.dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1])


def test_mask_attention_semantics(clip):
    grid, patch = 4, 14  # tiny CLIP: 56 px, 14 px patches
    logits = torch.full((1, 3, 56, 56), -10.0)
    logits[0, 0] = 10.0  # full image
    logits[0, 1, :14, :28] = 10.0  # top-left two patches
    # query 2: empty mask
    mask = clip.mask_attention(logits, num_heads=2)
    q, length = 3, 3 + 1 + grid * grid
    assert mask.shape == (2, length, length)
    assert torch.equal(mask[0], mask[1])  # same for every head
    blocked = torch.isinf(mask[0])
    assert blocked[:, :q].all()  # nobody attends to the mask tokens
    assert not blocked[q:, q:].any()  # class + patch tokens attend normally
    assert not blocked[:q, q].any()  # every mask token sees the class token
    assert not blocked[0, q + 1 :].any()
    allowed = (~blocked[1, q + 1 :]).nonzero().flatten().tolist()
    assert allowed == [0, 1]
    assert blocked[2, q + 1 :].all()  # empty mask: only the class token
    assert patch == clip.model.visual.conv1.kernel_size[0]


def test_mask_embeddings(clip, photos):
    b, h, w = 3, 128, 128
    logits = torch.full((b, 4, h, w), -5.0)
    logits[:, 0] = 5.0  # whole image
    logits[:, 1, :, : w // 2] = 5.0  # left half
    logits[:, 2, :, : w // 2] = 5.0  # same mask as query 1
    logits[:, 3, : h // 3, : w // 3] = 5.0  # a corner
    emb = clip.mask_embeddings(photos, logits)
    assert emb.shape == (b, 4, clip.dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(b, 4))
    torch.testing.assert_close(emb[:, 1], emb[:, 2])
    cos = (emb[:, 0] * emb[:, 1]).sum(-1)
    assert (cos < 1 - 1e-4).all()  # a partial mask differs from the full image
    assert not torch.allclose(emb[:, 1], emb[:, 3])
    assert not torch.allclose(emb[0], emb[1])  # depends on the image
    # queries are independent: dropping one leaves the others unchanged
    torch.testing.assert_close(clip.mask_embeddings(photos, logits[:, :2]), emb[:, :2], atol=1e-5, rtol=1e-4)
    assert math.isfinite(float(emb.sum()))


def _clip(vision: dict) -> ClipModel:
    """A small CLIP with `vision` overriding the tiny preset's vision config (random weights, seeded)."""
    import copy

    import open_clip

    cfg = copy.deepcopy(get_config("tiny").clip)
    cfg.custom = {**cfg.custom, "vision_cfg": {**cfg.custom["vision_cfg"], **vision}}
    torch.manual_seed(0)
    return ClipModel(cfg, open_clip.CLIP(**cfg.custom).float())


def _mask_patterns(b: int, q: int, size: int, seed: int) -> torch.Tensor:
    """(b, q, size, size) mask logits: empty, full, halves, a single patch's worth, random blobs, near 0.5."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, size, size, generator=g) * 4  # random: about half the patches kept
    logits[:, 0] = -8.0  # empty: the class token only
    logits[:, 1] = 8.0  # everything
    logits[:, 2] = -8.0
    logits[:, 2, :, : size // 2] = 8.0  # left half
    logits[:, 3] = -8.0
    logits[:, 3, :3, :3] = 8.0  # a few pixels: one patch
    logits[0, 4] = -8.0  # empty in the first image only
    logits[:, 5] = torch.randn(b, size, size, generator=g) * 0.05  # sigmoid near the 0.5 threshold
    return logits


@pytest.mark.parametrize("vision", [{}, {"layers": 3, "width": 96, "head_width": 32, "ls_init_value": 0.5}],
                         ids=["tiny", "3-heads-layer-scale"])
def test_split_maskclip_equals_the_whole_transformer(photos, vision):
    """The cacheable split (class + patch stream once, then the mask tokens) computes what the reference's
    whole transformer under the attention mask computes, per query, image and mask pattern."""
    model = _clip(vision)
    for b, q, size in ((3, 8, 128), (1, 6, 40), (2, 12, 56)):
        logits = _mask_patterns(b, q, size, seed=q)
        split = model.mask_embeddings(photos[:b], logits)
        full = model.mask_embeddings_full(photos[:b], logits)
        assert split.shape == (b, q, model.dim)
        torch.testing.assert_close(split, full, atol=5e-7, rtol=1e-6)
        assert not torch.allclose(split[:, 0], split[:, 1])  # the masks matter
    empty = torch.full((2, 3, 56, 56), -8.0)
    torch.testing.assert_close(model.mask_embeddings(photos[:2], empty), model.mask_embeddings_full(photos[:2], empty),
                               atol=5e-7, rtol=1e-6)


def test_maskclip_stream_is_mask_independent_and_per_image(clip, photos):
    image = clip.maskclip_image(photos)
    stream = clip.maskclip_stream(image)
    layers, width = len(clip.model.visual.transformer.resblocks), clip.model.visual.transformer.width
    tokens = 1 + (clip.image_size // 14) ** 2
    assert stream["cls"].shape == (3, width)
    assert stream["keys"].shape == stream["values"].shape == (3, layers, tokens, width)
    one = clip.maskclip_stream(image[1:2])  # images are independent of their batch
    for name in stream:
        torch.testing.assert_close(one[name][0], stream[name][1], atol=1e-5, rtol=1e-5)
    logits = _mask_patterns(3, 6, 128, seed=1)
    torch.testing.assert_close(clip.embed_masks(stream, logits), clip.mask_embeddings(photos, logits), atol=0, rtol=0)


def test_non_standard_blocks_are_refused_by_name(photos):
    from odise_core.modeling.clip import UnsupportedClipArchitecture

    model = _clip({"qk_norm": True})
    with pytest.raises(UnsupportedClipArchitecture, match="standard open_clip"):
        model.mask_embeddings(photos[:1], torch.zeros(1, 2, 56, 56))
