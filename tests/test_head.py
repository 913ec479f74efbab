"""Category head, CLIP classifier logits and the geometric ensemble on known answers."""
import math

import torch

from odise_core.config import HeadConfig
from odise_core.modeling.head import CategoryHead, clip_class_logits, geometric_ensemble, max_over_synonyms


def _identity_head(dim: int, kind: str = "label") -> CategoryHead:
    head = CategoryHead(HeadConfig(kind=kind, embed_dim=dim), clip_dim=dim)
    with torch.no_grad():
        head.text_proj.weight.copy_(torch.eye(dim))
        head.text_proj.bias.zero_()
    return head


def test_max_over_synonyms():
    logits = torch.tensor([[1.0, 5.0, 2.0, -1.0, 0.5]])
    syn_to_class = torch.tensor([0, 0, 2, 1, 2])
    torch.testing.assert_close(max_over_synonyms(logits, syn_to_class, 3), torch.tensor([[5.0, -1.0, 2.0]]))


def test_max_over_synonyms_passes_gradient_to_the_best_synonym():
    logits = torch.tensor([[1.0, 5.0, 2.0]], requires_grad=True)
    max_over_synonyms(logits, torch.tensor([0, 0, 1]), 2).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 1.0, 1.0]]))


def test_label_head_scaled_cosine_with_synonyms_and_null():
    head = _identity_head(4)
    with torch.no_grad():
        head.null_embed.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    text = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0]])  # class 0: two synonyms
    syn_to_class = torch.tensor([0, 0, 1])
    mask_embed = torch.tensor([[[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]])
    logits = head(mask_embed, text, syn_to_class, 2, logit_scale=10.0)
    assert logits.shape == (1, 2, 3)
    c = 10 / math.sqrt(2)
    expected = torch.tensor([[[10.0, 0.0, 0.0], [c, c, 0.0]]])
    torch.testing.assert_close(logits, expected)


def test_caption_head_reproduces_binary_times_open_probabilities():
    head = _identity_head(3, kind="caption")
    assert not hasattr(head, "null_embed")
    g = torch.Generator().manual_seed(0)
    mask_embed, text = torch.randn(2, 5, 3, generator=g), torch.randn(4, 3, generator=g)
    syn_to_class = torch.tensor([0, 1, 2, 3])
    binary = torch.randn(2, 5, 2, generator=g)
    probs = head(mask_embed, text, syn_to_class, 4, logit_scale=20.0, binary_logits=binary).softmax(-1)
    open_logits = 20.0 * torch.nn.functional.normalize(mask_embed, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    fg_bg = binary.softmax(-1)
    expected = torch.cat([open_logits.softmax(-1) * fg_bg[..., :1], fg_bg[..., 1:]], -1)
    torch.testing.assert_close(probs, expected)


def test_clip_class_logits_is_100_cos_max_over_synonyms():
    embeds = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    out = clip_class_logits(embeds, text, torch.tensor([0, 1, 1]), 2)
    s = 100 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[[100.0, 0.0], [s, s]]]))


def test_geometric_ensemble_matches_formula():
    odise = torch.tensor([[[2.0, 0.5, -1.0, 0.3]]])  # K=3 plus null
    clip = torch.tensor([[[0.1, 3.0, 1.0]]])
    is_base = torch.tensor([True, False, True])
    a, b = 0.3, 0.7
    out = geometric_ensemble(odise, clip, is_base, a, b)
    p = odise[..., :3].softmax(-1)
    q = clip.softmax(-1)
    w = torch.tensor([a, b, a])
    mixed = p ** (1 - w) * q ** w
    p_null = odise.softmax(-1)[..., 3:]
    expected = torch.cat([mixed / mixed.sum(-1, keepdim=True) * (1 - p_null), p_null], -1)
    expected = (expected + 1e-8).log().softmax(-1)  # the reference's final softmax(log(x + 1e-8))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1))


def test_geometric_ensemble_extremes():
    g = torch.Generator().manual_seed(0)
    odise, clip = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 5, generator=g)
    p_fg = 1 - odise.softmax(-1)[..., -1:]
    only_odise = geometric_ensemble(odise, clip, torch.ones(5, dtype=torch.bool), alpha=0.0, beta=1.0)
    torch.testing.assert_close(only_odise[..., :5], odise[..., :5].softmax(-1) * p_fg)
    only_clip = geometric_ensemble(odise, clip, torch.zeros(5, dtype=torch.bool), alpha=0.0, beta=1.0)
    torch.testing.assert_close(only_clip[..., :5], clip.softmax(-1) * p_fg)


def _official_ensemble(odise: torch.Tensor, clip: torch.Tensor, is_base: torch.Tensor, alpha: float,
                       beta: float) -> torch.Tensor:
    """The reference's formula, written out: log of the products, masked by base/novel, then
    softmax(log(x + 1e-8)) of the K+1 probabilities."""
    p, q = odise[..., :-1].softmax(-1), clip.softmax(-1)
    base = is_base.to(p.dtype)
    log_open = (p ** (1 - alpha) * q ** alpha).log() * base + (p ** (1 - beta) * q ** beta).log() * (1 - base)
    p_null = odise.softmax(-1)[..., -1:]
    return (torch.cat([log_open.softmax(-1) * (1 - p_null), p_null], -1) + 1e-8).log().softmax(-1)


def test_ensemble_stays_finite_where_the_reference_gives_nan():
    """Deliberate deviation: a probability that underflows to 0 (logit gap > ~104 in float32) makes the
    reference's log(0) * 0 = NaN; the log-space mix stays finite and equals the reference in float64."""
    g = torch.Generator().manual_seed(1)
    odise, clip = torch.randn(1, 6, 4, generator=g) * 3, torch.randn(1, 6, 3, generator=g) * 3
    clip[0, 0] = torch.tensor([0.0, 120.0, 5.0])  # CLIP probability of class 0 underflows in float32
    odise[0, 1] = torch.tensor([-110.0, 5.0, 0.0, 1.0])  # ODISE probability of class 0 underflows
    is_base = torch.tensor([True, False, True])
    official = _official_ensemble(odise, clip, is_base, 0.3, 0.7)
    assert official[0, :2].isnan().any(dim=-1).all() and official[0, 2:].isfinite().all()
    ours = geometric_ensemble(odise, clip, is_base, 0.3, 0.7)
    assert ours.isfinite().all()
    torch.testing.assert_close(ours[0, 2:], official[0, 2:])  # where the reference is finite: the same numbers
    exact = _official_ensemble(odise.double(), clip.double(), is_base, 0.3, 0.7)
    torch.testing.assert_close(ours, exact.float(), rtol=1e-5, atol=1e-7)
