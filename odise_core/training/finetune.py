"""Fine-tune loop for ODISE's heads on accepted annotations, with its augmented training views.

SD and CLIP stay frozen; the fused diffusion features of each augmented view are kept in a
FeatureCache (odise_core/feature_cache.py, the one prediction uses), so the backbone runs once per
view, and in that cache's memory tier for the run, so a step reads its views from RAM after their
first read. The losses are those of training/losses.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from odise_core.feature_cache import FeatureCache, feature_key
from odise_core.training.losses import SetCriterion, Target

if TYPE_CHECKING:
    from odise_core.modeling.odise import ODISE
    from odise_core.vocabulary import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class TrainSample:
    """One accepted annotation: image plus per-instance masks and class indices into the vocabulary."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool
    classes: np.ndarray  # (N,) int


TRAINABLE_PARTS = ("pixel_decoder", "predictor", "category_head")
OPTIONAL_PARTS = ("feature_projections",)


@dataclass
class FinetuneOptions:
    """Fine-tune settings. `trainable` names parts: pixel_decoder, predictor, category_head, and
    optionally feature_projections (the bottleneck fusion; then the raw diffusion features of a view
    are cached instead of the fused ones, about 4x more memory, and `crop` must equal the window).

    Each image gets `views_per_image` augmented views (view 0 unaugmented; others random flip and
    scale jitter, then a random `crop`-sized window); their diffusion features are computed once
    and cached, so the frozen backbone runs once per view. During a run, up to `cache_limit_gb` of
    them stay in memory (as stored: a fused 512 view of the full preset takes about 22 MB in
    float16), so every step after a view's first read takes it from RAM; beyond that the least
    recently used are read back from the feature cache. Without a caller's feature cache, a private
    one in a temporary folder holds them (as float16 when `cache_half`), also under `cache_limit_gb`.
    `grad_clip` is the max L2 norm of all trainable gradients together (the reference uses 0.01).
    """

    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: int = 10
    warmup_factor: float = 0.067
    batch_size: int = 1
    crop: int | None = None  # None: the model's sliding window (512; tiny preset: 128)
    trainable: tuple[str, ...] = TRAINABLE_PARTS
    grad_clip: float | None = 0.01
    flip: bool = True
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    views_per_image: int = 4
    cache_half: bool = True
    cache_limit_gb: float = 8.0  # views kept in memory during a run (and the private cache's disk bound)
    seed: int = 0
    device: str | None = None  # None: the model's device
    num_points: int = 12544  # points per mask in the matcher and the mask losses (the reference's 112*112)


@dataclass
class FinetuneResult:
    """What a fine-tune did: the loss per step, how far it got and where the time went."""

    losses: list[float]  # weighted total loss per step
    steps: int  # steps completed
    stopped: bool  # True when should_stop() ended the run early
    seconds_features: float  # backbone time (feature caching)
    seconds_train: float  # head forward/backward/optimizer time
    num_images: int

    @property
    def seconds_per_step(self) -> float:
        return self.seconds_train / max(self.steps, 1)


def _trainable_modules(model: "ODISE", parts: tuple[str, ...]) -> dict[str, nn.Module]:
    available = {
        "pixel_decoder": model.sem_seg_head.pixel_decoder,
        "predictor": model.sem_seg_head.predictor,
        "category_head": model.category_head,
        "feature_projections": model.backbone.feature_projections,
    }
    unknown = [p for p in parts if p not in available]
    if unknown or not parts:
        raise ValueError(f"trainable parts must be a non-empty subset of {TRAINABLE_PARTS + OPTIONAL_PARTS}, "
                         f"got {parts}")
    return {p: available[p] for p in parts}


@dataclass(frozen=True)
class ViewPlan:
    """Geometry of one augmented training view: resized size, horizontal flip, crop origin."""

    size: tuple[int, int]
    flip: bool
    origin: tuple[int, int]


