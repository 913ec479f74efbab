"""Interactive /predict: Label Studio's smart-tool context -> one labeled region, from a per-task cache.

A model whose query masks are known (a table with a cup and a plate on it) makes every answer
exact; the real tiny ODISE goes through the same code in tests/test_interactive_model.py and e2e.
"""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.app import create_app
from backend.interactive import InteractionError, parse_context
from backend.model import ODISEBackend
from backend.settings import BackendSettings
from odise_core.geometry import mask_iou, polygons_to_mask
from tests.known_queries import CONFIG, MASKS, H, W, KnownQueries, full, keypoint, rectangle, text


def data_uri(seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def served(tmp_path):
    model = KnownQueries()
    backend = ODISEBackend(BackendSettings.from_env({}, model_dir=tmp_path), model_factory=lambda s: model)
    backend.start_loading(background=False)
    return backend, create_app(backend, load=False).test_client(), model


def ask(client, results: list[dict], out: str = "PolygonLabels", image: str | None = None, project="7.1") -> dict:
    body = {"tasks": [{"id": 1, "data": {"image": image or data_uri()}}], "label_config": CONFIG.format(out=out),
            "project": project, "params": {"login": None, "password": None, "context": {"result": results}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"][0]


def region_mask(region: dict) -> np.ndarray:
    points = [(x / 100 * W, y / 100 * H) for x, y in region["value"]["points"]]
    return polygons_to_mask([points], H, W)


def check_valid(regions: list[dict], out: str = "PolygonLabels") -> None:
    interface = LabelInterface(CONFIG.format(out=out))
    for r in regions:
        assert interface.validate_region(r, return_errors=True) == []


def test_click_on_the_cup_inside_the_table_returns_the_cup_with_the_picked_label(served):
    _, client, model = served
    answer = ask(client, [keypoint(48, 37, "cup")])
    regions = answer["result"]
    assert len(regions) == 1 and regions[0]["from_name"] == "label" and regions[0]["type"] == "polygonlabels"
    assert regions[0]["value"]["polygonlabels"] == ["cup"]
    assert mask_iou(region_mask(regions[0]), full(MASKS[1])) > 0.9
    assert regions[0]["score"] == pytest.approx(0.2)  # the query's probability of the picked label
    check_valid(regions)
    assert model.passes == 1


def test_a_label_that_is_no_output_label_gives_odise_best_class(served):
    _, client, _ = served
    regions = ask(client, [keypoint(48, 37, "saucer")])["result"]
    assert regions[0]["value"]["polygonlabels"] == ["plate"]  # ODISE's best class for the cup's query
    assert ask(client, [keypoint(10, 70, None)])["result"][0]["value"]["polygonlabels"] == ["table"]


def test_negative_and_refining_clicks(served):
    _, client, _ = served
    both = ask(client, [keypoint(48, 37, "table"), keypoint(90, 57, "table")])["result"]
    assert mask_iou(region_mask(both[0]), full(MASKS[0])) > 0.9
    not_plate = ask(client, [keypoint(48, 37), keypoint(10, 70), keypoint(90, 57, positive=False)])["result"]
    assert mask_iou(region_mask(not_plate[0]), full(MASKS[1])) > 0.9
    assert ask(client, [keypoint(48, 37), keypoint(49, 38, positive=False)])["result"] == []


def test_box_returns_the_mask_inside_it_clipped_to_the_box(served):
    _, client, _ = served
    regions = ask(client, [rectangle(36, 26, 60, 48, "cup")])["result"]
    assert regions[0]["value"]["polygonlabels"] == ["cup"]
    assert mask_iou(region_mask(regions[0]), full(MASKS[1])) > 0.9
    table = ask(client, [rectangle(0, 10, 120, 70)])["result"]  # cuts the table's bottom rows off
    clipped = full(MASKS[0])
    clipped[70:] = False
    assert table[0]["value"]["polygonlabels"] == ["table"]
    assert mask_iou(region_mask(table[0]), clipped) > 0.9
    check_valid(regions + table)


def test_text_prompt_known_label_and_new_phrase(served):
    _, client, model = served
    mug = ask(client, [text("Mug")])["result"]  # a synonym of "cup": scored as that class, labeled "cup"
    assert model.phrases == [] and len(mug) == 1 and mug[0]["value"]["polygonlabels"] == ["cup"]
    assert mask_iou(region_mask(mug[0]), full(MASKS[1])) > 0.9
    saucer = ask(client, [text("saucer")])["result"]
    assert model.phrases == ["saucer"] and len(saucer) == 1
    assert saucer[0]["value"]["polygonlabels"] == ["plate"] and saucer[0]["score"] == pytest.approx(0.8)
    assert mask_iou(region_mask(saucer[0]), full(MASKS[2])) > 0.9
    check_valid(mug + saucer)


def test_brush_output_control_gets_rle_masks(served):
    from backend.ls_format import brush_rle_decode

    _, client, _ = served
    regions = ask(client, [keypoint(48, 37, "cup")], out="BrushLabels")["result"]
    assert regions[0]["type"] == "brushlabels" and regions[0]["value"]["brushlabels"] == ["cup"]
    assert np.array_equal(brush_rle_decode(regions[0]["value"]["rle"], H, W), full(MASKS[1]))
    check_valid(regions, out="BrushLabels")


def test_the_cache_runs_the_model_once_per_image_version_and_vocabulary(served):
    backend, client, model = served
    for x in (48, 10, 90):
        ask(client, [keypoint(x, 37 if x == 48 else 57)])
    ask(client, [text("saucer")])
    assert model.passes == 1
    ask(client, [keypoint(48, 37)], image=data_uri(seed=1))
    assert model.passes == 2
    ask(client, [keypoint(48, 37)], project="8.1")  # another project's model version may differ
    assert model.passes == 3 and len(backend.interactive.cache) == 3
    backend._on_promoted("7", "v2")
    assert len(backend.interactive.cache) == 1
    ask(client, [keypoint(48, 37)])
    assert model.passes == 4


def test_concurrent_first_interactions_compute_once(tmp_path):
    model = KnownQueries(delay=0.5)
    backend = ODISEBackend(BackendSettings.from_env({}, model_dir=tmp_path), model_factory=lambda s: model)
    backend.start_loading(background=False)
    app = create_app(backend, load=False)
    answers: list[dict] = []

    def one() -> None:
        answers.append(ask(app.test_client(), [keypoint(48, 37, "cup")]))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.passes == 1 and len(answers) == 4
    assert all(a["result"][0]["value"]["polygonlabels"] == ["cup"] for a in answers)


def test_cache_is_bounded_by_bytes(tmp_path):
    model = KnownQueries()
    state_bytes = model.query_state(np.zeros((H, W, 3), np.uint8), _vocab()).nbytes
    settings = BackendSettings.from_env({"INTERACTIVE_CACHE_MB": str(2.5 * state_bytes / 2 ** 20)}, model_dir=tmp_path)
    backend = ODISEBackend(settings, model_factory=lambda s: model)
    backend.start_loading(background=False)
    client = create_app(backend, load=False).test_client()
    for seed in range(4):
        ask(client, [keypoint(48, 37)], image=data_uri(seed))
    cache = backend.interactive.cache
    assert len(cache) == 2 and cache.nbytes == 2 * state_bytes
    ask(client, [keypoint(48, 37)], image=data_uri(3))  # the most recent stayed
    assert model.passes == 5
    ask(client, [keypoint(48, 37)], image=data_uri(0))  # the oldest was dropped
    assert model.passes == 6


def _vocab():
    from odise_core.vocabulary import Vocabulary

    return Vocabulary.from_names(["table", "cup", "plate"])


def test_bad_contexts_get_error_entries_and_the_server_keeps_serving(served):
    _, client, _ = served
    bad = ask(client, [{"from_name": "click", "to_name": "image", "type": "keypointlabels", "value": {"x": "a"}}])
    assert "result" not in bad and "value.x must be a number" in bad["error"]
    only_negative = ask(client, [keypoint(48, 37, positive=False)])
    assert "positive click" in only_negative["error"]
    wrong_image = ask(client, [dict(keypoint(48, 37), to_name="other")])
    assert "other" in wrong_image["error"]
    rotated = rectangle(36, 26, 60, 48)
    rotated["value"]["rotation"] = 30
    assert "rotated" in ask(client, [rotated])["error"]
    assert "empty" in ask(client, [text("  ")])["error"]
    assert ask(client, [keypoint(48, 37, "cup")])["result"][0]["value"]["polygonlabels"] == ["cup"]


@pytest.mark.parametrize("result,message", [
    (dict(rectangle(36, 26, 60, 48), value={**rectangle(36, 26, 60, 48)["value"], "rotation": "abc"}),
     "value.rotation must be a number (degrees), got 'abc'"),
    (dict(rectangle(36, 26, 60, 48), value={**rectangle(36, 26, 60, 48)["value"], "rotation": {"deg": 3}}),
     "value.rotation must be a number (degrees), got {'deg': 3}"),
    (dict(text("cup"), value={"text": 5}), "value.text must be a string or a list of strings, got 5"),
    (dict(keypoint(48, 37), value=[48, 37]), 'context result of type keypointlabels has no "value" object'),
    (dict(rectangle(36, 26, 60, 48), value="36,26"), 'context result of type rectanglelabels has no "value" object'),
])
def test_malformed_prompt_values_get_an_error_entry_not_a_server_error(served, result, message):
    _, client, _ = served
    answer = ask(client, [result])
    assert "result" not in answer and message in answer["error"], answer
    assert ask(client, [keypoint(48, 37, "cup")])["result"][0]["value"]["polygonlabels"] == ["cup"]


def test_a_full_turn_is_no_rotation():
    turned = rectangle(12, 8, 24, 16, "plate")
    turned["value"]["rotation"] = 360
    assert parse_context({"result": [turned]}).box == pytest.approx((10.0, 10.0, 10.0, 10.0))


def test_parse_context_shapes():
    assert parse_context(None) is None and parse_context({}) is None
    assert parse_context({"result": [{"type": "choices", "value": {"choices": ["a"]}}]}) is None
    clicks = parse_context({"result": [keypoint(12, 8), keypoint(24, 16, positive=False)]})
    assert clicks.kind == "click" and clicks.label == "cup" and clicks.to_name == "image"
    assert clicks.clicks == ((10.0, 10.0, True), (20.0, 20.0, False))
    box = parse_context({"result": [rectangle(12, 8, 24, 16, "plate")]})
    assert box.kind == "box" and box.box == pytest.approx((10.0, 10.0, 10.0, 10.0)) and box.label == "plate"
    assert parse_context({"result": [text("red mug")]}).text == "red mug"
    with pytest.raises(InteractionError, match="must be an object"):
        parse_context(["x"])
    with pytest.raises(InteractionError, match="outside the image"):
        parse_context({"result": [keypoint(240, 8)]})


def test_shipped_interactive_config_predicts_polygons_and_keeps_the_smart_tools_as_prompts():
    from pathlib import Path

    from backend.label_config import parse_label_config

    xml = (Path(__file__).resolve().parents[1] / "label_config" / "interactive.xml").read_text()
    config = parse_label_config(xml)
    assert [c.name for c in config.controls] == ["label"]  # the smartOnly tools are not outputs
    interface = LabelInterface(xml)
    tools = {c.name: c for c in interface.controls}
    assert {"click", "box", "prompt"} <= set(tools)
    assert set(tools["click"].labels) == set(tools["label"].labels) == set(tools["box"].labels)


def test_a_click_keeps_only_the_parts_of_the_mask_it_fell_on():
    from backend.interactive_predict import clicked_parts

    mask = np.zeros((10, 20), bool)
    mask[1:4, 1:5] = True  # part A
    mask[6:9, 10:18] = True  # part B
    assert np.array_equal(clicked_parts(mask, [(2, 2)]), mask & (np.arange(10)[:, None] < 5))
    assert np.array_equal(clicked_parts(mask, [(2, 2), (12, 7)]), mask)
    assert np.array_equal(clicked_parts(mask, [(19, 0)]), mask)  # on no part: the whole mask
