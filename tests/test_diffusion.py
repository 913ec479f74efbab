"""Diffusion feature capture: shapes/strides, early stop, determinism, the implicit captioner."""
from __future__ import annotations

import pytest
import skimage.data
import torch

from odise_core.config import get_config
from odise_core.modeling.diffusion import DiffusionFeatureExtractor

CLIP_DIM = 64
CROP = 64  # small crops keep the tiny networks fast; every feature is still at least 1x1


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny").diffusion


@pytest.fixture(scope="module")
def extractor(cfg) -> DiffusionFeatureExtractor:
    return DiffusionFeatureExtractor(cfg, CLIP_DIM).eval()


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255  # 512 x 512
    return torch.stack([photo[:, :CROP, :CROP], photo[:, 200 : 200 + CROP, 300 : 300 + CROP]])


def _embed(batch: int) -> torch.Tensor:
    return torch.randn(batch, CLIP_DIM, generator=torch.Generator().manual_seed(1))


def test_features_shapes_and_strides(extractor, cfg, crops):
    with torch.inference_mode():
        feats = extractor(crops, _embed(2))
    assert len(feats) == 8
    for spec, feat in zip(cfg.features, feats):
        assert feat.shape == (2, spec.channels, CROP // spec.stride, CROP // spec.stride), spec
    assert [s.source for s in cfg.features] == ["vae_encoder"] * 2 + ["unet"] * 4 + ["vae_decoder"] * 2
    assert [s.stride for s in cfg.features] == [4, 8, 64, 32, 16, 8, 8, 4]


def test_full_preset_feature_specs():
    specs = get_config("odise-label-coco").diffusion.features
    assert [s.channels for s in specs] == [512, 512, 2560, 1920, 960, 640, 512, 512]
    assert [s.target_stride for s in specs] == [4, 8, 32, 32, 16, 8, 8, 4]


def _count_calls(modules):
    calls = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(*_, name=name):
            calls[name] += 1
        handles.append(module.register_forward_hook(hook))
    return calls, handles


def test_networks_stop_after_last_needed_block(extractor, crops):
    model = extractor
    results = {}
    for mode in ("early", "full"):
        model.full_networks = mode == "full"
        watched = {
            "unet.conv_out": model.unet.conv_out,
            "unet.last_resnet": model.unet.up_blocks[3].resnets[2],
            "unet.up3.resnet1": model.unet.up_blocks[3].resnets[1],
            "vae.decoder.conv_out": model.vae.decoder.conv_out,
            "vae.decoder.up2": model.vae.decoder.up_blocks[2],
            "vae.decoder.up1.resnet1": model.vae.decoder.up_blocks[1].resnets[1],
            "vae.encoder.conv_out": model.vae.encoder.conv_out,
        }
        calls, handles = _count_calls(watched)
        with torch.inference_mode():
            results[mode] = model(crops, _embed(2))
        for h in handles:
            h.remove()
        results[mode + "_calls"] = calls
    model.full_networks = False
    early_calls, full_calls = results["early_calls"], results["full_calls"]
    assert early_calls["unet.conv_out"] == 0 and early_calls["unet.last_resnet"] == 0
    assert early_calls["vae.decoder.conv_out"] == 0 and early_calls["vae.decoder.up2"] == 0
    assert early_calls["unet.up3.resnet1"] == 1 and early_calls["vae.decoder.up1.resnet1"] == 1
    # the latent needs the whole encoder; on the CPU in float32 it runs one crop at a time
    assert early_calls["vae.encoder.conv_out"] == full_calls["vae.encoder.conv_out"] == len(crops) > 1
    assert all(n == 1 for name, n in full_calls.items() if name != "vae.encoder.conv_out")
    for a, b in zip(results["early"], results["full"]):  # stopping early changes nothing captured
        torch.testing.assert_close(a, b)


def test_deterministic_across_builds_and_calls(cfg, extractor, crops):
    other = DiffusionFeatureExtractor(cfg, CLIP_DIM).eval()
    reference_noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(extractor.noise, reference_noise)
    with torch.inference_mode():
        a = extractor(crops, _embed(2))
        b = extractor(crops, _embed(2))
        c = other(crops, _embed(2))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z)


