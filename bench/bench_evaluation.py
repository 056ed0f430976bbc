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
Benchmark of the MAISI evaluations: seconds per volume for 2.5D FID features and for the reconstruction check.

Rows (random weights: timing and memory do not depend on the weight values):

1. ``features_every_slice``: 2.5D FID features of one preprocessed ``--shape`` volume (default
   256 x 256 x 128) with the full-size RadImageNet-layout ResNet50 (``scripts.fid.ResNetFeatures``),
   every slice of the three planes, ``--slice-batch-size`` slices per forward pass (the bundle);
2. ``features_every_slice_one_batch``: the same with each plane's whole stack in ONE batch, as the
   published ``compute_fid_2-5d_ct.py`` forwards it (same code, batch size = stack size; the published
   script itself needs CUDA + NCCL and downloads its network, so it cannot run here);
3. ``features_ratio_0.4``: the bundle with ``center_slices_ratio`` 0.4 (the published setting);
4. ``reconstruction``: ``scripts.evaluation_recon.AutoencoderReconstruction.evaluate_case`` on one
   ``--recon-shape`` CT volume (default 128 x 128 x 64) with the full-size MAISI autoencoder
   (``autoencoder_def`` of ``configs/inference.json``): load, encode, planned decode within
   ``--memory-budget-gb``, PSNR/SSIM/MAE and the preview data.

Rows alternate (A B C D A B C D ...) so background load hits them alike. Peak memory is the process'
``VmHWM`` reset before each call (Linux), i.e. the resident high-water mark of that call.

Example::

    python bench/bench_evaluation.py --repetitions 2 --json-out /tmp/bench_evaluation.json
    python bench/bench_evaluation.py --tiny --shape 32 32 16 --recon-shape 32 32 16 --repetitions 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from bench_maisi_ct import (  # noqa: E402
    BUNDLE_DIR,
    CONFIG_DIR,
    describe_machine,
    import_bundle_scripts,
    non_negative_int,
    peak_rss_mib,
    positive_int,
    reset_peak_rss,
    stats,
)

logger = logging.getLogger("bench_evaluation")

PLANES = ("xy", "yz", "zx")
TINY_BACKBONE = {"layers": [1, 1, 1, 1], "base_channels": 2}
TINY_AUTOENCODER = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
}
RECON_SPACING = (1.5, 1.5, 2.0)


def ct_volume(shape: Sequence[int], seed: int) -> np.ndarray:
    """A preprocessed-looking CT volume: air around a noisy soft-tissue body, HU in [-1000, 1000]."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000.0, dtype=np.float32)
    inner = tuple(slice(s // 8, s - s // 8) for s in shape)
    volume[inner] = np.clip(rng.normal(40.0, 200.0, size=volume[inner].shape), -1000, 1000)
    return volume


def feature_step(backbone: Any, volume: torch.Tensor, ratio: float | None, batch_size: int | None) -> Callable[[], int]:
    """One volume's 2.5D features; ``batch_size=None`` forwards each plane's stack in one batch."""
    from scripts.evaluation_fid import plane_slices

    def run() -> int:
        rows = 0
        for plane in PLANES:
            slices = plane_slices(volume, plane, ratio)
            rows += backbone.features(slices, batch_size or slices.shape[0]).shape[0]
        return rows

    return run


def reconstruction_step(args: argparse.Namespace, device: torch.device, folder: Path) -> tuple[Callable[[], Any], int]:
    """One ``evaluate_case`` call on a synthetic CT file; returns it and the autoencoder's parameter count."""
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct_volume(args.recon_shape, args.seed), np.diag([*RECON_SPACING, 1.0])), str(path))
    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / "inference.json"), str(CONFIG_DIR / "evaluate_autoencoder.json")])
    parser["bundle_root"] = str(BUNDLE_DIR)
    parser["device"] = device
    parser["memory_budget_gb"] = args.memory_budget_gb
    parser["progress"] = False
    for key, value in (TINY_AUTOENCODER if args.tiny else {}).items():
        parser[key] = value
    evaluator = parser.get_parsed_content("reconstruction_evaluator")
    evaluator.autoencoder.to(device).eval()
    parameters = sum(p.numel() for p in evaluator.autoencoder.parameters())
    return lambda: evaluator.evaluate_case({"image": str(path)})[0], parameters


