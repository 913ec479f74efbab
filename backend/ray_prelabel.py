"""Pre-labeling spread over Ray actors, each holding one model: `odise-ls prelabel ... --ray [ADDRESS]`.

Same sources, outputs, resumability and failure listing as `backend.prelabel`: the driver lists
the work (project tasks without a prediction of the serving model version, or folder images not
yet in the import JSON), hands one image at a time to `PrelabelWorker` actors, and records every
answer itself (import JSON journal, or predictions sent to Label Studio in batches). Actors build
their model once with `backend.settings.build_model` through `ODISEBackend`, exactly as the
single-process path does, run torch on as many threads as the CPUs Ray reserved for them (more
threads than cores makes every actor wait on descheduled threads), and fetch their images
themselves (Label Studio credentials travel in the pickled settings, whose repr hides the key).
Actors are threaded (Ray's `max_concurrency`): each queued image is fetched on its own call's thread
while the model, behind a lock, works on another, so a slow download does not leave the model idle.
An actor that dies is replaced by a new one, so a long run keeps its N workers, and its images
are handed on; an image that kills two actors is listed as failed. Ray is imported lazily: it is
the optional extra `odise-label-studio[ray]`.
"""
from __future__ import annotations

import logging
import os
import resource
import threading
import time
import uuid
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from backend.batch import Failure, PrelabelSummary
from backend.prelabel import (LOCAL_FILES_PREFIX, ImportFile, PredictionWriter, _has_version, _Runner, image_url,
                              list_images, project_tasks)

log = logging.getLogger(__name__)

PREFETCH_PER_WORKER = 2  # images an actor fetches (and holds decoded) while the model works on another
IN_FLIGHT_PER_WORKER = 1 + PREFETCH_PER_WORKER
MAX_ATTEMPTS = 2  # an image that killed this many actors is listed as failed instead of killing more
ACTOR_PREFIX = "odise-prelabel"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class RayUnavailable(RuntimeError):
    """--ray was asked for but Ray is not installed."""


class WorkersDisagree(RuntimeError):
    """The actors built models with different versions (e.g. different weights on different nodes)."""


def import_ray() -> Any:
    """The `ray` module, or RayUnavailable saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs Ray: pip install 'odise-label-studio[ray]'") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at `address` ("auto", "ray://host:port") or start a local one ("" or None).

    Does nothing when this process is already connected (e.g. tests that started their own cluster).
    """
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=True)
    return ray


def thread_count(cpus: float) -> int:
    """Torch threads for an actor that reserved `cpus` CPUs: that many (at least one), never the whole node."""
    return max(1, int(cpus))


@dataclass
class WorkerStats:
    """What one actor did: images answered, wall seconds in the model (`busy_seconds`), CPU seconds of the
    process while it had images in hand (fetch, decode, model), its peak memory."""

    name: str
    pid: int
    threads: int
    images: int
    busy_seconds: float
    cpu_seconds: float
    peak_rss_mb: float


