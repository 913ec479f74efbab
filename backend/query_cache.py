"""Per-image QueryStates for interactive requests, bounded by bytes; one computation per key at a time.

The first interaction on a task pays for one full ODISE pass; later clicks, boxes and phrases on
it read the kept state. Keys name the image content, the model version and the vocabulary, so a
new fine-tune or a changed label config never reads a stale state; a promotion also drops its
project's entries at once to free their memory.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

from odise_core.query_state import QueryState

log = logging.getLogger(__name__)


def image_digest(image: np.ndarray) -> str:
    """Content hash of a decoded image (pixels, shape and dtype)."""
    h = hashlib.sha256(f"{image.shape}:{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class CacheKey:
    project: str | None
    image: str  # image_digest
    model_version: str
    vocabulary: str  # Vocabulary.fingerprint


class QueryStateCache:
    """LRU of QueryStates holding at most `max_bytes`; concurrent misses on one key compute once."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[CacheKey, QueryState] = OrderedDict()
        self._pending: dict[CacheKey, Future] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get_or_compute(self, key: CacheKey, compute: Callable[[], QueryState]) -> QueryState:
        """The state under `key`, computing it (once, whoever asks meanwhile waits for it) when absent."""
        with self._lock:
            state = self._entries.get(key)
            if state is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return state
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = Future()
                owner = True
                self.misses += 1
            else:
                owner = False
                self.hits += 1
        if not owner:
            return pending.result()
        try:
            state = compute()
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            self._store(key, state)
        pending.set_result(state)
        return state

    def _store(self, key: CacheKey, state: QueryState) -> None:
        if state.nbytes > self.max_bytes:
            log.info("interactive cache: a state of %.1f MB exceeds the %.1f MB bound; not kept",
                     state.nbytes / 2 ** 20, self.max_bytes / 2 ** 20)
            return
        self._entries[key] = state
        total = sum(s.nbytes for s in self._entries.values())
        while total > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            total -= evicted.nbytes

    def drop_project(self, project: str | None) -> int:
        """Forget every state computed for `project`; returns how many."""
        with self._lock:
            stale = [k for k in self._entries if k.project == project]
            for k in stale:
                del self._entries[k]
        return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
