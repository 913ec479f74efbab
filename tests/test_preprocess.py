"""Image decoding (EXIF, alpha, grey, 16-bit), resize/pad and sliding-window origins."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from odise_core.config import BackboneConfig, get_config
from odise_core.preprocess import load_image, prepare, resized_shape, window_origins


def _png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    cat = skimage.data.chelsea()  # 300 x 451
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = _png_bytes(Image.fromarray(cat), exif=exif)
    out = load_image(data)
    assert out.shape == (451, 300, 3)
    np.testing.assert_array_equal(out, np.rot90(cat, k=-1))
    assert load_image(Image.fromarray(cat)).shape == cat.shape


def test_rgba_composited_on_white_and_la():
    rgb = skimage.data.astronaut()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, :256] = 255
    out = load_image(np.dstack([rgb, alpha]))
    np.testing.assert_array_equal(out[:, :256], rgb[:, :256])
    assert (out[:, 256:] == 255).all()
    la = Image.fromarray(np.dstack([skimage.data.camera(), np.full((512, 512), 255, np.uint8)]), mode="LA")
    np.testing.assert_array_equal(load_image(_png_bytes(la))[..., 1], skimage.data.camera())


def test_grey_16bit_float_and_palette():
    grey = skimage.data.camera()
    for src in (grey, grey[..., None], grey.astype(np.uint16) * 257, grey / 255.0, _png_bytes(Image.fromarray(grey))):
        out = load_image(src)
        assert out.dtype == np.uint8 and out.shape == (512, 512, 3)
        np.testing.assert_array_equal(out[..., 0], grey)
        np.testing.assert_array_equal(out[..., 2], grey)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_array_equal(load_image(_png_bytes(sixteen))[..., 1], grey)
    palette = Image.fromarray(skimage.data.coffee()).convert("P")
    assert load_image(_png_bytes(palette)).shape == (400, 600, 3)


def test_non_images_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(b"definitely not an image")
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))


def test_prepare_resizes_scales_and_pads():
    cfg = get_config("tiny").backbone  # min 256, max 640, divisibility 64
    cat = skimage.data.chelsea()  # 300 x 451
    prepared = prepare(cat, cfg)
    assert prepared.original_size == (300, 451)
    assert prepared.resized_size == (256, 385)  # 451 * 256 / 300 = 384.9 -> 385
    assert prepared.tensor.shape == (1, 3, 256, 448)
    t = prepared.tensor
    assert t.dtype == torch.float32 and 0.0 <= t.min() and t.max() <= 1.0
    assert (t[..., 385:] == 0).all()  # zero padding right of the resized image
    expected = np.asarray(Image.fromarray(cat).resize((385, 256), Image.BILINEAR)).astype(np.float32) / 255
    np.testing.assert_allclose(t[0, :, :, :385].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_long_edge_limit_and_huge_image_warning(caplog):
    cfg = BackboneConfig(min_size=1024, max_size=2560)
    assert resized_shape(1000, 1000, 1024, 2560) == (1024, 1024)
    assert resized_shape(500, 4000, 1024, 2560) == (320, 2560)  # long edge caps the scale
    huge = np.zeros((1200, 6000, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="odise_core.preprocess"):
        prepared = prepare(huge, cfg)
    assert prepared.resized_size == (512, 2560)
    assert prepared.tensor.shape == (1, 3, 512, 2560)
    assert any("downscaled" in r.getMessage() and "6000x1200" in r.getMessage() for r in caplog.records)


def test_window_origins_shift_last_window_to_the_edge():
    assert window_origins(1024, 1024, 512) == [(0, 0), (0, 512), (512, 0), (512, 512)]
    assert window_origins(512, 512, 512) == [(0, 0)]
    origins = window_origins(1024, 1408, 512)  # 1408 = 2.75 windows: last column starts at 896
    assert sorted({x for _, x in origins}) == [0, 512, 896]
    assert sorted({y for y, _ in origins}) == [0, 512]
    assert all(x + 512 <= 1408 and y + 512 <= 1024 for y, x in origins)
    with pytest.raises(ValueError):
        window_origins(256, 1024, 512)