def plan_view(image_hw: tuple[int, int], base_size: int, max_size: int, crop: int, flip: bool, scale: float,
              rng: np.random.Generator) -> ViewPlan:
    """Shortest edge to base_size (long edge <= max_size) times `scale`, then a random crop origin."""
    h, w = image_hw
    factor = min(base_size / min(h, w), max_size / max(h, w)) * scale
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    y0 = int(rng.integers(0, max(nh - crop, 0) + 1))
    x0 = int(rng.integers(0, max(nw - crop, 0) + 1))
    return ViewPlan((nh, nw), flip, (y0, x0))


def render_view(sample: TrainSample, plan: ViewPlan, crop: int) -> tuple[torch.Tensor, Target]:
    """The view's image (1,3,crop,crop) in [0,1] (zero padded) and its non-empty instance masks."""
    img = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float()[None] / 255.0
    masks = torch.from_numpy(np.ascontiguousarray(sample.masks, dtype=np.float32))[None]
    nh, nw = plan.size
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False).clamp(0, 1)
    if masks.shape[1]:
        masks = F.interpolate(masks, size=(nh, nw), mode="nearest")
    else:
        masks = masks.new_zeros(1, 0, nh, nw)
    if plan.flip:
        img, masks = img.flip(-1), masks.flip(-1)
    y0, x0 = plan.origin
    img, masks = img[..., y0:y0 + crop, x0:x0 + crop], masks[..., y0:y0 + crop, x0:x0 + crop]
    pad = (0, crop - img.shape[-1], 0, crop - img.shape[-2])
    img, masks = F.pad(img, pad), F.pad(masks, pad)
    masks = masks[0] > 0.5
    keep = masks.flatten(1).any(1)
    labels = torch.as_tensor(np.asarray(sample.classes), dtype=torch.int64).reshape(-1)[keep]
    return img, {"labels": labels, "masks": masks[keep]}


