"""On-disk cache of frozen backbone features, bounded by bytes, shared by processes, with a RAM tier.

The SD + CLIP backbone is frozen, so the fused features of an image only change with the image and
with what `feature_key` hashes (weights, configuration, precision, the backbone's own trainable
weights). Prediction and fine-tuning both reuse them from here: one file per entry, written
atomically, least recently used evicted first, stored in float16, bfloat16 or float32 (exact). An
optional in-process MemoryTier in front of the disk holds verified entries, so a fine-tune reading
the same views every step does not load and checksum them again. Hits and misses are counted per
purpose (predict, train) in this process and added to the folder's stats.json every few seconds.
A second kind of entry holds MaskCLIP's mask-independent stream of an image (`maskclip_key`).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from odise_core.modeling.odise import ODISE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ENTRY_SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0  # temp files of writers killed mid-write are removed after this long
LOCK_TIMEOUT = 30.0  # bookkeeping is skipped (never the prediction) when the lock stays busy this long
FLUSH_SECONDS = 5.0  # counts of a process reach stats.json this long after its first uncounted lookup at most
TOUCH_SECONDS = 30.0  # a memory hit sets its disk entry's mtime (recency for eviction) at most this often
PURPOSES = ("predict", "train")  # who looks features up: prediction (serving) or a fine-tune's views
Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CacheStats:
    """What `odise-ls cache` shows: entries and bytes on disk, the bound, and the hits and misses so far of
    prediction (`hits`, `misses`: the serving hit rate) and of fine-tuning's view reads (`train_*`)."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    train_hits: int
    train_misses: int
    storage: str
    root: str

    @property
    def hit_rate(self) -> float:
        return _rate(self.hits, self.misses)

    @property
    def train_hit_rate(self) -> float:
        return _rate(self.train_hits, self.train_misses)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "hit_rate": self.hit_rate, "train_hit_rate": self.train_hit_rate}


