"""Matcher, criterion and point sampling on known answers; the fine-tune loop on the tiny preset."""
import numpy as np
import pytest
import torch

from odise_core.training import (
    HungarianMatcher,
    SetCriterion,
    dice_loss,
    pairwise_bce_cost,
    pairwise_dice_cost,
    point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords,
)

BIG = 12.0


def _masks(h, w, regions):
    out = torch.zeros(len(regions), h, w)
    for i, (rows, cols) in enumerate(regions):
        out[i, rows, cols] = 1
    return out


def test_point_sample_reads_pixel_centres():
    maps = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    coords = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 3], [(0 + 0.5) / 4, (0 + 0.5) / 3]]])
    torch.testing.assert_close(point_sample(maps, coords), torch.tensor([[[6.0, 0.0]]]))


def test_uncertain_points_prefer_small_logits():
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[..., :8] = 0.0  # left half uncertain
    g = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=400, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                    generator=g)
    assert coords.shape == (1, 400, 2) and coords.min() >= 0 and coords.max() <= 1
    assert (coords[0, :300, 0] < 0.5).all()  # the 300 importance points sit in the uncertain half


def test_loss_values_known():
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    perfect = (targets * 2 - 1) * BIG
    assert dice_loss(perfect, targets, 1.0) < 1e-4
    assert sigmoid_ce_loss(perfect, targets, 1.0) < 1e-4
    zero = torch.zeros_like(targets)  # sigmoid 0.5 everywhere
    assert abs(sigmoid_ce_loss(zero, targets, 1.0).item() - np.log(2)) < 1e-6
    assert abs(dice_loss(zero, targets, 1.0).item() - (1 - 3 / 5)) < 1e-6  # 1 - (2*1+1)/(2+2+1)
    pair = pairwise_dice_cost(torch.stack([perfect[0], -perfect[0]]), targets)
    assert pair[0, 0] < 1e-4 and pair[1, 0] > 0.6
    bce = pairwise_bce_cost(torch.stack([perfect[0], -perfect[0]]), targets)
    assert bce[0, 0] < 1e-4 and bce[1, 0] > 10


def test_matcher_finds_the_right_queries():
    h = w = 8
    gt = _masks(h, w, [(slice(0, 4), slice(None)), (slice(4, 8), slice(None))])
    pred_masks = torch.stack([(gt[1] * 2 - 1) * BIG, torch.full((h, w), -BIG), (gt[0] * 2 - 1) * BIG])[None]
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0
    logits[0, 2, 1] = 5.0
    targets = [{"labels": torch.tensor([1, 2]), "masks": gt}]
    rows, cols = HungarianMatcher(num_points=256)({"pred_logits": logits, "pred_masks": pred_masks}, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {2: 0, 0: 1}


def test_criterion_buffer_keys_and_losses():
    crit = SetCriterion(3, num_points=256)
    assert list(crit.state_dict()) == ["empty_weight"]
    torch.testing.assert_close(crit.empty_weight, torch.tensor([1.0, 1.0, 1.0, 0.1]))
    h = w = 8
    gt = _masks(h, w, [(slice(0, 4), slice(None))])
    good_masks = torch.stack([(gt[0] * 2 - 1) * BIG, torch.full((h, w), -BIG)])[None]
    good_logits = torch.tensor([[[BIG, 0, 0, 0], [0, 0, 0, BIG]]])
    targets = [{"labels": torch.tensor([0]), "masks": gt}]
    good = {"pred_logits": good_logits, "pred_masks": good_masks,
            "aux_outputs": [{"pred_logits": good_logits, "pred_masks": good_masks}] * 2}
    losses = crit(good, targets, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert losses["loss_ce"] < 1e-3
    # query order does not matter: the matcher pairs the target with whichever query fits
    swapped = {"pred_logits": good_logits.flip(1), "pred_masks": good_masks.flip(1)}
    swapped_losses = crit(swapped, targets, generator=torch.Generator().manual_seed(0))
    for k in ("loss_ce", "loss_mask", "loss_dice"):
        torch.testing.assert_close(swapped_losses[k], losses[k])
    inverted = {"pred_logits": good_logits, "pred_masks": -good_masks}
    inverted_losses = crit(inverted, targets, generator=torch.Generator().manual_seed(0))
    assert inverted_losses["loss_mask"] > 3 * losses["loss_mask"]
    assert inverted_losses["loss_dice"] > losses["loss_dice"] + 0.1
    g = torch.Generator().manual_seed(0)
    wrong_class = {"pred_logits": torch.tensor([[[0, BIG, 0, 0], [0, 0, 0, BIG]]]), "pred_masks": good_masks}
    ce = crit(wrong_class, targets, generator=g)["loss_ce"]
    # CE weighted by empty_weight: only the matched query (weight 1) is wrong -> BIG / (1 + 0.1)
    assert abs(ce.item() - BIG / 1.1) < 1e-3


def test_criterion_without_targets_pushes_to_no_object():
    crit = SetCriterion(2, num_points=64)
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    masks = torch.zeros(1, 3, 4, 4, requires_grad=True)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.zeros(0, dtype=torch.long),
                                                                  "masks": torch.zeros(0, 4, 4)}])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    crit.weighted_total(losses).backward()
    assert (logits.grad[0, :, 2] < 0).all()  # raising the no-object logit lowers the loss
