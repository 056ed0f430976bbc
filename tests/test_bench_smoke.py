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
COMPARISON_ROWS = {
    "ae_train_step": "iteration",
    "diffusion_train_step": "iteration",
    "latent_encoding_per_slice": "slice",
    "diffusion_first_epoch": "epoch",
    "sampling_loop": "image",
    "sampling_whole_process": "process",
}
TABLE_ROWS = (
    "AE train step, per iteration",
    "diffusion train step, per iteration (every slice in the memo)",
    "latent encoding, per slice",
    "first epoch of the zoo workload, from an empty memo",
    "sampling loop + decode (DDIM 2), per image",
    "whole process `monai.bundle run` (DDIM 2, 1 image), per process",
)


def assert_timing(timing: dict, unit: str, memory: bool = True) -> None:
    assert timing["unit"] == unit
    assert timing["repetitions"] == 1
    for key in ("mean_s", "median_s", "min_s", "max_s") + (("peak_memory_mb",) if memory else ()):
        assert math.isfinite(timing[key]) and timing[key] > 0, (key, timing)
    assert timing["min_s"] <= timing["mean_s"] <= timing["max_s"]
    assert len(timing["samples_s"]) == timing["repetitions"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--iterations", "1", "--warmup", "0", "--steps", "2"]
    command += ["--batch-size", "2", "--epoch-repetitions", "1", "--process-repetitions", "1"]
    command += ["--device", "cpu", "--threads", "1", "--json-out", str(json_out)]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    return json.loads(json_out.read_text()), result.stdout


def test_every_row_has_positive_finite_timings(report):
    data, _ = report
    results = data["results"]
    assert set(results) >= {*COMPARISON_ROWS, "ae_train_step_phases", "import_torch_monai"}
    for row, unit in COMPARISON_ROWS.items():
        memory = row != "sampling_whole_process"  # a subprocess' memory is not measured
        assert_timing(results[row]["bundle"], unit, memory)
        assert_timing(results[row]["reference"], unit, memory)
    phases = results["ae_train_step_phases"]
    assert len(phases) == 9 and "autoencoder forward" in phases
    for timing in phases.values():
        assert math.isfinite(timing["median_s"]) and timing["median_s"] > 0


def test_bundle_and_reference_sample_the_same_image(report):
    data, _ = report
    difference = float(data["results"]["extra"]["sampling: max abs difference bundle vs reference image (clipped to [0, 1])"])
    assert difference < 1e-3  # SDPA vs explicit attention: equal up to rounding


def test_report_describes_machine_and_prints_table(report):
    data, stdout = report
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["cpu_cores"] >= 1 and machine["torch"]
    assert data["settings"]["tiny"] is True and data["settings"]["steps"] == 2
    for row in TABLE_ROWS:
        assert f"| {row} |" in stdout
