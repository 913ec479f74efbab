"""Pre-labeling throughput on Ray: 1 vs N model-holding actors against the single-process path.

Folder mode on generated images (random pixels; cost does not depend on content), local Ray
cluster. Every model is built and warmed on one extra image before anything is timed; the single
process runs in this process with as many torch threads as one actor (`--cpus-per-worker`), on
the same images, in the same run. The feature cache is off unless `--feature-cache`: every pass
sees the same images, so with it on only the first pass would run the backbone and the later ones
would measure re-prediction from cached features, not the first pass a new dataset gets. With `--repeat R` the runs are interleaved (round r starts at
a different configuration), so a slow spell on a shared machine hits every configuration; each
figure is then the median over the rounds, and ratios are taken within a round.

With `--fetch-delay S` the images are served by a local HTTP server (127.0.0.1) that answers each
request S seconds late, like a slow image store; both paths then fetch every image over HTTP (each
run under new URLs, so no cache helps) and overlap downloads with the model: the single process
with its read-ahead threads, each actor with its threaded calls.

Printed per configuration: images/s, the actors' CPU seconds per image, the cores they got (CPU
seconds per second: on a shared machine, what bounds the ratio), how busy they were (share of the
wall time spent in the model) and the model's seconds per image, and for Ray the driver's CPU per
image. Also the
actors' start-up (model build), their peak RSS, the ratio of N workers to 1, and the 1-worker run's
wall-clock overhead per image over the single process (dispatch, transfer and bookkeeping that
the actor's queue does not hide).

    PYTHONPATH=. python benchmarks/prelabel_scaling.py                       # tiny, 16 images, 1 and 2 workers
    PYTHONPATH=. python benchmarks/prelabel_scaling.py --repeat 3            # interleaved rounds (shared machine)
    PYTHONPATH=. python benchmarks/prelabel_scaling.py --images 2 --json     # smoke run
    PYTHONPATH=. python benchmarks/prelabel_scaling.py --workers 1 --fetch-delay 0.5   # images from a slow host
    PYTHONPATH=. python benchmarks/prelabel_scaling.py --preset odise-label-coco --random-weights \\
        --workers 1 --cpus-per-worker 2 --images 3 --no-single             # memory and speed of one full actor

Actors run at normal priority (RAY_worker_niceness=0) so that they compete with the single
process on equal terms, and Ray's memory monitor is off (other jobs' memory must not get them
killed). Note the load average printed at the start and end: figures are wall clock.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from backend.batch import PrelabelSummary, run_overlapped
from backend.label_config import make_label_config
from backend.model import ODISEBackend
from backend.prelabel import _Runner, prelabel_folder
from backend.ray_prelabel import RaySummary, WorkerPool, distribute, import_ray, prelabel_folder_on_ray, thread_count
from backend.settings import BackendSettings
from odise_core.vocabulary import Vocabulary

LABELS = "person,cat,dog,car,tree,sky,grass,road"


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = [folder / f"img{i:04d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)).save(path)
    return paths


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def progress(line: str) -> None:
    """A line on stderr as each step ends: a full-preset run takes long, and what ended is worth knowing."""
    print(f"[{time.strftime('%H:%M:%S')}, load {load()}] {line}", file=sys.stderr, flush=True)


class SlowHost:
    """The files of `folder` over HTTP on 127.0.0.1, each answer `delay` seconds late; counts the downloads.

    Any path ending in a file's name serves that file, so each run can use URLs of its own.
    """

    def __init__(self, folder: Path, delay: float):
        self.served: list[str] = []  # appended to by the server's threads (list.append is atomic)

        @Request.application
        def app(request: Request) -> Response:
            time.sleep(delay)
            file = folder / request.path.rsplit("/", 1)[-1]
            if not file.is_file():
                return Response("no such image", 404)
            self.served.append(request.path)
            return Response(file.read_bytes(), mimetype="image/png")

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Bench:
    """The models (one single-process backend, one actor pool per worker count) and the timed runs."""

    def __init__(self, args: argparse.Namespace, root: Path):
        self.args, self.root = args, root
        self.folder = root / "images"
        self.images = make_images(self.folder, args.images, args.size)
        self.host = SlowHost(self.folder, args.fetch_delay) if args.fetch_delay > 0 else None
        warm = make_images(root / "warm", 1, args.size, seed=1)[0]
        self.warm_task = {"id": None, "data": {"image": warm.resolve().as_uri()}}
        self.xml = make_label_config(Vocabulary.from_text(LABELS), kind="polygon")
        env = {} if args.feature_cache else {"FEATURE_CACHE_MB": "0"}
        self.settings = BackendSettings.from_env(env, preset=args.preset, device="cpu", fast=args.fast,
                                                 random_weights=args.random_weights, model_dir=root / "models")
        self.runs = 0
        self.backend: ODISEBackend | None = None
        self.pools: dict[int, WorkerPool] = {}
        self.startup: dict[int, float] = {}
        self.first_image: dict[int, float] = {}

    def build_single(self) -> None:
        self.backend = ODISEBackend(self.settings)
        self.backend.start_loading(background=False)
        if self.backend.error:
            raise SystemExit(self.backend.error)
        version, model = self.backend.model_for(None)
        self.backend.predict_task(self.warm_task, self.backend.parse_config(self.xml), model, version)

    def build_pool(self, workers: int) -> None:
        t0 = time.perf_counter()
        pool = WorkerPool(self.settings, self.xml, None, workers, cpus_per_worker=self.args.cpus_per_worker)
        self.startup[workers] = time.perf_counter() - t0
        progress(f"{workers} actor(s) built their models in {self.startup[workers]:.1f} s")
        t0 = time.perf_counter()
        import_ray().get([actor.predict.remote(self.warm_task) for actor in pool.actors])
        self.first_image[workers] = time.perf_counter() - t0
        progress(f"{workers} actor(s) answered their first (warm-up) image in {self.first_image[workers]:.1f} s")
        self.pools[workers] = pool

    def over_http(self) -> list[dict[str, Any]]:
        """This run's tasks: every image under URLs of the slow host no earlier run used."""
        return [{"id": None, "data": {"image": f"{self.host.url}/run{self.runs}/{p.name}"}} for p in self.images]

    def single(self, out: Path) -> PrelabelSummary:
        if self.host is None:
            return prelabel_folder(self.backend, self.xml, self.folder, out, progress=False)
        version, model = self.backend.model_for(None)
        runner = _Runner(self.backend, self.backend.parse_config(self.xml), model, version)
        summary = PrelabelSummary(total=self.args.images, model_version=version)
        summary.record(run_overlapped(self.over_http(), runner.fetch, lambda task, _: runner.predict(task),
                                      name=lambda task: task["data"]["image"], progress=False))
        return summary

    def on_ray(self, pool: WorkerPool, out: Path) -> RaySummary:
        if self.host is None:
            return prelabel_folder_on_ray(self.settings, self.xml, self.folder, out, progress=False, pool=pool)
        summary = RaySummary(total=self.args.images, model_version=pool.version)
        distribute(pool, self.over_http(), lambda task: task["data"]["image"], lambda task, prediction: None,
                   summary, progress=False)
        return summary

    def run(self, config: str | int) -> dict[str, Any]:
        """One timed pass over the images: single process ("single") or a pool of `config` actors."""
        self.runs += 1
        out = self.root / f"run{self.runs}.json"
        n = self.args.images
        if config == "single":
            cpu0 = time.process_time()
            summary = self.single(out)
            cpu = time.process_time() - cpu0
            row = {"actor_cpu_s_per_image": round(cpu / n, 3), "cores": round(cpu / summary.seconds, 3), "busy": None,
                   "model_s_per_image": None, "driver_cpu_ms_per_image": None}
        else:
            pool = self.pools[config]
            before = {w.pid: w for w in pool.stats(pool.actors)}
            cpu0 = time.process_time()
            summary = self.on_ray(pool, out)
            cpu = time.process_time() - cpu0
            after = summary.worker_stats
            busy = sum(w.busy_seconds - before[w.pid].busy_seconds for w in after)
            actor_cpu = sum(w.cpu_seconds - before[w.pid].cpu_seconds for w in after)
            row = {"actor_cpu_s_per_image": round(actor_cpu / n, 3), "cores": round(actor_cpu / summary.seconds, 3),
                   "busy": round(busy / (config * summary.seconds), 3), "model_s_per_image": round(busy / n, 3),
                   "driver_cpu_ms_per_image": round(1000 * cpu / n, 1)}
        assert summary.predicted == n and not summary.failures, summary.format()
        progress(f"{config}: {summary.images_per_second:.3f} images/s")
        return {"images_per_s": round(summary.images_per_second, 4), "seconds": round(summary.seconds, 3), **row}


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds, plus every round's images/s."""
    keys = [k for k in rows[0] if rows[0][k] is not None]
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in rows), 4) for k in keys}
    out["rounds_images_per_s"] = [r["images_per_s"] for r in rows]
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ray = import_ray()
    torch.set_num_threads(thread_count(args.cpus_per_worker))  # the single process gets one actor's threads
    configs: list[str | int] = ([] if args.no_single else ["single"]) + list(args.workers)
    results: dict[str, Any] = {"preset": args.preset, "fast": args.fast, "images": args.images, "size": args.size,
                               "fetch_delay_s": args.fetch_delay,
                               "cpus": os.cpu_count(), "cpus_per_worker": args.cpus_per_worker,
                               "threads_per_model": thread_count(args.cpus_per_worker), "repeat": args.repeat,
                               "feature_cache": args.feature_cache, "load_start": load()}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, Path(tmp))
        if not args.no_single:
            bench.build_single()
        os.environ["RAY_worker_niceness"] = "0"
        os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # other jobs' memory must not get the actors killed
        ray.init(num_cpus=sum(args.workers) * args.cpus_per_worker, include_dashboard=False, log_to_driver=False)
        try:
            for workers in args.workers:
                bench.build_pool(workers)
            rounds: dict[str | int, list[dict[str, Any]]] = {c: [] for c in configs}
            for r in range(args.repeat):
                for config in configs[r % len(configs):] + configs[:r % len(configs)]:
                    rounds[config].append(bench.run(config))
            peak = {w: max(s.peak_rss_mb for s in pool.stats(pool.actors)) for w, pool in bench.pools.items()}
            cache = bench.settings.feature_cache().stats()
            results["feature_cache_lookups"] = {"hits": cache.hits, "misses": cache.misses}
        finally:
            for pool in bench.pools.values():
                pool.shutdown()
            ray.shutdown()
            if bench.host is not None:
                bench.host.close()
                results["downloads"] = len(bench.host.served)
    results["load_end"] = load()
    if not args.no_single:
        results["single"] = median_row(rounds["single"])
        results["single"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    results["ray"] = []
    one = rounds.get(1)
    for workers in args.workers:
        row = {"workers": workers, **median_row(rounds[workers]), "startup_s": round(bench.startup[workers], 2),
               "first_image_s": round(bench.first_image[workers], 2), "actor_peak_rss_mb": round(peak[workers])}
        if one:
            row["ratio_to_1_worker"] = round(statistics.median(
                r["images_per_s"] / o["images_per_s"] for r, o in zip(rounds[workers], one)), 3)
        results["ray"].append(row)
    if one and not args.no_single:
        results["ray_1_worker_overhead_ms_per_image"] = round(statistics.median(
            1000 * (o["seconds"] - s["seconds"]) / args.images for o, s in zip(one, rounds["single"])), 1)
    return results


def report(results: dict[str, Any]) -> None:
    print(f"{results['preset']}{' fast' if results['fast'] else ''}, {results['images']} images of "
          f"{results['size']} px, {results['cpus']} CPUs, {results['threads_per_model']} torch thread(s) per model, "
          f"{results['repeat']} round(s), feature cache {'on' if results['feature_cache'] else 'off'}; load average {results['load_start']} at the start, "
          f"{results['load_end']} at the end")
    delay = results["fetch_delay_s"]
    if delay:
        print(f"images fetched over HTTP from 127.0.0.1, each answer {delay:g} s late ({results['downloads']} downloads)")
    single = results.get("single")
    if single:
        print(f"single process: {single['images_per_s']:.3f} images/s (rounds {single['rounds_images_per_s']}), "
              f"CPU {single['actor_cpu_s_per_image']:.3f} s/image on {single['cores']:.2f} cores, "
              f"peak RSS {single['peak_rss_mb']} MB")
    for r in results["ray"]:
        ratio = f" (x{r['ratio_to_1_worker']} vs 1)" if "ratio_to_1_worker" in r else ""
        print(f"ray {r['workers']} worker(s): {r['images_per_s']:.3f} images/s{ratio} (rounds "
              f"{r['rounds_images_per_s']}), actor CPU {r['actor_cpu_s_per_image']:.3f} s/image on "
              f"{r['cores']:.2f} cores, busy {100 * r['busy']:.0f}% (model {r['model_s_per_image']:.3f} s/image"
              + (f"; each actor fetching then predicting, one after the other, would make "
                 f"{r['workers'] / (delay + r['workers'] * r['model_s_per_image']):.3f} images/s" if delay else "")
              + f"), driver CPU {r['driver_cpu_ms_per_image']:.1f} "
              f"ms/image, start-up {r['startup_s']:.1f} s, first image {r['first_image_s']:.1f} s, "
              f"actor peak RSS {r['actor_peak_rss_mb']} MB")
    if "ray_1_worker_overhead_ms_per_image" in results:
        print(f"ray 1 worker vs single process: {results['ray_1_worker_overhead_ms_per_image']:+.1f} ms/image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--fast", action="store_true", help="one window per image (FAST=1)")
    ap.add_argument("--random-weights", action="store_true", help="the preset's architecture with random weights")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=240, help="shortest edge of the generated images")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per actor")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; figures are medians over them")
    ap.add_argument("--feature-cache", action="store_true",
                    help="keep the feature cache on: passes after the first then hit it (re-prediction, not a first pass)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-process run (saves one model's memory)")
    ap.add_argument("--fetch-delay", type=float, default=0.0,
                    help="serve the images over HTTP on 127.0.0.1, each answer this many seconds late")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = measure(args)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        report(results)


if __name__ == "__main__":
    main()
