"""Running a batch of images: read-ahead on a thread pool overlapped with compute, failures recorded
without stopping, Ctrl-C or a stop request ending the run cleanly, and the run's summary."""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PREFETCH = 16  # read-ahead stays well inside the backend's image cache (32 images)


class PredictionError(RuntimeError):
    """The backend returned an error entry instead of a prediction; the message is the backend's."""


@dataclass
class Failure:
    item: str
    error: str


@dataclass
class Progress:
    """How far `run_overlapped` got: items computed, failures, wall seconds, and whether Ctrl-C stopped it."""

    done: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


@dataclass
class PrelabelSummary:
    """What a run did; `images_per_second` counts predicted items over the run's wall time."""

    total: int = 0
    predicted: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    model_version: str = ""
    interrupted: bool = False
    resume: str = ""  # where the done work is kept, when interrupted

    def record(self, progress: Progress) -> None:
        self.predicted, self.failures, self.seconds = progress.done, progress.failures, progress.seconds
        self.interrupted = progress.interrupted

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """A human-readable report, failures listed one per line."""
        lines = [f"model version {self.model_version}: {self.total} item(s), {self.predicted} predicted, "
                 f"{self.skipped} already done, {len(self.failures)} failed, {self.seconds:.1f} s "
                 f"({self.images_per_second:.2f} images/s)"]
        lines += [f"  FAILED {f.item}: {f.error}" for f in self.failures]
        if self.interrupted:
            left = self.total - self.skipped - self.predicted - len(self.failures)
            lines.append(f"interrupted: {left} item(s) not done. {self.resume} Run the same command again to "
                         "resume: items that already have a prediction of this model version are skipped.")
        return "\n".join(lines)


def run_overlapped(items: Sequence[T], fetch: Callable[[T], Any], compute: Callable[[T, Any], None],
                   name: Callable[[T], str], workers: int = 2, prefetch: int = 4, progress: bool = True,
                   desc: str = "prelabel", stop: Callable[[], bool] | None = None,
                   on_item: Callable[[Progress], None] | None = None) -> Progress:
    """Run `fetch` on a thread pool up to `prefetch` items ahead while `compute` runs here, in order.

    A failing fetch or compute is recorded and the run goes on. Ctrl-C (KeyboardInterrupt), or
    `stop()` turning true before the next item, abandons the rest, cancels the read-ahead and
    returns with `interrupted` set. `on_item(progress)` is called after every item (a live view).
    """
    result = Progress()
    ahead = max(1, min(prefetch, MAX_PREFETCH))
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch")
    pending: deque[tuple[T, Future]] = deque()
    try:
        with tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar, \
                (logging_redirect_tqdm() if progress else nullcontext()):
            queue = iter(items)

            def refill() -> None:
                for item in queue:
                    pending.append((item, pool.submit(fetch, item)))
                    if len(pending) >= ahead:
                        return

            refill()
            while pending:
                if stop is not None and stop():
                    result.interrupted = True
                    break
                item, future = pending.popleft()
                refill()
                try:
                    compute(item, future.result())
                    result.done += 1
                except Exception as e:  # noqa: BLE001 - one bad image must not stop a 10,000-image run
                    result.failures.append(Failure(name(item), str(e) if isinstance(e, PredictionError)
                                                   else f"{type(e).__name__}: {e}"))
                    log.warning("%s failed: %s", name(item), e)
                bar.update(1)
                bar.set_postfix(failed=len(result.failures), refresh=False)
                if on_item is not None:
                    result.seconds = time.perf_counter() - start
                    on_item(result)
    except KeyboardInterrupt:
        result.interrupted = True
        log.warning("interrupted: the item in flight is abandoned, %d done so far are kept", result.done)
    finally:
        pool.shutdown(wait=not result.interrupted, cancel_futures=True)
    result.seconds = time.perf_counter() - start
    return result
