"""Weight loading: offline errors, diffusers dir and single-file SD, the empty-prompt cache, strict ODISE keys."""
from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from odise_core import weights
from odise_core.config import get_config
from odise_core.weights import (
    WeightsLocation,
    WeightsMissingError,
    check_weights_available,
    fetch_checkpoint,
    load_odise_checkpoint,
    load_stable_diffusion,
)

WEIGHT_VARS = ("ODISE_WEIGHTS_DIR", "ODISE_SD_WEIGHTS", "ODISE_CLIP_WEIGHTS", "ODISE_CHECKPOINT", "ODISE_OFFLINE")


@pytest.fixture
def where(tmp_path, monkeypatch) -> WeightsLocation:
    """An empty weights dir, offline; the environment's weight variables point elsewhere and must not matter."""
    for var in WEIGHT_VARS:
        monkeypatch.setenv(var, str(tmp_path / "from-the-environment"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return WeightsLocation(tmp_path / "weights", offline_flag=True)


def _cfg(name: str, where: WeightsLocation):
    return get_config(name).replace(weights_dir=str(where.root), offline=True)


def test_offline_full_preset_fails_fast_with_one_actionable_message(where):
    start = time.monotonic()
    with pytest.raises(WeightsMissingError) as info:
        check_weights_available(_cfg("odise-label-coco", where))
    assert time.monotonic() - start < 3.0
    message = str(info.value)
    assert "Stable Diffusion" in message and "CLIP" in message and "ODISE checkpoint" in message
    assert "offline" in message and "from-the-environment" not in message
    assert str(where.root / "sd-v1-3.ckpt") in message  # where it looked
    assert "odise_label_coco_50e-b67d2efc.pth" in message
    for how in ("ODISE_SD_WEIGHTS", "ODISE_CLIP_WEIGHTS", "ODISE_CHECKPOINT", "ODISE_WEIGHTS_DIR", "--preset tiny"):
        assert how in message


def test_hf_hub_offline_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert WeightsLocation(tmp_path).offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not WeightsLocation(tmp_path).offline and WeightsLocation(tmp_path, offline_flag=True).offline


def test_missing_local_paths_are_named(where, tmp_path):
    cfg = _cfg("odise-label-coco", where).diffusion
    cfg.pretrained = str(tmp_path / "nowhere" / "sd-v1-3.ckpt")
    with pytest.raises(WeightsMissingError, match="nowhere/sd-v1-3.ckpt"):
        load_stable_diffusion(cfg, where=where)
    with pytest.raises(WeightsMissingError, match="missing.pth"):
        fetch_checkpoint(str(tmp_path / "missing.pth"), where)


def test_tiny_preset_needs_nothing(where):
    check_weights_available(_cfg("tiny", where))


def _tiny_text_encoder(dim: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                            num_attention_heads=max(1, dim // 64), max_position_embeddings=77, hidden_act="quick_gelu")
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def _empty_prompt(encoder) -> torch.Tensor:
    ids = torch.tensor([[49406] + [49407] * 76])
    with torch.no_grad():
        return encoder(input_ids=ids).last_hidden_state


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_diffusers_dir_round_trip_and_empty_prompt_cache(tmp_path, monkeypatch, where):
    cfg = get_config("tiny").diffusion
    unet, vae, _ = load_stable_diffusion(cfg, where=where)
    encoder = _tiny_text_encoder(cfg.context_dim)
    root = tmp_path / "sd"
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    encoder.save_pretrained(root / "text_encoder")
    cfg.pretrained = str(root)
    check_weights_available(_cfg("tiny", where).replace(diffusion=cfg))
    unet2, vae2, empty = load_stable_diffusion(cfg, where=where)
    _assert_same_weights(unet, unet2)
    _assert_same_weights(vae, vae2)
    assert not any(p.requires_grad for p in unet2.parameters()) and not unet2.training
    assert empty.shape == (1, 77, cfg.context_dim)
    torch.testing.assert_close(empty, _empty_prompt(encoder))
    cached = list((where.root / "sd-empty-prompt").glob("*.pt"))
    assert len(cached) == 1

    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder must not be loaded again")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", refuse)
    _, _, again = load_stable_diffusion(cfg, where=where)
    torch.testing.assert_close(again, empty)


# diffusers -> original ldm key names (SD v1 layout), to write a single-file checkpoint for the test
def _ldm_unet_key(key: str, has_attention: list[bool]) -> str:
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]

    def res(rest: str) -> str:
        for a, b in resnet:
            if rest.startswith(a + "."):
                return b + rest[len(a):]
        return rest

    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for a, b in fixed.items():
        if key.startswith(a):
            return b + key[len(a):]
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{3 * i + j + 1}." + ("0." + res(rest) if kind == "resnets" else "1." + rest)
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block.{index}." + (res(m[3]) if m[1] == "resnets" else m[3])
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{3 * i + j}." + ("0." + res(rest) if kind == "resnets" else "1." + rest)
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{3 * i + 2}.{2 if has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(key)


def _ldm_vae_key(key: str) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d)\.resnets\.", lambda m: f"decoder.up.{3 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.up.{3 - int(m[1])}.upsample.", key)
    key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
        key = key.replace("attn_1." + a, "attn_1." + b)
    return key


def _ldm_state(cfg, unet: nn.Module, vae: nn.Module) -> dict[str, torch.Tensor]:
    """UNet and VAE weights in the CompVis ldm single-file layout."""
    has_attention = [t.startswith("CrossAttn") for t in cfg.unet["up_block_types"]]
    state = {"model.diffusion_model." + _ldm_unet_key(k, has_attention): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        if ".attn_1." in _ldm_vae_key(k) and v.ndim == 2:
            v = v[:, :, None, None]  # ldm's VAE attention uses 1x1 convs
        state["first_stage_model." + _ldm_vae_key(k)] = v
    return state


def test_single_file_ldm_checkpoint(tmp_path, where):
    cfg = get_config("tiny").diffusion
    unet, vae, _ = load_stable_diffusion(cfg, where=where)
    encoder = _tiny_text_encoder(cfg.context_dim)
    state = _ldm_state(cfg, unet, vae)
    text = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}  # SD ckpts: text_model.*
    state.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()})
    ckpt = tmp_path / "sd-v1-3.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)

    cfg.pretrained = str(ckpt)
    unet2, vae2, empty = load_stable_diffusion(cfg, where=where)
    _assert_same_weights(unet, unet2)
    _assert_same_weights(vae, vae2)
    torch.testing.assert_close(empty, _empty_prompt(encoder))
    assert not any(p.requires_grad for p in vae2.parameters())
    x = torch.rand(1, 3, 64, 64)
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vae2.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(unet2(latent, 0, empty).sample, unet(latent, 0, empty).sample)


def test_single_file_without_text_encoder_takes_the_empty_prompt_from_a_file(tmp_path, where):
    """UNet + VAE only (float16 safetensors) and SD's empty-prompt encoding given as a file."""
    from safetensors.torch import save_file

    cfg = get_config("tiny").diffusion
    unet, vae, _ = load_stable_diffusion(cfg, where=where)
    path = tmp_path / "sd_ldm.safetensors"
    save_file({k: v.half().contiguous() for k, v in _ldm_state(cfg, unet, vae).items()}, str(path))
    cfg.pretrained = str(path)
    with pytest.raises(WeightsMissingError, match="no text encoder"):
        load_stable_diffusion(cfg, where=where)
    empty = torch.randn(1, 77, cfg.context_dim)
    save_file({"empty_prompt_embedding": empty, "shared_noise": torch.randn(1, 4, 8, 8)}, str(tmp_path / "c.safetensors"))
    cfg.empty_prompt = str(tmp_path / "c.safetensors")
    unet2, vae2, empty2 = load_stable_diffusion(cfg, where=where)
    torch.testing.assert_close(empty2, empty, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in unet2.parameters())
    for name, p in unet.named_parameters():
        torch.testing.assert_close(unet2.get_parameter(name), p.half().float(), rtol=0, atol=0)
    torch.save(torch.zeros(1, 76, cfg.context_dim), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\(1, 77, C\)"):
        weights.load_empty_prompt(tmp_path / "bad.pt")
    with pytest.raises(WeightsMissingError, match="empty-prompt"):
        weights.load_empty_prompt(tmp_path / "absent.safetensors")


def test_custom_clip_architecture_from_a_safetensors_file(tmp_path, where):
    """An open_clip config open_clip does not name (cfg.clip.custom) with weights from a local file."""
    import open_clip
    from safetensors.torch import save_file

    cfg = get_config("tiny").clip
    source = open_clip.CLIP(**cfg.custom)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    save_file({k: v.contiguous().clone() for k, v in source.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    cfg.pretrained = str(tmp_path / "clip.safetensors")
    loaded = weights.load_clip(cfg, where)
    for name, p in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0)
    save_file({"visual.proj": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    cfg.pretrained = str(tmp_path / "wrong.safetensors")
    with pytest.raises(RuntimeError):
        weights.load_clip(cfg, where)


def test_single_file_in_weights_dir_is_found_for_a_hub_id(where):
    target = where.root / "sd-v1-3.ckpt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert weights.resolve_sd_source(get_config("odise-label-coco").diffusion, where) == ("file", str(target))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("head.")}


def test_odise_checkpoint_loads_strictly(tmp_path):
    source = _Toy()
    good = tmp_path / "good.pth"
    torch.save({"model": source.trainable_state_dict(), "iteration": 5}, good)
    target = _Toy()
    load_odise_checkpoint(target, str(good))
    torch.testing.assert_close(target.head.weight, source.head.weight)

    extra = dict(source.trainable_state_dict(), **{"category_head.clip.visual.proj": torch.zeros(1)})
    torch.save({"model": extra}, tmp_path / "frozen_extra.pth")
    load_odise_checkpoint(_Toy(), str(tmp_path / "frozen_extra.pth"))  # frozen CLIP copies are ignored

    bad = dict(source.trainable_state_dict(), **{"head.scale": torch.ones(1)})
    del bad["head.bias"]
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"1 missing keys \['head.bias'\].*1 unexpected keys \['head.scale'\]"):
        load_odise_checkpoint(_Toy(), str(tmp_path / "bad.pth"))

    shape = dict(source.trainable_state_dict(), **{"head.weight": torch.zeros(4, 3)})
    torch.save({"model": shape}, tmp_path / "shape.pth")
    with pytest.raises(RuntimeError, match="head.weight: checkpoint \\(4, 3\\) vs model \\(2, 3\\)"):
        load_odise_checkpoint(_Toy(), str(tmp_path / "shape.pth"))


def test_url_checkpoint_offline_and_cached(where):
    url = "https://example.invalid/releases/odise_label_coco_50e-b67d2efc.pth"
    with pytest.raises(WeightsMissingError, match="offline"):
        fetch_checkpoint(url, where)
    cached = where.root / "checkpoints" / "odise_label_coco_50e-b67d2efc.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert fetch_checkpoint(url, where) == cached


def test_clip_found_in_local_file_or_hub_cache_under_weights_dir(where):
    cfg = get_config("odise-label-coco").clip
    with pytest.raises(WeightsMissingError, match="ViT-L-14-336px.pt"):
        weights.resolve_clip_source(cfg, where)
    repo = where.root / "clip" / "models--timm--vit_large_patch14_clip_336.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"")
    assert weights.resolve_clip_source(cfg, where) == ("tag", "openai")
    local = where.root / "clip" / "ViT-L-14-336px.pt"
    local.write_bytes(b"")
    assert weights.resolve_clip_source(cfg, where) == ("file", str(local))


def test_caption_checkpoint_loads_strictly_with_its_word_head(tmp_path):
    """The caption model's official layout: word_head.text_proj, a 2-way class_embed, empty_weight (2,)."""
    from odise_core.config import HeadConfig, get_config
    from odise_core.modeling.odise import ODISE

    cfg = get_config("tiny")
    cfg.head = HeadConfig(kind="caption", label_prompt="a photo of a {}.", embed_dim=cfg.head.embed_dim)
    model = ODISE.from_config(cfg, device="cpu")
    state = model.trainable_state_dict()
    assert tuple(state["criterion.empty_weight"].shape) == (2,)
    assert tuple(state["sem_seg_head.predictor.class_embed.weight"].shape)[0] == 2
    official = {("word_head." + k[len("category_head."):] if k.startswith("category_head.") else k): v + 1.0
                for k, v in state.items()}
    assert any(k.startswith("word_head.") for k in official)
    path = tmp_path / "caption.pth"
    torch.save({"model": official}, path)
    weights.load_odise_checkpoint(model, str(path))
    torch.testing.assert_close(model.category_head.text_proj.weight, official["word_head.text_proj.weight"])
