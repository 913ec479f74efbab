"""The synthetic scene generator: deterministic, full panoptic coverage, shapes that look like their class."""
from __future__ import annotations

import numpy as np
import pytest

from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, THING_CLASSES, make_dataset, make_scene


def test_same_seed_same_scene_and_different_seed_differs():
    a, b, c = make_scene(3), make_scene(3), make_scene(4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.classes, b.classes)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(8))
def test_masks_partition_the_image(seed):
    s = make_scene(seed, size=(96, 80))
    assert s.image.shape == (96, 80, 3) and s.image.dtype == np.uint8
    assert s.masks.shape[1:] == (96, 80) and s.masks.dtype == bool
    assert (s.masks.sum(0) == 1).all()  # every pixel belongs to exactly one segment
    assert s.masks.any(axis=(1, 2)).all()
    assert len(s.classes) == len(s.masks)
    assert ((s.classes >= 0) & (s.classes < len(CLASS_NAMES))).all()
    things = [c for c in s.classes if IS_THING[c]]
    stuff = [c for c in s.classes if not IS_THING[c]]
    assert 1 <= len(things) <= 3 and 1 <= len(stuff) <= 2
    assert len(set(stuff)) == len(stuff)  # one segment per stuff class
    segs = s.segments()
    assert [g.is_thing for g in segs] == [IS_THING[c] for c in s.classes]


def test_shapes_fill_their_bounding_box_as_their_geometry_says():
    ratios: dict[str, list[float]] = {n: [] for n in THING_CLASSES}
    for s in make_dataset(30, seed=5):
        for m, c in zip(s.masks, s.classes):
            if not IS_THING[c]:
                continue
            ys, xs = np.nonzero(m)
            ratios[CLASS_NAMES[c]].append(m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    assert all(len(v) > 3 for v in ratios.values())
    assert 0.70 < np.mean(ratios["circle"]) < 0.85  # pi / 4
    assert np.mean(ratios["triangle"]) < 0.6  # at most 1/2 plus rasterisation
    assert np.mean(ratios["square"]) > np.mean(ratios["triangle"])


def test_dataset_prefix_is_stable():
    small, big = make_dataset(3, seed=9), make_dataset(5, seed=9)
    for a, b in zip(small, big):
        assert np.array_equal(a.image, b.image)
    assert not np.array_equal(make_dataset(1, seed=9)[0].image, make_dataset(1, seed=10)[0].image)