def _rate(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 0.0


def _crc(tensors: Features) -> str:
    """CRC32 of every tensor's bytes in key order: a flipped byte in an entry is detected on load."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


@dataclass
class _Held:
    """One entry of a MemoryTier: its stored tensors, their bytes, when this process last set the disk mtime."""

    tensors: Features
    nbytes: int
    touched: float


class MemoryTier:
    """Verified stored features per key in this process's memory, at most `max_bytes` (0 holds nothing),
    least recently used dropped first. Thread-safe: the server predicts and fine-tunes from threads."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"feature cache memory_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def get(self, key: str) -> _Held | None:
        """The entry of `key` (now the most recently used), None when not held."""
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
            return held

    def put(self, key: str, tensors: Features, touched: float) -> None:
        """Hold `tensors` (never modified afterwards) under `key`, dropping the least recently used entries
        until everything fits; an entry larger than the whole budget is not held."""
        size = _nbytes(tensors)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._held.pop(key, None)
            self.bytes -= old.nbytes if old is not None else 0
            while self._held and self.bytes + size > self.max_bytes:
                self.bytes -= self._held.popitem(last=False)[1].nbytes
            self._held[key] = _Held(tensors, size, touched)
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self.bytes = 0


class FeatureCache:
    """Features per key under `root`, at most `max_bytes` on disk (0 disables), stored as `storage`, with
    a MemoryTier of `memory_bytes` in front of the disk (0: every lookup reads the disk)."""

    def __init__(self, root: str | Path, max_bytes: int, storage: str = "fp16", memory_bytes: int = 0) -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"feature cache storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
        if max_bytes < 0:
            raise ValueError(f"feature cache max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)
        self.storage = storage
        self.dtype = STORAGE_DTYPES[storage]
        self.memory = MemoryTier(memory_bytes)
        self._counts = _counts_of(self.root)

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.root)!r}, max_bytes={self.max_bytes}, storage={self.storage!r}, "
                f"memory_bytes={self.memory.max_bytes})")

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def with_memory(self, memory_bytes: int) -> "FeatureCache":
        """This cache's folder, bound and storage with a memory tier of its own (a fine-tune's views for one
        run: the memory is released with the returned object)."""
        return FeatureCache(self.root, self.max_bytes, self.storage, memory_bytes)

    def path_for(self, key: str) -> Path:
        """The entry file of `key`: format version and storage dtype in the name, then a hash of the key."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return self.root / f"v{FORMAT_VERSION}-{self.storage}-{digest}{ENTRY_SUFFIX}"

    # ----------------------------------------------------------------- lookups
    def get_or_compute(self, key: str, compute: Callable[[], Features], as_stored: bool = False,
                       purpose: str = "predict") -> Features:
        """The features of `key`: on a hit, the stored tensors as float32 on the CPU; on a miss, `compute()`'s
        tensors exactly as computed (stored compactly on the side), or as stored then read back when
        `as_stored` (so a result does not depend on whether it was cached, as fine-tuning needs).
        The hit or miss is counted under `purpose` ("predict" or "train")."""
        if purpose not in PURPOSES:
            raise ValueError(f"feature cache purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        if not self.enabled:
            return compute()
        stored = self._recall(key)
        self._counts.add(purpose, hit=stored is not None)
        if stored is not None:
            return _as_float(stored)
        computed = compute()
        stored = {name: t.detach().to("cpu", self.dtype, copy=True).contiguous() for name, t in computed.items()}
        if any(t.isinf().any() for t in stored.values()):
            log.warning("features overflow %s storage: not cached (use bf16 or fp32 storage)", self.storage)
            return computed
        self._store(key, stored)
        self.memory.put(key, stored, time.time())
        return _as_float(stored) if as_stored else computed

    def contains(self, key: str) -> bool:
        """Whether `key` has an entry on disk (not checked for corruption)."""
        return self.enabled and self.path_for(key).is_file()

    def _recall(self, key: str) -> Features | None:
        """The stored entry from memory, else from disk (then held in memory), None when in neither. A memory
        hit refreshes the disk entry's mtime every TOUCH_SECONDS, so eviction on disk still sees it used."""
        held = self.memory.get(key)
        if held is None:
            stored = self._load(key)
            if stored is not None:
                self.memory.put(key, stored, time.time())
            return stored
        now = time.time()
        if now - held.touched >= TOUCH_SECONDS:
            held.touched = now
            _touch(self.path_for(key))
        return held.tensors

    def _load(self, key: str) -> Features | None:
        """The stored entry on disk, None when absent; a corrupt or truncated one is logged and deleted."""
        path = self.path_for(key)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                stored = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self._discard(path, f"unreadable ({exc})")
            return None
        if meta.get("key") != key or meta.get("crc32") != _crc(stored):
            self._discard(path, "its content does not match its checksum or key")
            return None
        _touch(path)
        return stored

    def _discard(self, path: Path, why: str) -> None:
        log.warning("feature cache entry %s is %s: deleted, the features are recomputed", path.name, why)
        path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- writes
    def _store(self, key: str, stored: Features) -> None:
        size = _nbytes(stored)
        if size > self.max_bytes:
            log.info("features of %d bytes exceed the feature cache's %d: not stored", size, self.max_bytes)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX, suffix=ENTRY_SUFFIX)
        os.close(fd)
        try:
            save_file(stored, tmp, metadata={"key": key, "crc32": _crc(stored), "format": str(FORMAT_VERSION)})
            os.replace(tmp, self.path_for(key))
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            log.warning("feature cache could not write under %s (%s): features not cached", self.root, exc)
            return
        self._evict()

    def _evict(self) -> None:
        """Delete least recently used entries (oldest mtime first) until the total fits `max_bytes`."""
        try:
            with _file_lock(self.root):
                entries = self._entries()
                total = sum(size for _, size, _ in entries)
                for path, size, _ in sorted(entries, key=lambda e: e[2]):
                    if total <= self.max_bytes:
                        break
                    path.unlink(missing_ok=True)
                    total -= size
                now = time.time()
                for tmp in self.root.glob(f"{TEMP_PREFIX}*"):
                    try:
                        if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                            tmp.unlink(missing_ok=True)
                    except FileNotFoundError:
                        pass
        except Timeout:
            log.warning("feature cache lock under %s busy for %.0f s: eviction skipped", self.root, LOCK_TIMEOUT)

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, mtime) of every entry file; files removed meanwhile are skipped."""
        found = []
        if not self.root.is_dir():
            return found
        for path in self.root.glob(f"v*{ENTRY_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((path, st.st_size, st.st_mtime))
        return found

    # ----------------------------------------------------------------- bookkeeping
    def flush(self) -> None:
        """Add this process's uncounted hits and misses to stats.json now (also done every FLUSH_SECONDS, by
        stats() and at exit; a process ended by os._exit or a kill loses at most its last FLUSH_SECONDS)."""
        self._counts.flush()

    def stats(self) -> CacheStats:
        """Entries and bytes on disk and the counts of every process (this one's flushed first)."""
        self.flush()
        entries = self._entries()
        counts = _read_counts(self.root)
        return CacheStats(entries=len(entries), bytes=sum(size for _, size, _ in entries), max_bytes=self.max_bytes,
                          hits=counts["predict"]["hits"], misses=counts["predict"]["misses"],
                          train_hits=counts["train"]["hits"], train_misses=counts["train"]["misses"],
                          storage=self.storage, root=str(self.root))

    def clear(self) -> int:
        """Remove every entry (of any storage dtype), this process's memory tier and the hit/miss counts
        (this process's uncounted ones too); returns how many entries were on disk."""
        self.memory.clear()
        self._counts.discard()
        if not self.root.is_dir():
            return 0
        with _file_lock(self.root):
            entries = self._entries()
            for path, _, _ in entries:
                path.unlink(missing_ok=True)
            _stats_path(self.root).unlink(missing_ok=True)
        return len(entries)


def _as_float(stored: Features) -> Features:
    """Float32 copies: the caller may change them, the held entry stays as verified."""
    return {name: t.to(torch.float32, copy=True) for name, t in stored.items()}


def _touch(path: Path) -> None:
    """Set the entry's mtime to now (its recency for eviction); an entry evicted meanwhile is left alone."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _nbytes(tensors: Features) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------- hit/miss counts shared by processes
def _stats_path(root: Path) -> Path:
    return root / "stats.json"


def _file_lock(root: Path) -> FileLock:
    """The lock around eviction and stats.json that every process using `root` takes."""
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".lock"), timeout=LOCK_TIMEOUT)


def _zero_counts() -> dict[str, dict[str, int]]:
    return {purpose: {"hits": 0, "misses": 0} for purpose in PURPOSES}


def _read_counts(root: Path) -> dict[str, dict[str, int]]:
    """Counts per purpose in stats.json; the earlier flat {"hits", "misses"} were prediction's."""
    counts = _zero_counts()
    try:
        data = json.loads(_stats_path(root).read_text())
        if "hits" in data:
            data = {"predict": data}
        for purpose in PURPOSES:
            for outcome in ("hits", "misses"):
                counts[purpose][outcome] = int(data.get(purpose, {}).get(outcome, 0))
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        return _zero_counts()
    return counts


def _add_counts(into: dict[str, dict[str, int]], delta: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Add `delta`'s hits and misses per purpose to `into` (changed in place and returned)."""
    for purpose, outcomes in delta.items():
        for outcome, n in outcomes.items():
            into[purpose][outcome] += n
    return into


class _Counts:
    """Hits and misses of one cache folder counted in this process and not yet in its stats.json: a lookup
    only adds to memory; a timer adds them under the file lock within FLUSH_SECONDS (deltas, so the
    counts of several processes sum)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._pending = _zero_counts()
        self._scheduled = False

    def add(self, purpose: str, hit: bool) -> None:
        with self._lock:
            self._pending[purpose]["hits" if hit else "misses"] += 1
            if self._scheduled:
                return
            self._scheduled = True
        timer = threading.Timer(FLUSH_SECONDS, self._flush_when_due)
        timer.daemon = True
        timer.start()

    def _flush_when_due(self) -> None:
        with self._lock:
            self._scheduled = False
        self.flush()

    def _take(self) -> dict[str, dict[str, int]]:
        with self._lock:
            taken, self._pending = self._pending, _zero_counts()
        return taken

    def discard(self) -> None:
        self._take()

    def flush(self) -> None:
        """Add the pending counts to stats.json under the file lock; kept for the next flush when that fails."""
        delta = self._take()
        if not any(n for outcomes in delta.values() for n in outcomes.values()):
            return
        try:
            with _file_lock(self.root):
                counts = _add_counts(_read_counts(self.root), delta)
                tmp = _stats_path(self.root).with_suffix(".json.tmp")
                tmp.write_text(json.dumps(counts))
                os.replace(tmp, _stats_path(self.root))
            return
        except Timeout:
            log.warning("feature cache lock under %s busy for %.0f s: hit/miss counts kept for later", self.root,
                        LOCK_TIMEOUT)
        except OSError as exc:
            log.warning("feature cache statistics not written under %s (%s): kept for later", self.root, exc)
        with self._lock:
            _add_counts(self._pending, delta)

    def forget(self) -> None:
        """In a forked child: the parent flushes what it counted; the child starts from nothing."""
        self._lock = threading.Lock()
        self._pending = _zero_counts()
        self._scheduled = False


_COUNTS: dict[Path, _Counts] = {}
_COUNTS_LOCK = threading.Lock()


def _counts_of(root: Path) -> _Counts:
    """The one _Counts of `root` in this process, shared by every FeatureCache on that folder."""
    with _COUNTS_LOCK:
        return _COUNTS.setdefault(root.resolve(), _Counts(root))


def _flush_all() -> None:
    for counts in list(_COUNTS.values()):
        counts.flush()


def _forget_all_in_child() -> None:
    global _COUNTS_LOCK
    _COUNTS_LOCK = threading.Lock()
    for counts in _COUNTS.values():
        counts.forget()


atexit.register(_flush_all)
os.register_at_fork(after_in_child=_forget_all_in_child)


FEATURE_KINDS = ("fused", "raw")


def feature_key(model: "ODISE", padded: torch.Tensor, kind: str = "fused", storage: str = "fp16",
                autocast_dtype: torch.dtype | None = None, extra: str = "") -> str:
    """Key of the backbone features of `padded` (the exact model input, so resize and padding settings are
    in it) under everything else they depend on: the frozen weights, the diffusion, backbone and CLIP
    configuration, the precision plan (SD dtype, `autocast_dtype`), the storage dtype and the backbone's
    trainable weights ("fused"; "raw" diffusion features do not go through the feature projections).
    `extra` names anything else the caller varies (a fine-tune's view plan)."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    cfg = model.cfg.to_dict()
    parts = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "image": _image_digest(padded),
        "weights": model.frozen_weights_key,
        "config": {name: cfg[name] for name in ("diffusion", "backbone", "clip")},
        "sd_dtype": str(model.backbone.feature_extractor.sd_dtype),
        "autocast": str(autocast_dtype),
        "storage": storage,
        "trainable": model.backbone_digest(include_projections=kind == "fused"),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# What a MaskCLIP entry holds (odise_core/modeling/clip.py, ClipModel.maskclip_stream): changing it changes the key.
MASKCLIP_LAYOUT = "cls+per-layer keys/values"


def maskclip_key(model: "ODISE", image01: torch.Tensor, storage: str = "fp16",
                 autocast_dtype: torch.dtype | None = None) -> str:
    """Key of MaskCLIP's mask-independent stream of `image01` (as `maskclip_inputs` gives it): the exact
    CLIP-size image it is resized to, the frozen CLIP weights and configuration, CLIP's dtype, the
    autocast dtype and the storage dtype. No trainable weight: CLIP is never fine-tuned, so a promoted
    model keeps hitting it."""
    clip = model.clip
    parts = {
        "format": FORMAT_VERSION,
        "kind": "maskclip",
        "layout": MASKCLIP_LAYOUT,
        "image": _image_digest(clip.maskclip_image(image01)),
        "weights": model.clip_weights_key,
        "config": model.cfg.to_dict()["clip"],
        "clip_dtype": str(next(clip.parameters()).dtype),
        "autocast": str(autocast_dtype),
        "storage": storage,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _image_digest(image: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape and float32 values."""
    image = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(str(tuple(image.shape)).encode())
    h.update(image.numpy().tobytes())
    return h.hexdigest()