class PrelabelWorker:
    """One model in one Ray actor: the single-process path's backend, config and model, built once.

    Meant to run threaded (`max_concurrency` above IN_FLIGHT_PER_WORKER): `predict` fetches its task's
    images first, on its own thread, then waits for the model lock, so fetching the next images overlaps
    the current prediction, and at most IN_FLIGHT_PER_WORKER - 1 decoded images wait for the model.
    """

    def __init__(self, settings: Any, label_config: str, project: str | None, threads: int = 1):
        import torch

        from backend.model import ModelLoadFailed, ODISEBackend

        torch.set_num_threads(threads)
        logging.getLogger("backend.model").setLevel(logging.WARNING)  # a line per task would flood the driver
        backend = ODISEBackend(settings)
        backend.start_loading(background=False)
        if backend.error:
            raise ModelLoadFailed(backend.error)
        version, model = backend.model_for(project)
        self.runner = _Runner(backend, backend.parse_config(label_config), model, version)
        self.images, self.busy_seconds, self.cpu_seconds = 0, 0.0, 0.0
        self._model = threading.Lock()  # one image in the model at a time, on the threads Ray reserved
        self._counting = threading.Lock()
        self._working = 0  # predict calls under way; CPU time is counted while there is one
        self._cpu_since = 0.0

    def model_version(self) -> str:
        return self.runner.version

    def predict(self, task: dict[str, Any]) -> dict[str, Any]:
        """The prediction of `task`, or an entry with "error" and no "result" for an image that fails.

        The images are fetched into the backend's image cache before the model lock is taken;
        `predict_task` then finds them there. Busy time is the time holding the model lock.
        """
        from backend.tasks import ImageFetchError

        self._begin()
        try:
            try:
                self.runner.fetch(task)
            except ImageFetchError as e:  # the entry predict_task would make, without holding the model
                return {"error": str(e), "task": task.get("id"), "model_version": self.runner.version}
            with self._model:
                wall = time.perf_counter()
                try:
                    return self.runner.backend.predict_task(task, self.runner.config, self.runner.model,
                                                            self.runner.version)
                finally:
                    self.busy_seconds += time.perf_counter() - wall
        finally:
            self._end()

    def _begin(self) -> None:
        with self._counting:
            if self._working == 0:
                self._cpu_since = time.process_time()
            self._working += 1

    def _end(self) -> None:
        with self._counting:
            self._working -= 1
            self.images += 1
            if self._working == 0:
                self.cpu_seconds += time.process_time() - self._cpu_since

    def _cpu_seconds(self) -> float:
        """The process's CPU time while it had an image in hand (fetching, decoding, predicting), so far."""
        with self._counting:
            return self.cpu_seconds + (time.process_time() - self._cpu_since if self._working else 0.0)

    def stats(self) -> WorkerStats:
        """What this actor did; also writes its feature cache hit/miss counts (the actor is killed, not exited)."""
        import ray
        import torch

        feature_cache = getattr(self.runner.model, "feature_cache", None)
        if feature_cache is not None:
            feature_cache.flush()
        return WorkerStats(ray.get_runtime_context().get_actor_name() or "", os.getpid(), torch.get_num_threads(),
                           self.images, self.busy_seconds, self._cpu_seconds(),
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@dataclass
class RaySummary(PrelabelSummary):
    """A Ray run: the single-process summary plus the actors' fate and what each did (`worker_stats`, at the end)."""

    workers: int = 0
    workers_lost: int = 0
    workers_replaced: int = 0
    retried: int = 0
    worker_stats: list[WorkerStats] = field(default_factory=list)

    def format(self) -> str:
        images = ", ".join(str(w.images) for w in self.worker_stats) or "-"
        return (super().format() + f"\n{self.workers} Ray worker(s), {self.workers_lost} lost, "
                f"{self.workers_replaced} replaced, {self.retried} image(s) retried on another worker; "
                f"images per worker at the end: {images}")


class WorkerPool:
    """The run's actors: started with the resources asked for, named so they can be found in the cluster.

    `replace` swaps a dead actor for a new one with the same resources; `shutdown` kills them all.
    """

    def __init__(self, settings: Any, label_config: str, project: str | None, workers: int,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise ValueError(f"--cpus-per-worker must be above 0 and --gpus-per-worker at least 0, got "
                             f"{cpus_per_worker:g} and {gpus_per_worker:g}")
        ray = import_ray()
        self.ray = ray
        threads = thread_count(cpus_per_worker)
        self._remote = ray.remote(PrelabelWorker)
        self._options = dict(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                             max_concurrency=IN_FLIGHT_PER_WORKER + 1,  # + 1: stats() never waits behind images
                             runtime_env={"env_vars": {name: str(threads) for name in THREAD_VARIABLES}})
        self._args = (settings, label_config, project, threads)
        self._run = uuid.uuid4().hex[:8]
        self._started = 0
        self.actors: list[Any] = [self._start() for _ in range(workers)]
        self.version = self._agreed_version()

    def _start(self) -> Any:
        name = f"{ACTOR_PREFIX}-{self._run}-{self._started}"
        self._started += 1
        return self._remote.options(name=name, **self._options).remote(*self._args)

    def _agreed_version(self) -> str:
        from backend.model import ModelLoadFailed

        try:
            versions = self.ray.get([a.model_version.remote() for a in self.actors])
        except self.ray.exceptions.RayError as e:
            self.shutdown()
            raise ModelLoadFailed(f"a Ray worker could not build the model: {e}") from None
        if len(set(versions)) != 1:
            self.shutdown()
            raise WorkersDisagree(f"Ray workers built different model versions {sorted(set(versions))}: every node "
                                  "must see the same weights, settings and MODEL_DIR")
        return versions[0]

    def replace(self, dead: Any) -> Any:
        """Kill `dead` (if it is not dead yet) and start a new actor in its place; the new one builds its model."""
        self.discard(dead)
        actor = self._start()
        self.actors.append(actor)
        return actor

    def discard(self, actor: Any) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        self.ray.kill(actor)

    def stats(self, actors: Sequence[Any]) -> list[WorkerStats]:
        """What each of `actors` did so far; actors that died meanwhile are left out."""
        stats = []
        for ref in [a.stats.remote() for a in actors]:
            try:
                stats.append(self.ray.get(ref))
            except self.ray.exceptions.RayActorError:
                continue
        return stats

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def distribute(pool: WorkerPool, items: Sequence[dict[str, Any]], name: Callable[[dict[str, Any]], str],
               on_result: Callable[[dict[str, Any], dict[str, Any]], None], summary: RaySummary,
               progress: bool = True) -> None:
    """Predict every task of `items` on the pool's actors; `on_result(task, prediction)` runs here, per answer.

    Each actor has IN_FLIGHT_PER_WORKER images in hand (one in the model, the others being fetched or
    waiting decoded), so it never waits for the driver or, when downloads are slower than the model, for
    one download at a time. A dead actor
    is replaced at once; the new one joins when its model is built and reports the run's version
    (one that cannot start or disagrees is dropped, not replaced again). Failures (error entries,
    `on_result` raising, an image that killed MAX_ATTEMPTS actors, no actor left) are recorded in
    `summary`, and the run goes on.
    """
    ray = pool.ray
    live = list(pool.actors)
    starting: dict[Any, Any] = {}  # model_version ref -> replacement actor still building its model
    queue: deque[tuple[int, int]] = deque((i, 0) for i in range(len(items)))  # (item index, actors it killed)
    in_flight: dict[Any, tuple[Any, int, int]] = {}  # ref -> (actor, item index, attempts)
    summary.workers = len(live)
    start = time.perf_counter()

    def fail(index: int, error: str) -> None:
        summary.failures.append(Failure(name(items[index]), error))
        log.warning("%s failed: %s", name(items[index]), error)

    def dispatch() -> None:
        """Top every live actor up to IN_FLIGHT_PER_WORKER images, one level at a time (a short list is shared)."""
        busy = {id(a): 0 for a in live}
        for a, _, _ in in_flight.values():
            busy[id(a)] = busy.get(id(a), 0) + 1
        for level in range(1, IN_FLIGHT_PER_WORKER + 1):
            for actor in live:
                if queue and busy[id(actor)] < level:
                    index, attempts = queue.popleft()
                    in_flight[actor.predict.remote(items[index])] = (actor, index, attempts)
                    busy[id(actor)] += 1

    def lost(actor: Any, error: Exception) -> None:
        if actor in live:
            live.remove(actor)
            summary.workers_lost += 1
            replacement = pool.replace(actor)
            starting[replacement.model_version.remote()] = replacement
            log.warning("a Ray worker died (%s); a new one is starting, its images go to the %d other(s) meanwhile",
                        type(error).__name__, len(live))

    def joined(ref: Any) -> None:
        actor = starting.pop(ref)
        try:
            version = ray.get(ref)
        except ray.exceptions.RayError as e:
            pool.discard(actor)
            log.warning("a replacement Ray worker could not start (%s); going on with %d", e, len(live))
            return
        if version != pool.version:
            pool.discard(actor)
            log.warning("a replacement Ray worker built model version %s instead of %s; going on with %d",
                        version, pool.version, len(live))
            return
        live.append(actor)
        summary.workers_replaced += 1

    with tqdm(total=len(items), desc="prelabel (ray)", unit="img", disable=not progress, dynamic_ncols=True) as bar, \
            (logging_redirect_tqdm() if progress else nullcontext()):
        dispatch()
        while in_flight or (queue and starting):
            (ref,), _ = ray.wait(list(in_flight) + list(starting), num_returns=1)
            if ref in starting:
                joined(ref)
                dispatch()
                continue
            actor, index, attempts = in_flight.pop(ref)
            try:
                prediction = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                lost(actor, e)
                if attempts + 1 >= MAX_ATTEMPTS:
                    fail(index, f"the image killed {attempts + 1} Ray workers")
                elif not (live or starting):
                    fail(index, "no Ray worker left")
                else:
                    summary.retried += 1
                    queue.append((index, attempts + 1))
                    dispatch()
                    continue
            except ray.exceptions.RayTaskError as e:  # the call raised (a bug, not a dead actor): this image fails
                fail(index, f"{type(e.cause).__name__}: {e.cause}")
            else:
                if "result" not in prediction:
                    fail(index, prediction.get("error", "prediction failed"))
                else:
                    try:
                        on_result(items[index], prediction)
                        summary.predicted += 1
                    except Exception as e:  # noqa: BLE001 - one bad record must not stop the run
                        fail(index, f"{type(e).__name__}: {e}")
            bar.update(1)
            bar.set_postfix(failed=len(summary.failures), refresh=False)
            dispatch()
        for index, _ in queue:  # left over only when every actor died and none could be started
            fail(index, "no Ray worker left")
    summary.seconds = time.perf_counter() - start
    summary.worker_stats = pool.stats(live)


# ----------------------------------------------------------------------------- the two modes
def prelabel_folder_on_ray(settings: Any, label_config: str, folder: str | Path, out_json: str | Path,
                           workers: int = 2, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                           document_root: str | Path | None = None, url_prefix: str = LOCAL_FILES_PREFIX,
                           progress: bool = True, pool: WorkerPool | None = None) -> RaySummary:
    """`backend.prelabel.prelabel_folder` on Ray actors; the folder must be at the same path on every node.

    `pool`: run on these actors (built for this label config, kept running) instead of starting `workers`.
    """
    from backend.label_config import parse_label_config

    targets = parse_label_config(label_config).targets
    if len(targets) != 1:
        raise ValueError(f"folder mode needs a label config with one <Image>, this one has {len(targets)}")
    data_key = targets[0].data_key
    folder = Path(folder)
    root = Path(document_root) if document_root is not None else folder.resolve().parent
    images = list_images(folder)
    urls = {p.resolve().as_uri(): image_url(p, root, url_prefix) for p in images}
    out = ImportFile(out_json, data_key)
    with nullcontext(pool) if pool is not None else \
            WorkerPool(settings, label_config, None, workers, gpus_per_worker, cpus_per_worker) as actors:
        todo = [{"id": None, "data": {data_key: uri}} for uri, url in urls.items() if not out.done(url, actors.version)]
        summary = RaySummary(total=len(images), skipped=len(images) - len(todo), model_version=actors.version)
        try:
            distribute(actors, todo, lambda t: urls[t["data"][data_key]],
                       lambda t, p: out.add(urls[t["data"][data_key]], p), summary, progress)
        finally:
            out.write()
    log.info("import JSON with %d task(s) written to %s", len(out.tasks), out.path)
    return summary


def prelabel_project_on_ray(settings: Any, client: Any, project_id: int, workers: int = 2,
                            gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                            progress: bool = True, pool: WorkerPool | None = None) -> RaySummary:
    """`backend.prelabel.prelabel_project` on Ray actors; predictions are written in batches (PredictionWriter).

    `pool`: run on these actors (built for this project and its label config, kept running) instead of
    starting `workers`.
    """
    project = client.projects.get(id=project_id)
    tasks = project_tasks(client, project_id)
    with nullcontext(pool) if pool is not None else WorkerPool(
            settings, project.label_config, str(project_id), workers, gpus_per_worker, cpus_per_worker) as pool:
        todo = [t for t in tasks if not _has_version(t.get("predictions"), pool.version)]
        summary = RaySummary(total=len(tasks), skipped=len(tasks) - len(todo), model_version=pool.version)
        writer = PredictionWriter(client, project_id)
        try:
            distribute(pool, todo, lambda t: f"task {t['id']}", writer.add, summary, progress)
        finally:
            writer.flush()
            summary.predicted -= len(writer.failures)
            summary.failures += writer.failures
    return summary


# ----------------------------------------------------------------------------- command line
def run_command(args: Any, settings: Any, client: Any, label_config: str | None) -> RaySummary:
    """`odise-ls prelabel --ray`: connect to the cluster, then run the mode the flags ask for."""
    connect(args.ray)
    options = dict(workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                   progress=not args.no_progress)
    if client is not None:
        return prelabel_project_on_ray(settings, client, args.project, **options)
    return prelabel_folder_on_ray(settings, label_config, args.folder, args.out, document_root=settings.document_root,
                                  url_prefix=args.url_prefix, **options)
