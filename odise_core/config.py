"""Model configuration: explicit dataclasses and the named presets.

`odise-label-coco` is the paper's label model with every dimension from the reference;
`odise-caption-coco` differs only in its category head; `tiny` is the same architecture
with small widths and random weights, for tests and CI.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# diffusers configs of Stable Diffusion v1.x (v1.3 shares them with v1.4/v1.5).
SD_V1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD_V1_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}

TINY_UNET: dict[str, Any] = {
    **SD_V1_UNET,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
TINY_VAE: dict[str, Any] = {
    **SD_V1_VAE,
    "block_out_channels": [16, 32, 32, 32],
    "norm_num_groups": 16,
}


@dataclass(frozen=True)
class FeatureSpec:
    """One captured diffusion feature: the INPUT of `block` inside network `source`."""

    source: str  # "vae_encoder" | "unet" | "vae_decoder"
    block: str  # dotted module path inside that network, e.g. "down_blocks.2.resnets.1"
    channels: int
    stride: int  # stride of the captured tensor relative to the (padded) image
    target_stride: int  # stride it is resized to before fusion


def sd_feature_specs(unet: dict[str, Any], vae: dict[str, Any]) -> tuple[FeatureSpec, ...]:
    """The eight features ODISE captures, with channel counts derived from the diffusers configs.

    Order is the order of `backbone.feature_projections.{0..7}` in the official checkpoint.
    """
    u = unet["block_out_channels"]
    v = vae["block_out_channels"]
    # input of the last resnet of UNet up block i = its own width + the skip from down level i-1 (or 0)
    ru = u[::-1]
    up_in = [ru[i] + ru[min(i + 1, len(ru) - 1)] for i in range(len(ru))]
    return (
        FeatureSpec("vae_encoder", "down_blocks.2.resnets.1", v[2], 4, 4),
        FeatureSpec("vae_encoder", "down_blocks.3.resnets.1", v[3], 8, 8),
        FeatureSpec("unet", "up_blocks.0.resnets.2", up_in[0], 64, 32),
        FeatureSpec("unet", "up_blocks.1.resnets.2", up_in[1], 32, 32),
        FeatureSpec("unet", "up_blocks.2.resnets.2", up_in[2], 16, 16),
        FeatureSpec("unet", "up_blocks.3.resnets.2", up_in[3], 8, 8),
        FeatureSpec("vae_decoder", "up_blocks.0.resnets.2", v[3], 8, 8),
        FeatureSpec("vae_decoder", "up_blocks.1.resnets.2", v[2], 4, 4),
    )


@dataclass
class DiffusionConfig:
    """Frozen Stable Diffusion parts and how features are taken from them."""

    unet: dict[str, Any] = field(default_factory=lambda: dict(SD_V1_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD_V1_VAE))
    pretrained: str | None = "CompVis/stable-diffusion-v1-3"  # hub id, diffusers dir or .ckpt; None = random
    # file with SD's (1,77,C) encoding of "" (weights.load_empty_prompt), for checkpoints without a text encoder
    empty_prompt: str | None = None
    vae_scale: float = 0.18215
    timestep: int = 0
    noise_seed: int = 42
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    @property
    def features(self) -> tuple[FeatureSpec, ...]:
        return sd_feature_specs(self.unet, self.vae)

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def time_embed_dim(self) -> int:
        return 4 * int(self.unet["block_out_channels"][0])


@dataclass
class ClipConfig:
    """CLIP used by the implicit captioner, the category head's text side and MaskCLIP."""

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = "openai"  # open_clip tag or a local file; None = random
    # open_clip model config for architectures open_clip does not name (the tiny preset).
    custom: dict[str, Any] | None = None
    embed_dim: int = 768
    image_size: int = 336
    context_length: int = 77


TINY_CLIP: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "patch_size": 14, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class BackboneConfig:
    """Input preprocessing, sliding window and bottleneck fusion."""

    min_size: int = 1024
    max_size: int = 2560
    size_divisibility: int = 64
    window: int = 512
    fusion_mid_channels: int = 128
    fusion_out_channels: int = 512
    norm_groups: int = 32


@dataclass
class PixelDecoderConfig:
    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    num_points: int = 4
    enc_layers: int = 6
    ffn_dim: int = 1024
    dropout: float = 0.0
    norm_groups: int = 32
    # fused levels by stride; the first `len(in_strides)` go through the deformable encoder
    in_strides: tuple[int, ...] = (8, 16, 32)
    fpn_strides: tuple[int, ...] = (4,)


@dataclass
class DecoderConfig:
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    dec_layers: int = 9
    pre_norm: bool = False
    mask_dim: int = 256


