# Copyright (c) MONAI generative bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Dataset-scale throughput of ``maisi_ct_generative``: samples per hour for a fixed small manifest, 1 process vs N.

A manifest of ``--samples`` user-mask requests (a synthetic body with liver and spleen) is generated with the
bundle's own ``configs/inference.json`` from the command line, once in one process and once under ``torchrun``
with ``configs/multi_gpu_inference.json`` (gloo on CPU, NCCL on GPU), with the full-size networks and random
weights in the published formats (or ``--tiny`` ones for a smoke run). Threads are split evenly: each of the N
processes gets ``cores / N`` torch threads, the single process all of them. The two runs must write the same
image bytes; the report gives wall seconds, samples per hour and the speed-up.

Example::

    python bench/bench_maisi_dataset.py --samples 2 --steps 2 --processes 2 --json-out bench/results_dataset.json
    python bench/bench_maisi_dataset.py --tiny --samples 2 --steps 1 --json-out /tmp/dataset.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "maisi_ct_generative"
sys.path.insert(0, str(REPO_ROOT))

from demo.runner import bundle_command, bundle_scripts  # noqa: E402

OUTPUT_SIZE = [256, 256, 128]
SPACING = [1.5, 1.5, 2.0]
TINY = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
    **{f"{net}#{k}": v for net in ("diffusion_unet_def", "controlnet_def") for k, v in
       {"num_channels": [8, 16, 16], "attention_levels": [False, False, False], "num_head_channels": [0, 0, 8], "num_res_blocks": 1, "norm_num_groups": 8}.items()},  # fmt: skip
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
}


def write_weights(models: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """Random weights in the published formats for the networks of ``configs/inference.json``."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = {}
    for net_id, config_id, key in (
        ("autoencoder_def", "trained_autoencoder_path", None),
        ("diffusion_unet_def", "trained_diffusion_path", "unet_state_dict"),
        ("controlnet_def", "trained_controlnet_path", "controlnet_state_dict"),
    ):
        with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
            state = parser.get_parsed_content(net_id).state_dict()
        payload = state if key is None else {key: state}
        if key == "unet_state_dict":
            payload["scale_factor"] = torch.tensor(1.0)
        torch.save(payload, models / f"{net_id}.pt")
        paths[config_id] = str(models / f"{net_id}.pt")
    return paths


def write_manifest(root: Path, samples: int) -> str:
    mask = np.zeros(OUTPUT_SIZE, dtype=np.uint8)
    mask[20:-20, 20:-20, :] = 200
    mask[60:120, 60:120, 30:90] = 1
    mask[140:190, 60:120, 30:60] = 3
    nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), str(root / "mask.nii.gz"))
    rows = [{"id": f"case{i}", "mask_path": str(root / "mask.nii.gz")} for i in range(samples)]
    (root / "manifest.json").write_text(json.dumps(rows))
    return str(root / "manifest.json")


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-4000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--memory-budget-gb", type=float, default=8.0, help="decode budget of each process (pinned, so both runs plan alike)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = {**(TINY if args.tiny else {}), **write_weights(root / "models", TINY if args.tiny else {})}
        common = {"bundle_root": ".", "request_manifest": write_manifest(root, args.samples), "output_size": OUTPUT_SIZE,
                  "spacing": SPACING, "num_inference_steps": args.steps, "quality_check_max_attempts": 1, "progress": False, "memory_budget_gb": args.memory_budget_gb, **overrides}  # fmt: skip
        single = run(bundle_command(["inference.json"], {**common, "output_dir": str(root / "one")}), cores)
        multi_command = bundle_command(["inference.json", "multi_gpu_inference.json"], {**common, "output_dir": str(root / "many")}, torchrun_procs=args.processes)
        multi = run(multi_command, max(1, cores // args.processes))
        same = all((root / "one" / p.name).read_bytes() == p.read_bytes() for p in (root / "many").glob("*_image.nii.gz"))
        reports = {run: json.loads((root / run / "generation_report.json").read_text()) for run in ("one", "many")}
        phases = {run: report["timings"] for run, report in reports.items()}
        plans = sorted({sample["decode_plan"] for report in reports.values() for sample in report["samples"]})
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores, "load_average": os.getloadavg(), "cuda": torch.cuda.is_available()},
        "settings": {"samples": args.samples, "steps": args.steps, "processes": args.processes, "tiny": args.tiny, "output_size": OUTPUT_SIZE,
                     "memory_budget_gb": args.memory_budget_gb},
        "one_process": {"wall_s": single, "samples_per_hour": 3600 * args.samples / single},
        f"{args.processes}_processes": {"wall_s": multi, "samples_per_hour": 3600 * args.samples / multi},
        "speed_up": single / multi,
        "phase_seconds_summed_over_samples": phases,
        "decode_plans": plans,
        "same_image_bytes": same,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
