"""Per-stage latency and peak memory of ODISE on random weights: optimised vs reference-equivalent.

Cost does not depend on weight values, so the full `odise-label-coco` preset with random weights
gives honest figures. Each (mode, size) runs in its own subprocess so peak RSS is not polluted by
the other runs.

    python benchmarks/latency.py                       # full preset, 512 and 1024, all three modes
    python benchmarks/latency.py --sizes 1024 --modes reference,optimised:fp32 --interleave --repeats 3
    python benchmarks/latency.py --preset tiny --sizes 256 --json

Modes: `reference` (float32, the reference pipeline's work), `optimised:fp32` (the same numbers,
less work), `optimised:auto` (the default: on a CPU with native bf16 the frozen SD networks run in
bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import PeakMemory  # noqa: E402

STAGES = ("preprocess", "clip_captioner", "vae_encoder", "unet", "vae_decoder", "fusion", "heads",
          "clip_classifier", "postprocess")


def random_weights(preset: str, device: str, **settings: object):
    """Settings of `preset` with random weights and no feature cache (a cached pass would not compute what
    is measured); every benchmark builds through backend.settings.build_model."""
    from backend.settings import BackendSettings

    return BackendSettings.from_env({}, preset=preset, device=device, random_weights=True, feature_cache_mb=0,
                                    **settings)


class StageClock:
    """Splits the backbone time into captioner / VAE encoder / UNet / VAE decoder / fusion with hooks."""

    def __init__(self, model) -> None:
        self.marks: list[tuple[str, float]] = []
        ext = model.backbone.feature_extractor
        visual = model.clip.model.visual
        for name, module in (("clip_captioner", visual), ("vae_encoder", ext.vae.encoder), ("unet", ext.unet),
                             ("vae_decoder", ext.vae.decoder)):
            module.register_forward_pre_hook(lambda m, a, n=name: self.marks.append((n, time.perf_counter())))
        for module in model.backbone.feature_projections:
            module.register_forward_pre_hook(lambda m, a: self.marks.append(("fusion", time.perf_counter())))
        model.backbone.register_forward_hook(lambda m, a, o: self.marks.append(("end", time.perf_counter())))

    def split(self) -> dict[str, float]:
        """Seconds per backbone stage from consecutive marks (a stage lasts until the next mark)."""
        out: dict[str, float] = {}
        for (name, t0), (_, t1) in zip(self.marks, self.marks[1:]):
            if name != "end":
                out[name] = out.get(name, 0.0) + (t1 - t0)
        self.marks.clear()
        return out


def session(preset: str, size: int, mode: str, classes: int, device: str, precision: str = "auto"):
    """Build the model; returns its figures so far and a function that predicts one image and times it."""
    import torch

    from backend.settings import build_model
    from odise_core.reference_mode import ReferenceEquivalentODISE
    from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

    torch.manual_seed(0)
    reference = mode == "reference"
    settings = random_weights(preset, device, min_size=size,
                              precision="fp32" if reference else precision)  # the reference pipeline runs fp32
    with PeakMemory() as build:
        predictor = build_model(settings, text_cache=TextEmbeddingCache(None),
                                network=ReferenceEquivalentODISE if reference else None)
    model = predictor.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(p.numel() * p.element_size() for extra in ("text_clip", "mask_clip", "sd_text_encoder")
                  if hasattr(model, extra) for p in getattr(model, extra).parameters())
    vocab = Vocabulary.coco_panoptic()
    if classes < len(vocab):
        vocab = Vocabulary(vocab.classes[:classes])
    import skimage.data

    image = skimage.data.astronaut()
    clock = StageClock(model)
    _, sd_dtype = predictor.apply_precision()
    ext = model.backbone.feature_extractor
    sd_bytes = sum(p.numel() * p.element_size() for net in (ext.unet, ext.vae) for p in net.parameters())
    result = {"mode": mode, "precision": settings.precision, "sd_dtype": str(sd_dtype).replace("torch.", ""),
              "preset": preset, "size": size, "classes": len(vocab), "device": str(model.device),
              "build_s": build.seconds, "build_peak_rss_mb": build.peak_rss / 2**20,
              "model_mb": params / 2**20, "sd_mb": sd_bytes / 2**20, "runs": {}}

    def measure() -> dict:
        with PeakMemory() as mem:
            raw = predictor.predict_raw(image, vocab)
        stages = dict(raw.timings)
        stages.pop("backbone")
        stages.update(clock.split())
        return {"total_s": mem.seconds, "peak_rss_mb": mem.peak_rss / 2**20, "peak_cuda_mb": mem.peak_cuda / 2**20,
                "stages_s": stages, "segments": len(raw.segments),
                "segment_classes": [s.class_index for s in raw.segments],
                "query_classes": raw.class_probs.argmax(-1).tolist()}

    return result, measure


def finish(result: dict, measured: list[dict]) -> dict:
    """The first image is the cold one; the others are warm (reported as their median)."""
    result["runs"]["cold"] = measured[0]
    result["runs"]["warm_all"] = measured[1:]
    result["runs"]["warm"] = median_run(measured[1:])
    return result


def run_one(preset: str, size: int, mode: str, classes: int, device: str, precision: str = "auto",
            warm_runs: int = 1) -> dict:
    """Build the model, predict one cold image then `warm_runs` warm ones at `size` shortest edge."""
    result, measure = session(preset, size, mode, classes, device, precision)
    return finish(result, [measure() for _ in range(1 + max(1, warm_runs))])


def median_run(runs: list[dict]) -> dict:
    """The median of several warm runs, per stage and for the total (a shared machine is noisy)."""
    import statistics

    stages = {k: statistics.median(r["stages_s"].get(k, 0.0) for r in runs) for k in runs[0]["stages_s"]}
    return {"total_s": statistics.median(r["total_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_cuda_mb": max(r["peak_cuda_mb"] for r in runs),
            "stages_s": stages, "segments": runs[-1]["segments"], "segment_classes": runs[-1]["segment_classes"],
            "query_classes": runs[-1]["query_classes"], "runs": len(runs),
            "total_s_min": min(r["total_s"] for r in runs), "total_s_max": max(r["total_s"] for r in runs)}


def child(args: argparse.Namespace) -> None:
    if not args.interleave:
        out = run_one(args.preset, args.size, args.mode, args.classes, args.device, args.precision, args.repeats)
        print("RESULT " + json.dumps(out))
        return
    # Interleaved: build and run the cold image, then one warm image per "run" line on stdin.
    result, measure = session(args.preset, args.size, args.mode, args.classes, args.device, args.precision)
    measured = [measure()]
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            measured.append(measure())
            print("DONE", flush=True)
        elif line.strip() == "finish":
            break
    print("RESULT " + json.dumps(finish(result, measured)), flush=True)


def child_process(preset: str, size: int, mode: str, classes: int, device: str, precision: str,
                  threads: int | None, *extra: str) -> tuple[list[str], dict]:
    """Command line and environment of one benchmark child."""
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--size", str(size), "--mode", mode,
           "--classes", str(classes), "--device", device, "--precision", precision, *extra]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return cmd, env


class Child:
    """A benchmark child process driven over stdin/stdout (interleaved mode)."""

    def __init__(self, cmd: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)

    def expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line[len(word):].strip()
        raise RuntimeError(f"benchmark child died before {word}:\n{self.proc.stderr.read()[-3000:]}")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def spawn_interleaved(specs: list[tuple[str, str]], preset: str, size: int, classes: int, device: str,
                      threads: int | None, repeats: int) -> list[dict]:
    """All modes' models stay built; their warm images alternate (A B C A B C ...), so a slow spell on a
    shared machine hits every mode instead of one. Needs the memory of all the models at once."""
    children = []
    try:
        for mode, precision in specs:
            print(f"building {mode} ({precision}) at {size}, cold image ...", file=sys.stderr, flush=True)
            children.append(Child(*child_process(preset, size, mode, classes, device, precision, threads,
                                                 "--interleave")))
            children[-1].expect("READY")
        for i in range(max(1, repeats)):
            for (mode, precision), ch in zip(specs, children):
                print(f"warm image {i + 1}/{repeats}: {mode} ({precision}) at {size}", file=sys.stderr, flush=True)
                ch.send("run")
                ch.expect("DONE")
        results = []
        for ch in children:
            ch.send("finish")
            results.append(json.loads(ch.expect("RESULT ")))
        return results
    finally:
        for ch in children:
            if ch.proc.poll() is None:
                ch.proc.kill()


def spawn(preset: str, size: int, mode: str, classes: int, device: str, threads: int | None,
          precision: str = "auto", repeats: int = 1) -> dict:
    cmd, env = child_process(preset, size, mode, classes, device, precision, threads, "--repeats", str(repeats))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed ({mode} {size}):\n{proc.stderr[-3000:]}")


def label(result: dict) -> str:
    if result["mode"] == "reference":
        return "reference"
    return f"opt {result['precision']} (SD {result['sd_dtype'].replace('bfloat16', 'bf16').replace('float32', 'fp32')})"


def print_table(results: list[dict]) -> None:
    """One table per size: a column per mode, then each optimised mode's ratio against the reference."""
    sizes = sorted({r["size"] for r in results})
    for size in sizes:
        runs = [r for r in results if r["size"] == size]
        ref = next((r for r in runs if r["mode"] == "reference"), None)
        others = [r for r in runs if r is not ref]
        print(f"\n== {runs[0]['preset']} at {size} px shortest edge, {runs[0]['classes']} classes, "
              f"device {runs[0]['device']} (warm image, median of {runs[0]['runs']['warm'].get('runs', 1)}; ms) ==")
        head = "".join(f"{label(r):>20}" for r in runs)
        if ref is not None:
            head += "".join(f"{'ratio ' + r['precision']:>14}" for r in others)
        print(f"{'stage':<18}" + head)

        def row(name: str, fn, fmt: str) -> None:
            vals = [fn(r) for r in runs]
            line = f"{name:<18}" + "".join(format(v, fmt).rjust(20) for v in vals)
            if ref is not None:
                line += "".join((f"{fn(ref) / fn(r):13.2f}x" if fn(r) > 0 else " " * 14) for r in others)
            print(line)

        for stage in STAGES:
            row(stage, lambda r, st=stage: r["runs"]["warm"]["stages_s"].get(st, 0.0) * 1000, ".0f")
        row("total warm", lambda r: r["runs"]["warm"]["total_s"] * 1000, ".0f")
        if runs[0]["runs"]["warm"].get("runs", 1) > 1:
            row("  fastest warm", lambda r: r["runs"]["warm"]["total_s_min"] * 1000, ".0f")
            row("  slowest warm", lambda r: r["runs"]["warm"]["total_s_max"] * 1000, ".0f")
        row("total cold", lambda r: r["runs"]["cold"]["total_s"] * 1000, ".0f")
        row("peak RSS warm MB", lambda r: r["runs"]["warm"]["peak_rss_mb"], ".0f")
        row("build s", lambda r: r["build_s"], ".1f")
        row("build peak RSS MB", lambda r: r["build_peak_rss_mb"], ".0f")
        row("model MB", lambda r: r["model_mb"], ".0f")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="odise-label-coco")
    ap.add_argument("--sizes", default="512,1024", help="shortest-edge sizes, comma separated")
    ap.add_argument("--modes", default="reference,optimised:fp32,optimised:auto",
                    help="reference and/or optimised[:precision], comma separated; precision is auto, bf16 or "
                         "fp32 (the reference always runs fp32)")
    ap.add_argument("--classes", type=int, default=133)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1,
                    help="warm images per mode; stages and total are their median (default 1)")
    ap.add_argument("--interleave", action="store_true",
                    help="keep every mode's model built and alternate their warm images (fairer on a noisy "
                         "shared machine; needs the memory of all models at once)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    specs = []
    for spec in args.modes.split(","):
        mode, _, precision = spec.partition(":")
        specs.append((mode, "fp32" if mode == "reference" else (precision or "auto")))
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        if args.interleave:
            results += spawn_interleaved(specs, args.preset, size, args.classes, args.device, args.threads,
                                         args.repeats)
            continue
        for mode, precision in specs:
            print(f"running {mode} ({precision}) at {size} ...", file=sys.stderr, flush=True)
            results.append(spawn(args.preset, size, mode, args.classes, args.device, args.threads, precision,
                                 args.repeats))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
