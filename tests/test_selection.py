"""Interactive selection rules on hand-made query masks (odise_core/selection.py)."""
from __future__ import annotations

import pytest
import torch

from odise_core.selection import Box, Click, select_box, select_click, select_phrase

H, W = 40, 60


def logits_of(*masks: torch.Tensor) -> torch.Tensor:
    """(Q,H,W) logits: +4 inside each boolean mask, -4 outside."""
    return torch.stack([torch.where(m, 4.0, -4.0) for m in masks])


def rect(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


TABLE = rect(10, 40, 0, 60)  # a large region
CUP = rect(15, 22, 20, 28)  # a small object on it
PLATE = rect(25, 32, 40, 52)  # another small object on it
SCENE = logits_of(TABLE, CUP, PLATE)
ALL_OBJECTS = torch.ones(3, dtype=torch.bool)


def test_click_on_small_object_inside_large_region_gets_the_small_object():
    assert select_click(SCENE, ALL_OBJECTS, [Click(24, 18)]) == 1
    assert select_click(SCENE, ALL_OBJECTS, [Click(45, 28)]) == 2
    assert select_click(SCENE, ALL_OBJECTS, [Click(5, 35)]) == 0  # the table where nothing else is


def test_more_positive_clicks_grow_the_answer_to_the_smallest_mask_holding_them_all():
    assert select_click(SCENE, ALL_OBJECTS, [Click(24, 18), Click(45, 28)]) == 0


def test_a_negative_click_excludes_every_mask_containing_it():
    # clicking the cup but saying "not the table" (outside the cup) keeps the cup
    assert select_click(SCENE, ALL_OBJECTS, [Click(24, 18), Click(5, 35, positive=False)]) == 1
    # a negative click next to the positive one inside the cup: every mask holding one holds both
    assert select_click(SCENE, ALL_OBJECTS, [Click(24, 18), Click(25, 19, positive=False)]) is None
    # a negative click on the plate moves the two-click answer off the table (which holds the plate)
    assert select_click(SCENE, ALL_OBJECTS, [Click(24, 18), Click(5, 35), Click(45, 28, positive=False)]) == 1


def test_no_object_queries_only_answer_when_nothing_else_fits():
    is_object = torch.tensor([True, False, True])
    assert select_click(SCENE, is_object, [Click(24, 18)]) == 0  # the cup's query says "no object"
    assert select_click(SCENE, torch.zeros(3, dtype=torch.bool), [Click(24, 18)]) == 1


def test_click_outside_every_mask_and_tiny_masks():
    assert select_click(SCENE, ALL_OBJECTS, [Click(30, 2)]) is None
    assert select_click(SCENE, ALL_OBJECTS, [Click(24, 18)], min_pixels=57) == 0  # the cup has 56 pixels
    with pytest.raises(ValueError, match="positive"):
        select_click(SCENE, ALL_OBJECTS, [Click(24, 18, positive=False)])


def test_box_picks_the_mask_mostly_inside_that_matches_it():
    assert select_box(SCENE, ALL_OBJECTS, Box(18, 13, 30, 24)) == 1  # around the cup
    assert select_box(SCENE, ALL_OBJECTS, Box(38, 23, 54, 34)) == 2  # around the plate
    assert select_box(SCENE, ALL_OBJECTS, Box(0, 8, 60, 40)) == 0  # around the table


def test_box_holding_only_part_of_every_mask_has_no_answer_and_clipping_is_exact():
    assert select_box(SCENE, ALL_OBJECTS, Box(0, 0, 10, 12)) is None  # 20 of the table's 1800 pixels
    grid = Box(18.0, 13.0, 30.0, 24.0).grid_mask((H, W))
    assert grid.sum() == 12 * 11 and grid[13, 18] and not grid[12, 18] and grid[23, 29] and not grid[24, 29]
    assert (CUP & ~grid).sum() == 0  # clipping the cup to its box keeps it whole


def test_phrase_picks_the_queries_whose_best_class_is_the_phrase():
    # classes: 0 "table", 1 "cup", 2 = the typed phrase "plate", 3 = no object
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    assert select_phrase(probs, 2, SCENE) == [2]
    probs_two = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.7, 0.1]])
    assert select_phrase(probs_two, 2, SCENE) == [2, 1]  # strongest first


def test_phrase_drops_a_duplicate_mask_and_falls_back_to_the_best_query():
    masks = logits_of(TABLE, CUP, CUP)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.7, 0.1]])
    assert select_phrase(probs, 2, masks) == [2]
    nobody = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.1, 0.3, 0.0], [0.7, 0.1, 0.2, 0.0]])
    assert select_phrase(nobody, 2, masks) == [1]
    assert select_phrase(probs, 2, masks, min_pixels=10_000) == []
