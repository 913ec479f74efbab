"""On-disk cache of frozen backbone features, bounded by bytes, shared by processes.

The SD + CLIP backbone is frozen, so the fused features of an image only change with the image and
with what `feature_key` hashes (weights, configuration, precision, the backbone's own trainable
weights). Prediction and fine-tuning both reuse them from here: one file per entry, written
atomically, least recently used evicted first, stored in float16, bfloat16 or float32 (exact).
A second kind of entry holds MaskCLIP's mask-independent stream of an image (`maskclip_key`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zlib
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
Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CacheStats:
    """What `odise-ls cache` shows: entries and bytes on disk, the bound, hits and misses so far."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    storage: str
    root: str

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "hit_rate": self.hit_rate}


def _crc(tensors: Features) -> str:
    """CRC32 of every tensor's bytes in key order: a flipped byte in an entry is detected on load."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class FeatureCache:
    """Features per key under `root`, at most `max_bytes` on disk (0 disables), stored as `storage`."""

    def __init__(self, root: str | Path, max_bytes: int, storage: str = "fp16") -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"feature cache storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
        if max_bytes < 0:
            raise ValueError(f"feature cache max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)
        self.storage = storage
        self.dtype = STORAGE_DTYPES[storage]

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, max_bytes={self.max_bytes}, storage={self.storage!r})"

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path_for(self, key: str) -> Path:
        """The entry file of `key`: format version and storage dtype in the name, then a hash of the key."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return self.root / f"v{FORMAT_VERSION}-{self.storage}-{digest}{ENTRY_SUFFIX}"

    # ----------------------------------------------------------------- lookups
    def get_or_compute(self, key: str, compute: Callable[[], Features], as_stored: bool = False) -> Features:
        """The features of `key`: on a hit, the stored tensors as float32 on the CPU; on a miss, `compute()`'s
        tensors exactly as computed (stored compactly on the side), or as stored then read back when
        `as_stored` (so a result does not depend on whether it was cached, as fine-tuning needs)."""
        if not self.enabled:
            return compute()
        stored = self._load(key)
        self._record(hit=stored is not None)
        if stored is not None:
            return {name: t.float() for name, t in stored.items()}
        computed = compute()
        stored = {name: t.detach().to("cpu", self.dtype).contiguous() for name, t in computed.items()}
        if any(t.isinf().any() for t in stored.values()):
            log.warning("features overflow %s storage: not cached (use bf16 or fp32 storage)", self.storage)
            return computed
        self._store(key, stored)
        return {name: t.float() for name, t in stored.items()} if as_stored else computed

    def contains(self, key: str) -> bool:
        """Whether `key` has an entry on disk (not checked for corruption)."""
        return self.enabled and self.path_for(key).is_file()

    def _load(self, key: str) -> Features | None:
        """The stored entry, None when absent; a corrupt or truncated one is logged and deleted."""
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
        try:
            os.utime(path)  # recency for eviction
        except FileNotFoundError:
            pass
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
            with self._lock():
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
            log.warning("feature cache lock %s busy for %.0f s: eviction skipped", self._lock_path, LOCK_TIMEOUT)

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
    @property
    def _lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def _stats_path(self) -> Path:
        return self.root / "stats.json"

    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._lock_path), timeout=LOCK_TIMEOUT)

    def _read_counts(self) -> dict[str, int]:
        try:
            data = json.loads(self._stats_path.read_text())
            return {"hits": int(data["hits"]), "misses": int(data["misses"])}
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return {"hits": 0, "misses": 0}

    def _record(self, hit: bool) -> None:
        """Count one disk lookup as a hit or a miss in the statistics file all processes share."""
        try:
            with self._lock():
                counts = self._read_counts()
                counts["hits" if hit else "misses"] += 1
                tmp = self._stats_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(counts))
                os.replace(tmp, self._stats_path)
        except Timeout:
            log.warning("feature cache lock %s busy for %.0f s: hit/miss not counted", self._lock_path, LOCK_TIMEOUT)
        except OSError as exc:
            log.warning("feature cache statistics not written under %s (%s)", self.root, exc)

    def stats(self) -> CacheStats:
        entries = self._entries()
        counts = self._read_counts()
        return CacheStats(entries=len(entries), bytes=sum(size for _, size, _ in entries), max_bytes=self.max_bytes,
                          hits=counts["hits"], misses=counts["misses"], storage=self.storage, root=str(self.root))

    def clear(self) -> int:
        """Remove every entry (of any storage dtype) and reset the hit/miss counts; returns how many entries."""
        if not self.root.is_dir():
            return 0
        with self._lock():
            entries = self._entries()
            for path, _, _ in entries:
                path.unlink(missing_ok=True)
            self._stats_path.unlink(missing_ok=True)
        return len(entries)


def _nbytes(tensors: Features) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
