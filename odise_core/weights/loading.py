"""What every weight loader shares: seeded random initialisation, freezing, and memory-mapped torch.load."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def seeded_init(seed: int, build: Any) -> Any:
    """`build()` under its own seed, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def freeze(module: nn.Module) -> nn.Module:
    """`module` in eval mode without gradients (the pretrained parts are never trained)."""
    module.eval()
    module.requires_grad_(False)
    return module


def torch_load(path: Path) -> dict[str, Any]:
    """Load a checkpoint memory-mapped, tensors only; older pickles fall back to full unpickling."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with non-tensor objects (e.g. lightning callbacks)
        logger.warning("%s is not a tensors-only checkpoint (%s); unpickling it fully", path, exc)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
