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
GPU readiness check (run by ``bench/gpu_check.sh``): one table of this project's figures next to the
published MAISI A100 80 GB figures (``docs/performance.md`` of MAISI, Table 3).

1. rflow-ct pair generation through the bundle's own ``configs/inference.json`` (in process), with random
   weights written in the published checkpoint formats and a synthetic user mask, at each ``--sizes``
   output size: diffusion and decode seconds from the run report, peak GPU memory of the run.
2. the BraTS training steps (``bench/bench_brats_ldm2d.py`` on the same device).
3. one ControlNet + UNet forward of the full-size CT networks in float32 and under float16 / bfloat16
   autocast, with and without memory-efficient (flash) attention: seconds, peak memory, max abs
   difference to float32.

``--tiny`` shrinks the networks and sizes so that the same code runs on a CPU in seconds (the suite runs
it); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

logger = logging.getLogger("gpu_check")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "maisi_ct_generative"
sys.path.insert(0, str(REPO_ROOT))

from demo.maisi_presets import MAISI_TINY_AUTOENCODER  # noqa: E402
SPACING = {(256, 256, 128): (1.5, 1.5, 2.0), (512, 512, 512): (1.0, 1.0, 1.0)}
# MAISI docs/performance.md, A100 80 GB, rflow-ct: (peak GB, VAE s, DM s) of the published configs
PUBLISHED_A100 = {
    (256, 256, 128): {"peak_gb": 15.0, "decode_s": 1.0, "diffusion_s": 2.0, "config": "16g, not tiled, 2 splits"},
    (512, 512, 512): {"peak_gb": 45.3, "decode_s": 32.0, "diffusion_s": 19.0, "config": "80g, roi [80,80,80], 2 splits"},
}
TINY_NETWORKS: dict[str, Any] = {
    **MAISI_TINY_AUTOENCODER,  # the tests' tiny autoencoder: the pair decodes at 256x256x128
    "diffusion_unet_def#num_channels": [8, 16, 16, 16],
    "diffusion_unet_def#num_head_channels": [0, 0, 8, 8],
    "diffusion_unet_def#num_res_blocks": 1,
    "diffusion_unet_def#norm_num_groups": 8,
    "controlnet_def#num_channels": [8, 16, 16, 16],
    "controlnet_def#num_head_channels": [0, 0, 8, 8],
    "controlnet_def#num_res_blocks": 1,
    "controlnet_def#norm_num_groups": 8,
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
}
TINY_SIZES = ((256, 256, 128),)  # the smallest CT output size the bundle allows


def parse_size(text: str) -> tuple[int, int, int]:
    """argparse type: ``XxYxZ``."""
    sizes = tuple(int(v) for v in text.lower().split("x"))
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; it must be XxYxZ.")
    return sizes  # type: ignore[return-value]


