"""Matcher, criterion and point sampling on known answers; the fine-tune loop on the tiny preset."""
import numpy as np
import pytest
import torch

from odise_core.training.losses import (
    HungarianMatcher,
    SetCriterion,
    dice_loss,
    pairwise_bce_cost,
    pairwise_dice_cost,
    point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords,
)

BIG = 12.0


def _masks(h, w, regions):
    out = torch.zeros(len(regions), h, w)
    for i, (rows, cols) in enumerate(regions):
        out[i, rows, cols] = 1
    return out


def test_point_sample_reads_pixel_centres():
    maps = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    coords = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 3], [(0 + 0.5) / 4, (0 + 0.5) / 3]]])
    torch.testing.assert_close(point_sample(maps, coords), torch.tensor([[[6.0, 0.0]]]))


def test_uncertain_points_prefer_small_logits():
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[..., :8] = 0.0  # left half uncertain
    g = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=400, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                    generator=g)
    assert coords.shape == (1, 400, 2) and coords.min() >= 0 and coords.max() <= 1
    assert (coords[0, :300, 0] < 0.5).all()  # the 300 importance points sit in the uncertain half


def test_loss_values_known():
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    perfect = (targets * 2 - 1) * BIG
    assert dice_loss(perfect, targets, 1.0) < 1e-4
    assert sigmoid_ce_loss(perfect, targets, 1.0) < 1e-4
    zero = torch.zeros_like(targets)  # sigmoid 0.5 everywhere
    assert abs(sigmoid_ce_loss(zero, targets, 1.0).item() - np.log(2)) < 1e-6
    assert abs(dice_loss(zero, targets, 1.0).item() - (1 - 3 / 5)) < 1e-6  # 1 - (2*1+1)/(2+2+1)
    pair = pairwise_dice_cost(torch.stack([perfect[0], -perfect[0]]), targets)
    assert pair[0, 0] < 1e-4 and pair[1, 0] > 0.6
    bce = pairwise_bce_cost(torch.stack([perfect[0], -perfect[0]]), targets)
    assert bce[0, 0] < 1e-4 and bce[1, 0] > 10


def test_matcher_finds_the_right_queries():
    h = w = 8
    gt = _masks(h, w, [(slice(0, 4), slice(None)), (slice(4, 8), slice(None))])
    pred_masks = torch.stack([(gt[1] * 2 - 1) * BIG, torch.full((h, w), -BIG), (gt[0] * 2 - 1) * BIG])[None]
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0
    logits[0, 2, 1] = 5.0
    targets = [{"labels": torch.tensor([1, 2]), "masks": gt}]
    rows, cols = HungarianMatcher(num_points=256)({"pred_logits": logits, "pred_masks": pred_masks}, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {2: 0, 0: 1}


def test_criterion_buffer_keys_and_losses():
    crit = SetCriterion(3, num_points=256)
    assert list(crit.state_dict()) == ["empty_weight"]
    torch.testing.assert_close(crit.empty_weight, torch.tensor([1.0, 1.0, 1.0, 0.1]))
    h = w = 8
    gt = _masks(h, w, [(slice(0, 4), slice(None))])
    good_masks = torch.stack([(gt[0] * 2 - 1) * BIG, torch.full((h, w), -BIG)])[None]
    good_logits = torch.tensor([[[BIG, 0, 0, 0], [0, 0, 0, BIG]]])
    targets = [{"labels": torch.tensor([0]), "masks": gt}]
    good = {"pred_logits": good_logits, "pred_masks": good_masks,
            "aux_outputs": [{"pred_logits": good_logits, "pred_masks": good_masks}] * 2}
    losses = crit(good, targets, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert losses["loss_ce"] < 1e-3
    # query order does not matter: the matcher pairs the target with whichever query fits
    swapped = {"pred_logits": good_logits.flip(1), "pred_masks": good_masks.flip(1)}
    swapped_losses = crit(swapped, targets, generator=torch.Generator().manual_seed(0))
    for k in ("loss_ce", "loss_mask", "loss_dice"):
        torch.testing.assert_close(swapped_losses[k], losses[k])
    inverted = {"pred_logits": good_logits, "pred_masks": -good_masks}
    inverted_losses = crit(inverted, targets, generator=torch.Generator().manual_seed(0))
    assert inverted_losses["loss_mask"] > 3 * losses["loss_mask"]
    assert inverted_losses["loss_dice"] > losses["loss_dice"] + 0.1
    g = torch.Generator().manual_seed(0)
    wrong_class = {"pred_logits": torch.tensor([[[0, BIG, 0, 0], [0, 0, 0, BIG]]]), "pred_masks": good_masks}
    ce = crit(wrong_class, targets, generator=g)["loss_ce"]
    # CE weighted by empty_weight: only the matched query (weight 1) is wrong -> BIG / (1 + 0.1)
    assert abs(ce.item() - BIG / 1.1) < 1e-3


def test_criterion_without_targets_pushes_to_no_object():
    crit = SetCriterion(2, num_points=64)
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    masks = torch.zeros(1, 3, 4, 4, requires_grad=True)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.zeros(0, dtype=torch.long),
                                                                  "masks": torch.zeros(0, 4, 4)}])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    crit.weighted_total(losses).backward()
    assert (logits.grad[0, :, 2] < 0).all()  # raising the no-object logit lowers the loss


