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
