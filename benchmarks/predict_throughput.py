"""Requests per second of POST /predict over real HTTP, plus one request/response example.

Starts the backend (default: tiny preset, CPU) on 127.0.0.1 in this process, sends `--requests`
single-task requests from `--clients` concurrent clients with a real photo (scikit-image's
chelsea, as a data URI so no image server is involved, or `--image PATH`), and prints
requests/second, latency percentiles and a shortened request/response pair as JSON.

    python benchmarks/predict_throughput.py --preset tiny --requests 20 --clients 2
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

from backend.label_config import make_label_config
from odise_core.vocabulary import Vocabulary
from serving import serve_backend


def _image_uri(path: str | None) -> tuple[str, tuple[int, int]]:
    if path:
        img = Image.open(path).convert("RGB")
    else:
        import skimage.data

        img = Image.fromarray(skimage.data.chelsea())
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), (img.height, img.width)


def _shorten(obj: object, limit: int = 6) -> object:
    """Trim long lists (points, RLE) so the example stays readable."""
    if isinstance(obj, dict):
        return {k: (v[:60] + "..." if isinstance(v, str) and len(v) > 60 else _shorten(v, limit)) for k, v in obj.items()}
    if isinstance(obj, list):
        head = [_shorten(v, limit) for v in obj[:limit]]
        return head + [f"... {len(obj) - limit} more"] if len(obj) > limit else head
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kind", choices=["polygon", "brush", "rectangle"], default="polygon")
    parser.add_argument("--labels", default="cat:kitten, person, grass (stuff), sky (stuff), wall (stuff)")
    parser.add_argument("--image", help="image file (default: skimage chelsea, 451x300)")
    parser.add_argument("--example", help="write the full request/response example JSON here")
    args = parser.parse_args()

    _, server, url, load_seconds = serve_backend(args.preset, args.device)

    uri, (h, w) = _image_uri(args.image)
    config = make_label_config(Vocabulary.from_text(args.labels), kind=args.kind)

    def body(i: int) -> dict:
        # A distinct URL per request (a query in the data URI's media type) defeats the image cache.
        return {"tasks": [{"id": i, "data": {"image": uri.replace("image/jpeg", f"image/jpeg;n={i}", 1)}}],
                "label_config": config, "project": "1.1700000000", "params": {"context": None}}

    session = requests.Session()
    for i in range(args.warmup):
        session.post(url, json=body(-1 - i), timeout=600).raise_for_status()

    def one(i: int) -> float:
        t = time.perf_counter()
        r = requests.post(url, json=body(i), timeout=600)
        r.raise_for_status()
        assert "result" in r.json()["results"][0], r.text[:500]
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        latencies = sorted(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0

    example_request = body(0)
    example_response = session.post(url, json=example_request, timeout=600).json()
    if args.example:
        Path(args.example).write_text(json.dumps({"request": example_request, "response": example_response}))
    server.shutdown()

    report = {
        "preset": args.preset, "device": args.device, "image": f"{w}x{h}", "kind": args.kind,
        "model_load_seconds": round(load_seconds, 2),
        "requests": args.requests, "clients": args.clients,
        "requests_per_second": round(args.requests / wall, 3),
        "latency_seconds": {"p50": round(statistics.median(latencies), 3),
                            "p90": round(latencies[int(0.9 * (len(latencies) - 1))], 3),
                            "max": round(latencies[-1], 3)},
        "regions_per_task": len(example_response["results"][0]["result"]),
        "example": {"request": _shorten(example_request), "response": _shorten(example_response)},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
