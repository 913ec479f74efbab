"""Images in, segments out: runs an ODISE network on one image under a precision policy.

The network (odise_core/modeling/odise.py) takes tensors; this predictor loads and pads the image,
picks the device and dtypes, mixes the two classifiers and turns per-query outputs into segments
in the requested output mode (odise_core/postprocess.py), as SamPredictor sits on top of Sam.
"""
from __future__ import annotations

import functools
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from odise_core.config import ModelConfig
from odise_core.feature_cache import Features, FeatureCache, feature_key, maskclip_key
from odise_core.modeling.head import geometric_ensemble
from odise_core.modeling.odise import ODISE
from odise_core.phrase import phrase_probabilities
from odise_core.postprocess import DIRECT_BUDGET_BYTES, MODES, segments_for_mode
from odise_core.preprocess import Prepared, load_image, prepare
from odise_core.query_state import QueryState, bounded_mask_logits
from odise_core.types import RawPrediction, Segment
from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_plan(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(whole-model autocast dtype or None, dtype of the frozen SD networks) for `precision` on `device`.

    - fp32: everything in float32: the same numbers as the reference pipeline.
    - auto: on CUDA, autocast in bf16 (fp16 without bf16 support); on a CPU with native bf16, the
      frozen UNet and VAE in bf16 and the rest in float32; float32 otherwise.
    - bf16: as auto, but the SD networks run in bf16 on any CPU.
    On the CPU only SD goes to bf16: whole-model autocast made the CLIP ViT 20x slower there.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None, torch.float32
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), torch.float32
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return None, torch.bfloat16
    return None, torch.float32


@dataclass
class _Forward:
    """What one full pass computes, before any output mode."""

    prep: Prepared
    out: dict[str, Any]  # the network's forward_heads outputs
    mask_logits: torch.Tensor  # (Q, h, w) at the resized size, unpadded
    clip_embeds: torch.Tensor | None  # (1, Q, D) when kept
    probs: torch.Tensor  # (Q, K+1)
    timings: dict[str, float]
    feature_cache: str | None  # "hit" (backbone and MaskCLIP stream) / "miss", None without a feature cache


