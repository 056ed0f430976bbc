"""Smoke test of bench/bench_maisi_ct.py: a tiny run must report positive, finite timings for every row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bundle_helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "bench_maisi_ct.py"
# latent 8^3 with dim_split 1: 4 splits would leave 2 voxels per chunk (< 3), so only 1 and 2 are valid
DECODE_ROWS = ("whole-1", "whole-2", "sliding")


def assert_timing(timing: dict) -> None:
    assert timing["repetitions"] == 1
    for key in ("mean_s", "median_s", "min_s", "max_s"):
        assert math.isfinite(timing[key]) and timing[key] > 0, (key, timing)
    assert timing["min_s"] <= timing["mean_s"] <= timing["max_s"]
    assert len(timing["samples_s"]) == timing["repetitions"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--latent", "8", "8", "8", "--iterations", "1"]
    command += ["--warmup", "0", "--steps", "2", "--device", "cpu", "--json-out", str(json_out)]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    return json.loads(json_out.read_text()), result.stdout


def test_every_row_has_positive_finite_timings(report):
    data, _ = report
    results = data["results"]
    assert_timing(results["forward"])
    assert_timing(results["sampling_step"])
    assert set(results["decode"]) == set(DECODE_ROWS)
    for strategy in DECODE_ROWS:
        row = results["decode"][strategy]
        assert_timing(row)
        assert math.isfinite(row["peak_memory_mb"]) and row["peak_memory_mb"] > 0
        assert row["peak_memory_delta_mb"] >= 0
    assert results["decode"]["sliding"]["num_tiles"] > 1


def test_overhead_is_step_over_forward(report):
    data, _ = report
    forward, step = data["results"]["forward"], data["results"]["sampling_step"]
    assert step["overhead_percent"] == pytest.approx((step["mean_s"] / forward["mean_s"] - 1) * 100)
    assert step["overhead_percent_median"] == pytest.approx((step["median_s"] / forward["median_s"] - 1) * 100)


def test_report_describes_machine_and_prints_table(report):
    data, stdout = report
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch"]
    assert data["settings"]["tiny"] is True and data["settings"]["steps"] == 2
    for row in ("ControlNet+UNet forward", "sample_latent, per step (2 steps)", "decode whole-1", "decode sliding"):
        assert f"| {row} |" in stdout
