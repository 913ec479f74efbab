"""Image decoding and model input preparation: any image -> RGB uint8 -> resized, padded [0,1] tensor."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from odise_core.config import BackboneConfig

logger = logging.getLogger(__name__)

ImageSource = str | Path | bytes | Image.Image | np.ndarray


@dataclass
class Prepared:
    """Model input for one image and the sizes needed to map outputs back."""

    tensor: torch.Tensor  # (1,3,Hp,Wp) float in [0,1], zero padded to size_divisibility
    resized_size: tuple[int, int]  # (h, w) after resize, before padding
    original_size: tuple[int, int]  # (H, W) of the input image


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array to uint8: 16-bit by /257, floats in [0,1] (or [0,255]) by value range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.round(arr / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(finite * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {arr.dtype}")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx2 (grey+alpha), HxWx3 or HxWx4 (RGBA) -> HxWx3 uint8; alpha composited on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or min(arr.shape[:2]) == 0:
        raise ValueError(f"not an image array: shape {arr.shape}")
    arr = _to_uint8(arr)
    if arr.shape[2] in (2, 4):
        color, alpha = arr[..., :-1].astype(np.float32), arr[..., -1:].astype(np.float32) / 255.0
        arr = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGB", "RGBA", "L", "LA"):
        return _array_to_rgb(np.asarray(img))
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _array_to_rgb(np.asarray(img))
    if img.mode == "PA":
        return _array_to_rgb(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))


def load_image(src: ImageSource) -> np.ndarray:
    """Decode a path, bytes, PIL image or array to HxWx3 uint8 RGB (EXIF orientation applied)."""
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src)
    if isinstance(src, (bytes, bytearray)):
        stream, what = io.BytesIO(src), f"the data ({len(src)} bytes) is not a readable image"
    elif isinstance(src, (str, Path)):
        stream, what = Path(src), f"{src} is not a readable image"
    else:
        raise ValueError(f"cannot load an image from {type(src).__name__}")
    try:
        with Image.open(stream) as img:
            img.load()
            return _pil_to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        reason = "no image format recognised" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ValueError(f"{what}: {reason}") from exc


def resized_shape(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Shortest edge to min_size unless the long edge would exceed max_size (detectron2 rounding).

    A side never rounds to 0: an extremely thin image (4000x3 with a 640 px long-edge limit) keeps one
    row and is zero-padded like any other to size_divisibility, instead of failing inside the resize.
    """
    if min(h, w) < 1:
        raise ValueError(f"the image is {w}x{h} pixels: it has no pixels to segment")
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def prepare(image: np.ndarray, cfg: BackboneConfig) -> Prepared:
    """Resize (bilinear), scale to [0,1] and zero-pad to cfg.size_divisibility."""
    h, w = image.shape[:2]
    nh, nw = resized_shape(h, w, cfg.min_size, cfg.max_size)
    if max(h, w) > cfg.max_size:
        logger.warning("large image %dx%d downscaled to %dx%d (max_size=%d)", w, h, nw, nh, cfg.max_size)
    resized = image if (nh, nw) == (h, w) else np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    div = cfg.size_divisibility
    pad_h, pad_w = (-nh) % div, (-nw) % div
    tensor = F.pad(tensor, (0, pad_w, 0, pad_h), value=0.0).unsqueeze(0)
    return Prepared(tensor=tensor, resized_size=(nh, nw), original_size=(h, w))


def window_origins(h: int, w: int, window: int) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping window x window crops covering h x w; the last crop of a
    row/column is shifted back to end at the edge (so it overlaps its neighbour)."""
    if window > min(h, w):
        raise ValueError(f"window {window} larger than the image {h}x{w}")

    def starts(n: int) -> list[int]:
        count = (n - window + window - 1) // window + 1
        return [max(min(i * window + window, n) - window, 0) for i in range(count)]

    return [(y, x) for y in starts(h) for x in starts(w)]