class ODISEPredictor:
    """Segments one image at a time with `model`, under `model.cfg.precision` on the model's device.

    It is also the handle the backend serves and versions: the weights it predicts with
    (`trainable_state_dict`, `load_trainable_state_dict`, `trained_classes`) are the network's.
    """

    def __init__(self, model: ODISE, feature_cache: FeatureCache | None = None):
        self.model = model
        # Backbone features of images seen before come from here (None: always computed).
        self.feature_cache = feature_cache
        # Panoptic post-processing upsamples all kept queries at once up to this many bytes, else one by
        # one (same segments, bounded memory on big photos); None: always at once (benchmarks/big_image.py).
        self.mask_budget_bytes: int | None = DIRECT_BUDGET_BYTES
        self.apply_precision()

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def version(self) -> str:
        """The ODISE checkpoint's name, "random" without one."""
        return self.model.version

    @property
    def trained_classes(self) -> set[str]:
        """Class names a fine-tune trained on: ensembled like COCO's "seen in training" classes."""
        return self.model.trained_classes

    @trained_classes.setter
    def trained_classes(self, names: set[str]) -> None:
        self.model.trained_classes = set(names)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable_state_dict(state)

    def apply_precision(self) -> tuple[torch.dtype | None, torch.dtype]:
        """Cast the frozen SD networks as `cfg.precision` asks on this device; returns the plan."""
        autocast_dtype, sd_dtype = precision_plan(self.cfg.precision, self.device)
        self.model.backbone.feature_extractor.set_sd_dtype(sd_dtype)
        return autocast_dtype, sd_dtype

    def _autocast(self) -> AbstractContextManager:
        autocast_dtype, _ = self.apply_precision()
        return torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def _cached(self, key: Callable[[str, torch.dtype | None], str], compute: Callable[[], Features]
                ) -> tuple[Features, str | None]:
        """`compute()`'s tensors, from the feature cache when it has them under `key(storage, autocast dtype)`;
        and "hit", "miss" or None (no cache). They are used as stored on a miss too, so an image predicts the
        same whether it was seen before or not (with fp16/bf16 storage, slightly unlike no cache)."""
        cache = self.feature_cache
        if cache is None or not cache.enabled:
            return compute(), None
        autocast_dtype, _ = precision_plan(self.cfg.precision, self.device)
        computed: list[bool] = []

        def counted() -> Features:
            computed.append(True)
            return compute()

        found = cache.get_or_compute(key(cache.storage, autocast_dtype), counted, as_stored=True)
        return {name: f.to(self.device) for name, f in found.items()}, "miss" if computed else "hit"

    def _features(self, padded: torch.Tensor) -> tuple[Features, str | None]:
        """The fused backbone features of `padded` (see `_cached`)."""
        return self._cached(lambda storage, autocast: feature_key(self.model, padded, "fused", storage, autocast),
                            lambda: self.model.extract_features(padded))

    def _maskclip_stream(self, clip_image: torch.Tensor) -> tuple[Features, str | None]:
        """MaskCLIP's mask-independent stream of `clip_image` (see `_cached`): computed the same way whether
        cached or not; only the mask tokens then run per prediction."""
        return self._cached(lambda storage, autocast: maskclip_key(self.model, clip_image, storage, autocast),
                            lambda: self.model.maskclip_stream(clip_image))

    def _forward(self, image: Any, vocab: Vocabulary, keep_clip_embeds: bool = False) -> _Forward:
        """One full pass: features, heads, MaskCLIP and the ensembled probabilities of one image."""
        if len(vocab) == 0:
            raise ValueError("the vocabulary is empty: give at least one class")
        model = self.model
        timings: dict[str, float] = {}
        t = time.perf_counter()
        array = load_image(image)
        prep: Prepared = prepare(array, self.cfg.backbone)
        timings["preprocess"] = time.perf_counter() - t

        with self._autocast():
            t = time.perf_counter()
            features, cache_state = self._features(prep.tensor)
            timings["backbone"] = time.perf_counter() - t
            t = time.perf_counter()
            out = model.forward_heads(features, vocab)
            timings["heads"] = time.perf_counter() - t

            t = time.perf_counter()
            h, w = prep.resized_size
            hp, wp = prep.tensor.shape[-2:]
            masks = nn.functional.interpolate(out["pred_masks"].float(), size=(hp, wp), mode="bilinear",
                                              align_corners=False)[..., :h, :w]
            clip_image, clip_masks = model.maskclip_inputs(prep.tensor, prep.resized_size, out["pred_masks"])
            stream, stream_state = self._maskclip_stream(clip_image)
            clip_embeds = model.mask_embeddings(clip_image, clip_masks, stream)
            clip_logits = model.clip_logits(clip_embeds, vocab)
            timings["clip_classifier"] = time.perf_counter() - t

        seen = vocab.is_base | torch.tensor([n in model.trained_classes for n in vocab.names], dtype=torch.bool)
        probs = geometric_ensemble(out["pred_logits"].float(), clip_logits.float(), seen.to(self.device),
                                   self.cfg.head.alpha, self.cfg.head.beta)[0]
        if cache_state is not None:  # a hit only when neither the backbone nor MaskCLIP ran
            cache_state = "hit" if (cache_state, stream_state) == ("hit", "hit") else "miss"
        return _Forward(prep, out, masks[0], clip_embeds if keep_clip_embeds else None, probs, timings, cache_state)

    @torch.inference_mode()
    def predict_raw(self, image: Any, vocab: Vocabulary, mode: str = "panoptic") -> RawPrediction:
        """Segments plus per-query class probabilities and mask logits for one image.

        `image`: anything odise_core.preprocess.load_image reads (path, bytes, PIL image, array).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        run = self._forward(image, vocab)
        t = time.perf_counter()
        segments = segments_for_mode(run.probs, run.mask_logits, vocab.is_thing, self.cfg.head, run.prep.resized_size,
                                     run.prep.original_size, mode, self.mask_budget_bytes)
        run.timings["postprocess"] = time.perf_counter() - t
        return RawPrediction(segments=segments, class_probs=run.probs.cpu(), mask_logits=run.mask_logits.cpu(),
                             image_size=run.prep.original_size, timings=run.timings, feature_cache=run.feature_cache)

    @torch.inference_mode()
    def query_state(self, image: Any, vocab: Vocabulary) -> QueryState:
        """One full pass keeping what interactive clicks, boxes and phrases need (odise_core/query_state.py).

        The query mask logits cover the whole image, at most MAX_MASK_SIDE pixels on a side; the
        mask and MaskCLIP embeddings let phrase_probabilities() score a new phrase without the network.
        """
        run = self._forward(image, vocab, keep_clip_embeds=True)
        binary = run.out["binary_logits"]
        return QueryState(mask_logits=bounded_mask_logits(run.mask_logits), class_probs=run.probs.float().cpu(),
                          mask_embed=run.out["mask_embed"][0].float().cpu(), clip_embeds=run.clip_embeds[0].float().cpu(),
                          logit_scale=float(run.out["logit_scale"]), image_size=run.prep.original_size,
                          binary_logits=None if binary is None else binary[0].float().cpu())

    def phrase_probabilities(self, state: QueryState, vocab: Vocabulary, phrase: str) -> torch.Tensor:
        """(Q, K+2) probabilities of `state`'s queries over `vocab` + `phrase` (class K) + no object."""
        return phrase_probabilities(self.model, state, vocab, phrase)

    def predict(self, image: Any, vocab: Vocabulary, mode: str = "panoptic") -> list[Segment]:
        """Panoptic (or instance/semantic) segments of one image at its original size."""
        return self.predict_raw(image, vocab, mode).segments


def build_predictor(cfg: ModelConfig, device: str | torch.device = "auto",
                    text_cache: TextEmbeddingCache | None = None, network: type[ODISE] | None = None,
                    feature_cache: FeatureCache | None = None) -> ODISEPredictor:
    """The one way to build a predictor: the network with `cfg`'s weights on `device` ('auto': CUDA,
    MPS, CPU), SD cast as `cfg.precision` asks, reusing backbone features from `feature_cache` when given.
    Fails at once, naming what is missing, without weights.

    `network` is ODISE or a subclass (the reference-equivalent baseline of the latency benchmark)."""
    return ODISEPredictor((network or ODISE).from_config(cfg, resolve_device(device), text_cache=text_cache),
                          feature_cache=feature_cache)
