"""Coloured overlay of segments with a legend, for the CLI and the README picture."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from odise_core.types import Segment


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` well-separated colours (golden-ratio hue steps), stable for a given index."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def overlay(image: np.ndarray, segments: list[Segment], class_names: list[str], alpha: float = 0.55) -> Image.Image:
    """Blend each segment's colour into `image` (HxWx3 uint8), outline it, and add a legend column."""
    base = image.astype(np.float32)
    colours = palette(len(class_names))
    edges = np.zeros(image.shape[:2], dtype=bool)
    for seg in segments:
        colour = np.array(colours[seg.class_index], dtype=np.float32)
        base[seg.mask] = (1 - alpha) * base[seg.mask] + alpha * colour
        m = seg.mask
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        edges |= edge
    base[edges] = 255.0
    picture = Image.fromarray(base.clip(0, 255).astype(np.uint8))

    present: dict[int, float] = {}
    for seg in segments:
        present[seg.class_index] = max(present.get(seg.class_index, 0.0), seg.score)
    font = ImageFont.load_default()
    row = 18
    width = 12 + max((int(font.getlength(f"{class_names[k]} {s:.2f}")) for k, s in present.items()), default=60) + 30
    canvas = Image.new("RGB", (picture.width + width, max(picture.height, row * (len(present) + 1))), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (k, score) in enumerate(sorted(present.items(), key=lambda kv: -kv[1])):
        y = 6 + i * row
        draw.rectangle([picture.width + 8, y, picture.width + 22, y + 12], fill=colours[k], outline="black")
        draw.text((picture.width + 28, y), f"{class_names[k]} {score:.2f}", fill="black", font=font)
    return canvas
