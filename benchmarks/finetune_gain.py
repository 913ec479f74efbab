"""Measured gain of fine-tuning: the `tiny` preset from random heads on N generated scenes.

The scenes (odise_core.tools.synthetic: textured circles/triangles/squares on striped or checkered
backgrounds, random colours) exist nowhere else, so no model has seen them. For each N the
random-weight model is fine-tuned on the first N training scenes and evaluated on the same
held-out scenes; PQ (things/stuff), mask AP and mIoU are printed before and after, with timings.

    PYTHONPATH=. python benchmarks/finetune_gain.py            # N in 8 32 128; ~15 min on 2 idle CPUs
    PYTHONPATH=. python benchmarks/finetune_gain.py --sizes 8 --steps 50 --holdout 4   # smoke run

Scenes are generated at --image-size and the preset's shortest-edge resize is set to the same
size, so one 128 px sliding window covers a whole scene (the tiny preset would otherwise upsample
to 256 px and run four windows per image). After a fine-tune the scene classes count as "seen in
training" for the CLIP ensemble (alpha instead of beta), as for a project's fine-tuned versions.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from backend.learning import copy_sharing_frozen, evaluate_model
from backend.settings import BackendSettings, build_model
from odise_core.tools.evaluation import EvalResult
from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, make_dataset
from odise_core.training.finetune import FinetuneOptions, TrainSample, finetune
from odise_core.vocabulary import VocabClass, Vocabulary

log = logging.getLogger("finetune_gain")


def row(name: str, r: EvalResult) -> str:
    def f(v: float) -> str:
        return "  n/a" if v != v else f"{v:5.1f}"

    return (f"{name:>14} | {f(r.pq)} | {f(r.pq_things)} | {f(r.pq_stuff)} | {f(r.mask_ap)} | {f(r.miou)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128], help="numbers of training scenes")
    ap.add_argument("--holdout", type=int, default=12, help="held-out scenes")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per fine-tune (same for every N)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--views", type=int, default=1, help="augmented views per image (features cached per view)")
    ap.add_argument("--num-points", type=int, default=3136,
                    help="points per mask in matcher and loss (the reference's 12544 is 4x the pixels of a "
                         "32x32 mask at this size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = build_model(BackendSettings.from_env({}, preset="tiny", device="cpu", min_size=args.image_size,
                                                 feature_cache_mb=0))  # features computed on every pass
    build_s = time.perf_counter() - t0
    vocab = Vocabulary([VocabClass(n, (n,), t) for n, t in zip(CLASS_NAMES, IS_THING)])
    train_scenes = make_dataset(max(args.sizes), seed=args.seed, size=args.image_size)
    held_scenes = make_dataset(args.holdout, seed=args.seed + 1_000_003, size=args.image_size)

    def samples(scenes: list) -> list[TrainSample]:
        return [TrainSample(image=s.image, masks=s.masks, classes=s.classes) for s in scenes]

    held = samples(held_scenes)
    t0 = time.perf_counter()
    before = evaluate_model(model, held, vocab)
    eval_s = time.perf_counter() - t0
    print(f"tiny preset, random weights; {args.holdout} held-out scenes of {args.image_size} px; "
          f"model built in {build_s:.1f} s; held-out evaluation {eval_s:.1f} s "
          f"({eval_s / args.holdout:.2f} s per image)")
    print(f"fine-tune: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, views {args.views}, "
          f"{args.num_points} points, {torch.get_num_threads()} threads\n")

    results = {"before": before.as_dict(), "runs": []}
    lines = [row("before (all N)", before)]
    for n in args.sizes:
        candidate = copy_sharing_frozen(model)
        opts = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                               views_per_image=args.views, seed=args.seed, num_points=args.num_points)
        t0 = time.perf_counter()
        res = finetune(candidate.model, samples(train_scenes[:n]), opts, vocab=vocab,
                       feature_cache=candidate.feature_cache)
        total = time.perf_counter() - t0
        candidate.trained_classes = set(vocab.names)  # as a fine-tune job does
        after = evaluate_model(candidate, held, vocab)
        feat_per_view = res.seconds_features / (n * args.views) if n else 0.0
        print(f"N={n:4d}: features {res.seconds_features:6.1f} s ({feat_per_view:.2f} s per image view), "
              f"training {res.seconds_train:6.1f} s ({res.seconds_per_step:.2f} s per step of "
              f"{args.batch_size} images = {res.seconds_per_step / args.batch_size:.2f} s per image), "
              f"loss {res.losses[0]:.2f} -> {sum(res.losses[-10:]) / len(res.losses[-10:]):.2f}, "
              f"total {total:.1f} s", flush=True)
        lines.append(row(f"after N={n}", after))
        results["runs"].append({"n": n, "after": after.as_dict(), "seconds_features": res.seconds_features,
                                "seconds_train": res.seconds_train, "seconds_per_step": res.seconds_per_step,
                                "first_loss": res.losses[0], "last_loss": res.losses[-1]})
    print(f"\n{'held-out':>14} |    PQ | PQ_th | PQ_st | AP    | mIoU")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
