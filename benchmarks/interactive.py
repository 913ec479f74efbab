"""Interactive answers at the server: first action on a task, cached clicks and boxes, text prompts, memory.

Builds the backend (default: the full `odise-label-coco` preset with random weights, on the CPU;
cost does not depend on weight values), serves it on 127.0.0.1 and sends Label Studio's
interactive /predict requests (a smart-tool `params.context`) over real HTTP for one photo with the
133 COCO panoptic labels:

- the first click on the task (one full ODISE pass, kept in the per-task cache);
- `--clicks` clicks and as many boxes at seeded random places (answered from the cache): p50/p90;
- `--phrases` new typed phrases (each one CLIP text encoding per prompt, then the kept embeddings);
- the bytes kept per cached task and the process's peak RSS.

    python benchmarks/interactive.py                      # full preset, ~1-2 minutes on 2 cores
    python benchmarks/interactive.py --preset tiny --clicks 5 --phrases 2
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import requests
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import serve_backend  # noqa: E402

from backend.label_config import make_label_config  # noqa: E402
from odise_core.vocabulary import Vocabulary  # noqa: E402

PHRASES = ("red mug", "white saucer", "wooden spoon", "coffee foam", "a shadow on the table", "striped cloth")
SMART_TOOLS = """  <KeyPointLabels name="click" toName="image" smartOnly="true"><Label value="cup"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smartOnly="true"><Label value="cup"/></RectangleLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""


def interactive_config() -> str:
    """COCO's 133 labels as PolygonLabels plus a click tool, a box tool and a text prompt."""
    return make_label_config(Vocabulary.coco_panoptic(), kind="polygon").replace("</View>", SMART_TOOLS)


def _percentiles(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    p90 = times[max(math.ceil(0.9 * len(times)) - 1, 0)]  # nearest rank
    return {"p50": round(statistics.median(times), 4), "p90": round(p90, 4),
            "max": round(times[-1], 4), "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="odise-label-coco")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--phrases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    backend, server, url, build_seconds = serve_backend(args.preset, args.device, random_weights=True)

    photo = skimage.data.coffee()  # 400 x 600
    h, w = photo.shape[:2]
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    task = {"id": 1, "data": {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
    config = interactive_config()
    session = requests.Session()

    def ask(result: dict) -> tuple[float, dict]:
        body = {"tasks": [task], "label_config": config, "project": "1.1700000000",
                "params": {"context": {"result": [{"from_name": "click", "to_name": "image", **result}]}}}
        t = time.perf_counter()
        r = session.post(url, json=body, timeout=1200)
        elapsed = time.perf_counter() - t
        r.raise_for_status()
        answer = r.json()["results"][0]
        if "error" in answer:
            raise SystemExit(f"interactive request failed: {answer['error']}")
        return elapsed, answer

    rng = np.random.default_rng(args.seed)

    def click() -> dict:
        x, y = rng.uniform(2, 98, size=2)
        return {"type": "keypointlabels", "is_positive": True, "value": {"x": x, "y": y, "width": 0.5}}

    def box() -> dict:
        x, y = rng.uniform(0, 70, size=2)
        bw, bh = rng.uniform(10, 30, size=2)
        return {"from_name": "box", "type": "rectanglelabels",
                "value": {"x": x, "y": y, "width": bw, "height": bh, "rotation": 0}}

    first_seconds, first = ask(click())
    click_times, box_times, answered = [], [], 0
    for _ in range(args.clicks):
        elapsed, answer = ask(click())
        click_times.append(elapsed)
        answered += bool(answer["result"])
        box_times.append(ask(box())[0])
    phrase_times = [ask({"from_name": "prompt", "type": "textarea", "value": {"text": [p]}})[0]
                    for p in PHRASES[: args.phrases]]
    repeat_seconds = ask({"from_name": "prompt", "type": "textarea", "value": {"text": [PHRASES[0]]}})[0]
    cache = backend.interactive.cache
    server.shutdown()

    report = {
        "preset": args.preset, "device": args.device, "image": f"{w}x{h}", "labels": 133,
        "build_seconds": round(build_seconds, 1),
        "first_interaction_seconds": round(first_seconds, 2),
        "cached_click_seconds": _percentiles(click_times),
        "clicks_with_a_region": answered,
        "cached_box_seconds": _percentiles(box_times),
        "new_phrase_seconds": _percentiles(phrase_times),
        "repeated_phrase_seconds": round(repeat_seconds, 4),
        "full_passes": cache.misses,
        "cached_tasks": len(cache),
        "bytes_per_cached_task": cache.nbytes // max(len(cache), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "first_answer_regions": len(first["result"]),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
