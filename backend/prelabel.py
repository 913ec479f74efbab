"""Batch pre-labeling: a whole Label Studio project, or a folder of images into an import JSON.

Predictions are made by the same `backend.model.ODISEBackend` the server uses (same results,
same model version string). Both modes are resumable (a task or image that already has a
prediction of this model version is skipped), show a progress bar, list per-image failures
without stopping, and overlap image fetching with compute: a small thread pool reads images
ahead into the backend's image cache while the model works on the current one (backend.batch). Ctrl-C
stops a run cleanly: the image in flight is abandoned, what was done is kept (Label Studio predictions, or
the folder mode's journal) and the summary says how to resume. The command line: backend.prelabel_cli.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

from backend.batch import Failure, PredictionError, PrelabelSummary, Progress, run_overlapped

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LOCAL_FILES_PREFIX = "/data/local-files/?d="
WRITE_BATCH = 32  # predictions per Label Studio import request


def _has_version(predictions: Iterable[dict[str, Any]] | None, model_version: str) -> bool:
    return any(p.get("model_version") == model_version for p in predictions or [])


class _Runner:
    """Prefetch and predict Label Studio task dicts with an ODISEBackend."""

    def __init__(self, backend: Any, config: Any, model: Any, version: str):
        self.backend, self.config, self.model, self.version = backend, config, model, version

    def fetch(self, task: dict[str, Any]) -> None:
        """Warm the backend's image cache with every image of the task."""
        data = task.get("data") or {}
        for target in self.config.targets:
            if target.data_key in data:
                self.backend.fetcher.fetch(data[target.data_key], task_id=task.get("id"))

    def predict(self, task: dict[str, Any]) -> dict[str, Any]:
        prediction = self.backend.predict_task(task, self.config, self.model, self.version)
        if "result" not in prediction:
            raise PredictionError(prediction.get("error", "prediction failed"))
        return prediction


# ----------------------------------------------------------------------------- folder mode
def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_url(path: Path, document_root: Path, url_prefix: str = LOCAL_FILES_PREFIX) -> str:
    """The URL Label Studio serves `path` at: the prefix plus the path relative to its document root."""
    try:
        rel = path.resolve().relative_to(document_root.resolve())
    except ValueError:
        raise ValueError(f"{path} is not under the document root {document_root}; pass --document-root "
                         "(Label Studio's LOCAL_FILES_DOCUMENT_ROOT on this machine)") from None
    return url_prefix + quote(rel.as_posix(), safe="/")


