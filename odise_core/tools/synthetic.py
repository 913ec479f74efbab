"""Generated scenes no model has seen: textured shapes on textured backgrounds, with panoptic truth.

Each scene is deterministic in its seed. Things are circles, triangles and squares filled with a
noisy random colour; stuff is a striped or a checkered background (the image is either one
background or two split by a random line). Colours are random for every class, so shape and
texture, not colour, tell classes apart. Used by the fine-tune benchmark and the learning tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from odise_core.types import Segment

THING_CLASSES = ("circle", "triangle", "square")
STUFF_CLASSES = ("stripes background", "checkerboard background")
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES
IS_THING = tuple([True] * len(THING_CLASSES) + [False] * len(STUFF_CLASSES))


@dataclass
class SyntheticScene:
    """An RGB image with non-overlapping instance masks that cover every pixel."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool
    classes: np.ndarray  # (N,) int64 indices into CLASS_NAMES

    def segments(self) -> list[Segment]:
        """The ground truth as `Segment`s (score 1)."""
        return [Segment(m, int(c), 1.0, IS_THING[int(c)]) for m, c in zip(self.masks, self.classes)]


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours that differ enough for the pattern to be visible."""
    a = _colour(rng)
    while True:
        b = _colour(rng)
        if np.abs(a - b).sum() > 150:
            return a, b


def _texture(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture of a stuff class."""
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(6, 14)
    a, b = _two_colours(rng)
    if kind == "stripes background":
        pattern = (np.floor(u / (period / 2)) % 2).astype(bool)
    elif kind == "checkerboard background":
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(bool)
    else:
        raise ValueError(f"no texture for {kind!r}")
    return np.where(pattern[..., None], a, b)


def _shape_mask(kind: str, cy: float, cx: float, r: float, angle: float, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "square":
        half = r * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes of an equilateral triangle with circumradius r
            a = angle + np.pi / 2 + k * 2 * np.pi / 3
            inside &= (dx * np.cos(a) + dy * np.sin(a)) <= r / 2
        return inside
    raise ValueError(f"no shape {kind!r}")


def make_scene(seed: int, size: int | tuple[int, int] = 128, max_shapes: int = 3) -> SyntheticScene:
    """One scene of `size` (H, W) with 1..max_shapes non-overlapping things, deterministic in `seed`."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # background: one stuff class, or two split by a random line through the image
    stuff_ids = len(THING_CLASSES) + rng.permutation(len(STUFF_CLASSES))
    if rng.random() < 0.5:
        regions = [(int(stuff_ids[0]), np.ones((h, w), dtype=bool))]
    else:
        py, px, phi = rng.uniform(0.3 * h, 0.7 * h), rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0, np.pi)
        side = (xx - px) * np.cos(phi) + (yy - py) * np.sin(phi) > 0
        regions = [(int(stuff_ids[0]), side), (int(stuff_ids[1]), ~side)]
    image = np.zeros((h, w, 3), dtype=np.float32)
    for cls, region in regions:
        image[region] = _texture(CLASS_NAMES[cls], rng, yy, xx)[region]

    things: list[tuple[int, np.ndarray]] = []
    occupied = np.zeros((h, w), dtype=bool)
    n_shapes = int(rng.integers(1, max_shapes + 1))
    lo, hi = 0.12 * min(h, w), 0.24 * min(h, w)
    for _ in range(n_shapes):
        for _attempt in range(20):
            cls = int(rng.integers(len(THING_CLASSES)))
            r = rng.uniform(lo, hi)
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            mask = _shape_mask(THING_CLASSES[cls], cy, cx, r, rng.uniform(0, 2 * np.pi), yy, xx)
            grown = _shape_mask("circle", cy, cx, r + 3, 0.0, yy, xx)
            if mask.sum() >= 20 and not (grown & occupied).any():
                break
        else:
            continue
        occupied |= mask
        shade = _colour(rng) + rng.uniform(-25, 25, size=(h, w, 1)) * (yy / h)[..., None]
        image[mask] = shade[mask]
        things.append((cls, mask))

    image += rng.normal(0, 6, size=image.shape)
    masks, classes = [], []
    for cls, mask in things:
        masks.append(mask)
        classes.append(cls)
    for cls, region in regions:
        m = region & ~occupied
        if m.any():
            masks.append(m)
            classes.append(cls)
    return SyntheticScene(image=np.clip(image, 0, 255).astype(np.uint8), masks=np.stack(masks),
                          classes=np.asarray(classes, dtype=np.int64))


def make_dataset(n: int, seed: int = 0, size: int | tuple[int, int] = 128, max_shapes: int = 3) -> list[SyntheticScene]:
    """`n` scenes; scene i depends only on (seed, i), so datasets with different n share a prefix."""
    return [make_scene(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), size, max_shapes)
            for i in range(n)]
