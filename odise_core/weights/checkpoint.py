"""The official ODISE checkpoints: fetch (path or URL, cached under the weights dir) and load strictly,
checking keys and shapes against the model's trainable state dict."""
from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from odise_core.weights.loading import torch_load
from odise_core.weights.location import CONNECT_TIMEOUT, DEFAULT_LOCATION, WeightsLocation, is_url, reachable

logger = logging.getLogger(__name__)

# Frozen or recomputed tensors a full reference state dict may carry; never part of our trainable keys.
IGNORED_CHECKPOINT_PREFIXES = (
    "backbone.feature_extractor.ldm_extractor.",
    "backbone.feature_extractor.clip.",
    "category_head.clip.",
    "clip_head.",
    "pixel_mean",
    "pixel_std",
)


def _checkpoint_cache(url: str, where: WeightsLocation) -> Path:
    return where.root / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def fetch_checkpoint(source: str, where: WeightsLocation = DEFAULT_LOCATION, download: bool = True) -> Path:
    """A local path for an ODISE checkpoint, downloading a URL into <weights dir>/checkpoints.

    With download=False only checks that a URL is cached or downloadable (the returned path may not exist yet).
    """
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise where.missing(f"ODISE checkpoint {source!r}", [str(path)], "no such file")
        return path
    dest = _checkpoint_cache(source, where)
    if dest.is_file():
        return dest
    host = urllib.parse.urlparse(source).hostname or ""
    if not reachable(host, where):
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
    raw = torch_load(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    ignored = [k for k in state if k.startswith(IGNORED_CHECKPOINT_PREFIXES)]
    state = {_renamed(k): torch.as_tensor(v) for k, v in state.items()
             if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    problem = state_dict_mismatch(model.trainable_state_dict(), state)
    if problem:
        raise RuntimeError(f"checkpoint {path} does not match the model: {problem}")
    model.load_state_dict(state, strict=False)  # keys and shapes checked above: only frozen keys stay missing
    logger.info("loaded %d tensors from %s (%d frozen keys ignored)", len(state), path, len(ignored))
