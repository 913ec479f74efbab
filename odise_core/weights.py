"""Locate, fetch and load the frozen pretrained parts (SD v1.3, CLIP) and the ODISE checkpoints.

Nothing here reaches the network when the weights are already on disk, and when they are not and
the network is unavailable (`WeightsLocation.offline`, HF_HUB_OFFLINE=1, or the host does not answer
within a few seconds), a `WeightsMissingError` names what is missing, where it looked and how to supply it.

Sources and places come from the configuration, never from the environment (the backend's settings
map ODISE_WEIGHTS_DIR, ODISE_SD_WEIGHTS, ODISE_CLIP_WEIGHTS, ODISE_CHECKPOINT and ODISE_OFFLINE onto
it): `DiffusionConfig.pretrained`, `ClipConfig.pretrained`, `ModelConfig.checkpoint`, and
`ModelConfig.weights_dir` / `ModelConfig.offline` (a `WeightsLocation`). HF_HUB_OFFLINE is the hub
library's own switch and is honoured as the hub reads it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from odise_core.config import ClipConfig, DiffusionConfig, ModelConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "odise-label-studio"
SD_CKPT_NAME = "sd-v1-3.ckpt"
SD_DIFFUSERS_DIR_NAME = "stable-diffusion-v1-3"
OPENAI_CLIP_FILES = {"ViT-L-14-336": "ViT-L-14-336px.pt"}
# open_clip's download locations for the CLIP we ship presets for (spares importing open_clip to check).
KNOWN_CLIP_SOURCES: dict[tuple[str, str], dict[str, str]] = {
    ("ViT-L-14-336", "openai"): {
        "hf_hub": "timm/vit_large_patch14_clip_336.openai/",
        "url": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
    },
}
HF_HOST = "huggingface.co"
CONNECT_TIMEOUT = 3.0
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
# Frozen or recomputed tensors a full reference state dict may carry; never part of our trainable keys.
IGNORED_CHECKPOINT_PREFIXES = (
    "backbone.feature_extractor.ldm_extractor.",
    "backbone.feature_extractor.clip.",
    "category_head.clip.",
    "clip_head.",
    "pixel_mean",
    "pixel_std",
)

def how_to_supply(root: Path | None = None) -> str:
    """The one-line instructions every WeightsMissingError ends with."""
    return (
        "Supply the weights with --weights-dir or these environment variables: "
        "ODISE_SD_WEIGHTS=<diffusers dir | sd-v1-3.ckpt | hub id>, ODISE_CLIP_WEIGHTS=<file | open_clip tag>, "
        f"ODISE_CHECKPOINT=<.pth path | URL>, or place them in {root or DEFAULT_WEIGHTS_DIR} "
        f"(--weights-dir / ODISE_WEIGHTS_DIR): {SD_CKPT_NAME} or {SD_DIFFUSERS_DIR_NAME}/, "
        "clip/ViT-L-14-336px.pt, checkpoints/<name>.pth. Use --preset tiny for random weights."
    )


class WeightsMissingError(RuntimeError):
    """Pretrained weights are not on disk and cannot be downloaded now."""


def weights_dir(root: str | Path | None = None) -> Path:
    """Cache directory for weights and derived constants: `root`, or ~/.cache/odise-label-studio."""
    return Path(root).expanduser() if root else DEFAULT_WEIGHTS_DIR


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub library parses it, read now (tests and tools may set it late)."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES


@dataclass(frozen=True)
class WeightsLocation:
    """Where weights are looked up and cached, and whether the network may be used."""

    root: Path = DEFAULT_WEIGHTS_DIR
    offline_flag: bool = False

    @classmethod
    def of(cls, cfg: ModelConfig) -> "WeightsLocation":
        return cls(weights_dir(cfg.weights_dir), cfg.offline)

    @property
    def offline(self) -> bool:
        return self.offline_flag or _hub_offline()

    def why_missing(self, host: str) -> str:
        return "offline (ODISE_OFFLINE/HF_HUB_OFFLINE)" if self.offline else f"{host} unreachable"

    def missing(self, what: str, looked: list[str], why: str) -> WeightsMissingError:
        where = "; ".join(looked) if looked else "nowhere"
        return WeightsMissingError(f"{what} not found ({why}). Looked in: {where}. {how_to_supply(self.root)}")


DEFAULT_LOCATION = WeightsLocation()
_REACHABLE: dict[str, bool] = {}


def _reachable(host: str, where: WeightsLocation) -> bool:
    """Whether `host`:443 accepts a TCP connection within CONNECT_TIMEOUT (cached per process)."""
    if where.offline:
        return False
    if host not in _REACHABLE:
        try:
            with socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT):
                _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https")


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin"))


def _hf_cached(repo_id: str, filename: str, cache_dir: Path | None = None) -> bool:
    """Whether the file is in the default Hugging Face cache (or in `cache_dir`)."""
    from huggingface_hub import try_to_load_from_cache

    dirs = [None] + ([str(cache_dir)] if cache_dir is not None else [])
    return any(isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=d), str) for d in dirs)


# ---------------------------------------------------------------------------------------- SD


def resolve_sd_source(cfg: DiffusionConfig, where: WeightsLocation = DEFAULT_LOCATION) -> tuple[str, str]:
    """Return (kind, location) of the SD weights: kind is "random", "dir", "file" or "hub"."""
    source = cfg.pretrained
    if source is None:
        return "random", ""
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir", str(path)
    if path.is_file():
        return "file", str(path)
    if _looks_like_path(source):
        raise where.missing(f"Stable Diffusion weights {source!r}", [str(path)], "no such file or directory")
    local_dir, local_ckpt = where.root / SD_DIFFUSERS_DIR_NAME, where.root / SD_CKPT_NAME
    if (local_dir / "unet" / "config.json").is_file():
        return "dir", str(local_dir)
    if local_ckpt.is_file():
        return "file", str(local_ckpt)
    looked = [str(local_dir), str(local_ckpt), f"Hugging Face cache for {source}"]
    if _hf_cached(source, "unet/config.json") or _reachable(HF_HOST, where):
        return "hub", source
    raise where.missing(f"Stable Diffusion v1.3 ({source})", looked, where.why_missing(HF_HOST))


def source_identity(kind: str, location: str) -> str:
    """`location` for caches keyed by weights: with the resolved path, size and mtime of a local file (or of
    every file in a local directory), so replacing the weights changes it."""
    if kind == "file":
        stat = Path(location).stat()
        return f"{Path(location).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    if kind == "dir":
        root = Path(location).resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return f"{root}:" + ",".join(f"{p.relative_to(root)}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)
    return location


def _seeded_init(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _torch_load(path: Path) -> dict[str, Any]:
    """Load a checkpoint memory-mapped, tensors only; older pickles fall back to full unpickling."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with non-tensor objects (e.g. lightning callbacks)
        logger.warning("%s is not a tensors-only checkpoint (%s); unpickling it fully", path, exc)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


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
        encoder = _seeded_init(cfg.noise_seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**sd_text_encoder_config(cfg))))
    elif kind == "file":
        raw = _torch_load(Path(location))
        encoder = _text_encoder_from_state(raw.get("state_dict", raw))
    else:
        encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder",
                                                local_files_only=where.offline or kind == "dir")
    return _freeze(encoder)


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
    raw = _torch_load(source)
    tensor = raw.get("empty_prompt_embedding") if isinstance(raw, dict) else raw
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[:2] != (1, 77):
        raise ValueError(f"{source} must hold a (1, 77, C) tensor (alone or as 'empty_prompt_embedding')")
    return tensor.float()