class ImportFile:
    """A Label Studio import JSON plus an append-only journal, so an interrupted run loses at most one image."""

    def __init__(self, path: str | Path, data_key: str):
        self.path = Path(path)
        self.data_key = data_key
        self.journal = self.path.with_name(self.path.name + ".partial.jsonl")
        self.tasks: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for task in json.loads(self.path.read_text()):
                self.tasks[task["data"][data_key]] = task
        if self.journal.exists():
            self._load_journal()

    def _load_journal(self) -> None:
        """Merge the journal; a last line cut short (killed mid-write) is dropped from the file."""
        lines = [line for line in self.journal.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.journal} line {i + 1} is not JSON; delete the line or the file") from None
                log.warning("%s: dropping a last line cut short by an interruption", self.journal)
                self.journal.write_text("".join(good + "\n" for good in lines[:-1]))
                continue
            self._merge(entry)

    def _merge(self, entry: dict[str, Any]) -> None:
        task = self.tasks.setdefault(entry["url"], {"data": {self.data_key: entry["url"]}, "predictions": []})
        task.setdefault("predictions", []).append(entry["prediction"])

    def add(self, url: str, prediction: dict[str, Any]) -> None:
        entry = {"url": url, "prediction": prediction}
        self._merge(entry)
        with self.journal.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def done(self, url: str, model_version: str) -> bool:
        return _has_version(self.tasks.get(url, {}).get("predictions"), model_version)

    def write(self) -> None:
        """Write the JSON atomically and drop the journal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(list(self.tasks.values()), indent=1))
        tmp.replace(self.path)
        self.journal.unlink(missing_ok=True)


def prelabel_folder(backend: Any, label_config: str, folder: str | Path, out_json: str | Path,
                    document_root: str | Path | None = None, url_prefix: str = LOCAL_FILES_PREFIX,
                    workers: int = 2, prefetch: int = 4, progress: bool = True) -> PrelabelSummary:
    """Predict every image of `folder` into a Label Studio import JSON (tasks with predictions).

    Images are referenced as `url_prefix + path relative to document_root` (default: the folder's
    parent), which is how Label Studio serves local files. An existing output is extended.
    """
    config = backend.parse_config(label_config)
    if len(config.targets) != 1:
        raise ValueError(f"folder mode needs a label config with one <Image>, this one has {len(config.targets)}")
    data_key = config.targets[0].data_key
    version, model = backend.model_for(None)
    folder = Path(folder)
    root = Path(document_root) if document_root is not None else folder.resolve().parent
    out = ImportFile(out_json, data_key)
    images = list_images(folder)
    # Read by the backend as file:// URIs, referenced in the output by their Label Studio URL.
    urls = {p.resolve().as_uri(): image_url(p, root, url_prefix) for p in images}
    todo = [{"id": None, "data": {data_key: uri}} for uri, url in urls.items() if not out.done(url, version)]
    summary = PrelabelSummary(total=len(images), skipped=len(images) - len(todo), model_version=version)
    runner = _Runner(backend, config, model, version)

    def compute(task: dict[str, Any], _: None) -> None:
        out.add(urls[task["data"][data_key]], runner.predict(task))

    try:
        summary.record(run_overlapped(todo, runner.fetch, compute, name=lambda t: urls[t["data"][data_key]],
                                      workers=workers, prefetch=prefetch, progress=progress))
    except BaseException:
        out.write()  # a crash keeps what was done, in the JSON
        raise
    if summary.interrupted:  # leave no half-written JSON behind; the journal holds every finished image
        summary.resume = f"The {summary.predicted} image(s) done are kept in {out.journal}."
        return summary
    out.write()
    log.info("import JSON with %d task(s) written to %s", len(out.tasks), out.path)
    return summary


# ----------------------------------------------------------------------------- project mode
def project_tasks(client: Any, project_id: int) -> list[dict[str, Any]]:
    """All tasks of a project with their predictions, as plain dicts."""
    out = []
    for task in client.tasks.list(project=project_id, fields="all"):
        out.append(task.model_dump() if hasattr(task, "model_dump") else dict(task))
    return out


class PredictionWriter:
    """Predictions sent to a Label Studio project in batches; a failed batch is listed in `failures`, not raised.

    `on_written(batch)` runs after each batch Label Studio accepted, with its (task, prediction) pairs.
    """

    def __init__(self, client: Any, project_id: int, batch: int = WRITE_BATCH,
                 on_written: Callable[[list[tuple[dict[str, Any], dict[str, Any]]]], None] | None = None):
        self.client, self.project_id, self.batch, self.on_written = client, project_id, max(1, batch), on_written
        self.pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.failures: list[Failure] = []

    def add(self, task: dict[str, Any], prediction: dict[str, Any]) -> None:
        self.pending.append((task, prediction))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        from label_studio_sdk import PredictionRequest

        batch, self.pending = self.pending, []
        if not batch:
            return
        request = [PredictionRequest(task=int(t["id"]), result=p["result"], score=p.get("score"),
                                     model_version=p["model_version"]) for t, p in batch]
        try:
            self.client.projects.import_predictions(id=self.project_id, request=request)
        except Exception as e:  # noqa: BLE001 - listed; the tasks have no prediction, so the next run redoes them
            self.failures += [Failure(f"task {t['id']}", f"writing to Label Studio failed: {type(e).__name__}: {e}")
                              for t, _ in batch]
            log.warning("writing %d prediction(s) to Label Studio failed: %s", len(batch), e)
            return
        if self.on_written is not None:
            self.on_written(batch)


def prelabel_project(backend: Any, client: Any, project_id: int, workers: int = 2, prefetch: int = 4,
                     progress: bool = True) -> PrelabelSummary:
    """Create a prediction on every task of the project that has none of the serving model version.

    The label config is read from the project; the model is the project's promoted fine-tune if
    there is one (as the server would use), else the base model.
    """
    project = client.projects.get(id=project_id)
    version, model = backend.model_for(str(project_id))
    return prelabel_tasks(backend, client, project_id, project.label_config, project_tasks(client, project_id),
                          version, model, workers=workers, prefetch=prefetch, progress=progress)


def prelabel_tasks(backend: Any, client: Any, project_id: int, label_config: str, tasks: list[dict[str, Any]],
                   version: str, model: Any, workers: int = 2, prefetch: int = 4, progress: bool = True,
                   writer: PredictionWriter | None = None, stop: Callable[[], bool] | None = None,
                   on_item: Callable[[PrelabelSummary], None] | None = None) -> PrelabelSummary:
    """Predict `tasks` of the project that have no prediction of `version` with `model`, written in batches.

    `writer` (default: a plain PredictionWriter) sends the predictions; `stop` and `on_item` are
    run_overlapped's (cancellation, and a live summary after every task).
    """
    config = backend.parse_config(label_config)
    todo = [t for t in tasks if not _has_version(t.get("predictions"), version)]
    summary = PrelabelSummary(total=len(tasks), skipped=len(tasks) - len(todo), model_version=version)
    runner = _Runner(backend, config, model, version)
    writer = writer or PredictionWriter(client, project_id)

    def compute(task: dict[str, Any], _: None) -> None:
        writer.add(task, runner.predict(task))

    def report(progress: Progress) -> None:
        summary.record(progress)
        if on_item is not None:
            on_item(summary)

    try:
        report(run_overlapped(todo, runner.fetch, compute, name=lambda t: f"task {t['id']}", workers=workers,
                              prefetch=prefetch, progress=progress, stop=stop, on_item=report))
    finally:
        writer.flush()
    summary.predicted -= len(writer.failures)
    summary.failures += writer.failures
    if summary.interrupted:
        summary.resume = f"The {summary.predicted} prediction(s) made are saved in project {project_id}."
    return summary
