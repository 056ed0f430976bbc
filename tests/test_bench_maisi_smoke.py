"""Smoke test of bench/bench_maisi_ct.py: a tiny run of every section but compile (timings meaningless)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bundle_helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "bench_maisi_ct.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--latent", "8", "8", "8", "--iterations", "1", "--warmup", "0"]
    command += ["--steps", "2", "--sections", "forward", "loop", "decode", "memory", "mask", "--memory-latents", "8,8,8"]
    command += ["--tile-latents", "8,8,8", "--mask-latent", "8", "8", "8", "--mask-steps", "3", "--reference-roi", "4"]
    command += ["--budget-gb", "1.02", "--threads", "1", "--json-out", str(json_out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]
    return json.loads(json_out.read_text()), result.stdout


def test_forward_and_loop_compare_ours_with_the_reference(report):
    results = report[0]["results"]
    forward = results["forward"]
    assert forward["output_abs_max"] > 0  # seeded weights, zero-initialised layers randomised: a real output
    assert forward["reference"]["max_abs_diff_to_reference"] == 0.0
    for variant in ("ours", "ours_channels_last"):
        assert 0 < forward[variant]["max_abs_diff_to_reference"] < 1e-4 * forward["output_abs_max"] + 1e-6
        assert math.isfinite(forward[variant]["speedup_vs_reference"]) and forward[variant]["median_s"] > 0
    loop = results["loop"]
    assert loop["step"]["repetitions"] == 1 and loop["step"]["median_s"] > 0
    # the loop's own work (scheduler steps around a network that costs nothing) is far below a forward
    assert 0 < loop["loop_own_seconds_per_step"] < loop["forward"]["median_s"]


def test_decode_rows_report_the_whole_process_peak_and_the_plan(report):
    decode = report[0]["results"]["decode"]
    assert decode["direct"]["ours_identical"] is True
    assert decode["reference-sliding"]["max_abs_diff_to_direct"] > 1e-3  # 4^3 windows of an 8^3 latent have seams
    for run in ("planned", "planned-exact"):
        row = decode[run]
        assert row["ours"]["peak_rss_mib"] >= row["ours"]["resident_mib"] > 100  # the whole process, not the increase
        assert row["plan"].startswith("halo-tiled decode") and row["decoded_voxels"] > 8**3
        assert row["estimated_peak_gb"] * 1e9 / 2**20 >= row["resident_gb_at_plan"] * 1e9 / 2**20
    assert decode["planned-exact"]["max_abs_diff_to_direct"] < 1e-4 < decode["planned"]["max_abs_diff_to_direct"]


def test_memory_and_mask_rows_and_the_printed_tables(report):
    data, stdout = report
    memory = data["results"]["memory"]
    step = memory["sampling_step"][0]
    assert step["latent_voxels"] == 512 and step["peak_rss_mib"] >= step["resident_mib"]
    assert step["unet"]["seconds"] > 0 and step["controlnet"]["seconds"] > 0
    assert memory["halo_tile_decode"][0]["peak_rss_mib"] > 0
    mask = data["results"]["mask"]
    assert mask["latent"] == [4, 8, 8, 8] and mask["ddim_steps"] == 3 and mask["seconds_per_step"] > 0
    assert mask["attention_blocks"] > 0  # the mask UNet's attention runs the memory-efficient kernel
    assert data["machine"]["load_average_start"] and data["machine"]["torch"]
    for row in ("| reference |", "| ours |", "| sample_latent per step |", "| direct (reference) |", "| ours under 1.02 GB |"):
        assert row in stdout