def measure(steps: Mapping[str, Callable[[], Any]], repetitions: int, warmup: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Alternate the steps; per row: timing statistics (seconds per volume), peak RSS and the last output."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu = dict.fromkeys(steps, 0.0)
    peaks = dict.fromkeys(steps, 0.0)
    outputs: dict[str, Any] = {}
    for _ in range(repetitions):
        for name, step in steps.items():
            reset_peak_rss()
            cpu_start, start = time.process_time(), time.perf_counter()
            outputs[name] = step()
            wall[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
            peaks[name] = max(peaks[name], peak_rss_mib())
    results = {name: {**stats(wall[name], cpu[name] / sum(wall[name])), "unit": "volume", "peak_rss_mib": peaks[name]} for name in steps}
    return results, outputs


def format_table(results: Mapping[str, Any], outputs: Mapping[str, Any], machine: Mapping[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch threads {machine['torch_threads']}, "
        f"device {machine['device']}, load average {machine['load_average_1m']:.2f} -> {machine['load_average_1m_end']:.2f}",
        f"feature volume {'x'.join(map(str, args.shape))}, slice batch {args.slice_batch_size}; "
        f"reconstruction volume {'x'.join(map(str, args.recon_shape))}, memory budget {args.memory_budget_gb} GB",
        "",
        "| row | s per volume (mean / median / min) | peak RSS MiB | CPU s per wall s | output |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        output = outputs[name]
        detail = f"{output} feature rows" if isinstance(output, int) else f"{output['decode_plan']}; PSNR {output['psnr']:.2f} dB"
        lines.append(
            f"| {name} | {row['mean_s']:.3g} / {row['median_s']:.3g} / {row['min_s']:.3g} | {row['peak_rss_mib']:.0f} | "
            f"{row['cpu_per_wall']:.2f} | {detail} |"
        )
    return "\n".join(lines)


def build_arg_parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    cli.add_argument("--tiny", action="store_true", help="tiny backbone and autoencoder, for a smoke run")
    cli.add_argument("--shape", type=positive_int, nargs=3, default=[256, 256, 128], help="feature volume (default 256 256 128)")
    cli.add_argument("--slice-batch-size", type=positive_int, default=32, help="slices per forward pass (default 32)")
    cli.add_argument("--recon-shape", type=positive_int, nargs=3, default=[128, 128, 64], help="reconstruction volume (default 128 128 64)")
    cli.add_argument("--memory-budget-gb", type=float, default=4.0, help="decode memory budget (default 4)")
    cli.add_argument("--repetitions", type=positive_int, default=2, help="timed repetitions per row (default 2)")
    cli.add_argument("--warmup", type=non_negative_int, default=0, help="untimed repetitions first (default 0)")
    cli.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    cli.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights (default 0)")
    cli.add_argument("--json-out", type=Path, default=None, help="also write the results to this JSON file")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exits with 1 if a timing is not positive and finite."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    args = build_arg_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    import_bundle_scripts()
    import scripts.evaluation_recon  # noqa: F401  (the config's targets)
    from scripts.fid import FeatureBackbone, ResNetFeatures

    machine = {**describe_machine(), "device": str(device)}
    machine["load_average_1m"] = machine["load_average_start"][0] if machine["load_average_start"] else None
    network = ResNetFeatures("keras", **(TINY_BACKBONE if args.tiny else {})).to(device).eval()
    backbone = FeatureBackbone(network, "radimagenet_resnet50", "random weights", "none", device)
    volume = torch.from_numpy(ct_volume(args.shape, args.seed))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        reconstruction, parameters = reconstruction_step(args, device, Path(folder))
        steps = {
            "features_every_slice": feature_step(backbone, volume, None, args.slice_batch_size),
            "features_every_slice_one_batch": feature_step(backbone, volume, None, None),
            "features_ratio_0.4": feature_step(backbone, volume, 0.4, args.slice_batch_size),
            "reconstruction": reconstruction,
        }
        results, outputs = measure(steps, args.repetitions, args.warmup)
    machine["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    logger.info("benchmark finished in %.1f s", time.perf_counter() - start)
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "backbone_parameters": sum(p.numel() for p in network.parameters()), "autoencoder_parameters": parameters}
    print(format_table(results, outputs, machine, args))
    report = {"machine": machine, "settings": settings, "results": results, "outputs": {k: v if isinstance(v, int) else dict(v) for k, v in outputs.items()}}
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        logger.info("wrote %s", args.json_out)
    seconds = [row[key] for row in results.values() for key in ("mean_s", "median_s", "min_s")]
    return 0 if all(math.isfinite(value) and value > 0 for value in seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
