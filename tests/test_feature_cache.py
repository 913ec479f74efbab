"""The backbone feature cache: exact with fp32 storage, bounded by bytes (LRU), robust to corrupt entries
and to several processes, and keyed so that a heads-only fine-tune keeps hitting it."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from odise_core.config import get_config
from odise_core.feature_cache import FeatureCache, feature_key
from odise_core.predictor import ODISEPredictor, build_predictor
from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

LABELS = "person,cup,table,sky (stuff),grass (stuff),wall (stuff)"


def _features(seed: int, size: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"s2": torch.randn(1, 2, size // 2, generator=g), "s3": torch.randn(1, 2, size // 4, generator=g)}


def _bytes(storage_bytes: int, size: int = 1000) -> int:
    """Payload bytes of `_features(size)` at `storage_bytes` per value."""
    return storage_bytes * (2 * (size // 2) + 2 * (size // 4))


@pytest.fixture(scope="module")
def tiny() -> ODISEPredictor:
    return build_predictor(get_config("tiny"), device="cpu", text_cache=TextEmbeddingCache(None))


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.from_text(LABELS)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    import skimage.data

    return [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.chelsea()]


# ----------------------------------------------------------------------------- the store
def test_miss_returns_computed_and_hit_returns_stored(tmp_path):
    cache = FeatureCache(tmp_path, max_bytes=10**6, storage="fp16")
    calls = []
    computed = cache.get_or_compute("a", lambda: calls.append(1) or _features(0))
    assert torch.equal(computed["s2"], _features(0)["s2"]) and computed["s2"].dtype == torch.float32
    hit = FeatureCache(tmp_path, max_bytes=10**6, storage="fp16").get_or_compute("a", lambda: calls.append(1) or {})
    assert calls == [1]
    assert hit["s2"].dtype == torch.float32 and torch.equal(hit["s2"], _features(0)["s2"].half().float())
    assert not torch.equal(hit["s2"], _features(0)["s2"])  # fp16 storage rounds
    as_stored = cache.get_or_compute("b", lambda: _features(1), as_stored=True)
    assert torch.equal(as_stored["s3"], _features(1)["s3"].half().float())
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.bytes > _bytes(2)) == (2, 1, 2, True)
    assert stats.hit_rate == pytest.approx(1 / 3) and stats.storage == "fp16" and stats.root == str(tmp_path)


def test_fp32_storage_is_exact_and_storage_dtypes_do_not_share_entries(tmp_path):
    exact = FeatureCache(tmp_path, max_bytes=10**6, storage="fp32")
    exact.get_or_compute("a", lambda: _features(0))
    assert torch.equal(exact.get_or_compute("a", dict)["s2"], _features(0)["s2"])
    bf16 = FeatureCache(tmp_path, max_bytes=10**6, storage="bf16")
    assert torch.equal(bf16.get_or_compute("a", lambda: _features(2))["s2"], _features(2)["s2"])  # a miss
    assert torch.equal(bf16.get_or_compute("a", dict)["s2"], _features(2)["s2"].bfloat16().float())
    assert exact.stats().entries == 2 and exact.clear() == 2 and exact.stats().entries == 0
    assert (exact.stats().hits, exact.stats().misses) == (0, 0)
    with pytest.raises(ValueError, match="storage must be one of fp16, bf16, fp32"):
        FeatureCache(tmp_path, 1, storage="int8")


def test_eviction_by_bytes_keeps_the_most_recently_used(tmp_path):
    one = _bytes(2) + 1000  # an entry with its header
    cache = FeatureCache(tmp_path, max_bytes=3 * one)
    for i, key in enumerate("abc"):
        cache.get_or_compute(key, lambda i=i: _features(i))
        os.utime(cache.path_for(key), (time.time() - 100 + i, time.time() - 100 + i))
    cache.get_or_compute("a", dict)  # a hit makes "a" the most recent
    cache.get_or_compute("d", lambda: _features(3))
    assert [cache.contains(k) for k in "abcd"] == [True, False, True, True]
    assert cache.stats().bytes <= 3 * one
    calls = []
    cache.get_or_compute("b", lambda: calls.append(1) or _features(1))
    assert calls == [1]  # evicted, so recomputed


def test_disabled_and_oversized_entries_are_computed_not_stored(tmp_path):
    off = FeatureCache(tmp_path / "off", max_bytes=0)
    assert torch.equal(off.get_or_compute("a", lambda: _features(0))["s2"], _features(0)["s2"])
    assert not (tmp_path / "off").exists()
    small = FeatureCache(tmp_path / "small", max_bytes=100)
    assert torch.equal(small.get_or_compute("a", lambda: _features(0))["s2"], _features(0)["s2"])
    assert small.stats().entries == 0 and small.stats().misses == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_or_truncated_entry_is_deleted_and_recomputed(tmp_path, damage, caplog):
    cache = FeatureCache(tmp_path, max_bytes=10**6, storage="fp32")
    cache.get_or_compute("a", lambda: _features(0))
    path = cache.path_for("a")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path, max_bytes=10**6, storage="fp32")
    with caplog.at_level("WARNING", logger="odise_core.feature_cache"):
        again = fresh.get_or_compute("a", lambda: _features(0))
    assert torch.equal(again["s2"], _features(0)["s2"])
    assert "deleted, the features are recomputed" in caplog.text
    assert torch.equal(FeatureCache(tmp_path, 10**6, "fp32").get_or_compute("a", dict)["s3"], _features(0)["s3"])


def _worker(root: str, worker: int, rounds: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    cache = FeatureCache(root, max_bytes=4 * (_bytes(4) + 1000), storage="fp32")
    wrong = 0
    for r in range(rounds):
        key = f"k{(r + worker) % 6}"
        got = cache.get_or_compute(key, lambda k=key: _features(int(k[1:])))
        wrong += not torch.equal(got["s2"], _features(int(key[1:]))["s2"])
    cache.flush()  # multiprocessing ends a forked worker with os._exit: no atexit flush
    queue.put(wrong)


def test_concurrent_processes_keep_the_cache_consistent(tmp_path):
    ctx = multiprocessing.get_context("fork")  # spawn would import torch again in every worker: minutes here
    parent = FeatureCache(tmp_path, max_bytes=4 * (_bytes(4) + 1000), storage="fp32")
    parent.get_or_compute("k0", lambda: _features(0))  # counted, not yet flushed: a forked child must not add it
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), w, 30, queue)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert [queue.get(timeout=5) for _ in procs] == [0, 0, 0]
    cache = FeatureCache(tmp_path, max_bytes=4 * (_bytes(4) + 1000), storage="fp32")
    stats = cache.stats()
    assert stats.hits + stats.misses == 91 and stats.misses >= 6
    assert 1 <= stats.entries <= 4 and stats.bytes <= cache.max_bytes
    assert not list(Path(tmp_path).glob(".tmp-*"))
    for key in [f"k{i}" for i in range(6)]:
        if cache.contains(key):  # every entry left is whole and holds its own key's features
            assert torch.equal(cache.get_or_compute(key, dict)["s2"], _features(int(key[1:]))["s2"])


# ----------------------------------------------------------------------------- the memory tier
@pytest.fixture
def disk_loads(monkeypatch) -> list[Path]:
    """Paths of every entry file the feature cache opens (a lookup of an absent file opens none), in order."""
    from odise_core import feature_cache

    opened: list[Path] = []
    real = feature_cache.safe_open

    def counting(path, *args, **kwargs):
        handle = real(path, *args, **kwargs)
        opened.append(Path(path))
        return handle

    monkeypatch.setattr(feature_cache, "safe_open", counting)
    return opened


def test_memory_hits_do_not_read_the_disk(tmp_path, disk_loads):
    FeatureCache(tmp_path, max_bytes=10**6, storage="fp32").get_or_compute("a", lambda: _features(0))
    cache = FeatureCache(tmp_path, max_bytes=10**6, storage="fp32", memory_bytes=10**6)
    first = cache.get_or_compute("a", dict)  # from disk, checked, then held
    assert disk_loads == [cache.path_for("a")] and torch.equal(first["s2"], _features(0)["s2"])
    first["s2"].zero_()  # the caller's copy: the held entry stays as verified
    cache.path_for("a").unlink()
    again = cache.get_or_compute("a", lambda: pytest.fail("recomputed"))
    assert len(disk_loads) == 1 and torch.equal(again["s2"], _features(0)["s2"])
    computed = cache.get_or_compute("b", lambda: _features(1))  # a miss is held as stored too
    computed["s3"].zero_()
    assert torch.equal(cache.get_or_compute("b", dict)["s3"], _features(1)["s3"]) and len(disk_loads) == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (3, 2)  # memory hits count as hits
    cache.clear()
    assert len(cache.memory) == 0 and cache.memory.bytes == 0


def test_memory_tier_keeps_the_most_recently_used_within_its_bytes():
    from odise_core.feature_cache import MemoryTier

    one = _bytes(2)
    tier = MemoryTier(int(2.5 * one))
    for i, key in enumerate("abc"):
        tier.put(key, {n: t.half() for n, t in _features(i).items()}, 0.0)
    assert [tier.get(k) is not None for k in "abc"] == [False, True, True] and tier.bytes == 2 * one
    tier.get("b")  # now more recent than c
    tier.put("d", {n: t.half() for n, t in _features(3).items()}, 0.0)
    assert [tier.get(k) is not None for k in "bcd"] == [True, False, True] and tier.bytes == 2 * one
    tier.put("b", {n: t.half() for n, t in _features(5).items()}, 0.0)  # replaced, not counted twice
    assert tier.bytes == 2 * one and torch.equal(tier.get("b").tensors["s2"], _features(5)["s2"].half())
    tier.put("huge", _features(6, size=4000), 0.0)  # larger than the whole budget: not held, nothing dropped
    assert tier.get("huge") is None and len(tier) == 2
    zero = MemoryTier(0)
    zero.put("a", _features(0), 0.0)
    assert len(zero) == 0 and zero.bytes == 0
    with pytest.raises(ValueError, match="memory_bytes must be >= 0"):
        MemoryTier(-1)


def test_a_cache_memory_tier_stays_within_its_bytes(tmp_path, disk_loads):
    one = _bytes(2)
    cache = FeatureCache(tmp_path, max_bytes=10**6, memory_bytes=int(2.5 * one))
    for i, key in enumerate("abcd"):
        cache.get_or_compute(key, lambda i=i: _features(i))
    assert cache.memory.bytes == 2 * one and not disk_loads
    cache.get_or_compute("a", dict)  # dropped from memory: read from disk and held again
    cache.get_or_compute("d", dict)
    assert disk_loads == [cache.path_for("a")] and cache.memory.bytes == 2 * one


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_disk_entry_is_still_detected_behind_the_memory_tier(tmp_path, damage, caplog):
    FeatureCache(tmp_path, max_bytes=10**6, storage="fp32").get_or_compute("a", lambda: _features(0))
    path = FeatureCache(tmp_path, max_bytes=10**6, storage="fp32").path_for("a")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    cache = FeatureCache(tmp_path, max_bytes=10**6, storage="fp32", memory_bytes=10**6)
    with caplog.at_level("WARNING", logger="odise_core.feature_cache"):
        got = cache.get_or_compute("a", lambda: _features(0))
    assert "deleted, the features are recomputed" in caplog.text
    assert torch.equal(got["s2"], _features(0)["s2"]) and (cache.stats().hits, cache.stats().misses) == (0, 2)
    assert torch.equal(cache.memory.get("a").tensors["s2"], _features(0)["s2"])  # the recomputed entry is held
    assert torch.equal(FeatureCache(tmp_path, 10**6, "fp32").get_or_compute("a", dict)["s2"], _features(0)["s2"])


def test_memory_hits_keep_the_disk_entry_recent_at_a_bounded_rate(tmp_path):
    from odise_core.feature_cache import TOUCH_SECONDS

    cache = FeatureCache(tmp_path, max_bytes=10**6, memory_bytes=10**6)
    cache.get_or_compute("a", lambda: _features(0))
    path, old = cache.path_for("a"), time.time() - 1000
    os.utime(path, (old, old))
    cache.get_or_compute("a", dict)
    assert path.stat().st_mtime == pytest.approx(old)  # set on the store a moment ago: not again yet
    cache.memory.get("a").touched -= TOUCH_SECONDS
    cache.get_or_compute("a", dict)
    assert path.stat().st_mtime == pytest.approx(time.time(), abs=5)  # disk eviction sees it used


# ----------------------------------------------------------------------------- hit/miss counts
def test_counts_per_purpose_are_batched_then_flushed(tmp_path, monkeypatch):
    from odise_core import feature_cache

    monkeypatch.setattr(feature_cache, "FLUSH_SECONDS", 2.0)
    cache = FeatureCache(tmp_path, max_bytes=10**6)
    stats_json = tmp_path / "stats.json"
    for key, purpose in [("a", "predict"), ("a", "predict"), ("b", "train"), ("b", "train"), ("b", "train")]:
        cache.get_or_compute(key, lambda: _features(0), purpose=purpose)
    assert not stats_json.exists()  # counted in memory only
    deadline = time.time() + 30
    while not stats_json.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads(stats_json.read_text()) == {"predict": {"hits": 1, "misses": 1},
                                                  "train": {"hits": 2, "misses": 1}}
    cache.get_or_compute("a", dict, purpose="train")
    stats = cache.stats()  # flushes this process's counts first
    assert (stats.hits, stats.misses, stats.train_hits, stats.train_misses) == (1, 1, 3, 1)
    assert (stats.hit_rate, stats.train_hit_rate) == (0.5, 0.75)
    with pytest.raises(ValueError, match="purpose must be one of predict, train"):
        cache.get_or_compute("a", dict, purpose="serve")
    stats_json.write_text(json.dumps({"hits": 4, "misses": 6}))  # written by an earlier version: prediction's
    cache.get_or_compute("a", dict)
    assert (cache.stats().hits, cache.stats().misses, cache.stats().train_hits) == (5, 6, 0)
    cache.get_or_compute("a", dict)
    cache.clear()  # drops this process's uncounted lookups too
    assert (cache.stats().hits, cache.stats().misses) == (0, 0)


_COUNTING = """
import sys
from odise_core.feature_cache import FeatureCache
import torch
cache = FeatureCache(sys.argv[1], max_bytes=10**6)
for i in range(int(sys.argv[2])):
    cache.get_or_compute(f"k{i % 3}", lambda: {"x": torch.ones(4)})
