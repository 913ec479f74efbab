"""The tiny ODISE behind interactive answers: query_state() and phrase scoring, then the backend on top."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from label_studio_sdk.label_interface import LabelInterface

from backend.app import create_app
from backend.ls_format import brush_rle_decode
from backend.model import ODISEBackend
from backend.settings import BackendSettings
from odise_core.config import get_config
from odise_core.predictor import ODISEPredictor, build_predictor
from odise_core.phrase import extended_vocabulary
from odise_core.query_state import MAX_MASK_SIDE, QueryState, bounded_mask_logits
from odise_core.selection import select_phrase
from odise_core.vocabulary import Vocabulary
from tests.known_queries import keypoint, rectangle, text

VOCAB = Vocabulary.from_text("cup:mug, table, saucer")
PHOTO = skimage.data.coffee()[::2, ::2].copy()  # 200 x 300


@pytest.fixture(scope="module")
def model() -> ODISEPredictor:
    cfg = get_config("tiny")
    cfg.precision = "fp32"
    return build_predictor(cfg, device="cpu")


def test_query_state_holds_the_prediction_s_queries(model: ODISEPredictor):
    state = model.query_state(PHOTO, VOCAB)
    raw = model.predict_raw(PHOTO, VOCAB)
    q = raw.class_probs.shape[0]
    assert torch.allclose(state.class_probs, raw.class_probs, atol=1e-5)  # the same ensemble
    assert state.image_size == PHOTO.shape[:2] and max(state.grid_size) <= MAX_MASK_SIDE
    assert torch.equal(state.mask_logits, bounded_mask_logits(raw.mask_logits))
    assert state.mask_embed.shape == (q, model.cfg.head.embed_dim)
    assert state.clip_embeds.shape == (q, model.cfg.clip.embed_dim)
    assert torch.allclose(state.clip_embeds.norm(dim=-1), torch.ones(q), atol=1e-4)
    assert state.logit_scale > 0 and state.binary_logits is None  # the label model has no fg/bg logits
    assert state.nbytes == sum(t.numel() * t.element_size() for t in
                               (state.mask_logits, state.class_probs, state.mask_embed, state.clip_embeds))


def test_phrase_scoring_reproduces_the_vocabulary_and_picks_the_matching_query(model: ODISEPredictor):
    state = model.query_state(PHOTO, VOCAB)
    probs = model.phrase_probabilities(state, VOCAB, "zebra")
    assert probs.shape == (state.class_probs.shape[0], len(VOCAB) + 2)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-5)

    # Make query 3 look exactly like "zebra" to both classifiers and the others like "table".
    head = model.cfg.head

    network = model.model

    def raw_text(prompt: str, name: str) -> torch.Tensor:
        return network.text_cache.get(network.clip, network.model_key, prompt, [name])

    with torch.no_grad():
        label_dir = {n: network.category_head.text_proj(raw_text(head.label_prompt, n))[0] for n in ("zebra", "table")}
    clip_dir = {n: F.normalize(raw_text(head.clip_prompt, n), dim=-1)[0] for n in ("zebra", "table")}
    q = state.class_probs.shape[0]
    which = ["zebra" if i == 3 else "table" for i in range(q)]
    made = QueryState(mask_logits=torch.full((q, 8, 8), 3.0, dtype=torch.float16), class_probs=state.class_probs,
                      mask_embed=torch.stack([label_dir[n] for n in which]),
                      clip_embeds=torch.stack([clip_dir[n] for n in which]), logit_scale=state.logit_scale,
                      image_size=(8, 8))
    made.mask_logits[:, :, :4] = -3.0  # every mask: the right half
    made.mask_logits[3] = 3.0  # query 3: the whole image (no duplicate of the others)
    probs = model.phrase_probabilities(made, VOCAB, "zebra")
    assert int(probs[3].argmax()) == len(VOCAB)
    assert select_phrase(probs, len(VOCAB), made.mask_logits) == [3]
    with pytest.raises(ValueError, match="already names a class"):
        extended_vocabulary(VOCAB, "Mug")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    settings = BackendSettings.from_env({}, preset="tiny", device="cpu", precision="fp32",
                                        model_dir=tmp_path_factory.mktemp("models"))
    backend = ODISEBackend(settings)
    backend.start_loading(background=False)
    assert backend.error is None
    return backend, create_app(backend, load=False).test_client()


CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="label" toName="image"><Label value="cup" predicted_values="mug"/><Label value="table"/>
<Label value="saucer"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smartOnly="true"><Label value="cup"/><Label value="table"/></KeyPointLabels>
<RectangleLabels name="box" toName="image" smartOnly="true"><Label value="cup"/><Label value="table"/></RectangleLabels>
<TextArea name="prompt" toName="image"/></View>"""


def test_tiny_backend_answers_clicks_boxes_and_text_from_one_pass(client, tmp_path):
    from PIL import Image

    backend, http = client
    path = tmp_path / "coffee.png"
    Image.fromarray(PHOTO).save(path)
    h, w = PHOTO.shape[:2]
    interface = LabelInterface(CONFIG)
    task = {"id": 5, "data": {"image": str(path)}}

    def ask(results: list[dict]) -> dict:
        body = {"tasks": [task], "label_config": CONFIG, "project": "3.1", "params": {"context": {"result": results}}}
        answer = http.post("/predict", json=body).get_json()["results"][0]
        assert "error" not in answer, answer
        assert interface.validate_prediction(answer, return_errors=True) == []
        return answer

    clicked = ask([keypoint(w / 2, h / 2, "table", size=(h, w))])
    assert clicked["result"], "with 100 random queries some mask holds the image centre"
    assert all(r["value"]["brushlabels"] == ["table"] for r in clicked["result"])
    # a box around the clicked region (and more) holds that region: it has an answer, clipped to the box
    ys, xs = np.nonzero(brush_rle_decode(clicked["result"][0]["value"]["rle"], h, w))
    x0, y0, x1, y1 = max(xs.min() - 3, 0), max(ys.min() - 3, 0), min(xs.max() + 4, w), min(ys.max() + 4, h)
    boxed = ask([rectangle(x0, y0, x1, y1, "cup", size=(h, w))])
    assert boxed["result"] and all(r["value"]["brushlabels"] == ["cup"] for r in boxed["result"])
    for region in boxed["result"]:
        ys, xs = np.nonzero(brush_rle_decode(region["value"]["rle"], h, w))
        assert ys.min() >= y0 - 1 and ys.max() <= y1 and xs.min() >= x0 - 1 and xs.max() <= x1
    typed = ask([text("white plate")])
    assert typed["result"] and {r["value"]["brushlabels"][0] for r in typed["result"]} <= {"cup", "table", "saucer"}
    assert backend.interactive.cache.misses == 1 and len(backend.interactive.cache) == 1
