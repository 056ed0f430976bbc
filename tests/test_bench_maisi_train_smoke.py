"""Smoke test of bench/bench_maisi_train_vae_controlnet.py: a tiny run reports positive, finite timings for both trainers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from bundle_helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "bench_maisi_train_vae_controlnet.py"


def test_tiny_run_reports_both_trainers(tmp_path):
    json_out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--iterations", "2", "--warmup", "0", "--vae-patch", "16", "16", "16"]
    command += ["--latent", "8", "8", "8", "--device", "cpu", "--json-out", str(json_out)]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-6000:]
    report = json.loads(json_out.read_text())
    assert report["environment"]["device"] == "cpu" and report["tiny"] is True
    for name in ("autoencoder", "controlnet"):
        row = report["results"][name]
        assert row["repetitions"] == 2 and len(row["samples_s"]) == 2
        assert all(math.isfinite(v) and v > 0 for v in row["samples_s"])
        assert row["min_s"] <= row["mean_s"] <= row["max_s"]
        assert f"{name:12s} s/iteration mean" in result.stdout
    assert report["results"]["autoencoder"]["workload"]["patch"] == [16, 16, 16]
    assert report["results"]["controlnet"]["workload"]["mask"] == [32, 32, 32]
