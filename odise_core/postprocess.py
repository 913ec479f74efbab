"""Panoptic, instance and semantic outputs from per-query class probabilities and mask logits (Mask2Former rules).

Masks are upsampled from the resized to the original image size only at the end. For a big photo
that is costly: 100 queries at 6000x4000 are 9.6 GB of float32 logits, and each step of panoptic
inference made another copy. `panoptic_segments` upsamples every kept query at once only while that
fits in a memory budget, and otherwise one query at a time in two passes, with identical segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from odise_core.config import HeadConfig
from odise_core.types import Segment

MODES = ("panoptic", "instance", "semantic")
# Full-size float32 logits of all kept queries up to this size are made at once (fastest); beyond it
# panoptic inference goes query by query. 256 MiB: 100 queries of a 0.67-megapixel image.
DIRECT_BUDGET_BYTES = 256 * 2 ** 20


def resize_mask_logits(mask_logits: torch.Tensor, padded_size: tuple[int, int], resized_size: tuple[int, int],
                       original_size: tuple[int, int]) -> torch.Tensor:
    """(Q,h,w) logits -> bilinear to the padded canvas, crop the valid (resized) region, bilinear to the original."""
    x = mask_logits[None].float()
    if tuple(x.shape[-2:]) != tuple(padded_size):
        x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[..., : resized_size[0], : resized_size[1]]
    if tuple(x.shape[-2:]) != tuple(original_size):
        x = F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)
    return x[0]


class UpsampledLogits:
    """(Q,h,w) logits at the resized size, indexed like their (Q,H,W) upsampling but made one query at a time.

    `instance_inference` and `panoptic_by_query` read them this way, so a big image never holds the
    full-size logits of every query at once (each is `resize_mask_logits` of that query alone: identical).
    """

    def __init__(self, logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]):
        self.logits, self.resized_size, self.original_size = logits, tuple(resized_size), tuple(original_size)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, q: int) -> torch.Tensor:
        return resize_mask_logits(self.logits[q:q + 1], self.resized_size, self.resized_size, self.original_size)[0]


def panoptic_inference(probs: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                       object_mask_threshold: float = 0.0, overlap_threshold: float = 0.8,
                       mask_threshold: float = 0.5) -> tuple[torch.Tensor, list[Segment]]:
    """Panoptic map (H,W) int32 with 0 = void, ids 1..N matching the returned segments' order.

    Queries whose best class is "no object" or whose score <= object_mask_threshold are dropped;
    each pixel goes to argmax(score * sigmoid(mask)); a segment keeps its pixels with
    sigmoid >= mask_threshold and needs (pixels won / pixels of its own mask) >= overlap_threshold;
    stuff segments of the same class merge into one.
    """
    num_classes = probs.shape[-1] - 1
    h, w = mask_logits.shape[-2:]
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device)
    scores, labels = probs.max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    index = keep.nonzero().flatten()
    if index.numel() == 0:
        return panoptic, []
    masks = mask_logits[index].float().sigmoid()
    cur_scores, cur_labels = scores[index], labels[index]
    owner = (cur_scores.view(-1, 1, 1).to(masks) * masks).argmax(0)
    segments: list[Segment] = []
    stuff_segment: dict[int, int] = {}  # class -> position in `segments`
    for k in range(index.numel()):
        cls = int(cur_labels[k])
        won = owner == k
        own = masks[k] >= mask_threshold
        won_area, own_area = int(won.sum()), int(own.sum())
        region = won & own
        if won_area == 0 or own_area == 0 or not bool(region.any()):
            continue
        if won_area / own_area < overlap_threshold:
            continue
        pos = _add_region(segments, stuff_segment, region, cls, float(cur_scores[k]), bool(is_thing[cls]),
                          int(index[k]))
        panoptic[region] = pos + 1
    return panoptic, segments


def _add_region(segments: list[Segment], stuff_segment: dict[int, int], region: torch.Tensor, cls: int,
                score: float, thing: bool, query_index: int) -> int:
    """Append a segment for `region`, or merge it into the segment of its stuff class; returns its position."""
    if not thing and cls in stuff_segment:
        pos = stuff_segment[cls]
        seg = segments[pos]
        seg.mask = seg.mask | region.cpu().numpy()
        seg.score = max(seg.score, score)
        return pos
    if not thing:
        stuff_segment[cls] = len(segments)
    segments.append(Segment(mask=region.cpu().numpy(), class_index=cls, score=score, is_thing=thing,
                            query_index=query_index))
    return len(segments) - 1


def panoptic_segments(probs: torch.Tensor, mask_logits: torch.Tensor, resized_size: tuple[int, int],
                      original_size: tuple[int, int], is_thing: torch.Tensor, object_mask_threshold: float = 0.0,
                      overlap_threshold: float = 0.8, mask_threshold: float = 0.5,
                      budget_bytes: int | None = DIRECT_BUDGET_BYTES) -> list[Segment]:
    """Panoptic segments at `original_size` from (Q,h,w) logits at `resized_size`; query_index refers to Q.

    Only queries that can survive (best class not "no object", score above object_mask_threshold) are
    upsampled. When their full-size logits would take more than `budget_bytes` (None: no limit), they
    are upsampled one at a time (`panoptic_by_query`), which gives the same segments.
    """
    scores, _ = probs[:, :-1].max(-1)
    keep = (probs.argmax(-1) != probs.shape[-1] - 1) & (scores > object_mask_threshold)
    index = keep.nonzero().flatten()
    full_bytes = index.numel() * original_size[0] * original_size[1] * 4
    if budget_bytes is None or full_bytes <= budget_bytes:
        full = resize_mask_logits(mask_logits[index], resized_size, resized_size, original_size)
        _, segments = panoptic_inference(probs[index], full, is_thing, object_mask_threshold, overlap_threshold,
                                         mask_threshold)
    else:
        segments = panoptic_by_query(probs[index], mask_logits[index], resized_size, original_size, is_thing,
                                     object_mask_threshold, overlap_threshold, mask_threshold)
    for seg in segments:
        seg.query_index = int(index[seg.query_index])
    return segments


def panoptic_by_query(probs: torch.Tensor, mask_logits: torch.Tensor, resized_size: tuple[int, int],
                      original_size: tuple[int, int], is_thing: torch.Tensor, object_mask_threshold: float = 0.0,
                      overlap_threshold: float = 0.8, mask_threshold: float = 0.5) -> list[Segment]:
    """`panoptic_inference` on (Q,h,w) logits upsampled to `original_size` one query at a time.

    Pass 1 keeps a running per-pixel maximum of score * sigmoid(mask) and its query (strictly greater
    replaces, so ties go to the first query, as argmax does) and counts each query's own pixels. Pass 2
    upsamples again only the queries that pass the overlap rule. Peak memory: a few full-size planes
    instead of several copies of Q of them.
    """
    num_classes = probs.shape[-1] - 1
    scores, labels = probs.max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    index = keep.nonzero().flatten()
    if index.numel() == 0:
        return []

    full = UpsampledLogits(mask_logits, resized_size, original_size)

    def mask_probs(k: int) -> torch.Tensor:
        return full[int(index[k])].sigmoid()

    cur_scores, cur_labels = scores[index], labels[index]
    best = owner = None
    own_areas = []
    for k in range(index.numel()):
        masks = mask_probs(k)
        weighted = cur_scores[k].to(masks) * masks
        own_areas.append(int((masks >= mask_threshold).sum()))
        del masks
        if best is None:
            best, owner = weighted, torch.zeros(weighted.shape, dtype=torch.int16, device=weighted.device)
            continue
        better = weighted > best
        owner[better] = k
        best = torch.where(better, weighted, best)
        del weighted, better
    del best
    won_areas = torch.bincount(owner.view(-1), minlength=index.numel()).tolist()
    segments: list[Segment] = []
    stuff_segment: dict[int, int] = {}  # class -> position in `segments`
    for k in range(index.numel()):
        won_area, own_area = won_areas[k], own_areas[k]
        if won_area == 0 or own_area == 0 or won_area / own_area < overlap_threshold:
            continue
        region = (owner == k) & (mask_probs(k) >= mask_threshold)
        if not bool(region.any()):
            continue
        cls = int(cur_labels[k])
        _add_region(segments, stuff_segment, region, cls, float(cur_scores[k]), bool(is_thing[cls]), int(index[k]))
    return segments


def instance_inference(probs: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                       max_instances: int = 100, things_only: bool = True, keep_empty: bool = True
                       ) -> list[Segment]:
    """Top (query, class) pairs by class probability, scored class prob * mean mask prob inside the mask.

    As in the reference's panoptic-on setting, only thing classes are kept unless `things_only` is False.
    A pair whose mask (logit > 0) is empty is kept with score 0, as the reference (a false positive
    ranked last in mask AP), unless `keep_empty` is False.
    """
    q, k1 = probs.shape
    num_classes = k1 - 1
    cls_scores = probs[:, :-1].flatten()
    top = min(max_instances, cls_scores.numel())
    top_scores, top_index = cls_scores.topk(top, sorted=True)
    queries = torch.div(top_index, num_classes, rounding_mode="floor")
    classes = top_index % num_classes
    out: list[Segment] = []
    for score, qi, cls in zip(top_scores.tolist(), queries.tolist(), classes.tolist()):
        thing = bool(is_thing[cls])
        if things_only and not thing:
            continue
        logits = mask_logits[qi].float()
        binary = logits > 0
        mask_score = float((logits.sigmoid() * binary).sum() / (binary.sum() + 1e-6))
        if not keep_empty and not bool(binary.any()):
            continue
        out.append(Segment(mask=binary.cpu().numpy(), class_index=int(cls), score=score * mask_score,
                           is_thing=thing, query_index=int(qi)))
    out.sort(key=lambda s: s.score, reverse=True)
    return out


def semantic_inference(probs: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class score maps (K,H,W): sum over queries of class prob * sigmoid(mask)."""
    return torch.einsum("qc,qhw->chw", probs[:, :-1].float(), mask_logits.float().sigmoid())


def linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, i1, lambda1) of 1-D linear resizing n_in -> n_out with align_corners=False, as PyTorch computes
    them: output j = (1 - lambda1[j]) * x[i0[j]] + lambda1[j] * x[i1[j]]."""
    j = torch.arange(n_out, dtype=torch.float32)
    src = ((j + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    return i0, (i0 + 1).clamp_max(n_in - 1), src - i0.float()


def bilinear_rows(logits: torch.Tensor, out_size: tuple[int, int], rows: slice) -> torch.Tensor:
    """Rows `rows` of F.interpolate(logits (Q,h,w), out_size, "bilinear", align_corners=False), computed
    from the source rows they need only. All rows: F.interpolate itself; a band agrees with it to a few
    float32 ulps (PyTorch's kernel rounds in another order)."""
    h, (height, width) = logits.shape[-2], out_size
    if rows.indices(height) == (0, height, 1):
        return F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
    y0, y1, ly = (t[rows] for t in linear_taps(h, height))
    top, bottom = int(y0.min()), int(y1.max()) + 1
    # Width first over the source rows the band reads (with the height unchanged, F.interpolate's row
    # weights are exactly 1 and 0), then each output row mixes two of them.
    across = F.interpolate(logits[None, :, top:bottom], size=(bottom - top, width), mode="bilinear",
                           align_corners=False)[0]
    ly = ly.to(logits)[:, None]
    return (1 - ly) * across[:, y0 - top] + ly * across[:, y1 - top]


def semantic_segments(probs: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                      resized_size: tuple[int, int], original_size: tuple[int, int],
                      budget_bytes: int | None = DIRECT_BUDGET_BYTES) -> list[Segment]:
    """One segment per class that wins pixels of the semantic map (sum over queries of class prob *
    sigmoid(mask) at the original size); its score is its mean share of the per-pixel class sum.

    The map is made in bands of rows so that the upsampled logits of one band stay under `budget_bytes`
    (None: one band); a 6000x4000 photo never holds 100 full-size query planes.
    """
    logits = mask_logits[..., : resized_size[0], : resized_size[1]].float()
    height, width = original_size
    num_queries, num_classes = logits.shape[0], probs.shape[-1] - 1
    per_row = (num_queries + num_classes) * width * 4
    band = height if budget_bytes is None else max(1, min(height, budget_bytes // max(per_row, 1)))
    labels = torch.empty((height, width), dtype=torch.int64)
    score_sum = torch.zeros(num_classes, dtype=torch.float64)
    for top in range(0, height, band):
        rows = slice(top, min(top + band, height))
        sem = semantic_inference(probs, bilinear_rows(logits, original_size, rows))
        share, best = (sem / sem.sum(0, keepdim=True).clamp_min(1e-6)).max(0)
        labels[rows] = best.cpu()
        score_sum.index_add_(0, best.flatten().cpu(), share.flatten().double().cpu())
        del sem, share, best
    counts = torch.bincount(labels.view(-1), minlength=num_classes)
    label_map = labels.numpy()
    return [Segment(mask=label_map == k, class_index=k, score=float(score_sum[k] / counts[k]),
                    is_thing=bool(is_thing[k])) for k in counts.nonzero().flatten().tolist()]


def segments_for_mode(probs: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor, head: HeadConfig,
                      resized_size: tuple[int, int], original_size: tuple[int, int], mode: str,
                      budget_bytes: int | None = DIRECT_BUDGET_BYTES) -> list[Segment]:
    """Segments at the original image size from one image's (Q,K+1) probs and (Q,h,w) mask logits of the
    resized region, in output mode "panoptic", "instance" or "semantic" (see MODES); `budget_bytes` as in
    `panoptic_segments`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "semantic":
        return semantic_segments(probs, mask_logits, is_thing, resized_size, original_size, budget_bytes)
    if mode == "instance":  # each query is upsampled to full size only when its turn comes
        full = UpsampledLogits(mask_logits, resized_size, original_size)
        return instance_inference(probs, full, is_thing.to(probs.device), head.max_instances)
    return panoptic_segments(probs, mask_logits, resized_size, original_size, is_thing.to(probs.device),
                             head.object_mask_threshold, head.overlap_threshold, head.mask_threshold, budget_bytes)
