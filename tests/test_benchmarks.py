"""The benchmark scripts run end to end (on the tiny preset) and report what they claim to."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_latency_reports_stages_memory_and_modes():
    results = json.loads(_run("latency.py", "--preset", "tiny", "--sizes", "128", "--classes", "20",
                              "--modes", "reference,optimised:fp32,optimised:bf16", "--repeats", "2", "--json"))
    assert [(r["mode"], r["precision"], r["sd_dtype"]) for r in results] == [
        ("reference", "fp32", "float32"), ("optimised", "fp32", "float32"), ("optimised", "bf16", "bfloat16")]
    for r in results:
        assert r["classes"] == 20 and r["build_s"] > 0 and r["build_peak_rss_mb"] > 100
        for run in ("cold", "warm"):
            stages = r["runs"][run]["stages_s"]
            assert {"clip_captioner", "vae_encoder", "unet", "vae_decoder", "heads", "clip_classifier"} <= set(stages)
            assert all(v >= 0 for v in stages.values()) and r["runs"][run]["peak_rss_mb"] > 100
        assert len(r["runs"]["warm_all"]) == r["runs"]["warm"]["runs"] == 2
        warm = sorted(run["total_s"] for run in r["runs"]["warm_all"])
        assert r["runs"]["warm"]["total_s_min"] == warm[0] <= r["runs"]["warm"]["total_s"] <= warm[-1]
    ref, fp32, bf16 = results
    # the reference holds three CLIPs and SD's text encoder; bf16 halves the SD weights
    assert ref["model_mb"] > fp32["model_mb"] > bf16["model_mb"]
    # same arithmetic, same segments
    assert ref["runs"]["warm"]["segments"] == fp32["runs"]["warm"]["segments"]


def test_precision_reports_bf16_drift():
    out = json.loads(_run("precision.py", "--skip-full", "--json"))["segments_tiny"]
    assert out["segments_fp32"] > 0 and out["segments_bf16"] > 0
    assert 0.0 <= out["matched_same_class"] <= 1.0 and 0.0 <= out["mean_mask_iou"] <= 1.0
    assert 0.0 < out["max_class_prob_diff"] < 0.2  # bf16 changes the numbers, a little


def test_latency_interleaved_alternates_warm_images():
    results = json.loads(_run("latency.py", "--preset", "tiny", "--sizes", "128", "--classes", "10",
                              "--modes", "reference,optimised:fp32", "--interleave", "--repeats", "2", "--json"))
    assert [r["mode"] for r in results] == ["reference", "optimised"]
    for r in results:
        assert len(r["runs"]["warm_all"]) == 2 and r["runs"]["cold"]["total_s"] > 0


def test_interactive_reports_first_and_cached_answers():
    report = json.loads(_run("interactive.py", "--preset", "tiny", "--clicks", "3", "--phrases", "1"))
    assert report["full_passes"] == 1 and report["cached_tasks"] == 1  # one pass served every interaction
    assert report["cached_click_seconds"]["n"] == report["cached_box_seconds"]["n"] == 3
    assert report["new_phrase_seconds"]["n"] == 1 and report["labels"] == 133
    assert report["bytes_per_cached_task"] > 100 * 64 * 64  # 100 queries' masks at least
    assert 0 < report["cached_click_seconds"]["p50"] <= report["cached_click_seconds"]["max"]