# ---------------------------------------------------------------------------------------------- fine-tune loop
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from odise_core.config import get_config
    from odise_core.feature_cache import FeatureCache
    from odise_core.modeling.odise import ODISE
    from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, make_scene
    from odise_core.training.finetune import TrainSample
    from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

    cache = TextEmbeddingCache(tmp_path_factory.mktemp("text"))

    def build():
        return ODISE.from_config(get_config("tiny"), device="cpu", text_cache=cache)

    scenes = [make_scene(seed, size=128) for seed in (3, 4)]
    samples = [TrainSample(s.image, s.masks, s.classes) for s in scenes]
    features = FeatureCache(tmp_path_factory.mktemp("features"), max_bytes=2**30, storage="fp16")
    return build, samples, Vocabulary.from_names(list(CLASS_NAMES), list(IS_THING)), features


def _options(**kw):
    from odise_core.training.finetune import FinetuneOptions
    base = dict(steps=6, lr=1e-3, warmup=2, views_per_image=1, seed=3, grad_clip=1.0, num_points=2048)
    base.update(kw)
    return FinetuneOptions(**base)


def _fixed_loss(model, samples, vocab) -> float:
    """Loss of the model on the unaugmented views with fixed sampling points (no grad)."""
    from odise_core.training.finetune import plan_view, render_view
    from odise_core.training.losses import SetCriterion
    crit = SetCriterion(len(vocab), num_points=2048)
    total = 0.0
    cfg = model.cfg.backbone
    with torch.no_grad():
        for i, s in enumerate(samples):
            plan = plan_view(s.image.shape[:2], cfg.min_size, cfg.max_size, cfg.window, False, 1.0,
                             np.random.default_rng(i))
            image01, target = render_view(s, plan, cfg.window)
            out = model.forward_heads(model.extract_features(image01), vocab)
            losses = crit(out, [target], generator=torch.Generator().manual_seed(i))
            total += float(crit.weighted_total(losses))
    return total


def test_finetune_reduces_loss_and_trains_only_chosen_parts(tiny_setup):
    from odise_core.training.finetune import finetune
    build, samples, vocab, cache = tiny_setup
    model = build()
    before = _fixed_loss(model, samples, vocab)
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if k.startswith(("backbone.", "category_head.", "sem_seg_head.pixel_decoder."))}
    predictor = {k: v.clone() for k, v in model.sem_seg_head.predictor.state_dict().items()}
    result = finetune(model, samples, _options(steps=16, trainable=("predictor",)), vocab=vocab,
                      feature_cache=cache)
    after = _fixed_loss(model, samples, vocab)
    assert result.steps == 16 and len(result.losses) == 16 and not result.stopped
    assert after < 0.8 * before
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    changed = [k for k, v in model.sem_seg_head.predictor.state_dict().items() if not torch.equal(v, predictor[k])]
    assert len(changed) > len(predictor) // 2
    assert result.seconds_per_step > 0


def test_finetune_is_deterministic_for_a_seed(tiny_setup):
    from odise_core.training.finetune import finetune
    build, samples, vocab, cache = tiny_setup
    opts = _options(steps=3, batch_size=2)
    first = finetune(build(), samples, opts, vocab=vocab, feature_cache=cache)
    again = finetune(build(), samples, opts, vocab=vocab, feature_cache=cache)
    assert again.seconds_features == 0  # every view came from the shared cache
    assert first.losses == again.losses
    other = finetune(build(), samples, _options(steps=3, batch_size=2, seed=4), vocab=vocab, feature_cache=cache)
    assert other.seconds_features > 0 and other.losses != first.losses


