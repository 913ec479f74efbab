"""A typed phrase as a temporary extra class, scored over a kept QueryState without rerunning the network.

The phrase gets one CLIP text encoding per prompt (cached like the vocabulary's), joins the
vocabulary as class K, and goes through the same category head, MaskCLIP classifier and
geometric ensemble as the vocabulary did, over the kept per-query embeddings.
"""
from __future__ import annotations

from typing import Any

import torch

from odise_core.modeling.head import clip_class_logits, geometric_ensemble
from odise_core.query_state import QueryState
from odise_core.vocabulary import VocabClass, Vocabulary


def extended_vocabulary(vocab: Vocabulary, phrase: str) -> Vocabulary:
    """`vocab` plus `phrase` as its last class; ValueError when the phrase already names a class."""
    phrase = phrase.strip()
    if not phrase:
        raise ValueError("the phrase is empty")
    taken = {s.lower() for c in vocab for s in c.synonyms}
    if phrase.lower() in taken:
        raise ValueError(f'"{phrase}" already names a class of the vocabulary: score that class instead')
    return Vocabulary(list(vocab.classes) + [VocabClass(name=phrase, synonyms=(phrase,), is_thing=True)])


def _texts(model: Any, vocab: Vocabulary, phrase: str, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw text embeddings of the vocabulary's synonyms then the phrase, and their class indices."""
    text, syn_to_class = model.text_embeddings(vocab, prompt)
    extra = model.text_cache.get(model.clip, model.model_key, prompt, [phrase]).to(text.device)
    index = torch.tensor([len(vocab)], dtype=syn_to_class.dtype, device=syn_to_class.device)
    return torch.cat([text, extra.to(text.dtype)]), torch.cat([syn_to_class, index])


@torch.inference_mode()
def phrase_probabilities(model: Any, state: QueryState, vocab: Vocabulary, phrase: str) -> torch.Tensor:
    """(Q, K+2) ensembled probabilities over `vocab` + `phrase` (class K) + no object, for `state`'s queries.

    `model` is the ODISE network (odise_core.modeling.odise) that produced `state` with `vocab`.
    """
    extended = extended_vocabulary(vocab, phrase)
    k = len(extended)
    device = model.device
    label_text, label_syn = _texts(model, vocab, phrase, model.cfg.head.label_prompt)
    clip_text, clip_syn = _texts(model, vocab, phrase, model.cfg.head.clip_prompt)
    binary = state.binary_logits[None].to(device) if state.binary_logits is not None else None
    odise_logits = model.category_head(state.mask_embed[None].to(device), label_text, label_syn, k,
                                       logit_scale=state.logit_scale, binary_logits=binary)
    clip_logits = clip_class_logits(state.clip_embeds[None].to(device), clip_text, clip_syn, k)
    seen = extended.is_base | torch.tensor([n in model.trained_classes for n in extended.names], dtype=torch.bool)
    head = model.cfg.head
    return geometric_ensemble(odise_logits.float(), clip_logits.float(), seen.to(device), head.alpha, head.beta)[0].cpu()