for i in range(int(sys.argv[3])):
    cache.get_or_compute(f"k{i % 2}", lambda: {"x": torch.ones(4)}, purpose="train")
"""


def test_counts_of_processes_that_exit_sum_in_stats_json(tmp_path):
    import subprocess
    import sys

    cache = FeatureCache(tmp_path, max_bytes=10**6)
    cache.get_or_compute("k0", lambda: {"x": torch.ones(4)})
    cache.flush()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout first
    procs = [subprocess.Popen([sys.executable, "-c", _COUNTING, str(tmp_path), str(n), str(m)], env=env)
             for n, m in ((40, 7), (25, 11))]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    stats = cache.stats()  # each process added its counts at exit, under the lock
    assert (stats.hits + stats.misses, stats.train_hits + stats.train_misses) == (1 + 40 + 25, 7 + 11)
    assert stats.entries == 3 and 3 <= stats.misses <= 5 and stats.train_misses == 0  # k1, k2: once or twice


# ----------------------------------------------------------------------------- the predictor
def _same(a, b) -> None:
    assert torch.equal(a.class_probs, b.class_probs) and torch.equal(a.mask_logits, b.mask_logits)
    assert [(s.class_index, s.score, s.is_thing) for s in a.segments] == \
        [(s.class_index, s.score, s.is_thing) for s in b.segments]
    assert all(np.array_equal(s.mask, t.mask) for s, t in zip(a.segments, b.segments))


def test_fp32_cached_predictions_equal_uncached(tiny, vocab, photos, tmp_path):
    plain = [tiny.predict_raw(photos[0], vocab)]
    assert plain[0].feature_cache is None
    tiny.feature_cache = FeatureCache(tmp_path, max_bytes=10**9, storage="fp32")
    try:
        misses = [tiny.predict_raw(photos[0], vocab)]
        hits = [tiny.predict_raw(photos[0], vocab)]
    finally:
        tiny.feature_cache = None
    assert [r.feature_cache for r in misses + hits] == ["miss", "hit"]
    for a, b, c in zip(plain, misses, hits):
        _same(a, b)
        _same(a, c)
        assert c.timings["backbone"] > 0


def _panoptic(pred, size) -> np.ndarray:
    """Per-pixel (class index + 1) of the panoptic segments, 0 where no segment."""
    out = np.zeros(size, dtype=np.int64)
    for s in pred.segments:
        out[s.mask] = s.class_index + 1
    return out


@pytest.mark.parametrize("storage,max_prob_diff,max_pixels_pct", [("fp16", 2e-3, 0.5), ("bf16", 2e-2, 5.0)])
def test_compact_storage_stays_close_to_the_uncached_pass(tiny, vocab, photos, tmp_path, storage, max_prob_diff,
                                                          max_pixels_pct):
    """Bounds a few times the measured figures (README, Feature cache); a first pass and a hit agree exactly."""
    tiny.feature_cache = None
    plain = [tiny.predict_raw(p, vocab) for p in photos]
    tiny.feature_cache = FeatureCache(tmp_path, max_bytes=10**9, storage=storage)
    try:
        first = [tiny.predict_raw(p, vocab) for p in photos]
        again = [tiny.predict_raw(p, vocab) for p in photos]
    finally:
        tiny.feature_cache = None
    diffs, pixels = [], []
    for p, a, b, c in zip(photos, plain, first, again):
        _same(b, c)  # used as stored on the first pass too
        diffs.append(float((a.class_probs - b.class_probs).abs().max()))
        pixels.append(100.0 * float((_panoptic(a, p.shape[:2]) != _panoptic(b, p.shape[:2])).mean()))
    print(f"{storage}: max |dp| {max(diffs):.2e}, panoptic pixels differing {max(pixels):.3f}% (per photo "
          f"{', '.join(f'{d:.1e}/{x:.3f}%' for d, x in zip(diffs, pixels))})")
    assert 0 < max(diffs) < max_prob_diff and max(pixels) < max_pixels_pct


def test_key_follows_inputs_precision_storage_and_backbone_weights(tiny, photos):
    from odise_core.preprocess import prepare

    padded = prepare(photos[0], tiny.cfg.backbone).tensor
    key = feature_key(tiny.model, padded, "fused", "fp16")
    assert key == feature_key(tiny.model, padded.clone(), "fused", "fp16")
    nudged = padded.clone()
    nudged[0, 0, 0, 0] += 1e-3
    others = [feature_key(tiny.model, nudged, "fused", "fp16"), feature_key(tiny.model, padded, "raw", "fp16"),
              feature_key(tiny.model, padded, "fused", "fp32"),
              feature_key(tiny.model, padded, "fused", "fp16", torch.bfloat16),
              feature_key(tiny.model, padded, "fused", "fp16", extra="view 1")]
    assert len({key, *others}) == 6
    state = {k: v.clone() for k, v in tiny.trainable_state_dict().items()}
    heads = {k: (v + 1 if k.startswith("sem_seg_head.predictor.") and v.is_floating_point() else v)
             for k, v in state.items()}
    projections = {k: (v + 1 if k.startswith("backbone.feature_projections.") and v.is_floating_point() else v)
                   for k, v in state.items()}
    raw = feature_key(tiny.model, padded, "raw", "fp16")
    try:
        tiny.load_trainable_state_dict(heads)
        assert feature_key(tiny.model, padded, "fused", "fp16") == key  # heads-only: the features stand
        tiny.load_trainable_state_dict(projections)
        assert feature_key(tiny.model, padded, "fused", "fp16") != key
        assert feature_key(tiny.model, padded, "raw", "fp16") == raw  # raw features skip the projections
    finally:
        tiny.load_trainable_state_dict(state)
    assert feature_key(tiny.model, padded, "fused", "fp16") == key


def test_heads_only_fine_tune_keeps_hitting_and_a_projection_fine_tune_misses(photos, vocab, tmp_path):
    from odise_core.tools.synthetic import make_scene
    from odise_core.training.finetune import FinetuneOptions, TrainSample, finetune

    predictor = build_predictor(get_config("tiny"), device="cpu", text_cache=TextEmbeddingCache(None),
                                feature_cache=FeatureCache(tmp_path / "features", 10**9, storage="fp32"))
    scene = make_scene(3, size=128)
    samples = [TrainSample(scene.image, scene.masks, scene.classes % len(vocab))]
    image = photos[2]
    first = predictor.predict_raw(image, vocab)
    options = FinetuneOptions(steps=2, views_per_image=2, num_points=256, lr=1e-3, grad_clip=None)
    finetune(predictor.model, samples, options, vocab=vocab, feature_cache=predictor.feature_cache)
    stats = predictor.feature_cache.stats()
    assert stats.misses == 1 and stats.hits == 0  # the image, predicted
    assert stats.entries == 1 + stats.train_misses >= 2  # and the views the steps drew, fine-tuning
    heads = predictor.predict_raw(image, vocab)
    assert (first.feature_cache, heads.feature_cache) == ("miss", "hit")
    assert not torch.equal(first.class_probs, heads.class_probs)  # the heads changed, the features stand
    predictor.feature_cache, cached = None, predictor.feature_cache
    _same(predictor.predict_raw(image, vocab), heads)  # exact storage: a hit predicts as a fresh pass
    predictor.feature_cache = cached
    options.trainable = ("feature_projections", "predictor")
    finetune(predictor.model, samples, options, vocab=vocab, feature_cache=predictor.feature_cache)
    assert predictor.predict_raw(image, vocab).feature_cache == "miss"


def test_fine_tune_reads_each_view_from_disk_at_most_once_per_run(vocab, tmp_path, disk_loads):
    from odise_core.tools.synthetic import make_scene
    from odise_core.training.finetune import FinetuneOptions, TrainSample, finetune

    model = build_predictor(get_config("tiny"), device="cpu", text_cache=TextEmbeddingCache(None)).model
    scene = make_scene(5, size=128)
    samples = [TrainSample(scene.image, scene.masks, scene.classes % len(vocab))]
    cache = FeatureCache(tmp_path, 10**9, storage="fp16")
    options = FinetuneOptions(steps=5, batch_size=2, views_per_image=2, num_points=256, grad_clip=None)
    cold = finetune(model, samples, options, vocab=vocab, feature_cache=cache)
    views = cache.stats().entries
    assert not disk_loads and cache.stats().train_misses == views == 2  # computed, then read from memory
    warm = finetune(model, samples, options, vocab=vocab, feature_cache=cache)
    assert len(disk_loads) == len(set(disk_loads)) == views  # 10 reads, each view loaded from disk once
    stats = cache.stats()
    assert (stats.train_hits, stats.train_misses, stats.hits, stats.misses) == (10 + 10 - views, views, 0, 0)
    assert warm.seconds_features == 0 < cold.seconds_features


# ----------------------------------------------------------------------------- odise-ls cache
def test_cache_command_shows_and_clears(tmp_path, capsys, monkeypatch):
    from backend.cli import main

    monkeypatch.delenv("FEATURE_CACHE_DIR")
    monkeypatch.delenv("FEATURE_CACHE_DTYPE")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    cache = FeatureCache(tmp_path / "models" / "feature_cache", max_bytes=10**6, storage="fp16")
    for key, purpose in (("a", "predict"), ("b", "predict"), ("a", "predict"), ("a", "train"), ("c", "train")):
        cache.get_or_compute(key, lambda: _features(0), purpose=purpose)
    size = cache.stats().bytes
    assert main(["cache", "--json", "--feature-cache-mb", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"entries": 3, "bytes": size, "max_bytes": 2 * 2**20, "hits": 1, "misses": 2,
                     "hit_rate": pytest.approx(1 / 3), "train_hits": 1, "train_misses": 1, "train_hit_rate": 0.5,
                     "storage": "fp16", "root": str(cache.root)}
    assert main(["cache"]) == 0
    text = capsys.readouterr().out
    assert f"feature cache {cache.root}" in text and "entries   3" in text
    assert "hit rate  33.3% (1 hits, 2 misses) predicting" in text
    assert "training  50.0% (1 hits, 1 misses) fine-tune view reads" in text
    assert f"{size / 2**20:.1f} MB of 16384 MB max" in text
    assert main(["cache", "clear", "--json"]) == 0
    cleared = json.loads(capsys.readouterr().out)
    assert (cleared["removed"], cleared["entries"], cleared["bytes"], cleared["hits"], cleared["train_hits"]) == \
        (3, 0, 0, 0, 0)
    assert not cache.contains("a")
    assert main(["cache", "clear", "--feature-cache-dir", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out == f"removed 0 entries from {tmp_path / 'elsewhere'}\n"
    monkeypatch.setenv("FEATURE_CACHE_MB", "lots")
    assert main(["cache"]) == 2
    assert "FEATURE_CACHE_MB='lots' is not a number" in capsys.readouterr().err


def test_fine_tune_candidates_and_served_versions_share_the_feature_cache(tiny, tmp_path):
    from backend.learning.serving import copy_sharing_frozen

    tiny.feature_cache = FeatureCache(tmp_path, max_bytes=10**6)
    try:
        assert copy_sharing_frozen(tiny).feature_cache is tiny.feature_cache
    finally:
        tiny.feature_cache = None
