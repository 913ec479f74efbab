"""Pre-labeling spread over Ray actors, each holding one model: `odise-ls prelabel ... --ray [ADDRESS]`.

Same sources, outputs, resumability and failure listing as `backend.prelabel`: the driver lists
the work (project tasks without a prediction of the serving model version, or folder images not
yet in the import JSON), hands one image at a time to `PrelabelWorker` actors, and records every
answer itself (import JSON journal, or predictions sent to Label Studio in batches). Actors build
their model once with `backend.settings.build_model` through `ODISEBackend`, exactly as the
single-process path does, and fetch their images themselves (Label Studio credentials travel in
the pickled settings, whose repr hides the key). An image whose actor dies is handed to another
actor; an image that kills two actors is listed as failed. Ray is imported lazily: it is the
optional extra `odise-label-studio[ray]`.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from backend.batch import Failure, PrelabelSummary
from backend.prelabel import (LOCAL_FILES_PREFIX, ImportFile, PredictionWriter, _has_version, _Runner, image_url,
                              list_images, project_tasks)

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # the next image waits in the actor's queue while the current one runs
MAX_ATTEMPTS = 2  # an image that killed this many actors is listed as failed instead of killing more
ACTOR_PREFIX = "odise-prelabel"


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


class PrelabelWorker:
    """One model in one Ray actor: the single-process path's backend, config and model, built once."""

    def __init__(self, settings: Any, label_config: str, project: str | None):
        from backend.model import ModelLoadFailed, ODISEBackend

        logging.getLogger("backend.model").setLevel(logging.WARNING)  # a line per task would flood the driver
        backend = ODISEBackend(settings)
        backend.start_loading(background=False)
        if backend.error:
            raise ModelLoadFailed(backend.error)
        version, model = backend.model_for(project)
        self.runner = _Runner(backend, backend.parse_config(label_config), model, version)

    def model_version(self) -> str:
        return self.runner.version

    def predict(self, task: dict[str, Any]) -> dict[str, Any]:
        """The prediction of `task`, or an entry with "error" and no "result" (never raises for one image)."""
        return self.runner.backend.predict_task(task, self.runner.config, self.runner.model, self.runner.version)


@dataclass
class RaySummary(PrelabelSummary):
    """A Ray run: the single-process summary plus how many actors ran, died, and images handed on."""

    workers: int = 0
    workers_lost: int = 0
    retried: int = 0

    def format(self) -> str:
        return (super().format() + f"\n{self.workers} Ray worker(s), {self.workers_lost} lost, "
                f"{self.retried} image(s) retried on another worker")


