"""Diffusion features with the implicit captioner: frozen SD VAE + UNet (diffusers), features by hooks.

Each captured feature is the INPUT of a diffusers block (cfg.features). A forward-pre-hook stores it
and, unless `full_networks` is set, aborts the network as soon as its last needed feature is taken,
so the UNet's last resnet/attention/output conv and the VAE decoder's high-resolution tail never run.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import DiffusionConfig, FeatureSpec
from odise_core.weights import load_stable_diffusion

SEQ_LEN = 77
LATENT_SIZE = 64  # latent side of a 512 crop: the shape of the reference's shared noise
STOPPABLE = ("unet", "vae_decoder")  # the VAE encoder always runs to the end: its output is the latent


class _StopNetwork(Exception):
    """Raised by a hook once a network has produced its last needed feature."""


class PositionalLinear(nn.Module):
    """Linear projection broadcast over a learnt positional embedding: (B,in) -> (B,seq_len,out)."""

    def __init__(self, in_features: int, out_features: int, seq_len: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, out_features))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).unsqueeze(1) + self.positional_embedding


class DiffusionFeatureExtractor(nn.Module):
    """Implicit captioner + SD feature capture. Trainable: alpha_cond, alpha_cond_time_embed,
    clip_project, time_embed_project (official names); `unet`/`vae` are frozen."""

    frozen_prefixes = ("unet.", "vae.")

    def __init__(
        self,
        cfg: DiffusionConfig,
        clip_dim: int,
        full_networks: bool = False,
        channels_last: bool = False,
        sd: tuple[nn.Module, nn.Module, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs: tuple[FeatureSpec, ...] = cfg.features
        self.full_networks = full_networks
        self.channels_last = channels_last
        unet, vae, empty = sd if sd is not None else load_stable_diffusion(cfg)
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.register_buffer("empty_embedding", empty.detach().float().reshape(1, SEQ_LEN, -1), persistent=False)
        gen = torch.Generator().manual_seed(cfg.noise_seed)
        noise = torch.randn(1, cfg.latent_channels, LATENT_SIZE, LATENT_SIZE, generator=gen, device="cpu")
        self.register_buffer("noise", noise, persistent=False)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64,
                               device="cpu") ** 2
        alpha_bar = float(torch.cumprod(1.0 - betas, 0)[cfg.timestep])
        self.signal_scale, self.noise_scale = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5

        context_dim, time_dim = cfg.context_dim, cfg.time_embed_dim
        self.clip_project = PositionalLinear(clip_dim, context_dim, SEQ_LEN)
        self.alpha_cond = nn.Parameter(torch.zeros(1, SEQ_LEN, context_dim))
        self.time_embed_project = PositionalLinear(clip_dim, time_dim, 1)
        self.alpha_cond_time_embed = nn.Parameter(torch.zeros(time_dim))

        self._last_index = {
            src: max(i for i, s in enumerate(self.specs) if s.source == src) for src in {s.source for s in self.specs}
        }

    def train(self, mode: bool = True) -> "DiffusionFeatureExtractor":
        """Only the captioner projections follow `mode`; SD stays in eval."""
        super().train(mode)
        self.unet.eval()
        self.vae.eval()
        return self

    @property
    def sd_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def set_sd_dtype(self, dtype: torch.dtype) -> None:
        """Run the frozen UNet and VAE in `dtype` (float32 or bfloat16); the captioner stays float32.

        Casting down is one-way: bf16 weights cast back to float32 are rounded, so that is refused.
        In bf16 the VAE encoder also switches to channels_last, where oneDNN's bf16 convolutions
        were measured 2x faster on an AMX CPU (and float32 gained nothing)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the SD networks run in float32 or bfloat16, not {dtype}")
        current = self.sd_dtype
        if dtype == current:
            return
        if current != torch.float32:
            raise ValueError(f"the SD networks were already cast to {current}; casting back to {dtype} would "
                             "keep the rounded weights: rebuild the model with precision 'fp32'")
        # diffusers warns on any dtype cast by `.to()`; these networks have no fp32-only modules
        diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
        level = diffusers_log.level
        diffusers_log.setLevel(logging.ERROR)
        try:
            self.unet.to(dtype)
            self.vae.to(dtype)
        finally:
            diffusers_log.setLevel(level)
        if dtype == torch.bfloat16 and not self.channels_last:
            self.vae.encoder.to(memory_format=torch.channels_last)

    def _network(self, source: str) -> nn.Module:
        return {"vae_encoder": self.vae.encoder, "unet": self.unet, "vae_decoder": self.vae.decoder}[source]

    def _attach_hooks(self, captured: dict[int, list[torch.Tensor]], time_cond: torch.Tensor) -> list[Any]:
        """Hooks for one forward: capture block inputs (stopping networks early) and offset the time embedding.

        Registered per call and acting only in the calling thread, so copies of this module and
        concurrent forwards never see each other's tensors."""
        owner = threading.get_ident()
        handles = []
        for index, spec in enumerate(self.specs):
            stop = not self.full_networks and spec.source in STOPPABLE and self._last_index[spec.source] == index

            def hook(module: nn.Module, args: tuple, kwargs: dict, index: int = index, stop: bool = stop) -> None:
                if threading.get_ident() != owner:
                    return
                captured.setdefault(index, []).append(args[0] if args else next(iter(kwargs.values())))
                if stop:
                    raise _StopNetwork

            block = self._network(spec.source).get_submodule(spec.block)
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))

        def add_time_cond(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + time_cond.to(output.dtype) if threading.get_ident() == owner else output

        handles.append(self.unet.time_embedding.register_forward_hook(add_time_cond))
        return handles

    @staticmethod
    def _run(fn: Any) -> None:
        try:
            fn()
        except _StopNetwork:
            pass

    def conditioning(self, clip_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit captioner: UNet context (B,77,C) and time-embedding offset (B,T) from CLIP embeddings."""
        prefix = self.clip_project(clip_embed)
        context = self.empty_embedding + torch.tanh(self.alpha_cond) * prefix
        time_cond = torch.tanh(self.alpha_cond_time_embed) * self.time_embed_project(clip_embed)[:, 0]
        return context, time_cond

    def forward(self, crops01: torch.Tensor, clip_embed: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,w,w) crops in [0,1] and their CLIP embeddings (B,D) -> the 8 features in cfg order."""
        dtype = self.sd_dtype
        # the input follows the encoder's layout (channels_last when asked for, or in bf16: set_sd_dtype)
        encoder_cl = self.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        memory_format = torch.channels_last if encoder_cl else torch.contiguous_format
        x = (crops01 * 2.0 - 1.0).to(dtype).contiguous(memory_format=memory_format)
        batch = x.shape[0]
        # float32 on the CPU: the VAE encoder runs one crop at a time. Speed was a wash (20% and 7%
        # faster, once 12% slower than batched, 4 x 512 crops); it holds one crop's 512x512x128
        # activations instead of four. In bf16 and on GPUs it is batched.
        encode_chunk = 1 if x.device.type == "cpu" and dtype == torch.float32 else batch
        context, time_cond = self.conditioning(clip_embed.to(self.alpha_cond.dtype))
        captured: dict[int, list[torch.Tensor]] = {}
        handles = self._attach_hooks(captured, time_cond)
        try:
            with torch.no_grad():
                h = torch.cat([self.vae.encoder(x[i:i + encode_chunk]) for i in range(0, batch, encode_chunk)])
                if self.vae.quant_conv is not None:
                    h = self.vae.quant_conv(h)
                latent = (h[:, : self.cfg.latent_channels] * self.cfg.vae_scale).contiguous()
            noise = self.noise
            if noise.shape[-2:] != latent.shape[-2:]:
                noise = F.interpolate(noise, size=latent.shape[-2:], mode="bicubic", align_corners=False)
            noisy = self.signal_scale * latent + self.noise_scale * noise.to(latent.dtype)
            timesteps = torch.full((batch,), self.cfg.timestep, dtype=torch.long, device=x.device)
            self._run(lambda: self.unet(noisy, timesteps, encoder_hidden_states=context.to(dtype)))
            with torch.no_grad():
                z = latent / self.cfg.vae_scale
                if self.vae.post_quant_conv is not None:
                    z = self.vae.post_quant_conv(z)
                self._run(lambda: self.vae.decoder(z))
        finally:
            for handle in handles:
                handle.remove()
        # a network run in chunks (the VAE encoder on the CPU) left one tensor per chunk
        return [torch.cat(captured[i]) if len(captured[i]) > 1 else captured[i][0] for i in range(len(self.specs))]
