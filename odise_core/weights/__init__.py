"""Locate, fetch and load the frozen pretrained parts (SD v1.3, CLIP) and the ODISE checkpoints.

Nothing here reaches the network when the weights are already on disk, and when they are not and
the network is unavailable (`WeightsLocation.offline`, HF_HUB_OFFLINE=1, or the host does not answer
within a few seconds), a `WeightsMissingError` names what is missing, where it looked and how to supply it.

Sources and places come from the configuration, never from the environment (the backend's settings
map ODISE_WEIGHTS_DIR, ODISE_SD_WEIGHTS, ODISE_CLIP_WEIGHTS, ODISE_CHECKPOINT and ODISE_OFFLINE onto
it): `DiffusionConfig.pretrained`, `ClipConfig.pretrained`, `ModelConfig.checkpoint`, and
`ModelConfig.weights_dir` / `ModelConfig.offline` (a `WeightsLocation`). HF_HUB_OFFLINE is the hub
library's own switch and is honoured as the hub reads it.

location    WeightsLocation (weights dir, offline), reachability, WeightsMissingError and how to supply weights
loading     seeded random init, freezing, memory-mapped torch.load (shared by the loaders)
sd          Stable Diffusion: source, UNet/VAE, SD's text encoder and the cached empty-prompt encoding
clip        CLIP: source (tag, file, hub cache) and model
checkpoint  the official ODISE checkpoints: fetch, strict key/shape check, load
"""
from __future__ import annotations

from odise_core.config import ModelConfig
from odise_core.weights.checkpoint import fetch_checkpoint, load_odise_checkpoint, state_dict_mismatch
from odise_core.weights.clip import load_clip, resolve_clip_source
from odise_core.weights.location import (WeightsLocation, WeightsMissingError, how_to_supply, source_identity,
                                         weights_dir)
from odise_core.weights.sd import (encode_empty_prompt, load_empty_prompt, load_sd_text_encoder, load_stable_diffusion,
                                   resolve_sd_source)

__all__ = ["WeightsLocation", "WeightsMissingError", "check_weights_available", "encode_empty_prompt",
           "fetch_checkpoint", "load_clip", "load_empty_prompt", "load_odise_checkpoint", "load_sd_text_encoder",
           "load_stable_diffusion", "resolve_clip_source", "resolve_sd_source", "source_identity", "state_dict_mismatch",
           "weights_dir"]


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
