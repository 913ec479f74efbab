"""Stable Diffusion v1: locate the weights (diffusers dir, single-file checkpoint, hub id) and load the frozen
UNet, VAE and the empty-prompt encoding of SD's own text encoder (computed once, cached on disk)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from odise_core.config import DiffusionConfig
from odise_core.weights.loading import freeze, seeded_init, torch_load
from odise_core.weights.location import (DEFAULT_LOCATION, HF_HOST, SD_CKPT_NAME, SD_DIFFUSERS_DIR_NAME,
                                         WeightsLocation, WeightsMissingError, given_source, hf_cached, reachable)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

logger = logging.getLogger(__name__)

# SD v1's FrozenCLIPEmbedder: openai CLIP ViT-L/14 text tower, "" = BOS then EOS padding to 77.
SD_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
BOS_TOKEN, EOS_TOKEN = 49406, 49407


def resolve_sd_source(cfg: DiffusionConfig, where: WeightsLocation = DEFAULT_LOCATION) -> tuple[str, str]:
    """Return (kind, location) of the SD weights: kind is "random", "dir", "file" or "hub"."""
    source = cfg.pretrained
    given = given_source(source, "Stable Diffusion weights", where, dirs=True)
    if given is not None:
        return given
    local_dir, local_ckpt = where.root / SD_DIFFUSERS_DIR_NAME, where.root / SD_CKPT_NAME
    if (local_dir / "unet" / "config.json").is_file():
        return "dir", str(local_dir)
    if local_ckpt.is_file():
        return "file", str(local_ckpt)
    looked = [str(local_dir), str(local_ckpt), f"Hugging Face cache for {source}"]
    if hf_cached(source, "unet/config.json") or reachable(HF_HOST, where):
        return "hub", source
    raise where.missing(f"Stable Diffusion v1.3 ({source})", looked, where.why_missing(HF_HOST))


def _empty_prompt_cache_path(kind: str, location: str, where: WeightsLocation) -> Path:
    ident = location
    if kind in ("dir", "file"):
        p = Path(location).resolve()
        stat = (p / "text_encoder").stat() if kind == "dir" and (p / "text_encoder").exists() else p.stat()
        ident = f"{p}:{stat.st_size}:{int(stat.st_mtime)}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return where.root / "sd-empty-prompt" / f"{digest}.pt"


def sd_text_encoder_config(cfg: DiffusionConfig) -> dict[str, Any]:
    """SD's text encoder config; scaled down to the UNet's context width for small presets."""
    width = cfg.context_dim
    if width == SD_TEXT_ENCODER["hidden_size"]:
        return dict(SD_TEXT_ENCODER)
    return {**SD_TEXT_ENCODER, "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 2,
            "num_attention_heads": max(1, width // 32), "projection_dim": width}


def load_sd_text_encoder(cfg: DiffusionConfig, where: WeightsLocation = DEFAULT_LOCATION) -> nn.Module:
    """SD's own text encoder (frozen), from the same source as the UNet/VAE; seeded random when pretrained=None."""
    from transformers import CLIPTextConfig, CLIPTextModel

    kind, location = resolve_sd_source(cfg, where)
    if kind == "random":
        encoder = seeded_init(cfg.noise_seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**sd_text_encoder_config(cfg))))
    elif kind == "file":
        raw = torch_load(Path(location))
        encoder = _text_encoder_from_state(raw.get("state_dict", raw))
    else:
        encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder",
                                                local_files_only=where.offline or kind == "dir")
    return freeze(encoder)


@torch.no_grad()
def encode_empty_prompt(text_encoder: nn.Module) -> torch.Tensor:
    """SD's (1,77,C) encoding of "": BOS then EOS padding, last hidden state."""
    ids = torch.full((1, 77), EOS_TOKEN, dtype=torch.long)
    ids[0, 0] = BOS_TOKEN
    return text_encoder(input_ids=ids).last_hidden_state.float()


