"""CLIP: locate the weights (open_clip tag, local file, hub cache under the weights dir) and load a frozen model."""
from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Any

from torch import nn

from odise_core.config import ClipConfig
from odise_core.weights.loading import freeze, seeded_init
from odise_core.weights.location import (DEFAULT_LOCATION, HF_HOST, WeightsLocation, WeightsMissingError,
                                         given_source, hf_cached, how_to_supply, reachable)

logger = logging.getLogger(__name__)

OPENAI_CLIP_FILES = {"ViT-L-14-336": "ViT-L-14-336px.pt"}
# open_clip's download locations for the CLIP we ship presets for (spares importing open_clip to check).
KNOWN_CLIP_SOURCES: dict[tuple[str, str], dict[str, str]] = {
    ("ViT-L-14-336", "openai"): {
        "hf_hub": "timm/vit_large_patch14_clip_336.openai/",
        "url": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
    },
}


def resolve_clip_source(cfg: ClipConfig, where: WeightsLocation = DEFAULT_LOCATION) -> tuple[str, str]:
    """Return (kind, location) of the CLIP weights: kind is "random", "file" or "tag"."""
    source = cfg.pretrained
    given = given_source(source, "CLIP weights", where)
    if given is not None:
        return given
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
        if any(hf_cached(hub, f, where.root / "clip") for f in files):
            return "tag", source
    url = pcfg.get("url") or ""
    hosts = [HF_HOST] if hub else []
    hosts += [urllib.parse.urlparse(url).hostname] if url else []
    if any(h and reachable(h, where) for h in hosts):
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
            model = seeded_init(0, lambda: open_clip.CLIP(**cfg.custom))
        else:
            model = seeded_init(0, lambda: open_clip.create_model(cfg.model_name, pretrained=None))
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
    return freeze(model.float())


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