def _load_single_file(cfg: DiffusionConfig, path: Path) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """Build UNet/VAE on the meta device and assign the converted (memory-mapped) ldm tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    raw = _torch_load(path)
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
        unet = _seeded_init(cfg.noise_seed, lambda: UNet2DConditionModel(**cfg.unet))
        vae = _seeded_init(cfg.noise_seed + 1, lambda: AutoencoderKL(**cfg.vae))
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
    unet, vae = _freeze(unet), _freeze(vae)
    logger.info("Stable Diffusion loaded (%s %s)", kind, location or "random weights")
    return unet, vae, empty


# -------------------------------------------------------------------------------------- CLIP


def resolve_clip_source(cfg: ClipConfig, where: WeightsLocation = DEFAULT_LOCATION) -> tuple[str, str]:
    """Return (kind, location) of the CLIP weights: kind is "random", "file" or "tag"."""
    source = cfg.pretrained
    if source is None:
        return "random", ""
    path = Path(source).expanduser()
    if path.is_file():
        return "file", str(path)
    if _looks_like_path(source):
        raise where.missing(f"CLIP weights {source!r}", [str(path)], "no such file")
    looked = []
    local_name = OPENAI_CLIP_FILES.get(cfg.model_name)
    if source == "openai" and local_name:
        for candidate in (where.root / "clip" / local_name, Path.home() / ".cache" / "clip" / local_name):
            if candidate.is_file():
                return "file", str(candidate)
            looked.append(str(candidate))
    pcfg = KNOWN_CLIP_SOURCES.get((cfg.model_name, source)) or _open_clip_pretrained_cfg(cfg.model_name, source)
    if not pcfg:
        raise WeightsMissingError(f"open_clip has no pretrained tag {source!r} for {cfg.model_name}. {how_to_supply(where.root)}")
    hub = (pcfg.get("hf_hub") or "").strip("/")
    if hub:
        looked.append(f"Hugging Face cache for {hub}")
        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        if any(_hf_cached(hub, f, where.root / "clip") for f in files):
            return "tag", source
    url = pcfg.get("url") or ""
    hosts = [HF_HOST] if hub else []
    hosts += [urllib.parse.urlparse(url).hostname] if url else []
    if any(h and _reachable(h, where) for h in hosts):
        return "tag", source
    raise where.missing(f"CLIP {cfg.model_name} weights ({source})", looked, where.why_missing("download hosts"))


def _open_clip_pretrained_cfg(model_name: str, tag: str) -> dict[str, Any]:
    import open_clip

    return dict(open_clip.get_pretrained_cfg(model_name, tag) or {})


def load_clip(cfg: ClipConfig, where: WeightsLocation = DEFAULT_LOCATION) -> nn.Module:
    """Return a frozen open_clip CLIP model (open_clip tag, local file, or random/custom config)."""
    import open_clip

    kind, location = resolve_clip_source(cfg, where)
    if kind == "random":
        if cfg.custom is not None:
            model = _seeded_init(0, lambda: open_clip.CLIP(**cfg.custom))
        else:
            model = _seeded_init(0, lambda: open_clip.create_model(cfg.model_name, pretrained=None))
    elif kind == "file" and cfg.custom is not None:
        # an architecture open_clip does not name: build it from the config, load the file's state dict strictly
        model = open_clip.CLIP(**cfg.custom)
        open_clip.load_checkpoint(model, location, strict=True)
    elif kind == "file" and location.endswith(".pt") and _is_torchscript(Path(location)):
        model = open_clip.load_openai_model(location, device="cpu", jit=False)
    else:
        model = open_clip.create_model(
            cfg.model_name, pretrained=location, force_quick_gelu=location == "openai" or kind == "file",
            cache_dir=str(where.root / "clip"),
        )
    logger.info("CLIP %s loaded (%s %s)", cfg.model_name, kind, location or "random weights")
    return _freeze(model.float())


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# ------------------------------------------------------------------------- ODISE checkpoint


def _checkpoint_cache(url: str, where: WeightsLocation) -> Path:
    return where.root / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def fetch_checkpoint(source: str, where: WeightsLocation = DEFAULT_LOCATION, download: bool = True) -> Path:
    """A local path for an ODISE checkpoint, downloading a URL into <weights dir>/checkpoints.

    With download=False only checks that a URL is cached or downloadable (the returned path may not exist yet).
    """
    if not _is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise where.missing(f"ODISE checkpoint {source!r}", [str(path)], "no such file")
        return path
    dest = _checkpoint_cache(source, where)
    if dest.is_file():
        return dest
    host = urllib.parse.urlparse(source).hostname or ""
    if not _reachable(host, where):
        raise where.missing(f"ODISE checkpoint {source}", [str(dest)], where.why_missing(host))
    if download:
        _download(source, dest)
    return dest


def _download(url: str, dest: Path) -> None:
    import requests
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT, 60)) as response:
        response.raise_for_status()
        total = int(response.headers.get("content-length", 0)) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            for chunk in response.iter_content(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    tmp.replace(dest)


# The caption model's checkpoint calls its category head "word_head".
CHECKPOINT_RENAMES = {"word_head.": "category_head."}


def _renamed(key: str) -> str:
    for old, new in CHECKPOINT_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def state_dict_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What differs between a state dict and the one expected (keys, shapes); None when they match."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return None
    return (f"{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:10]}")


def load_odise_checkpoint(model: nn.Module, url_or_path: str, where: WeightsLocation = DEFAULT_LOCATION) -> None:
    """Load ckpt["model"] into `model.trainable_state_dict()` keys strictly (raise on any mismatch)."""
    path = fetch_checkpoint(url_or_path, where)
    raw = _torch_load(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    ignored = [k for k in state if k.startswith(IGNORED_CHECKPOINT_PREFIXES)]
    state = {_renamed(k): torch.as_tensor(v) for k, v in state.items()
             if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    problem = state_dict_mismatch(model.trainable_state_dict(), state)
    if problem:
        raise RuntimeError(f"checkpoint {path} does not match the model: {problem}")
    model.load_state_dict(state, strict=False)  # keys and shapes checked above: only frozen keys stay missing
    logger.info("loaded %d tensors from %s (%d frozen keys ignored)", len(state), path, len(ignored))


def check_weights_available(cfg: ModelConfig) -> None:
    """Fail at once, with one message listing every missing artefact, before any model is built."""
    where = WeightsLocation.of(cfg)
    problems = []
    checks = [lambda: resolve_sd_source(cfg.diffusion, where), lambda: resolve_clip_source(cfg.clip, where)]
    if cfg.checkpoint is not None:
        checks.append(lambda: fetch_checkpoint(cfg.checkpoint, where, download=False))
    for check in checks:
        try:
            check()
        except WeightsMissingError as exc:
            problems.append(str(exc).replace(f" {how_to_supply(where.root)}", ""))
    if problems:
        raise WeightsMissingError(f"preset {cfg.name!r} cannot load its weights:\n- " + "\n- ".join(problems)
                                  + f"\n{how_to_supply(where.root)}")