def _text_encoder_config(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SD v1's text-encoder config with the widths read off the checkpoint (64-wide heads)."""
    bare = {k.removeprefix("text_model."): v for k, v in weights.items()}
    hidden = bare["embeddings.token_embedding.weight"].shape[1]
    layers = {int(k.split(".")[2]) for k in bare if k.startswith("encoder.layers.")}
    return {
        **SD_TEXT_ENCODER,
        "vocab_size": bare["embeddings.token_embedding.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": bare["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": bare["embeddings.position_embedding.weight"].shape[0],
        "projection_dim": hidden,
    }


def _text_encoder_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = "cond_stage_model.transformer."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise WeightsMissingError(f"the SD checkpoint has no text encoder ({prefix}*) to encode the empty prompt")
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**_text_encoder_config(weights)))
    nested = any(k.startswith("text_model.") for k in model.state_dict())  # transformers < 5 layout
    bare = {k.removeprefix("text_model."): v for k, v in weights.items()}
    model.load_state_dict({f"text_model.{k}" if nested else k: v for k, v in bare.items()}, strict=False, assign=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name.endswith("position_ids"):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                                       persistent=False)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise WeightsMissingError(f"the SD checkpoint's text encoder lacks {still_meta[:5]}")
    return model.eval()


def _empty_prompt_embedding(kind: str, location: str, state: dict[str, torch.Tensor] | None,
                            where: WeightsLocation) -> torch.Tensor:
    """SD's (1,77,768) encoding of "": computed once with SD's text encoder, then cached on disk."""
    cache = _empty_prompt_cache_path(kind, location, where)
    if cache.is_file():
        return torch.load(cache, map_location="cpu", weights_only=True)
    if state is not None:
        encoder = _text_encoder_from_state(state)
    else:
        from transformers import CLIPTextModel

        encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", local_files_only=where.offline)
    embedding = encode_empty_prompt(encoder)
    del encoder
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(embedding, cache)
    logger.info("cached the SD empty-prompt embedding at %s", cache)
    return embedding


def load_empty_prompt(path: str | Path, where: WeightsLocation = DEFAULT_LOCATION) -> torch.Tensor:
    """SD's (1,77,C) empty-prompt encoding from a file: a tensor, or a dict with key "empty_prompt_embedding".

    For SD checkpoints without a text encoder (e.g. UNet + VAE only)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise where.missing(f"SD empty-prompt embedding {str(path)!r}", [str(source)], "no such file")
    raw = torch_load(source)
    tensor = raw.get("empty_prompt_embedding") if isinstance(raw, dict) else raw
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[:2] != (1, 77):
        raise ValueError(f"{source} must hold a (1, 77, C) tensor (alone or as 'empty_prompt_embedding')")
    return tensor.float()


def _load_single_file(cfg: DiffusionConfig, path: Path) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """Build UNet/VAE on the meta device and assign the converted (memory-mapped) ldm tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    raw = torch_load(path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise WeightsMissingError(f"{path} is not a Stable Diffusion v1 checkpoint (no model.diffusion_model.* keys)")
    models = []
    for cls, convert, config in (
        (UNet2DConditionModel, convert_ldm_unet_checkpoint, cfg.unet),
        (AutoencoderKL, convert_ldm_vae_checkpoint, cfg.vae),
    ):
        converted = convert(state, dict(config))
        with torch.device("meta"):
            model = cls(**config)
        result = model.load_state_dict(converted, strict=False, assign=True)
        still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if result.missing_keys or still_meta:
            missing = result.missing_keys or still_meta
            raise WeightsMissingError(f"{path}: {len(missing)} {cls.__name__} weights missing, e.g. {missing[:5]}")
        models.append(model)
    return models[0], models[1], state


def load_stable_diffusion(
    cfg: DiffusionConfig, dtype: torch.dtype = torch.float32, where: WeightsLocation = DEFAULT_LOCATION
) -> tuple["UNet2DConditionModel", "AutoencoderKL", torch.Tensor]:
    """Return frozen (unet, vae, empty_prompt_embedding (1,77,C)); random weights when cfg.pretrained is None."""
    kind, location = resolve_sd_source(cfg, where)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if kind == "random":
        unet = seeded_init(cfg.noise_seed, lambda: UNet2DConditionModel(**cfg.unet))
        vae = seeded_init(cfg.noise_seed + 1, lambda: AutoencoderKL(**cfg.vae))
        empty = encode_empty_prompt(load_sd_text_encoder(cfg, where))
    elif kind == "file":
        unet, vae, state = _load_single_file(cfg, Path(location))
        empty = load_empty_prompt(cfg.empty_prompt, where) if cfg.empty_prompt else _empty_prompt_embedding(
            kind, location, state, where)
        del state
    else:
        local_only = where.offline or kind == "dir"
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", local_files_only=local_only)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", local_files_only=local_only)
        empty = load_empty_prompt(cfg.empty_prompt, where) if cfg.empty_prompt else _empty_prompt_embedding(
            kind, location, None, where)
    if any(p.dtype != dtype for p in [*unet.parameters(), *vae.parameters()]):
        unet, vae = unet.to(dtype), vae.to(dtype)
    unet, vae = freeze(unet), freeze(vae)
    logger.info("Stable Diffusion loaded (%s %s)", kind, location or "random weights")
    return unet, vae, empty