def test_finetune_progress_and_cancel(tiny_setup):
    from odise_core.training.finetune import finetune
    build, samples, vocab, cache = tiny_setup
    calls = []
    result = finetune(build(), samples, _options(steps=10), progress=lambda s, t, l: calls.append((s, t, l)),
                      should_stop=lambda: len(calls) >= 3, vocab=vocab, feature_cache=cache)
    assert result.stopped and result.steps == 3
    assert [(s, t) for s, t, _ in calls] == [(1, 10), (2, 10), (3, 10)]
    assert [l for _, _, l in calls] == result.losses


def test_finetune_rejects_bad_samples(tiny_setup):
    from odise_core.training.finetune import TrainSample, finetune
    build, samples, vocab, cache = tiny_setup
    s = samples[0]
    bad = TrainSample(s.image, s.masks, np.full(len(s.classes), len(vocab)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        finetune(build(), [bad], _options(), vocab=vocab)
    with pytest.raises(ValueError, match="trainable parts"):
        finetune(build(), samples, _options(trainable=("backbone",)), vocab=vocab)


def test_finetune_can_train_feature_projections(tiny_setup):
    from odise_core.training.finetune import finetune
    build, samples, vocab, cache = tiny_setup
    model = build()
    proj = {k: v.clone() for k, v in model.backbone.feature_projections.state_dict().items()}
    captioner = {k: v.clone() for k, v in model.backbone.feature_extractor.state_dict().items()}
    result = finetune(model, samples, _options(steps=3, trainable=("feature_projections", "predictor")),
                      vocab=vocab, feature_cache=cache)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    after = model.backbone.feature_projections.state_dict()
    assert sum(not torch.equal(after[k], v) for k, v in proj.items()) > len(proj) // 2
    assert all(torch.equal(model.backbone.feature_extractor.state_dict()[k], v) for k, v in captioner.items())


def test_feature_cache_limit_evicts_and_recomputes_identically(tiny_setup, tmp_path):
    from odise_core.feature_cache import FeatureCache
    from odise_core.training.finetune import finetune
    build, samples, vocab, cache = tiny_setup
    reference = finetune(build(), samples, _options(steps=3), vocab=vocab, feature_cache=cache)
    entry = min(p.stat().st_size for p in cache.root.glob("v*.safetensors"))  # a fused view
    small = FeatureCache(tmp_path, max_bytes=int(1.5 * entry), storage="fp16")
    limited = finetune(build(), samples, _options(steps=3), vocab=vocab, feature_cache=small)
    assert small.stats().entries == 1  # every new view evicted the previous one
    assert limited.losses == reference.losses
    private = finetune(build(), samples, _options(steps=3, cache_limit_gb=1e-9), vocab=vocab)  # nothing fits
    assert private.losses == reference.losses  # the same float16-rounded features, recomputed


def test_finetune_learns_one_scene_things_and_stuff():
    """Over-fitting one scene recovers every instance: the matcher, losses and panoptic inference
    handle things as well as stuff (held-out things stay hard for the random tiny backbone)."""
    from odise_core.config import get_config
    from odise_core.predictor import build_predictor
    from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, make_dataset
    from odise_core.training.finetune import FinetuneOptions, TrainSample, finetune
    from odise_core.vocabulary import TextEmbeddingCache, VocabClass, Vocabulary

    cfg = get_config("tiny")
    cfg.backbone.min_size = 128
    model = build_predictor(cfg, device="cpu", text_cache=TextEmbeddingCache(None))
    vocab = Vocabulary([VocabClass(n, (n,), t) for n, t in zip(CLASS_NAMES, IS_THING)])
    scene = make_dataset(2, seed=0, size=128)[1]
    assert sum(IS_THING[c] for c in scene.classes) >= 2  # several instances of a thing class
    finetune(model.model, [TrainSample(scene.image, scene.masks, scene.classes)],
             FinetuneOptions(steps=250, lr=1e-3, batch_size=1, seed=0, num_points=3136), vocab=vocab)
    model.trained_classes = set(vocab.names)
    segments = model.predict(scene.image, vocab)
    for cls, gt in zip(scene.classes, scene.masks):
        ious = [np.logical_and(gt, s.mask).sum() / np.logical_or(gt, s.mask).sum()
                for s in segments if s.class_index == cls]
        assert ious and max(ious) > 0.9, (CLASS_NAMES[cls], ious)
