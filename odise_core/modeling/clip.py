"""One shared frozen CLIP: image embedding for the implicit captioner, text embeddings, MaskCLIP."""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from odise_core.config import ClipConfig
from odise_core.weights import load_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_BATCH = 256


class ClipModel(nn.Module):
    """Frozen open_clip model; all inputs are images in [0, 1], outputs are projected embeddings."""

    def __init__(self, cfg: ClipConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else load_clip(cfg)
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)

    @property
    def dim(self) -> int:
        return int(self.cfg.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    def train(self, mode: bool = True) -> "ClipModel":
        """CLIP stays frozen in eval mode whatever the parent does."""
        super().train(False)
        return self

    def _to_clip_input(self, image01: torch.Tensor) -> torch.Tensor:
        """Resize the shortest edge to image_size (bicubic), centre-crop, CLIP mean/std."""
        size = self.image_size
        h, w = image01.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            image01 = F.interpolate(image01, size=new, mode="bicubic", align_corners=False)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            image01 = image01[..., top : top + size, left : left + size]
        dtype = self.mean.dtype
        return (image01.to(dtype) - self.mean) / self.std

    def encode_image(self, image01: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,D) projected class token, not normalised."""
        return self.model.encode_image(self._to_clip_input(image01)).float()

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (N,D) projected embeddings, L2-normalised unless `normalize` is False."""
        device = self.mean.device
        chunks = []
        for i in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(texts[i : i + TEXT_BATCH]).to(device)
            chunks.append(self.model.encode_text(tokens).float())
        embeds = torch.cat(chunks)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class + patch tokens after positional embedding and ln_pre: (B, 1+P, W)."""
        visual = self.model.visual
        x = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def patch_keep(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(B,Q,P) bool: the patches mask token q attends to, max-pooled sigmoid(mask) >= 0.5 over each
        patch of mask logits (B,Q,S,S) at the CLIP input size."""
        patch = self.model.visual.conv1.kernel_size
        return (F.max_pool2d(mask_logits.sigmoid(), kernel_size=patch, stride=patch) >= 0.5).flatten(2)

    def mask_attention(self, mask_logits: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Additive attention mask (B*heads, L, L), L = Q + 1 + P, for the whole-transformer MaskCLIP.

        Every token ignores the Q mask tokens; mask token q attends to the class token and to the
        patches whose max-pooled sigmoid(mask) is >= 0.5 (only the class token when its mask is empty).
        """
        b, q = mask_logits.shape[:2]
        blocked = ~self.patch_keep(mask_logits)  # (B, Q, P)
        length = q + 1 + blocked.shape[-1]
        mask = torch.zeros(b, length, length, dtype=torch.bool, device=mask_logits.device)
        mask[:, :, :q] = True
        mask[:, :q, q + 1 :] = blocked
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask, float("-inf"))
        return additive.unsqueeze(1).expand(b, num_heads, length, length).reshape(b * num_heads, length, length)

    def maskclip_image(self, image01: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> the (B,3,S,S) image MaskCLIP sees: bilinearly resized to the CLIP input size."""
        size = (self.image_size, self.image_size)
        return F.interpolate(image01.float(), size=size, mode="bilinear", align_corners=False)

    def maskclip_stream(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """MaskCLIP's mask-independent part of `image` (B,3,S,S), as `maskclip_image` gives it.

        The class and patch tokens never attend to the mask tokens, so they take the plain pass through
        the transformer whatever the masks. Returns "cls" (B,W), the class token after ln_pre that every
        mask token starts from, and "keys" and "values" (B, layers, 1+P, W): what each layer's attention
        of the mask tokens reads.
        """
        x = self._patch_tokens(self._to_clip_input(image))
        cls = x[:, 0].contiguous()
        keys, values = [], []
        for block in _standard_blocks(self.model.visual.transformer):
            q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            keys.append(k)
            values.append(v)
            x = _attend_then_mlp(block, x, q, k, v)
        return {"cls": cls, "keys": torch.stack(keys, 1).contiguous(), "values": torch.stack(values, 1).contiguous()}

    def embed_masks(self, stream: dict[str, torch.Tensor], mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP from `maskclip_stream`'s output and mask logits (B,Q,h,w) -> (B,Q,D) normalised embeddings.

        Each mask token starts as the class token and, layer by layer, attends (with the layer's stored keys
        and values) to the class token and the patches `patch_keep` gives it; ln_post + proj at the end.
        """
        size = (self.image_size, self.image_size)
        masks = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)
        keep = self.patch_keep(masks)  # (B, Q, P)
        b, q = keep.shape[:2]
        keys, values = stream["keys"], stream["values"]
        attend = torch.cat([keep.new_ones(b, q, 1), keep], dim=-1).unsqueeze(1)  # (B, 1, Q, 1+P): class token always
        bias = torch.zeros(attend.shape, dtype=keys.dtype, device=keys.device).masked_fill_(~attend, float("-inf"))
        x = stream["cls"].unsqueeze(1).expand(-1, q, -1)
        for i, block in enumerate(_standard_blocks(self.model.visual.transformer)):
            width = x.shape[-1]
            query = F.linear(block.ln_1(x), block.attn.in_proj_weight[:width], block.attn.in_proj_bias[:width])
            x = _attend_then_mlp(block, x, query, keys[:, i], values[:, i], bias)
        return self._project(x)

    def mask_embeddings(self, image01: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP: (B,3,H,W) in [0,1] and mask logits (B,Q,h,w) -> (B,Q,D) normalised embeddings.

        The same computation as `mask_embeddings_full`, split into the mask-independent stream (cacheable
        per image) and the mask tokens."""
        return self.embed_masks(self.maskclip_stream(self.maskclip_image(image01)), mask_logits)

    def mask_embeddings_full(self, image01: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP as the reference pipeline runs it: Q copies of the class token prepended to the class
        and patch tokens, the whole transformer under `mask_attention`. Same result as `mask_embeddings`."""
        image = self.maskclip_image(image01)
        masks = F.interpolate(mask_logits.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
        visual = self.model.visual
        x = self._patch_tokens(self._to_clip_input(image))
        q = masks.shape[1]
        x = torch.cat([x[:, :1].expand(-1, q, -1), x], dim=1)
        transformer = visual.transformer
        num_heads = transformer.resblocks[0].attn.num_heads
        attn_mask = self.mask_attention(masks, num_heads).to(x.dtype)
        if getattr(transformer, "batch_first", False):
            x = transformer(x, attn_mask=attn_mask)
        else:
            x = transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return self._project(x[:, :q])

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final mask tokens (B,Q,W) -> ln_post, proj, L2-normalised (B,Q,D) embeddings."""
        visual = self.model.visual
        x = visual.ln_post(tokens)
        if visual.proj is not None:
            x = x @ visual.proj
        return F.normalize(x.float(), dim=-1)


class UnsupportedClipArchitecture(TypeError):
    """The CLIP visual transformer's blocks are not the standard open_clip ones the split MaskCLIP reads."""


def _standard_blocks(transformer: nn.Module) -> nn.ModuleList:
    """The resblocks, checked to be pre-norm blocks with one nn.MultiheadAttention over a packed q/k/v
    projection (what `maskclip_stream` and `embed_masks` recompute by hand)."""
    for i, block in enumerate(transformer.resblocks):
        attn = getattr(block, "attn", None)
        if (not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.bias_k is not None
                or attn.add_zero_attn or hasattr(block, "ln_1_kv")):
            raise UnsupportedClipArchitecture(
                f"CLIP visual block {i} ({type(block).__name__}) is not a standard open_clip ResidualAttentionBlock "
                "with a packed nn.MultiheadAttention: MaskCLIP supports the standard open_clip ViTs (e.g. "
                "ViT-L-14-336); use one of them")
    return transformer.resblocks


def _attend_then_mlp(block: nn.Module, x: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One resblock on tokens `x` (B,N,W) whose projected `query` reads `keys` and `values` (B,M,W), with the
    additive attention `bias` (broadcast to B,heads,N,M; -inf where not attended; None: everywhere):
    x + ls_1(attn), then + ls_2(mlp(ln_2)). Made once per call, the bias spares a per-layer conversion."""
    heads = block.attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, heads, N, W / heads)
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(keys), split(values), attn_mask=bias)
    x = x + block.ls_1(block.attn.out_proj(out.transpose(1, 2).flatten(2)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
