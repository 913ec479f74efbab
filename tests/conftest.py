"""Fixtures shared by several test modules."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from odise_core.geometry import coco_rle_encode
from odise_core.tools.synthetic import CLASS_NAMES, IS_THING, make_dataset


@pytest.fixture(scope="session")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO-format folder (result.json + images/) of four generated 64x64 scenes with their masks."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, anns = [], []
    for i, s in enumerate(make_dataset(4, seed=3, size=64)):
        Image.fromarray(s.image).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"images/{i}.png", "height": 64, "width": 64})
        for m, c in zip(s.masks, s.classes):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                         "segmentation": coco_rle_encode(m), "area": int(m.sum())})
    cats = [{"id": k + 1, "name": n, "isthing": int(t)} for k, (n, t) in enumerate(zip(CLASS_NAMES, IS_THING))]
    (root / "result.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.fixture(scope="session", autouse=True)
def _exact_feature_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Commands built from the environment (also in subprocesses) keep their backbone feature cache in a
    temporary folder, never the user's, and store it exactly (fp32), so their results can be compared
    bit for bit with uncached passes; tests/test_feature_cache.py covers the rounding storage dtypes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATURE_CACHE_DIR", str(tmp_path_factory.mktemp("feature_cache")))
        mp.setenv("FEATURE_CACHE_DTYPE", "fp32")
        yield


@pytest.fixture
def serve_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, dict[str, Any]]]:
    """Runs `odise-ls serve ARGS` without a socket: once its model is ready, `ask(test_client)` runs and the
    server stops. Returns the exit code and what was seen: "bound" (host, port), "answers" (of `ask`), "closed"."""
    import werkzeug.serving

    from backend.cli import main

    def run(argv: list[str], ask: Callable[[Any], Any]) -> tuple[int, dict[str, Any]]:
        seen: dict[str, Any] = {}

        class Server:
            port = 0

            def __init__(self, app: Any) -> None:
                self.app = app

            def serve_forever(self) -> None:
                assert self.app.config["backend"].wait_ready(60), self.app.config["backend"].error
                seen["answers"] = ask(self.app.test_client())
                raise KeyboardInterrupt

            def server_close(self) -> None:
                seen["closed"] = True

        def make_server(host: str, port: int, app: Any, threaded: bool) -> Server:
            seen["bound"] = (host, port)
            return Server(app)

        monkeypatch.setattr(werkzeug.serving, "make_server", make_server)
        return main(["serve", *argv]), seen

    return run