@dataclass
class HeadConfig:
    """Category head, CLIP classifier ensemble and post-processing thresholds."""

    kind: str = "label"  # "label" | "caption"
    embed_dim: int = 256  # mask embedding / projected text dimension
    logit_scale_init: float = 2.6592600369644165  # ln(1/0.07)
    logit_scale_max: float = 100.0
    label_prompt: str = "{}"  # label model: bare synonyms
    clip_prompt: str = "a photo of a {}."
    alpha: float = 0.30  # ensemble weight of CLIP for classes seen in training
    beta: float = 0.70  # ensemble weight of CLIP for unseen classes
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.8
    mask_threshold: float = 0.5
    max_instances: int = 100
    # What MaskCLIP sees. "reference": the decoder's 1/4-resolution mask logits of the padded canvas
    # resized straight to CLIP's input, as the official pipeline (masks and image misaligned when the
    # image is padded). "aligned": masks upsampled to the canvas and cropped to the image first (a deviation).
    maskclip_input: str = "reference"


@dataclass
class ModelConfig:
    name: str
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    checkpoint: str | None = None  # ODISE trainable weights: URL or local path; None = random
    seed: int = 0
    # Inference precision (odise_core.predictor.precision_plan): "auto" = autocast bf16/fp16 on CUDA,
    # the frozen SD networks in bf16 on CPUs with native bf16, fp32 otherwise; "bf16" = SD in bf16 on
    # any CPU; "fp32" = float32 everywhere (the reference pipeline's numbers).
    precision: str = "auto"
    weights_dir: str | None = None  # where weights are looked up and cached; None = ~/.cache/odise-label-studio
    offline: bool = False  # never touch the network (HF_HUB_OFFLINE is honoured as well)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON types (tuples become lists); `from_dict` rebuilds an equal config."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config `to_dict` wrote (also after a JSON round trip). Fields it lacks take their defaults;
        unknown fields or values of the wrong type raise ConfigError naming the field."""
        return _from_plain(cls, data, "config")


class ConfigError(ValueError):
    """A stored model configuration cannot be rebuilt: the message names the field and what is wrong."""


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# JSON value types accepted for each annotated type (int is a valid float; bool is not an int here)
_JSON_TYPES: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,),
                                            type(None): (type(None),), dict: (dict,), tuple: (list, tuple)}


def _from_plain(cls: type, data: Any, where: str) -> Any:
    """Instance of dataclass `cls` from its `_to_plain` form; `where` names it in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{where} has unknown fields {unknown}: it was written by another version of "
                          "odise_core; rebuild it with that version or drop the fields")
    values = {}
    for name, value in data.items():
        hint, path = hints[name], f"{where}.{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _from_plain(hint, value, path)
            continue
        allowed = _json_types(hint)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"{path} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
        values[name] = tuple(value) if typing.get_origin(hint) is tuple else copy.deepcopy(value)
    try:
        return cls(**values)
    except TypeError as e:  # a required field (the preset name) is missing
        raise ConfigError(f"{where}: {e}") from None


def _json_types(hint: Any) -> tuple[type, ...]:
    """Python types the JSON value of a field annotated `hint` may have."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(dict.fromkeys(t for o in options for t in _JSON_TYPES[typing.get_origin(o) or o]))


ODISE_RELEASE = "https://github.com/NVlabs/ODISE/releases/download/v1.0.0"


def _label_coco() -> ModelConfig:
    return ModelConfig(
        name="odise-label-coco",
        checkpoint=f"{ODISE_RELEASE}/odise_label_coco_50e-b67d2efc.pth",
    )


def _caption_coco() -> ModelConfig:
    return ModelConfig(
        name="odise-caption-coco",
        head=HeadConfig(kind="caption", label_prompt="a photo of a {}."),
        checkpoint=f"{ODISE_RELEASE}/odise_caption_coco_50e-853cc971.pth",
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        diffusion=DiffusionConfig(unet=dict(TINY_UNET), vae=dict(TINY_VAE), pretrained=None),
        clip=ClipConfig(model_name="tiny", pretrained=None, custom=TINY_CLIP, embed_dim=64, image_size=56),
        backbone=BackboneConfig(
            min_size=256, max_size=640, window=128, fusion_mid_channels=16, fusion_out_channels=32, norm_groups=8
        ),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=32, mask_dim=32, num_heads=4, num_points=2, enc_layers=2, ffn_dim=64, norm_groups=8
        ),
        decoder=DecoderConfig(num_queries=20, hidden_dim=32, num_heads=4, ffn_dim=64, dec_layers=3, mask_dim=32),
        head=HeadConfig(embed_dim=32),
        checkpoint=None,
    )


PRESETS = {"odise-label-coco": _label_coco, "odise-caption-coco": _caption_coco, "tiny": _tiny}


def get_config(name: str, fast: bool = False) -> ModelConfig:
    """Return a fresh copy of the named preset.

    `fast` processes images at the window size (512 shortest edge for the paper presets: one crop
    instead of four for a square image), about 4x less backbone work at some cost in small-object quality.
    """
    try:
        cfg = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    if fast:
        cfg.backbone.min_size = cfg.backbone.window
    return cfg
