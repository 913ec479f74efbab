"""Mask2Former's Hungarian matcher and set criterion, the losses ODISE is trained with.

Class cross-entropy (weight 2, no-object weight 0.1), sigmoid BCE (5) and dice (5) on 12,544
importance-sampled points, on the final and every auxiliary prediction; matching uses the same
three costs.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

Target = dict[str, torch.Tensor]  # "labels" (N,) long, "masks" (N,H,W) float/bool


# ---------------------------------------------------------------------------------------------- point sampling
def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps (R,C,H,W) at coords (R,P,2) in [0,1] as (x, y): (R,C,P)."""
    return F.grid_sample(maps, (2.0 * coords - 1.0).unsqueeze(2), mode="bilinear", align_corners=False).squeeze(3)


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """PointRend sampling for (R,1,H,W) logits: the most uncertain (|logit| smallest) of an oversampled
    random set, plus uniformly random points. Returns (R, num_points, 2)."""
    r = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(r, num_sampled, 2, generator=generator, device="cpu").to(logits.device)
    uncertainty = -point_sample(logits, coords).abs()[:, 0]
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        extra = torch.rand(r, num_random, 2, generator=generator, device="cpu").to(logits.device)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen


# ---------------------------------------------------------------------------------------------- losses
def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of 1 - (2|p.t| + 1) / (|p| + |t| + 1), divided by num_masks."""
    p = logits.sigmoid().flatten(1)
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Mean-over-points BCE per mask, summed over masks, divided by num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice cost between every prediction (Q,P) and target (N,P): (Q,N)."""
    p = logits.sigmoid()
    num = 2 * p @ targets.t()
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def pairwise_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean-over-points BCE between every prediction (Q,P) and target (N,P): (Q,N)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / logits.shape[1]


# ---------------------------------------------------------------------------------------------- matcher
class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising class + BCE + dice costs on shared random points."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: list[Target],
                generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (query indices, target indices) of the optimal assignment."""
        indices = []
        for b, tgt in enumerate(targets):
            labels = tgt["labels"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            prob = outputs["pred_logits"][b].float().softmax(-1)
            cost_class = -prob[:, labels]
            out_mask = outputs["pred_masks"][b][:, None].float()
            tgt_mask = tgt["masks"][:, None].to(out_mask)
            coords = torch.rand(1, self.num_points, 2, generator=generator, device="cpu").to(out_mask.device)
            out_pts = point_sample(out_mask, coords.expand(out_mask.shape[0], -1, -1))[:, 0]
            tgt_pts = point_sample(tgt_mask, coords.expand(tgt_mask.shape[0], -1, -1))[:, 0]
            cost = (self.cost_mask * pairwise_bce_cost(out_pts, tgt_pts) + self.cost_class * cost_class
                    + self.cost_dice * pairwise_dice_cost(out_pts, tgt_pts))
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


# ---------------------------------------------------------------------------------------------- criterion
class SetCriterion(nn.Module):
    """Class CE (no-object weighted), mask BCE and dice on importance-sampled points, final + aux outputs.

    `empty_weight` (num_classes + 1,) is a persistent buffer, as `criterion.empty_weight` in the checkpoint.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, eos_coef: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def loss_labels(self, outputs: dict[str, torch.Tensor], targets: list[Target],
                    indices: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        logits = outputs["pred_logits"].float()
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {logits.shape[-1]} columns, criterion expects {self.num_classes + 1}")
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, ((src, tgt), t) in enumerate(zip(indices, targets)):
            target_classes[b, src.to(logits.device)] = t["labels"][tgt.to(t["labels"].device)].to(logits.device)
        return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device))

    def loss_masks(self, outputs: dict[str, torch.Tensor], targets: list[Target],
                   indices: list[tuple[torch.Tensor, torch.Tensor]], num_masks: float,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        pred = outputs["pred_masks"]
        src = torch.cat([pred[b, s.to(pred.device)] for b, (s, _) in enumerate(indices)])
        if src.shape[0] == 0:
            zero = pred.sum() * 0.0
            return zero, zero
        tgt = torch.cat([t["masks"][j.to(t["masks"].device)].to(pred) for t, (_, j) in zip(targets, indices)])
        src, tgt = src[:, None].float(), tgt[:, None].float()
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio, generator)
            labels = point_sample(tgt, coords)[:, 0]
        logits = point_sample(src, coords)[:, 0]
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def forward(self, outputs: dict[str, Any], targets: list[Target],
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Unweighted losses: loss_ce/loss_mask/loss_dice for the final output and `_{i}` for aux output i."""
        num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses: dict[str, torch.Tensor] = {}
        stages = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        for suffix, out in stages:
            indices = self.matcher(out, targets, generator=generator)
            losses["loss_ce" + suffix] = self.loss_labels(out, targets, indices)
            bce, dice = self.loss_masks(out, targets, indices, num_masks, generator)
            losses["loss_mask" + suffix] = bce
            losses["loss_dice" + suffix] = dice
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of every loss times its weight (2 class, 5 BCE, 5 dice)."""
        return sum(self.weight_dict[re.sub(r"_\d+$", "", k)] * v for k, v in losses.items())
