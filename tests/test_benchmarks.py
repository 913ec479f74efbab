"""The benchmark scripts run end to end (on the tiny preset) and report what they claim to."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = {"preprocess", "clip_captioner", "vae_encoder", "unet", "vae_decoder", "fusion", "heads", "clip_classifier",
          "postprocess"}


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _check_run(run: dict) -> None:
    """The stages partition the prediction: each measured, together most of the total and never more."""
    stages = run["stages_s"]
    assert set(stages) == STAGES and all(v > 0 for v in stages.values())
    assert 0.8 * run["total_s"] <= sum(stages.values()) <= run["total_s"] + 1e-3
    assert run["segments"] == len(run["segment_classes"])


def test_latency_reports_stages_memory_and_modes():
    results = json.loads(_run("latency.py", "--preset", "tiny", "--sizes", "128", "--classes", "20",
                              "--modes", "reference,optimised:fp32,optimised:bf16", "--repeats", "2", "--json"))
    assert [(r["mode"], r["precision"], r["sd_dtype"]) for r in results] == [
        ("reference", "fp32", "float32"), ("optimised", "fp32", "float32"), ("optimised", "bf16", "bfloat16")]
    for r in results:
        assert r["classes"] == 20 and r["size"] == 128 and r["build_s"] > 0
        assert r["build_peak_rss_mb"] > r["model_mb"]  # the process holds at least the model's weights
        _check_run(r["runs"]["cold"])
        warm_all = r["runs"]["warm_all"]
        assert len(warm_all) == r["runs"]["warm"]["runs"] == 2
        for run in warm_all:
            _check_run(run)
        totals = [run["total_s"] for run in warm_all]
        warm = r["runs"]["warm"]
        assert (warm["total_s_min"], warm["total_s"], warm["total_s_max"]) == (
            min(totals), statistics.median(totals), max(totals))
        assert warm["peak_rss_mb"] == max(run["peak_rss_mb"] for run in warm_all)
    ref, fp32, bf16 = results
    # the reference holds three CLIPs and SD's text encoder
    assert ref["model_mb"] > fp32["model_mb"]
    # bf16 halves exactly the bytes of the frozen SD networks, nothing else
    assert bf16["sd_mb"] == pytest.approx(fp32["sd_mb"] / 2, rel=1e-9)
    assert fp32["model_mb"] - bf16["model_mb"] == pytest.approx(fp32["sd_mb"] / 2, rel=1e-9)
    # same arithmetic: every query gets the same best class, and the same segments come out
    for run in ("cold", "warm"):
        assert len(ref["runs"][run]["query_classes"]) == 20  # one per query of the tiny preset
        assert ref["runs"][run]["query_classes"] == fp32["runs"][run]["query_classes"]
        assert ref["runs"][run]["segment_classes"] == fp32["runs"][run]["segment_classes"]


def test_precision_reports_bf16_drift():
    out = json.loads(_run("precision.py", "--skip-full", "--json"))["segments_tiny"]
    assert out["segments_fp32"] >= 1 and out["segments_bf16"] >= 1
    # bf16 changes the numbers a little: the matched segments keep their class and most of their pixels
    assert out["matched_same_class"] >= 0.9 and out["mean_mask_iou"] >= 0.75
    assert 0.0 < out["max_class_prob_diff"] < 0.05


def test_latency_interleaved_alternates_warm_images():
    results = json.loads(_run("latency.py", "--preset", "tiny", "--sizes", "128", "--classes", "10",
                              "--modes", "reference,optimised:fp32", "--interleave", "--repeats", "2", "--json"))
    assert [r["mode"] for r in results] == ["reference", "optimised"]
    for r in results:
        assert len(r["runs"]["warm_all"]) == 2
        for run in (r["runs"]["cold"], *r["runs"]["warm_all"]):
            _check_run(run)
    ref, opt = results
    assert [run["query_classes"] for run in ref["runs"]["warm_all"]] == \
        [run["query_classes"] for run in opt["runs"]["warm_all"]]


def test_interactive_reports_first_and_cached_answers():
    report = json.loads(_run("interactive.py", "--preset", "tiny", "--clicks", "3", "--phrases", "1"))
    assert report["full_passes"] == 1 and report["cached_tasks"] == 1  # one pass served every interaction
    assert report["cached_click_seconds"]["n"] == report["cached_box_seconds"]["n"] == 3
    assert report["new_phrase_seconds"]["n"] == 1 and report["labels"] == 133
    assert report["bytes_per_cached_task"] > 100 * 64 * 64  # 100 queries' masks at least
    assert 0 < report["cached_click_seconds"]["p50"] <= report["cached_click_seconds"]["max"]


def test_feature_cache_reports_a_miss_then_cheaper_hits():
    report = json.loads(_run("feature_cache.py", "--preset", "tiny", "--size", "128", "--storage", "fp32",
                             "--repeats", "2", "--json"))
    assert report["miss"]["cache"] == "miss" and [h["cache"] for h in report["hits"]] == ["hit", "hit"]
    assert report["bytes_per_image"] > report["maskclip_bytes"] > 0 and report["storage"] == "fp32"
    assert report["entries"] == 2  # the backbone features and MaskCLIP's stream
    assert all(h["backbone"] < report["miss"]["backbone"] for h in report["hits"])
    # the times are rounded to 3 decimals: their ratio may differ from the unrounded one by 0.0005 / hit_s
    assert report["speedup"] == pytest.approx(report["miss_s"] / report["hit_s"],
                                              rel=0.01 + 0.0006 / report["hit_s"])


def test_al_round_reports_both_passes_the_cache_and_the_refresh():
    from tests.e2e.label_studio import find_label_studio

    with_ls = find_label_studio() is not None
    report = json.loads(_run("al_round.py", "--preset", "tiny", "--images", "2", "--tasks", "3", "--steps", "1",
                             "--json", *([] if with_ls else ["--no-label-studio"])))
    first, second = report["first_pass"], report["second_pass"]
    assert [r["cache"] for r in first] == ["miss", "miss"] and [r["cache"] for r in second] == ["hit", "hit"]
    assert [r["image"] for r in first] == [r["image"] for r in second]
    assert report["first_median_s"] == statistics.median(r["seconds"] for r in first)
    assert report["ratio"] == round(report["first_median_s"] / report["second_median_s"], 2)
    # per image: its backbone features and its MaskCLIP stream
    assert report["cache_entries"] == 4 and report["bytes_per_cached_image"] == report["cache_bytes"] // 2 > 0
    assert report["classes"] == 133 and report["finetune"]["version"] == "v0001" and report["finetune"]["steps"] == 1
    refresh = report["refresh"]
    if not with_ls:
        assert refresh is None
        return
    assert (refresh["state"], refresh["done"], refresh["total"], refresh["failed"]) == ("done", 3, 3, 0)
    assert refresh["deleted"] == 3 and len(refresh["versions_after"]) == 1
    assert refresh["versions_after"][0].endswith("-v0001") and refresh["seconds"] > 0


def test_prelabel_scaling_reports_interleaved_rounds_of_warm_models():
    pytest.importorskip("ray")
    results = json.loads(_run("prelabel_scaling.py", "--fast", "--images", "2", "--workers", "1", "2",
                              "--repeat", "2", "--json"))
    assert (results["preset"], results["images"], results["repeat"], results["threads_per_model"]) == ("tiny", 2, 2, 1)
    assert results["feature_cache_lookups"] == {"hits": 0, "misses": 0}  # every pass runs the backbone
    rows = [results["single"], *results["ray"]]
    assert [r["workers"] for r in results["ray"]] == [1, 2]
    for row in rows:
        assert len(row["rounds_images_per_s"]) == 2 and all(x > 0 for x in row["rounds_images_per_s"])
        assert row["images_per_s"] == round(statistics.median(row["rounds_images_per_s"]), 4)
        assert row["actor_cpu_s_per_image"] > 0
        assert 0 < row["cores"] <= 2.05  # CPU seconds per second: never more than the threads used (plus fetching)
    one, two = results["ray"]
    for row in (one, two):
        assert 0 < row["busy"] <= 1 and row["driver_cpu_ms_per_image"] > 0
        assert row["startup_s"] > 0 and row["first_image_s"] > 0
        assert row["actor_peak_rss_mb"] > 100  # a process holding a model
    assert one["ratio_to_1_worker"] == 1.0
    assert two["ratio_to_1_worker"] == round(statistics.median(
        b / a for a, b in zip(one["rounds_images_per_s"], two["rounds_images_per_s"])), 3)
    assert isinstance(results["ray_1_worker_overhead_ms_per_image"], float)


def test_prelabel_scaling_fetches_over_a_slow_local_host():
    """--fetch-delay: both paths download every image over HTTP, under new URLs each run; the actors' busy
    share and model time per image are reported."""
    pytest.importorskip("ray")
    results = json.loads(_run("prelabel_scaling.py", "--fast", "--images", "3", "--workers", "1",
                              "--fetch-delay", "0.3", "--json"))
    assert (results["fetch_delay_s"], results["downloads"]) == (0.3, 2 * 3)  # single process and one actor
    (one,) = results["ray"]
    assert 0 < one["busy"] < 1 and one["model_s_per_image"] > 0  # busy < 1: the first download precedes the model


def test_maskclip_reports_the_split_against_the_whole_transformer():
    report = json.loads(_run("maskclip.py", "--preset", "tiny", "--repeats", "2", "--json"))
    assert (report["queries"], report["layers"], report["tokens"], report["width"]) == (20, 2, 17, 64)
    assert report["max_abs_diff"] < 1e-6  # the same embeddings
    assert all(len(times) == 2 and all(t > 0 for t in times) for times in report["rounds"].values())
    assert report["miss_s"] == pytest.approx(report["seconds"]["stream"] + report["seconds"]["hit"], abs=2e-3)
    # per image: the class token, then keys and values (or hidden states) of 17 tokens in 2 layers, fp16
    assert report["bytes_keys_values"] == 2 * (64 + 2 * 2 * 17 * 64)
    assert report["bytes_hidden"] == 2 * (64 + 2 * 17 * 64)