def finetune(model: "ODISE", samples: list[TrainSample], options: FinetuneOptions,
             progress: Callable[[int, int, float], None] | None = None,
             should_stop: Callable[[], bool] | None = None, *, vocab: "Vocabulary",
             feature_cache: FeatureCache | None = None,
             feature_lock: ContextManager | None = None) -> FinetuneResult:
    """Fine-tune the chosen head parts of `model` on `samples` whose class indices refer to `vocab`.

    AdamW with linear warmup then cosine decay to 10 %; deterministic for a given seed on CPU.
    `progress(step, total, loss)` is called after every step; `should_stop()` is polled before each
    step and ends the run early (the weights keep the updates made so far). `feature_cache` (the
    predictor's) keeps view features across calls and processes, keyed by the view's pixels, its kind
    (fused, or raw when the projections train) and the backbone's weights; without one (or with a
    disabled one) a private cache lives for this call. Either way a memory tier of
    `options.cache_limit_gb` for this call sits in front of it, and the reads count as "train" in
    the cache's statistics. Views are used as stored, hit or miss, so a run does not depend on what
    was cached. `feature_lock` is held around every backbone pass (a server shares the frozen
    backbone with its serving model).
    """
    if not samples:
        raise ValueError("finetune needs at least one training sample")
    num_classes = len(vocab)
    for i, s in enumerate(samples):
        if len(s.classes) and (int(np.max(s.classes)) >= num_classes or int(np.min(s.classes)) < 0):
            raise ValueError(f"sample {i} has class indices outside the vocabulary of {num_classes} classes")
        if s.masks.shape[0] != len(s.classes) or s.masks.shape[1:] != s.image.shape[:2]:
            raise ValueError(f"sample {i}: masks {s.masks.shape} do not match image {s.image.shape} / "
                             f"{len(s.classes)} classes")
    device = torch.device(options.device) if options.device else model.device
    if device != model.device:
        model.to(device)
    cfg = model.cfg.backbone
    crop = options.crop or cfg.window
    modules = _trainable_modules(model, tuple(options.trainable))
    raw = "feature_projections" in modules
    if raw and crop != cfg.window:
        raise ValueError(f"training feature_projections needs crop == window ({cfg.window}), got {crop}")

    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    criterion = SetCriterion(num_classes, num_points=options.num_points).to(device)

    model.eval()
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in modules.values():
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)

    def lr_at(step: int) -> float:
        if step < options.warmup:
            alpha = step / max(options.warmup, 1)
            return options.lr * (options.warmup_factor * (1 - alpha) + alpha)
        frac = (step - options.warmup) / max(options.steps - options.warmup, 1)
        return options.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    views = max(1, options.views_per_image)
    plans: list[list[ViewPlan]] = []
    for i, sample in enumerate(samples):
        view_rng = np.random.default_rng([options.seed, i])
        hw = sample.image.shape[:2]
        per = [plan_view(hw, cfg.min_size, cfg.max_size, crop, False, 1.0, view_rng)]
        for _ in range(views - 1):
            flip = options.flip and bool(view_rng.random() < 0.5)
            scale = float(view_rng.uniform(*options.scale_jitter))
            per.append(plan_view(hw, cfg.min_size, cfg.max_size, crop, flip, scale, view_rng))
        plans.append(per)
    private = None
    limit_bytes = int(options.cache_limit_gb * 2**30)
    if feature_cache is None or not feature_cache.enabled:
        private = tempfile.TemporaryDirectory(prefix="odise-finetune-features-")
        feature_cache = FeatureCache(private.name, limit_bytes, "fp16" if options.cache_half else "fp32")
    cache = feature_cache.with_memory(limit_bytes)
    keys: dict[tuple[int, int], str] = {}
    rendered: dict[tuple[int, int], Target] = {}
    seconds_features = 0.0

    def backbone_features(image01: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fused features, or with trainable projections the raw diffusion features of the window
        (named by their index, zero-padded so that names sort in order)."""
        with feature_lock if feature_lock is not None else contextlib.nullcontext():
            if not raw:
                return model.extract_features(image01)
            with torch.no_grad():
                feats = model.backbone.feature_extractor(image01, model.clip.encode_image(image01))
        return {f"{k:03d}": f for k, f in enumerate(feats)}

    def get_view(i: int, v: int) -> tuple[dict[str, torch.Tensor], Target]:
        image01 = None
        if (i, v) not in keys:
            image01, rendered[(i, v)] = render_view(samples[i], plans[i][v], crop)
            keys[(i, v)] = feature_key(model, image01, "raw" if raw else "fused", cache.storage,
                                       extra=f"finetune view {plans[i][v]} crop {crop}")

        def compute() -> dict[str, torch.Tensor]:
            nonlocal seconds_features
            t0 = time.perf_counter()
            view = image01 if image01 is not None else render_view(samples[i], plans[i][v], crop)[0]
            feats = backbone_features(view.to(device))
            seconds_features += time.perf_counter() - t0
            return feats

        return cache.get_or_compute(keys[(i, v)], compute, as_stored=True, purpose="train"), rendered[(i, v)]

    losses: list[float] = []
    seconds_train = 0.0
    stopped = False
    total = options.steps
    try:
        for step in range(total):
            if should_stop is not None and should_stop():
                stopped = True
                log.info("fine-tune stopped at step %d/%d", step, total)
                break
            picks = [(int(rng.integers(len(samples))), int(rng.integers(views))) for _ in range(options.batch_size)]
            batch = [get_view(i, v) for i, v in picks]
            t0 = time.perf_counter()
            features = {k: torch.cat([f[k] for f, _ in batch]).to(device, torch.float32) for k in batch[0][0]}
            if raw:
                features = model.backbone.fuse([features[k] for k in sorted(features)], crop)
            targets = [{"labels": t["labels"].to(device), "masks": t["masks"].to(device)} for _, t in batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            outputs = model.forward_heads(features, vocab)
            loss_dict = criterion(outputs, targets, generator=gen)
            loss = criterion.weighted_total(loss_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            optimizer.step()
            seconds_train += time.perf_counter() - t0
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, total, losses[-1])
            if (step + 1) % 10 == 0 or step + 1 == total:
                log.info("fine-tune step %d/%d loss %.4f", step + 1, total, losses[-1])
    finally:
        for p, flag in was_trainable.items():
            p.requires_grad_(flag)
        model.eval()
        if raw:
            model.forget_backbone_digest()  # the projections changed: fused features get new keys
        cache.flush()
        if private is not None:
            private.cleanup()
    return FinetuneResult(losses=losses, steps=len(losses), stopped=stopped, seconds_features=seconds_features,
                          seconds_train=seconds_train, num_images=len(samples))
