"""Vocabulary parsing, bundled label lists, base-class flags and the text-embedding cache."""
from __future__ import annotations

import pytest
import torch

from odise_core.config import get_config
from odise_core.modeling.clip import ClipModel
from odise_core.vocabulary import TextEmbeddingCache, VocabClass, Vocabulary, seen_in_coco_training


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return ClipModel(get_config("tiny").clip)


def test_from_text_syntax():
    vocab = Vocabulary.from_text("cat, dog:puppy|doggy ,grass (stuff)\nsky:clouds (stuff), , car (thing)")
    assert vocab.names == ["cat", "dog", "grass", "sky", "car"]
    assert vocab[1].synonyms == ("dog", "puppy", "doggy")
    assert vocab[3].synonyms == ("sky", "clouds")
    assert vocab.is_thing.tolist() == [True, True, False, False, True]
    texts, owner = vocab.synonyms_flat()
    assert texts == ["cat", "dog", "puppy", "doggy", "grass", "sky", "clouds", "car"]
    assert owner.tolist() == [0, 1, 1, 1, 2, 3, 3, 4]


def test_from_names_and_validation():
    vocab = Vocabulary.from_names(["a", "b"], is_thing=[True, False])
    assert vocab.is_thing.dtype == torch.bool and vocab.is_thing.tolist() == [True, False]
    assert VocabClass("cat", ("cat", " kitty ", "")).synonyms == ("cat", "kitty")
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_names(["a", "a"])
    with pytest.raises(ValueError):
        Vocabulary([])
    with pytest.raises(ValueError):
        Vocabulary.from_text(" , ")


def test_fingerprint_tracks_names_synonyms_and_kind():
    base = Vocabulary.from_text("cat, dog:puppy").fingerprint()
    assert Vocabulary.from_text("cat,dog:puppy").fingerprint() == base
    assert Vocabulary.from_text("cat, dog:doggy").fingerprint() != base
    assert Vocabulary.from_text("cat, dog:puppy (stuff)").fingerprint() != base
    assert Vocabulary.from_text("dog:puppy, cat").fingerprint() != base


def test_bundled_coco_and_ade():
    coco = Vocabulary.coco_panoptic()
    assert len(coco) == 133
    assert int(coco.is_thing.sum()) == 80 and int((~coco.is_thing).sum()) == 53
    assert coco.is_thing[:80].all() and not coco.is_thing[80:].any()  # things first, as in COCO's ids
    assert coco.names[0] == "person" and "child" in coco[0].synonyms
    assert coco.names[-1] == "rug" and coco.names[79] == "toothbrush"
    ade = Vocabulary.ade20k_150()
    assert len(ade) == 150 and int(ade.is_thing.sum()) == 100
    assert ade.names[0] == "wall" and not ade.is_thing[0] and ade.is_thing[12]  # wall stuff, person thing


def test_is_base_uses_any_coco_synonym_with_exact_strings_as_the_reference():
    vocab = Vocabulary.from_text("dog, platypus, kitten:kitty, sky (stuff), Person, TV, Dining Table, Cup:cup")
    # exact, case-sensitive equality with a COCO training label, on any synonym
    assert vocab.is_base.tolist() == [True, False, True, True, False, False, False, True]
    assert Vocabulary.coco_panoptic().is_base.all()
    assert 0 < int(Vocabulary.ade20k_150().is_base.sum()) < 150


def test_base_flag_is_fixed_where_the_vocabulary_is_built():
    assert VocabClass("Person").is_base is False
    assert VocabClass("Person", is_base=True).is_base is True  # a builder with its own rule
    assert VocabClass("person", is_base=False).is_base is False
    assert seen_in_coco_training(["Person", "Dining Table"], case_sensitive=False)
    assert not seen_in_coco_training(["Person", "Dining Table"])
    assert not seen_in_coco_training(["platypus"], case_sensitive=False)
    flags = Vocabulary([VocabClass("Person", is_base=True), VocabClass("person", is_base=False)])
    assert flags.is_base.tolist() == [True, False]
    assert Vocabulary([VocabClass("cat", is_base=True)]).fingerprint() != Vocabulary([VocabClass("cat", is_base=False)]).fingerprint()


def test_text_cache_hits_in_memory_and_on_disk(clip, tmp_path):
    texts = ["cat", "dog", "grass"]
    cache = TextEmbeddingCache(tmp_path)
    first = cache.get(clip, "tiny", "a photo of a {}.", texts)
    assert first.shape == (3, clip.dim)
    torch.testing.assert_close(first, clip.encode_text([f"a photo of a {t}." for t in texts], normalize=False))
    assert (cache.misses, cache.hits, cache.disk_hits) == (1, 0, 0)
    again = cache.get(clip, "tiny", "a photo of a {}.", texts)
    assert (cache.misses, cache.hits) == (1, 1)
    torch.testing.assert_close(again, first)
    fresh = TextEmbeddingCache(tmp_path)  # a new process: served from disk, CLIP not called
    from_disk = fresh.get(clip, "tiny", "a photo of a {}.", texts)
    assert (fresh.misses, fresh.disk_hits) == (0, 1)
    torch.testing.assert_close(from_disk, first)
    bare = cache.get(clip, "tiny", "{}", texts)
    assert cache.misses == 2 and not torch.allclose(bare, first)
    torch.testing.assert_close(bare, clip.encode_text(texts, normalize=False))
    cache.get(clip, "other-model", "{}", texts)
    assert cache.misses == 3


def test_cached_embeddings_usable_with_autograd(clip, tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    with torch.inference_mode():
        cache.get(clip, "tiny", "{}", ["cat"])
    weight = torch.ones(clip.dim, requires_grad=True)
    (cache.get(clip, "tiny", "{}", ["cat"]) @ weight).sum().backward()
    assert weight.grad is not None