@contextmanager
def bundle_on_path() -> Iterator[None]:
    """Make ``bundles/maisi_ct_generative/scripts`` importable as ``scripts``."""
    sys.path.insert(0, str(BUNDLE))
    try:
        yield
    finally:
        sys.path.remove(str(BUNDLE))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak memory PyTorch allocated on a CUDA device since the last reset (``None`` on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def parser_for(overrides: Mapping[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def randomize_zero_weights(network: torch.nn.Module) -> torch.nn.Module:
    """Give MONAI's zero-initialised output convolutions random weights, so that every network matters."""
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.dim() > 1 and not parameter.any():
                torch.nn.init.normal_(parameter, std=0.02)
    return network


def write_random_weights(models: Path, overrides: Mapping[str, Any], seed: int = 0) -> dict[str, str]:
    """Random weights in the published formats: autoencoder plain, ``unet_state_dict`` + ``scale_factor``, ``controlnet_state_dict``."""
    models.mkdir(parents=True, exist_ok=True)
    parser = parser_for({**overrides, "device": torch.device("cpu")})
    torch.manual_seed(seed)
    paths = {}
    for net_id, config_id, key in (
        ("autoencoder_def", "trained_autoencoder_path", None),
        ("diffusion_unet_def", "trained_diffusion_path", "unet_state_dict"),
        ("controlnet_def", "trained_controlnet_path", "controlnet_state_dict"),
    ):
        network = randomize_zero_weights(parser.get_parsed_content(net_id))
        payload: dict[str, Any] = network.state_dict() if key is None else {key: network.state_dict()}
        if key == "unet_state_dict":
            payload["scale_factor"] = torch.tensor(1.0)
        path = models / f"{net_id}.pt"
        torch.save(payload, path)
        paths[config_id] = str(path)
        del network
    return paths


def write_mask(path: Path, size: Sequence[int], spacing: Sequence[float]) -> None:
    """A body (200) holding a liver (1) and a spleen (3), at the output geometry."""
    x, y, z = size
    mask = np.zeros(size, dtype=np.uint8)
    mask[x // 8 : -x // 8, y // 8 : -y // 8, :] = 200
    mask[x // 4 : x // 2, y // 4 : y // 2, z // 4 : 3 * z // 4] = 1
    mask[x // 2 + x // 32 : 3 * x // 4, y // 4 : y // 2, z // 4 : z // 2] = 3
    nib.save(nib.Nifti1Image(mask, np.diag([*spacing, 1.0])), str(path))


def pair_generation(size: tuple[int, int, int], device: torch.device, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One rflow-ct pair through the bundle's ``initialize`` and ``run``; phase seconds and peak memory."""
    spacing = SPACING.get(size, (1.5, 1.5, 2.0))
    tiny = TINY_NETWORKS if args.tiny else {}
    models = work / "models"
    weights = write_random_weights(models, tiny)
    mask = work / f"mask_{'x'.join(map(str, size))}.nii.gz"
    write_mask(mask, size, spacing)
    output = work / f"out_{'x'.join(map(str, size))}"
    overrides = {**tiny, **weights, "device": device, "output_size": list(size), "spacing": list(spacing),
                 "mask_path": str(mask), "output_dir": str(output), "num_inference_steps": args.steps,
                 "quality_check_max_attempts": 1, "progress": False}
    if args.tiny:
        overrides["memory_budget_gb"] = 1000.0  # the planner's models are the full-size decoder's: decode whole
    parser = parser_for(overrides)
    reset_peak(device)
    start = time.perf_counter()
    for section in ("initialize", "run"):
        parser.get_parsed_content(section)
    synchronize(device)
    wall = time.perf_counter() - start
    report = json.loads((output / "generation_report.json").read_text())
    timings = report["timings"]
    return {"size": list(size), "wall_s": wall, "diffusion_s": timings.get("diffusion_s"), "decode_s": timings.get("decode_s"),
            "peak_gb": peak_gb(device), "decode_plan": report["samples"][0]["decode_plan"], "steps": args.steps}


def brats_steps(device: torch.device, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``bench/bench_brats_ldm2d.py`` on the device (a subprocess); its JSON."""
    out = work / "brats.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / "bench_brats_ldm2d.py"), "--device", str(device), "--json-out", str(out)]
    command += ["--tiny", "--iterations", "1", "--warmup", "0", "--steps", "2", "--batch-size", "2"] if args.tiny else \
        ["--iterations", "3", "--warmup", "1", "--steps", "10", "--batch-size", "2"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def autocast_forwards(device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ControlNet + UNet forward in float32, fp16 and bf16 autocast, flash attention off and on."""
    from scripts.attention import use_memory_efficient_attention
    from scripts.labels import binarize_labels, spacing_condition
    from scripts.sampler import SamplingConditions, predict

    parser = parser_for({**(TINY_NETWORKS if args.tiny else {}), "device": device})
    torch.manual_seed(0)
    unet = randomize_zero_weights(parser.get_parsed_content("diffusion_unet_def")).to(device).eval()
    controlnet = randomize_zero_weights(parser.get_parsed_content("controlnet_def")).to(device).eval()
    latent = args.forward_latent
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 132, (1, 1, *(4 * s for s in latent)), generator=generator)
    conditions = SamplingConditions(spacing=spacing_condition((1.5, 1.5, 2.0)), class_labels=torch.tensor([1]),
                                    controlnet_cond=binarize_labels(labels)).to(device)
    x = torch.randn((1, 4, *latent), generator=generator).to(device)
    t = torch.full((1,), 500.0, device=device)
    rows, reference = [], None
    dtypes = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
    for flash in (False, True):
        use_memory_efficient_attention(unet, flash)
        use_memory_efficient_attention(controlnet, flash)
        for name, dtype in dtypes.items():
            if dtype is torch.float16 and device.type != "cuda":
                continue  # float16 only on CUDA

            def forward() -> torch.Tensor:
                autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
                with torch.no_grad(), autocast:
                    return predict(unet, controlnet, x, t, conditions)

            forward()
            reset_peak(device)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.forward_repeats):
                out = forward()
            synchronize(device)
            seconds = (time.perf_counter() - start) / args.forward_repeats
            reference = out.float() if reference is None else reference
            rows.append({"dtype": name, "flash_attention": flash, "seconds": seconds, "peak_gb": peak_gb(device),
                         "max_abs_diff_to_float32": float((out.float() - reference).abs().max())})
    return rows


def format_table(results: Mapping[str, Any]) -> str:
    """The one table: ours next to the published A100 figures."""
    lines = [f"device: {results['device']}, torch {results['torch']}", "",
             "| check | ours | published A100 80 GB (MAISI Table 3) |", "|---|---|---|"]
    for row in results["pairs"]:
        size = tuple(row["size"])
        published = PUBLISHED_A100.get(size)
        ref = "n/a" if published is None else (f"DM {published['diffusion_s']:.0f} s (30 steps), VAE {published['decode_s']:.0f} s, "
                                               f"peak {published['peak_gb']} GB ({published['config']})")
        peak = "n/a (CPU)" if row["peak_gb"] is None else f"{row['peak_gb']:.1f} GB"
        lines.append(f"| rflow-ct pair {'x'.join(map(str, size))} | sampling {row['diffusion_s']:.1f} s ({row['steps']} steps), "
                     f"decode {row['decode_s']:.1f} s, peak {peak}; {row['decode_plan']} | {ref} |")
    brats = results.get("brats")
    if brats:
        for name, row in brats.get("results", {}).items():
            if isinstance(row, Mapping) and "median_s" in row:
                lines.append(f"| BraTS {name} | {row['median_s']:.3g} s | n/a |")
    for row in results["forwards"]:
        peak = "" if row["peak_gb"] is None else f", peak {row['peak_gb']:.2f} GB"
        lines.append(f"| forward {row['dtype']}, flash {row['flash_attention']} | {row['seconds'] * 1e3:.1f} ms{peak}, "
                     f"max abs diff {row['max_abs_diff_to_float32']:.2e} | n/a |")
    return "\n".join(lines)


def build_arg_parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--tiny", action="store_true", help="tiny networks and sizes (a CPU smoke run)")
    cli.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    cli.add_argument("--sizes", type=parse_size, nargs="+", default=None, help="output sizes (default 256x256x128 512x512x512)")
    cli.add_argument("--steps", type=int, default=30, help="rflow steps (default 30, the published setting)")
    cli.add_argument("--forward-latent", type=int, nargs=3, default=None, help="latent of the forward checks (default 64 64 32)")
    cli.add_argument("--forward-repeats", type=int, default=3)
    cli.add_argument("--skip-brats", action="store_true")
    cli.add_argument("--json-out", type=Path, default=None)
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_arg_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.sizes is None:
        args.sizes = list(TINY_SIZES) if args.tiny else [(256, 256, 128), (512, 512, 512)]
    if args.forward_latent is None:
        args.forward_latent = [8, 8, 8] if args.tiny else [64, 64, 32]
    if args.tiny:
        args.steps = min(args.steps, 2)
        args.forward_repeats = 1
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder, bundle_on_path():
        work = Path(folder)
        results["pairs"] = [pair_generation(tuple(size), device, args, work) for size in args.sizes]
        if not args.skip_brats:
            results["brats"] = brats_steps(device, args, work)
        results["forwards"] = autocast_forwards(device, args)
    print(format_table(results))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
