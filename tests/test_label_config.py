"""Label config -> vocabulary and controls; clear errors for configs that cannot be predicted."""
from __future__ import annotations

from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.label_config import LabelConfigError, make_label_config, parse_label_config
from odise_core.vocabulary import Vocabulary

ROOT = Path(__file__).resolve().parents[1]

MULTI = """<View>
  <Image name="left" value="$left"/>
  <Image name="right" value="$right"/>
  <PolygonLabels name="poly" toName="left">
    <Label value="Person" predicted_values="man, woman,person" background="red"/>
    <Label value="Sky" category="stuff" hint="clouds"/>
    <Label value="Unsure" ignore="true"/>
  </PolygonLabels>
  <BrushLabels name="brush" toName="left">
    <Label value="Person" predicted_values="man,human"/>
    <Label value="Road" category="stuff"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="right"><Label value="Car"/></RectangleLabels>
  <Choices name="weather" toName="left"><Choice value="sunny"/></Choices>
</View>"""


def test_multi_image_multi_control_config() -> None:
    cfg = parse_label_config(MULTI)
    assert [(t.to_name, t.data_key) for t in cfg.targets] == [("left", "left"), ("right", "right")]
    left, right = cfg.targets
    assert left.vocabulary.names == ["Person", "Sky", "Road"]
    assert left.vocabulary[0].synonyms == ("Person", "man", "woman", "person", "human")
    assert left.vocabulary[1].synonyms == ("Sky", "clouds")
    assert left.vocabulary.is_thing.tolist() == [True, False, False]
    assert [c.kind for c in left.controls] == ["polygon", "brush"]
    assert left.label_of == [{0: "Person", 1: "Sky"}, {0: "Person", 2: "Road"}]
    assert left.controls[0].ignored == ("Unsure",)
    assert right.vocabulary.names == ["Car"] and right.controls[0].kind == "rectangle"


@pytest.mark.parametrize("xml, message", [
    ("", "empty"),
    ("<View><Image name='i' value='$i'/>", "cannot be parsed"),
    ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
     "no PolygonLabels"),
    ("<View><Image name='i' value='$i'/><Polygon name='p' toName='i'/><Labels name='l' toName='i'>"
     "<Label value='a'/></Labels></View>", "use <PolygonLabels>"),
    ("<View><Image name='i' value='$i'/><PolygonLabels name='p' toName='i'><Label value='a' ignore='true'/>"
     "</PolygonLabels></View>", "no label the model may predict"),
    ("<View><Image name='i' value='$i'/><PolygonLabels name='p' toName='i'><Label value='a' category='blob'/>"
     "</PolygonLabels></View>", 'category must be "thing" or "stuff"'),
    ("<View><Image name='i' value='$i' valueList='$imgs'/><PolygonLabels name='p' toName='i'><Label value='a'/>"
     "</PolygonLabels></View>", "valueList"),
    ("<View><Image name='i' value='$i'/><PolygonLabels name='p' toName='i'><Label value='a' category='stuff'/>"
     "</PolygonLabels><BrushLabels name='b' toName='i'><Label value='a'/></BrushLabels></View>",
     "thing in one control tag and stuff"),
])
def test_unsupported_configs_raise_clear_errors(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


@pytest.mark.parametrize("kind, tag", [("polygon", "PolygonLabels"), ("brush", "BrushLabels"),
                                       ("rectangle", "RectangleLabels")])
def test_make_label_config_round_trips(kind: str, tag: str) -> None:
    vocab = Vocabulary.from_text("cat, dog:puppy|doggy, grass (stuff)")
    xml = make_label_config(vocab, kind=kind)
    cfg = parse_label_config(xml)
    (target,) = cfg.targets
    assert target.controls[0].tag == tag
    assert target.vocabulary.names == vocab.names
    assert [c.synonyms for c in target.vocabulary] == [c.synonyms for c in vocab]
    assert target.vocabulary.is_thing.tolist() == vocab.is_thing.tolist()
    interface = LabelInterface(xml)
    interface.validate()  # the SDK's schema and toName checks, as Label Studio applies them
    assert interface.is_valid
    with pytest.raises(ValueError, match="kind must be"):
        make_label_config(vocab, kind="ellipse")


def test_label_values_with_markup_characters_are_escaped() -> None:
    vocab = Vocabulary.from_names(['pot "plant" & <leaf>'])
    assert parse_label_config(make_label_config(vocab)).targets[0].vocabulary.names == ['pot "plant" & <leaf>']


@pytest.mark.parametrize("name, vocab, things", [("coco_panoptic.xml", Vocabulary.coco_panoptic, 80),
                                                 ("ade20k_150.xml", Vocabulary.ade20k_150, 100)])
def test_shipped_configs_match_bundled_vocabularies(name: str, vocab, things: int) -> None:
    expected = vocab()
    cfg = parse_label_config((ROOT / "label_config" / name).read_text())
    got = cfg.targets[0].vocabulary
    assert got.names == expected.names
    assert [c.synonyms for c in got] == [c.synonyms for c in expected]
    assert int(got.is_thing.sum()) == things


def test_label_studio_labels_count_as_base_ignoring_case() -> None:
    """The backend's documented rule: capitalised Label Studio labels ("Dining Table", "Sky") count as seen
    in COCO training; odise_core's default builder follows the reference's exact match and calls them novel."""
    xml = ("<View><Image name='i' value='$i'/><PolygonLabels name='p' toName='i'><Label value='Dining Table'/>"
           "<Label value='Sky' category='stuff'/><Label value='Platypus'/><Label value='Critter' "
           "predicted_values='DOG'/></PolygonLabels></View>")
    vocab = parse_label_config(xml).targets[0].vocabulary
    assert vocab.is_base.tolist() == [True, True, False, True]
    default = Vocabulary.from_text("Dining Table, Sky (stuff), Platypus, Critter:DOG")
    assert default.is_base.tolist() == [False, False, False, False]
