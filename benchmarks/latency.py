"""Per-stage latency and peak memory of ODISE on random weights: optimised vs reference-equivalent.

Cost does not depend on weight values, so the full `odise-label-coco` preset with random weights
gives honest figures. Each (mode, size) runs in its own subprocess so peak RSS is not polluted by
the other runs.

    python benchmarks/latency.py                       # full preset, 512 and 1024, all three modes
    python benchmarks/latency.py --sizes 1024 --modes reference,optimised:fp32
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


def random_weights(preset: str):
    from odise_core.config import get_config

    cfg = get_config(preset)
    cfg.diffusion.pretrained = None
    cfg.clip.pretrained = None
    cfg.checkpoint = None
    return cfg


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


def run_one(preset: str, size: int, mode: str, classes: int, device: str, precision: str = "auto") -> dict:
    """Build the model, predict one cold and one warm image at `size` shortest edge; return figures."""
    import torch

    from odise_core.model import ODISE
    from odise_core.reference_mode import ReferenceEquivalentODISE
    from odise_core.vocabulary import TextEmbeddingCache, Vocabulary

    torch.manual_seed(0)
    cfg = random_weights(preset)
    cfg.backbone.min_size = size
    cfg.backbone.max_size = max(cfg.backbone.max_size, size)
    cls = ReferenceEquivalentODISE if mode == "reference" else ODISE
    cfg.precision = "fp32" if mode == "reference" else precision  # the reference pipeline runs fp32
    with PeakMemory() as build:
        model = cls.from_config(cfg, device=device, text_cache=TextEmbeddingCache(None))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(p.numel() * p.element_size() for extra in ("text_clip", "mask_clip", "sd_text_encoder")
                  if hasattr(model, extra) for p in getattr(model, extra).parameters())
    vocab = Vocabulary.coco_panoptic()
    if classes < len(vocab):
        vocab = Vocabulary(vocab.classes[:classes])
    import skimage.data

    image = skimage.data.astronaut()
    clock = StageClock(model)
    _, sd_dtype = model.apply_precision()
    result = {"mode": mode, "precision": cfg.precision, "sd_dtype": str(sd_dtype).replace("torch.", ""),
              "preset": preset, "size": size, "classes": len(vocab), "device": str(model.device),
              "build_s": build.seconds, "build_peak_rss_mb": build.peak_rss / 2**20,
              "model_mb": params / 2**20, "runs": {}}
    for run in ("cold", "warm"):
        with PeakMemory() as mem:
            raw = model.predict_raw(image, vocab)
        stages = dict(raw.timings)
        stages.pop("backbone")
        stages.update(clock.split())
        result["runs"][run] = {"total_s": mem.seconds, "peak_rss_mb": mem.peak_rss / 2**20,
                               "peak_cuda_mb": mem.peak_cuda / 2**20, "stages_s": stages,
                               "segments": len(raw.segments)}
    return result


def child(args: argparse.Namespace) -> None:
    out = run_one(args.preset, args.size, args.mode, args.classes, args.device, args.precision)
    print("RESULT " + json.dumps(out))


def spawn(preset: str, size: int, mode: str, classes: int, device: str, threads: int | None,
          precision: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--size", str(size), "--mode", mode,
           "--classes", str(classes), "--device", device, "--precision", precision]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
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
              f"device {runs[0]['device']} (warm image; ms) ==")
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
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for spec in args.modes.split(","):
            mode, _, precision = spec.partition(":")
            precision = "fp32" if mode == "reference" else (precision or "auto")
            print(f"running {mode} ({precision}) at {size} ...", file=sys.stderr, flush=True)
            results.append(spawn(args.preset, size, mode, args.classes, args.device, args.threads, precision))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
