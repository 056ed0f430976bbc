"""Smoke test of bench/bench_body_mask.py: a tiny run reports a timing for every scipy candidate and a good envelope."""

from __future__ import annotations

import json
import subprocess
import sys

from bundle_helpers import REPO_ROOT


def test_bench_body_mask_tiny_run(tmp_path):
    json_out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / "bench_body_mask.py"), "--shape", "64", "64", "32", "--spacing", "6", "6", "8"]
    command += ["--repeats", "2", "--skip-monai", "--json-out", str(json_out)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    report = json.loads(json_out.read_text())
    expected = {
        "fill_holes/scipy_in_plane_structure (ours)",
        "fill_holes/scipy_per_slice_loop",
        "largest_component/scipy_label_bincount (ours)",
        "erode_10mm/scipy_minimum_filter_square (ours)",
        "erode_10mm/edt_per_slice_round",
        "image_envelope/ct (ours)",
    }
    assert set(report["median_s"]) == expected and all(len(v) == 2 and min(v) > 0 for v in report["samples_s"].values())
    assert report["envelope"]["dice_vs_true_body"] > 0.98 and report["envelope"]["table_voxels_left_in_envelope_fraction"] < 0.15
    filled = report["voxels_filled_by_hole_filling"]
    assert filled["fill_holes/scipy_per_slice_loop"] == filled["fill_holes/scipy_in_plane_structure (ours)"] > 0
