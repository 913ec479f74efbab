"""Pre-labeling throughput on Ray: 1 vs N model-holding actors against the single-process path.

Folder mode on generated images (random pixels; cost does not depend on content), local Ray
cluster with one CPU per actor. Prints images/s for the single process and for each worker count,
the ratio to one worker, the actors' start-up (model build) time, the driver's CPU time per image
and the overhead per image of a 1-actor Ray run over the single process (wall clock).

    PYTHONPATH=. python benchmarks/prelabel_scaling.py                 # tiny preset, 16 images, 1 and 2 workers
    PYTHONPATH=. python benchmarks/prelabel_scaling.py --images 4 --json   # smoke run

Workers run at normal priority (RAY_worker_niceness=0) so that they compete with the single
process on equal terms. On a shared machine, run it when it is idle: every figure is wall clock.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from backend.label_config import make_label_config
from backend.model import ODISEBackend
from backend.prelabel import prelabel_folder
from backend.ray_prelabel import import_ray, prelabel_folder_on_ray
from backend.settings import BackendSettings
from odise_core.vocabulary import Vocabulary

LABELS = "person,cat,dog,car,tree,sky,grass,road"


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--fast", action="store_true", help="one window per image (FAST=1)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=240, help="shortest edge of the generated images")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray = import_ray()

    xml = make_label_config(Vocabulary.from_text(LABELS), kind="polygon")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "images"
        make_images(folder, args.images, args.size)
        settings = BackendSettings(preset=args.preset, device="cpu", fast=args.fast, model_dir=root / "models")
        backend = ODISEBackend(settings)
        backend.start_loading(background=False)
        single = prelabel_folder(backend, xml, folder, root / "single.json", progress=False)
        results = {"preset": args.preset, "fast": args.fast, "images": args.images, "cpus": os.cpu_count(),
                   "single": {"images_per_s": round(single.images_per_second, 3), "seconds": round(single.seconds, 2)},
                   "ray": []}
        os.environ["RAY_worker_niceness"] = "0"
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        try:
            for workers in args.workers:
                t0, cpu0 = time.perf_counter(), time.process_time()
                run = prelabel_folder_on_ray(settings, xml, folder, root / f"ray{workers}.json", workers=workers,
                                             progress=False)
                total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                assert run.predicted == args.images and not run.failures, run.format()
                results["ray"].append({"workers": workers, "images_per_s": round(run.images_per_second, 3),
                                       "seconds": round(run.seconds, 2), "startup_s": round(total - run.seconds, 2),
                                       "driver_cpu_ms_per_image": round(1000 * cpu / args.images, 2)})
        finally:
            ray.shutdown()
    one = next((r for r in results["ray"] if r["workers"] == 1), None)
    for r in results["ray"]:
        r["ratio_to_1_worker"] = round(r["images_per_s"] / one["images_per_s"], 3) if one else None
    if one:
        results["ray_1_worker_overhead_ms_per_image"] = round(
            1000 * (one["seconds"] - results["single"]["seconds"]) / args.images, 1)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.preset}{' fast' if args.fast else ''}, {args.images} images, {results['cpus']} CPUs")
    print(f"single process: {results['single']['images_per_s']:.3f} images/s")
    for r in results["ray"]:
        print(f"ray {r['workers']} worker(s): {r['images_per_s']:.3f} images/s (x{r['ratio_to_1_worker']} vs 1), "
              f"start-up {r['startup_s']:.1f} s, driver CPU {r['driver_cpu_ms_per_image']:.1f} ms/image")
    if one:
        print(f"ray 1 worker vs single process: {results['ray_1_worker_overhead_ms_per_image']:+.1f} ms/image")


if __name__ == "__main__":
    main()
