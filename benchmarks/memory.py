"""Peak host RSS (and CUDA memory when present) over a block of code, sampled by a thread."""
from __future__ import annotations

import threading
import time
from types import TracebackType

import torch


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.peak_rss`, `m.start_rss`, `m.peak_cuda` (bytes), `m.seconds`."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_rss = self.peak_rss = 0
        self.peak_cuda = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.start_rss = self.peak_rss = current_rss()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_cuda = torch.cuda.max_memory_allocated()
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_rss = max(self.peak_rss, current_rss())
