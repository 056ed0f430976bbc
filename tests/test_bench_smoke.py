"""Smoke test of bench/bench_brats_ldm2d.py: a tiny run must report positive, finite timings for every row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bundle_helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "bench_brats_ldm2d.py"
COMPARISON_ROWS = ("ae_train_step", "diffusion_train_step")
SINGLE_ROWS = ("latent_encoding_per_slice", "sampling_per_image")


def assert_timing(timing: dict, unit: str) -> None:
    assert timing["unit"] == unit
    assert timing["repetitions"] == 1
    for key in ("mean_s", "median_s", "min_s", "max_s", "peak_memory_mb"):
        assert math.isfinite(timing[key]) and timing[key] > 0, (key, timing)
    assert timing["min_s"] <= timing["mean_s"] <= timing["max_s"]
    assert len(timing["samples_s"]) == timing["repetitions"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--iterations", "1", "--warmup", "0", "--steps", "2"]
    command += ["--batch-size", "2", "--device", "cpu", "--json-out", str(json_out)]
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
    assert set(results) == {*COMPARISON_ROWS, *SINGLE_ROWS}
    for row in COMPARISON_ROWS:
        assert_timing(results[row]["bundle"], "iteration")
        assert_timing(results[row]["reference"], "iteration")
    assert_timing(results["latent_encoding_per_slice"], "slice")
    assert_timing(results["sampling_per_image"], "image")


def test_speedups_are_reference_over_bundle(report):
    data, _ = report
    for row in COMPARISON_ROWS:
        entry = data["results"][row]
        assert entry["speedup"] == pytest.approx(entry["reference"]["mean_s"] / entry["bundle"]["mean_s"])
        assert entry["speedup_median"] == pytest.approx(entry["reference"]["median_s"] / entry["bundle"]["median_s"])
        assert entry["speedup_min"] == pytest.approx(entry["reference"]["min_s"] / entry["bundle"]["min_s"])


def test_report_describes_machine_and_prints_table(report):
    data, stdout = report
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["cpu_cores"] >= 1 and machine["torch"]
    assert data["settings"]["tiny"] is True and data["settings"]["steps"] == 2
    for row in (
        "AE train step, per iteration",
        "diffusion train step, per iteration",
        "one-off latent encoding, per slice",
        "sampling (DDIM 2 steps), per image",
    ):
        assert f"| {row} |" in stdout
