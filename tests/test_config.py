"""ModelConfig <-> plain JSON dict: exact round trips for every preset and for changed values; clear errors."""
import dataclasses
import json

import pytest

from odise_core.config import PRESETS, ConfigError, ModelConfig, PixelDecoderConfig, get_config


def json_round_trip(cfg: ModelConfig) -> ModelConfig:
    return ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))


def changed(value):
    """A different value of the same JSON kind (None becomes a string, as for optional paths)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 0.5 + 0.125
    if isinstance(value, str):
        return value + "-x"
    if value is None:
        return "/somewhere/else"
    if isinstance(value, tuple):
        return value + (64,)
    if isinstance(value, dict):
        return {**value, "extra_key": [1, 2.5, "three"]}
    raise AssertionError(f"no change rule for {value!r}")


def change_every_field(obj) -> int:
    """Change every leaf field of a config dataclass in place; returns how many were changed."""
    count = 0
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            count += change_every_field(value)
        else:
            setattr(obj, f.name, changed(value))
            count += 1
    return count


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("fast", [False, True])
def test_every_preset_round_trips_exactly(name, fast):
    cfg = get_config(name, fast=fast)
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON: nothing is lost in a JSON file
    again = json_round_trip(cfg)
    assert again == cfg
    assert again.to_dict() == data
    assert isinstance(again.pixel_decoder.in_strides, tuple) and isinstance(again.pixel_decoder.fpn_strides, tuple)
    assert again.diffusion.features == cfg.diffusion.features  # the architecture derived from the dicts


def test_fast_differs_and_survives():
    assert get_config("tiny", fast=True).to_dict() != get_config("tiny").to_dict()
    assert json_round_trip(get_config("tiny", fast=True)).backbone.min_size == get_config("tiny").backbone.window


def test_changed_values_round_trip_exactly():
    cfg = get_config("tiny")
    assert change_every_field(cfg) == len(leaves(get_config("tiny").to_dict()))
    assert cfg != get_config("tiny")
    assert cfg.checkpoint == "/somewhere/else" and cfg.offline is True and cfg.pixel_decoder.in_strides[-1] == 64
    assert json_round_trip(cfg) == cfg


def leaves(data: dict, prefix: str = "") -> list[str]:
    """Field paths of a to_dict() result (dict-valued fields such as diffusion.unet count as one)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and k not in ("unet", "vae", "custom"):
            out += leaves(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def test_rebuilt_config_shares_nothing_with_the_dict():
    data = get_config("tiny").to_dict()
    cfg = ModelConfig.from_dict(data)
    data["diffusion"]["unet"]["block_out_channels"][0] = 999
    data["clip"]["custom"]["vision_cfg"]["layers"] = 99
    assert cfg == get_config("tiny")


def test_missing_fields_take_their_defaults():
    data = get_config("tiny").to_dict()
    del data["offline"], data["head"]["alpha"], data["pixel_decoder"]
    cfg = ModelConfig.from_dict(data)
    assert cfg.offline is False and cfg.head.alpha == 0.30 and cfg.pixel_decoder == PixelDecoderConfig()
    assert cfg.decoder == get_config("tiny").decoder


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["head"].update(temperature=2.0), r"config\.head has unknown fields \['temperature'\]"),
    (lambda d: d.update(extra=1), r"config has unknown fields \['extra'\]"),
    (lambda d: d["head"].update(alpha="high"), r"config\.head\.alpha must be int or float, got 'high'"),
    (lambda d: d["backbone"].update(min_size=True), r"config\.backbone\.min_size must be int, got True"),
    (lambda d: d["backbone"].update(min_size=512.5), r"config\.backbone\.min_size must be int"),
    (lambda d: d["pixel_decoder"].update(in_strides=8), r"config\.pixel_decoder\.in_strides must be list or tuple"),
    (lambda d: d["diffusion"].update(unet=[1]), r"config\.diffusion\.unet must be dict"),
    (lambda d: d.update(checkpoint=3), r"config\.checkpoint must be str or NoneType"),
    (lambda d: d.update(clip="ViT"), r"config\.clip must be an object"),
    (lambda d: d.pop("name"), r"config: .*missing 1 required positional argument: 'name'"),
])
def test_bad_dicts_raise_config_error_naming_the_field(edit, message):
    data = get_config("tiny").to_dict()
    edit(data)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_optional_fields_accept_none():
    data = get_config("odise-label-coco").to_dict()
    data["checkpoint"] = None
    data["clip"]["custom"] = None
    cfg = ModelConfig.from_dict(data)
    assert cfg.checkpoint is None and cfg.clip.custom is None
