"""One active-learning round on this CPU: the first pass over a handful of photos (cold backbone feature
cache), a short fine-tune that is promoted, the second pass with the promoted model (warm cache), and
the server refreshing N Label Studio tasks to the promoted version.

    PYTHONPATH=. python benchmarks/al_round.py                       # full odise-label-coco, random weights
    PYTHONPATH=. python benchmarks/al_round.py --preset tiny --images 2 --tasks 2 --json   # quick run

The model is built with random weights (cost does not depend on weight values) at the preset's own
resolution (1024 shortest edge on the full preset), with the reference demo's overlap threshold (0.0:
random weights otherwise leave too few regions to fine-tune on), and predicts with COCO's 133 classes through the
serving path: `ODISEBackend.predict_task` with the model serving the project, the same call the
server's /predict and its refresh make. The fine-tune is a real job of the backend's JobManager on
pseudo-labels (the first pass's own segments, or two half-image regions where random weights found none); when its held-out figures do not beat the base model
(random weights), the new version is promoted by hand the way `odise-ls models --rollback` does, and
the report says which happened. The refresh runs through the HTTP server (POST /refresh, the code a
promotion starts) against a real Label Studio started from the project's .venv-ls (or
$LABEL_STUDIO_BIN), whose tasks hold the first pass's predictions; without Label Studio that part is
reported as not measured.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image
from skimage import data as skdata
from werkzeug.serving import make_server

from backend.app import create_app
from backend.label_config import make_label_config
from backend.learning.refresh import own_version
from backend.ls_format import image_regions
from backend.model import ODISEBackend
from backend.settings import BackendSettings
from backend.training_data import TrainingData, build_training_data
from odise_core.types import Segment
from odise_core.vocabulary import Vocabulary
from serving import load_backend  # benchmarks/, the script's own directory

log = logging.getLogger("al_round")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _photos(n: int, folder: Path) -> list[Path]:
    """`n` scikit-image photos as PNG files (RGB), cycling through PHOTOS."""
    paths = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        image = getattr(skdata, name)()
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        path = folder / f"{i:02d}-{name}.png"
        path.write_bytes(_png(np.ascontiguousarray(image)))
        paths.append(path)
    return paths


def _pass(backend: ODISEBackend, project: str, config: Any, paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """Predict every image with the model serving `project`: (per-image figures, predictions)."""
    version, model = backend.model_for(project)
    cache = model.feature_cache
    rows, predictions = [], []
    for path in paths:
        before = cache.stats()
        t0 = time.perf_counter()
        prediction = backend.predict_task({"id": None, "data": {"image": str(path)}}, config, model, version)
        seconds = time.perf_counter() - t0
        after = cache.stats()
        if "result" not in prediction:
            raise SystemExit(f"{path.name}: {prediction['error']}")
        rows.append({"image": path.name, "seconds": round(seconds, 3), "regions": len(prediction["result"]),
                     "cache": "hit" if after.hits > before.hits and after.misses == before.misses else "miss"})
        predictions.append(prediction)
        log.info("%s %s: %.2f s (%s)", version, path.name, seconds, rows[-1]["cache"])
    return rows, predictions


def _halves(backend: ODISEBackend, target: Any, path: Path) -> list[dict]:
    """Two regions (top half: the first class, bottom half: the second) for an image the random model left
    without regions: the fine-tune's cost does not depend on what its masks say, only that it has some."""
    width, height = Image.open(path).size
    top = np.zeros((height, width), dtype=bool)
    top[: height // 2] = True
    segments = [Segment(mask=top, class_index=0, score=1.0, is_thing=bool(target.vocabulary.is_thing[0])),
                Segment(mask=~top, class_index=1, score=1.0, is_thing=bool(target.vocabulary.is_thing[1]))]
    return image_regions(segments, target.controls, target.label_of, backend.settings.result)


def _train_and_promote(backend: ODISEBackend, project: str, config: Any, paths: list[Path],
                       predictions: list[dict]) -> dict:
    """A short fine-tune job on the first pass's predictions taken as annotations (pseudo-labels), read
    back to masks the way annotations are; promoted by the job's rule, else by hand."""
    target = config.targets[0]
    tasks = [{"id": i + 1, "data": {target.data_key: str(path)}, "annotations": [
        {"result": prediction["result"] or _halves(backend, target, path), "was_cancelled": False}]}
        for i, (path, prediction) in enumerate(zip(paths, predictions))]

    def fetch(holdout_fraction: float) -> TrainingData:
        return build_training_data(tasks, target.vocabulary.names,
                                   lambda task: backend.fetcher.fetch(task["data"][target.data_key]),
                                   is_thing=[bool(t) for t in target.vocabulary.is_thing],
                                   holdout_fraction=holdout_fraction, from_names=[c.name for c in target.controls])

    t0 = time.perf_counter()
    job = backend.jobs.submit(project, fetch, lambda: backend.serving.get(project), target.vocabulary)
    job.wait()
    seconds = time.perf_counter() - t0
    if job.state != "done":
        raise SystemExit(f"fine-tune job ended {job.state}: {job.message}")
    by_hand = not job.promoted
    if by_hand:  # as `odise-ls models --rollback VERSION` does: the server serves it from its next request
        backend.jobs.store.promote(project, job.version)
    return {"version": job.version, "promoted_by_rule": not by_hand, "job_seconds": round(seconds, 1),
            "steps": job.total_steps, "message": job.message}


def _refresh_through_server(backend: ODISEBackend, project: str, label_config: str, paths: list[Path],
                            predictions: list[dict], tasks: int, ls: Any) -> dict:
    """Tasks in Label Studio holding the base model's predictions, refreshed by POST /refresh; timed."""
    api, url = ls.api(), ls.url
    files = [(f"file{i}", (f"task{i:03d}.png", paths[i % len(paths)].read_bytes(), "image/png"))
             for i in range(tasks)]
    r = api.post(f"{url}/api/projects/{project}/import", files=files, timeout=600)
    r.raise_for_status()
    listed = api.get(f"{url}/api/tasks", params={"project": project, "page_size": tasks + 10}, timeout=60).json()
    ids = sorted(t["id"] for t in listed["tasks"])
    old = [{"task": tid, "result": predictions[i % len(predictions)]["result"],
            "score": predictions[i % len(predictions)]["score"], "model_version": backend.base_version}
           for i, tid in enumerate(ids)]
    api.post(f"{url}/api/projects/{project}/import/predictions", json=old, timeout=600).raise_for_status()
    api.patch(f"{url}/api/projects/{project}", json={"model_version": backend.base_version}, timeout=60)
    backend.fetcher.configure(url, ls.personal_token)
    server = make_server("127.0.0.1", 0, create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        r = requests.post(f"http://127.0.0.1:{server.port}/refresh", json={"project": int(project)}, timeout=60)
        r.raise_for_status()
        job = backend.refresher.find(r.json()["id"])
        job.wait()
        seconds = time.perf_counter() - t0
        status = requests.post(f"http://127.0.0.1:{server.port}/job_status", json={"job": job.id}, timeout=60).json()
    finally:
        server.shutdown()
    stored = api.get(f"{url}/api/predictions", params={"project": project}, timeout=60).json()
    versions = sorted({p["model_version"] for p in stored if own_version(p["model_version"], backend.base_version,
                                                                         project)})
    return {"tasks": tasks, "seconds": round(seconds, 2), "seconds_per_task": round(seconds / tasks, 3),
            "state": status["state"], "done": status["step"], "total": status["total_steps"],
            "images_per_second": status["metrics"].get("images_per_second"),
            "failed": status["metrics"].get("failed"), "deleted": status["metrics"].get("deleted"),
            "versions_after": versions}


def _label_studio(root: Path) -> Any:
    """A running Label Studio (context manager) or None when none is installed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ is not installed
    from tests.e2e.label_studio import find_label_studio, running_label_studio

    binary = find_label_studio()
    if binary is None:
        return None
    data_dir = root / "label-studio"
    data_dir.mkdir()
    return running_label_studio(binary, data_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="odise-label-coco", help="odise-label-coco (default) or tiny")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--feature-cache-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--images", type=int, default=4, help="photos in each pass")
    ap.add_argument("--tasks", type=int, default=None, help="Label Studio tasks refreshed (default: --images)")
    ap.add_argument("--steps", type=int, default=2, help="fine-tune steps")
    ap.add_argument("--no-label-studio", action="store_true", help="skip the refresh through Label Studio")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="odise-al-round-"))
    vocab = Vocabulary.coco_panoptic()
    label_config = make_label_config(vocab, kind="polygon")
    ls_context = None if args.no_label_studio else _label_studio(root)
    ls = ls_context.__enter__() if ls_context is not None else None
    try:
        project = "1"
        if ls is not None:  # the fine-tune is stored under the Label Studio project's id
            r = ls.api().post(f"{ls.url}/api/projects", json={"title": "al round", "label_config": label_config},
                              timeout=60)
            r.raise_for_status()
            project = str(r.json()["id"])
        settings = BackendSettings.from_env({}, preset=args.preset, device="cpu", precision=args.precision,
                                            random_weights=True, overlap_threshold=0.0,  # random weights: regions
                                            model_dir=root / "models", feature_cache_dtype=args.feature_cache_dtype,
                                            refresh_on_promote="false", steps=args.steps, views_per_image=1,
                                            batch_size=1)
        backend, build_seconds = load_backend(settings)
        config = backend.parse_config(label_config)
        paths = _photos(args.images, root)
        first, predictions = _pass(backend, project, config, paths)
        stats = backend.model.feature_cache.stats()
        finetune = _train_and_promote(backend, project, config, paths, predictions)
        second, _ = _pass(backend, project, config, paths)
        refresh = (_refresh_through_server(backend, project, label_config, paths, predictions,
                                           args.tasks or args.images, ls) if ls is not None else None)
        backend.shutdown(timeout=60)
    finally:
        if ls_context is not None:
            ls_context.__exit__(None, None, None)
    first_s = statistics.median(r["seconds"] for r in first)
    second_s = statistics.median(r["seconds"] for r in second)
    report = {
        "preset": args.preset, "precision": settings.resolved_precision(), "cache_storage": args.feature_cache_dtype,
        "classes": len(vocab), "build_seconds": round(build_seconds, 1), "first_pass": first, "second_pass": second,
        "first_median_s": first_s, "second_median_s": second_s, "ratio": round(first_s / second_s, 2),
        "cache_entries": stats.entries, "cache_bytes": stats.bytes,
        "bytes_per_cached_image": stats.bytes // len(paths), "finetune": finetune, "refresh": refresh,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"preset {args.preset}, precision {report['precision']}, cache storage {args.feature_cache_dtype}, "
          f"{len(vocab)} classes, model built in {build_seconds:.1f} s")
    for a, b in zip(first, second):
        print(f"  {a['image']:<28} first pass {a['seconds']:8.2f} s ({a['cache']})   "
              f"after promotion {b['seconds']:8.2f} s ({b['cache']})")
    print(f"median per image: first {first_s:.2f} s, after promotion {second_s:.2f} s: {report['ratio']:.2f}x cheaper")
    print(f"feature cache after the first pass: {stats.entries} entries (backbone features and MaskCLIP stream of "
          f"each image), {stats.bytes} bytes, {report['bytes_per_cached_image']} bytes per cached image")
    print(f"fine-tune {finetune['version']} ({finetune['steps']} steps, {finetune['job_seconds']} s): promoted "
          f"{'by the promotion rule' if finetune['promoted_by_rule'] else 'by hand (it did not beat the base model)'}")
    if refresh is None:
        print("refresh through the server: not measured (no Label Studio: run ./dev setup, or LABEL_STUDIO_BIN)")
    else:
        print(f"refresh through the server: {refresh['tasks']} tasks in {refresh['seconds']:.2f} s "
              f"({refresh['seconds_per_task']:.2f} s per task, job {refresh['state']} {refresh['done']}/"
              f"{refresh['total']}, {refresh['failed']} failed, {refresh['deleted']} older predictions deleted)")


if __name__ == "__main__":
    main()
