"""The CPU fallback of bench/gpu_check.sh (tiny networks): every check runs and the table is printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bundle_helpers import REPO_ROOT


def test_gpu_check_runs_on_the_cpu_in_tiny_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--tiny", "--skip-brats", "--json-out", str(out)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu"
    (pair,) = data["pairs"]  # the bundle's own config ran: mask -> sampling -> decode -> files and report
    assert pair["size"] == [256, 256, 128] and pair["steps"] == 2 and pair["peak_gb"] is None
    assert pair["diffusion_s"] > 0 and pair["decode_s"] > 0 and pair["decode_plan"].startswith("whole-volume decode")
    rows = {(row["dtype"], row["flash_attention"]): row for row in data["forwards"]}
    assert set(rows) == {("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)}  # no fp16 on CPU
    assert rows[("float32", False)]["max_abs_diff_to_float32"] == 0.0
    assert rows[("float32", True)]["max_abs_diff_to_float32"] < 1e-4  # flash attention agrees with the explicit path
    assert 0 < rows[("bfloat16", True)]["max_abs_diff_to_float32"] < 1.0
    assert "| rflow-ct pair 256x256x128 |" in result.stdout and "published A100 80 GB" in result.stdout
    assert "DM 2 s (30 steps), VAE 1 s, peak 15.0 GB" in result.stdout