class WorkerPool:
    """The run's actors: started with the resources asked for, named so they can be found in the cluster."""

    def __init__(self, settings: Any, label_config: str, project: str | None, workers: int,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        ray = import_ray()
        self.ray = ray
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(PrelabelWorker)
        run = uuid.uuid4().hex[:8]
        self.actors = [remote.options(name=f"{ACTOR_PREFIX}-{run}-{i}").remote(settings, label_config, project)
                       for i in range(workers)]
        self.version = self._agreed_version()

    def _agreed_version(self) -> str:
        from backend.model import ModelLoadFailed

        try:
            versions = self.ray.get([a.model_version.remote() for a in self.actors])
        except self.ray.exceptions.RayError as e:
            self.shutdown()
            raise ModelLoadFailed(f"a Ray worker could not build the model: {e}") from None
        if len(set(versions)) != 1:
            raise WorkersDisagree(f"Ray workers built different model versions {sorted(set(versions))}: every node "
                                  "must see the same weights, settings and MODEL_DIR")
        return versions[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def distribute(pool: WorkerPool, items: Sequence[dict[str, Any]], name: Callable[[dict[str, Any]], str],
               on_result: Callable[[dict[str, Any], dict[str, Any]], None], summary: RaySummary,
               progress: bool = True) -> None:
    """Predict every task of `items` on the pool's actors; `on_result(task, prediction)` runs here, per answer.

    Failures (error entries, `on_result` raising, an image that killed MAX_ATTEMPTS actors, no actor
    left) are recorded in `summary`, and the run goes on.
    """
    ray = pool.ray
    live = list(pool.actors)
    queue: deque[tuple[int, int]] = deque((i, 0) for i in range(len(items)))  # (item index, actors it killed)
    in_flight: dict[Any, tuple[Any, int, int]] = {}  # ref -> (actor, item index, attempts)
    summary.workers = len(live)
    start = time.perf_counter()

    def fail(index: int, error: str) -> None:
        summary.failures.append(Failure(name(items[index]), error))
        log.warning("%s failed: %s", name(items[index]), error)

    def dispatch() -> None:
        for actor in live:
            busy = sum(1 for a, _, _ in in_flight.values() if a is actor)
            while queue and busy < IN_FLIGHT_PER_WORKER:
                index, attempts = queue.popleft()
                in_flight[actor.predict.remote(items[index])] = (actor, index, attempts)
                busy += 1

    with tqdm(total=len(items), desc="prelabel (ray)", unit="img", disable=not progress, dynamic_ncols=True) as bar, \
            (logging_redirect_tqdm() if progress else nullcontext()):
        dispatch()
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, index, attempts = in_flight.pop(ref)
            try:
                prediction = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if actor in live:
                    live.remove(actor)
                    summary.workers_lost += 1
                    log.warning("a Ray worker died (%s); its images go to the %d other(s)", type(e).__name__, len(live))
                if attempts + 1 >= MAX_ATTEMPTS:
                    fail(index, f"the image killed {attempts + 1} Ray workers")
                elif not live:
                    fail(index, "no Ray worker left")
                else:
                    summary.retried += 1
                    queue.append((index, attempts + 1))
                    dispatch()
                    continue
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
        for index, _ in queue:  # left over only when every actor died
            fail(index, "no Ray worker left")
    summary.seconds = time.perf_counter() - start


# ----------------------------------------------------------------------------- the two modes
def prelabel_folder_on_ray(settings: Any, label_config: str, folder: str | Path, out_json: str | Path,
                           workers: int = 2, gpus_per_worker: float = 0.0, document_root: str | Path | None = None,
                           url_prefix: str = LOCAL_FILES_PREFIX, progress: bool = True) -> RaySummary:
    """`backend.prelabel.prelabel_folder` on Ray actors; the folder must be at the same path on every node."""
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
    pool = WorkerPool(settings, label_config, None, workers, gpus_per_worker)
    try:
        todo = [{"id": None, "data": {data_key: uri}} for uri, url in urls.items() if not out.done(url, pool.version)]
        summary = RaySummary(total=len(images), skipped=len(images) - len(todo), model_version=pool.version)
        try:
            distribute(pool, todo, lambda t: urls[t["data"][data_key]],
                       lambda t, p: out.add(urls[t["data"][data_key]], p), summary, progress)
        finally:
            out.write()
    finally:
        pool.shutdown()
    log.info("import JSON with %d task(s) written to %s", len(out.tasks), out.path)
    return summary


def prelabel_project_on_ray(settings: Any, client: Any, project_id: int, workers: int = 2,
                            gpus_per_worker: float = 0.0, progress: bool = True) -> RaySummary:
    """`backend.prelabel.prelabel_project` on Ray actors; predictions are written in batches (PredictionWriter)."""
    project = client.projects.get(id=project_id)
    tasks = project_tasks(client, project_id)
    pool = WorkerPool(settings, project.label_config, str(project_id), workers, gpus_per_worker)
    try:
        todo = [t for t in tasks if not _has_version(t.get("predictions"), pool.version)]
        summary = RaySummary(total=len(tasks), skipped=len(tasks) - len(todo), model_version=pool.version)
        writer = PredictionWriter(client, project_id)
        try:
            distribute(pool, todo, lambda t: f"task {t['id']}", writer.add, summary, progress)
        finally:
            writer.flush()
            summary.predicted -= len(writer.failures)
            summary.failures += writer.failures
    finally:
        pool.shutdown()
    return summary


# ----------------------------------------------------------------------------- command line
def run_command(args: Any, settings: Any, client: Any, label_config: str | None) -> RaySummary:
    """`odise-ls prelabel --ray`: connect to the cluster, then run the mode the flags ask for."""
    connect(args.ray)
    options = dict(workers=args.workers, gpus_per_worker=args.gpus_per_worker, progress=not args.no_progress)
    if client is not None:
        return prelabel_project_on_ray(settings, client, args.project, **options)
    return prelabel_folder_on_ray(settings, label_config, args.folder, args.out, document_root=settings.document_root,
                                  url_prefix=args.url_prefix, **options)
