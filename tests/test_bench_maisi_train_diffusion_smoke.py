"""Smoke test of bench/bench_maisi_train_diffusion.py: a tiny run reports positive, finite timings for both workloads."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from bundle_helpers import REPO_ROOT


def test_tiny_benchmark_reports_timings(tmp_path):
    json_out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / "bench_maisi_train_diffusion.py"), "--tiny", "--latent", "8", "8", "8"]
    command += ["--iterations", "2", "--warmup", "1", "--image", "32", "32", "32", "--images", "1", "--device", "cpu", "--json-out", str(json_out)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(json_out.read_text())
    assert report["tiny"] and report["machine"]["device"] == "cpu"
    training = report["train_diffusion"]
    assert training["latent_shape"] == [4, 8, 8, 8] and training["per_iteration"]["repetitions"] == 2
    embedding = report["create_embeddings"]
    assert embedding["image_shape"] == [32, 32, 32] and embedding["per_image"]["repetitions"] == 1
    for timing in (training["per_iteration"], embedding["per_image"]):
        assert all(math.isfinite(s) and s > 0 for s in timing["samples_s"])
        assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]
