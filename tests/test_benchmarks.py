"""The benchmark harness itself runs and reports what it says it reports (tiny sizes; the timings mean nothing)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_extract_rounds_report_medians(tmp_path: Path) -> None:
    env = {**os.environ, "EMBEDFIT_BENCH_RESULTS": str(tmp_path / "results"),
           "EMBEDFIT_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        # Enough images for workers to hand over several batches of 64 after the first fifth (the steady state).
        [sys.executable, "bench_extract.py", "--images", "200", "--size", "96x72", "--naive-images", "4",
         "--rounds", "3", "--runtime", "onnx", "--workers", "1", "--batch-size", "8", "--tag", "_test"],
        cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("round ") == 3 and "median of 3 round(s)" in proc.stdout
    result = json.loads((tmp_path / "results" / "extract_efficientnet_lite0_cpu_fp32_test.json").read_text())
    assert result["rounds"] == 3 and result["runtime"] == "onnx" and result["workers"] == 1
    (row,) = result["rows"]
    rounds = row["rounds"]
    assert len(rounds) == 3 and row["images"] == 200 and row["naive_images"] == 4
    for key in ("naive", "embedfit", "compute_ceiling", "input_ceiling"):
        assert all(r[key] > 0 for r in rounds)
        assert row[key] == statistics.median(r[key] for r in rounds)
    # Ratios are the median of each round's own ratio, not a ratio of medians.
    for ratio, (num, den) in {"vs_naive": ("embedfit", "naive"), "vs_compute": ("embedfit", "compute_ceiling"),
                              "vs_bound": ("embedfit", "bound_images_per_second")}.items():
        for r in rounds:
            assert abs(r[ratio] - r[num] / r[den]) < 1e-9
        assert row[ratio] == statistics.median(r[ratio] for r in rounds)
    assert row["embedfit_min"] <= row["embedfit"] <= row["embedfit_max"]
    # One worker on a CPU: the two phases share the cores, so the bound is below both ceilings.
    assert row["bound"] == "shared cores"
    assert all(r["bound_images_per_second"] < min(r["compute_ceiling"], r["input_ceiling"]) for r in rounds)
    assert not list((BENCH / "results").glob("*_test.json"))