def test_trainable_parameters_match_official_names(cfg, extractor):
    trainable = {n: tuple(p.shape) for n, p in extractor.named_parameters() if p.requires_grad}
    ctx, temb = cfg.context_dim, cfg.time_embed_dim
    assert trainable == {
        "alpha_cond": (1, 77, ctx),
        "alpha_cond_time_embed": (temb,),
        "clip_project.linear.weight": (ctx, CLIP_DIM),
        "clip_project.linear.bias": (ctx,),
        "clip_project.positional_embedding": (1, 77, ctx),
        "time_embed_project.linear.weight": (temb, CLIP_DIM),
        "time_embed_project.linear.bias": (temb,),
        "time_embed_project.positional_embedding": (1, 1, temb),
    }
    state = extractor.state_dict()
    assert "empty_embedding" not in state and "noise" not in state
    assert all(k.startswith(extractor.frozen_prefixes) for k in state if k.split(".")[0] in ("unet", "vae"))
    extractor.train()
    assert not extractor.unet.training and not extractor.vae.training
    extractor.eval()


def test_captioner_conditions_unet_only(cfg, extractor, crops):
    model = extractor
    embed = _embed(2)
    context, time_cond = model.conditioning(embed)
    torch.testing.assert_close(context, model.empty_embedding.expand(2, -1, -1))  # alpha_cond starts at 0
    assert torch.count_nonzero(time_cond) == 0
    with torch.inference_mode():
        before = model(crops, embed)
    with torch.no_grad():
        model.alpha_cond.fill_(0.5)
        model.alpha_cond_time_embed.fill_(0.5)
    with torch.inference_mode():
        after = model(crops, embed)
    for spec, x, y in zip(cfg.features, before, after):
        if spec.source == "unet":
            assert not torch.allclose(x, y), spec
        else:
            torch.testing.assert_close(x, y)  # VAE features ignore the caption
    with torch.no_grad():
        model.alpha_cond.zero_()
        model.alpha_cond_time_embed.zero_()


def test_gradients_reach_the_captioner(extractor, crops):
    model = extractor.train()
    feats = model(crops[:1], _embed(1))
    sum(f.float().pow(2).mean() for f in feats[2:6]).backward()
    assert model.alpha_cond.grad is not None and model.alpha_cond.grad.abs().sum() > 0
    assert model.alpha_cond_time_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.unet.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_copies_capture_independently(extractor, crops):
    import copy

    twin = copy.deepcopy(extractor)
    with torch.inference_mode():
        ours = extractor(crops[:1], _embed(1))
        theirs = twin(crops[:1], _embed(1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert not extractor.unet.up_blocks[3].resnets[2]._forward_pre_hooks  # hooks live only during a forward


def test_channels_last_gives_the_same_features(cfg, crops):
    plain = DiffusionFeatureExtractor(cfg, CLIP_DIM).eval()
    with torch.inference_mode():
        expected = plain(crops[:1], _embed(1))
    fast = DiffusionFeatureExtractor(cfg, CLIP_DIM, channels_last=True,
                                     sd=(plain.unet, plain.vae, plain.empty_embedding)).eval()
    fast.load_state_dict(plain.state_dict())
    assert plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = fast(crops[:1], _embed(1))
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_concurrent_forwards_do_not_mix(extractor, crops):
    import threading

    with torch.inference_mode():
        expected = [extractor(crops[i : i + 1], _embed(1)) for i in range(2)]
    results: dict[int, list[torch.Tensor]] = {}

    def run(i: int) -> None:
        with torch.inference_mode():
            for _ in range(3):
                results[i] = extractor(crops[i : i + 1], _embed(1))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for a, b in zip(results[i], expected[i]):
            torch.testing.assert_close(a, b)


def test_batched_forward_equals_crop_by_crop(extractor, crops):
    """The CPU float32 path encodes crop by crop inside a batch: each crop keeps its own features."""
    with torch.inference_mode():
        batched = extractor(crops, _embed(2))
        single = [extractor(crops[i : i + 1], _embed(2)[i : i + 1]) for i in range(len(crops))]
    for index, feature in enumerate(batched):
        assert feature.shape[0] == len(crops)
        for i in range(len(crops)):
            torch.testing.assert_close(feature[i : i + 1], single[i][index], atol=1e-4, rtol=1e-4)


def test_bf16_sd_networks(cfg, crops):
    plain = DiffusionFeatureExtractor(cfg, CLIP_DIM).eval()
    with torch.inference_mode():
        expected = plain(crops, _embed(2))
    plain.set_sd_dtype(torch.bfloat16)
    assert plain.sd_dtype == torch.bfloat16 and plain.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert {p.dtype for p in plain.clip_project.parameters()} == {plain.alpha_cond.dtype} == {torch.float32}
    assert plain.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = plain(crops, _embed(2))
    for a, b in zip(expected, got):
        assert b.dtype == torch.bfloat16 and b.shape == a.shape
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(), dim=0)
        assert cos > 0.99
    with pytest.raises(ValueError, match="rebuild the model"):
        plain.set_sd_dtype(torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        plain.set_sd_dtype(torch.float16)
