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
Micro-benchmark of the ``maisi_ct_generative`` bundle's sampling loop and decode strategies.

On a small synthetic latent (random weights, random bit-plane mask, fixed seeds) it measures:

1. one ControlNet + UNet forward (``scripts.sampler.predict``) under ``torch.no_grad``;
2. the time per step of ``scripts.sampler.sample_latent`` with the config's ``RFlowScheduler`` over
   ``--steps`` steps (total / steps), and the loop overhead ``step / forward - 1`` (requirement: <= 5%);
3. decode time and peak memory of each decode strategy (``scripts.decode.decode_latent``) on the
   autoencoder: whole volume with 1, 2 and 4 splits (only split counts valid for the latent extent,
   ``scripts.decode.splits_compatible``) and sliding window (roi = half the latent, overlap 0.25). Each
   strategy runs in its own subprocess of this script (hidden ``--only-decode STRATEGY``) so that the
   CPU peak belongs to that strategy alone; on CUDA the peak is ``torch.cuda.max_memory_allocated``.
   On Linux the CPU peak is ``VmHWM`` (reset to the current RSS just before decoding), because
   ``ru_maxrss`` carries the parent's high-water mark over ``fork`` + ``exec``; ``ru_maxrss`` is also
   recorded in the JSON.

The networks are the full-size ones of ``configs/inference.json`` (built with ``monai.bundle.ConfigParser``,
random weights); ``--tiny`` shrinks them through config overrides for a smoke run.

Example::

    python bench/bench_maisi_ct.py --latent 16 16 16 --iterations 2 --warmup 1 --steps 4 --decode-iterations 1 --decode-warmup 0
    python bench/bench_maisi_ct.py --tiny --latent 8 8 8 --iterations 1 --warmup 0 --steps 2 --json-out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

logger = logging.getLogger("bench_maisi_ct")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundles" / "maisi_ct_generative"
CONFIG_DIR = BUNDLE_DIR / "configs"
UPSAMPLE = 4  # image voxels per latent voxel, per axis
SPACING = (1.5, 1.5, 2.0)
CLASS_LABEL = 1
MASK_BITS = 8
MAX_LABEL = 131
SLIDING_OVERLAP = 0.25

ROW_FORWARD = "forward"
ROW_STEP = "sampling_step"

TINY_OVERRIDES: dict[str, Any] = {
    "diffusion_unet_def#num_channels": [8, 16, 16],
    "diffusion_unet_def#attention_levels": [False, False, False],  # the middle block keeps its attention
    "diffusion_unet_def#num_head_channels": [0, 0, 8],
    "diffusion_unet_def#num_res_blocks": 1,
    "diffusion_unet_def#norm_num_groups": 8,
    "controlnet_def#num_channels": [8, 16, 16],
    "controlnet_def#attention_levels": [False, False, False],
    "controlnet_def#num_head_channels": [0, 0, 8],
    "controlnet_def#num_res_blocks": 1,
    "controlnet_def#norm_num_groups": 8,
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#norm_num_groups": 8,
    "autoencoder_def#num_res_blocks": [1, 1, 1],
}


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mb() -> float:
    """Process maximum resident set size so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10


def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """
    Peak RSS of this process in MiB: ``VmHWM`` of ``/proc/self/status`` on Linux, else ``ru_maxrss``.

    ``ru_maxrss`` alone is useless in a subprocess: Linux carries the parent's high-water mark over
    ``fork`` + ``exec``, so every child started by the main run would report the main run's peak.
    """
    hwm = _status_kib("VmHWM")
    return hwm / 2**10 if hwm is not None else max_rss_mb()


def stats(samples: Sequence[float], unit: str, cpu_per_wall: float) -> dict[str, Any]:
    """Mean / median / min / max of per-unit seconds."""
    return {
        "mean_s": float(np.mean(samples)),
        "median_s": float(np.median(samples)),
        "min_s": float(np.min(samples)),
        "max_s": float(np.max(samples)),
        "samples_s": [float(s) for s in samples],
        "repetitions": len(samples),
        "unit": unit,
        "cpu_per_wall": cpu_per_wall,
    }


def measure_alternating(
    steps: Mapping[str, tuple[Callable[[], Any], int, str]], device: torch.device, warmup: int, repetitions: int
) -> dict[str, dict[str, Any]]:
    """
    Time operations alternating between them every repetition (A B A B ...), so background load on a
    shared machine hits them alike. ``steps`` maps a name to ``(operation, units per call, unit)``.
    """
    for _ in range(warmup):
        for step, _, _ in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu = dict.fromkeys(steps, 0.0)
    for _ in range(repetitions):
        for name, (step, _, _) in steps.items():
            synchronize(device)
            cpu_start, start = time.process_time(), time.perf_counter()
            step()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
    return {
        name: stats([s / units for s in wall[name]], unit, cpu[name] / sum(wall[name]))
        for name, (_, units, unit) in steps.items()
    }


# ----------------------------------------------------------------------------------------------------------
# networks and inputs
# ----------------------------------------------------------------------------------------------------------


def import_bundle_scripts() -> Any:
    """Put ``bundles/maisi_ct_generative`` on ``sys.path`` and import its ``scripts`` package."""
    if str(BUNDLE_DIR) not in sys.path:
        sys.path.insert(0, str(BUNDLE_DIR))
    import scripts

    return scripts


def load_parser(device: torch.device, tiny: bool) -> ConfigParser:
    """``configs/inference.json`` with ``bundle_root``, ``device`` and (``--tiny``) the shrinking overrides."""
    import_bundle_scripts()
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "inference.json"))
    parser["bundle_root"] = str(BUNDLE_DIR)
    parser["device"] = device
    if tiny:
        for config_id, value in TINY_OVERRIDES.items():
            parser[config_id] = value
    return parser


def build(parser: ConfigParser, config_id: str, device: torch.device) -> torch.nn.Module:
    """Instantiate a network of the config with random weights, in eval mode on ``device``."""
    return parser.get_parsed_content(config_id).to(device).eval()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_conditions(latent: Sequence[int], seed: int, device: torch.device) -> Any:
    """Random bit-plane mask of the image size, the spacing condition and class label 1."""
    from scripts.labels import binarize_labels, spacing_condition
    from scripts.sampler import SamplingConditions

    generator = torch.Generator().manual_seed(seed)
    image = [UPSAMPLE * s for s in latent]
    labels = torch.randint(0, MAX_LABEL + 1, (1, 1, *image), generator=generator)
    return SamplingConditions(
        spacing=spacing_condition(SPACING),
        class_labels=torch.tensor([CLASS_LABEL], dtype=torch.long),
        controlnet_cond=binarize_labels(labels, bits=MASK_BITS),
    ).to(device)


def random_latent(channels: int, latent: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, channels, *latent), generator=generator).to(device)


# ----------------------------------------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------------------------------------


def bench_sampling(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Rows 1 and 2: one ControlNet+UNet forward and one ``sample_latent`` step, timed alternately."""
    from scripts.sampler import predict, sample_latent

    parser = load_parser(device, args.tiny)
    unet = build(parser, "diffusion_unet_def", device)
    controlnet = build(parser, "controlnet_def", device)
    scheduler = parser.get_parsed_content("noise_scheduler")
    channels = int(parser["diffusion_unet_def#in_channels"])
    conditions = make_conditions(args.latent, args.seed, device)
    noise = random_latent(channels, args.latent, args.seed + 1, device)
    timesteps = torch.full((1,), 500.0, device=device)
    logger.info("UNet %.1f M parameters, ControlNet %.1f M", num_params(unet) / 1e6, num_params(controlnet) / 1e6)

    def forward() -> None:
        with torch.no_grad():
            predict(unet, controlnet, noise, timesteps, conditions)

    def sampling() -> None:
        sample_latent(unet, scheduler, noise, conditions, args.steps, controlnet=controlnet, progress=False)

    timings = measure_alternating(
        {ROW_FORWARD: (forward, 1, "forward"), ROW_STEP: (sampling, args.steps, "step")},
        device,
        args.warmup,
        args.iterations,
    )
    forward_t, step_t = timings[ROW_FORWARD], timings[ROW_STEP]
    overhead = {
        "overhead_percent": (step_t["mean_s"] / forward_t["mean_s"] - 1.0) * 100.0,
        "overhead_percent_median": (step_t["median_s"] / forward_t["median_s"] - 1.0) * 100.0,
        "overhead_percent_min": (step_t["min_s"] / forward_t["min_s"] - 1.0) * 100.0,
    }
    return {
        ROW_FORWARD: forward_t,
        ROW_STEP: {**step_t, **overhead},
        "params": {"unet": num_params(unet), "controlnet": num_params(controlnet)},
    }


def decode_strategies(latent: Sequence[int], dim_split: int) -> list[str]:
    """Strategy names valid for the latent: ``whole-N`` for compatible split counts, then ``sliding``."""
    from scripts.decode import splits_compatible

    names = [f"whole-{n}" for n in (1, 2, 4) if splits_compatible(int(latent[dim_split]), n)]
    return [*names, "sliding"]


def sliding_roi(latent: Sequence[int]) -> tuple[int, int, int]:
    """Half the latent per axis (8^3 for a 16^3 latent)."""
    return tuple(max(s // 2, 1) for s in latent)  # type: ignore[return-value]


def decode_once(args: argparse.Namespace, device: torch.device, strategy: str) -> dict[str, Any]:
    """Body of the ``--only-decode`` subprocess: build the autoencoder, decode, report time and peak memory."""
    from scripts.decode import LatentDecoder, decode_latent, plan_decode

    parser = load_parser(device, args.tiny)
    autoencoder = build(parser, "autoencoder_def", device)
    channels = int(parser["autoencoder_def#latent_channels"])
    latent = random_latent(channels, args.latent, args.seed + 2, device)
    decoder = LatentDecoder(autoencoder).eval()
    if strategy == "sliding":
        plan = plan_decode(latent.shape, device, roi_size=sliding_roi(args.latent), overlap=SLIDING_OVERLAP, num_splits=1)
    else:
        splits = int(strategy.split("-")[1])
        plan = plan_decode(latent.shape, device, roi_size=tuple(args.latent), num_splits=splits)

    def run_decode() -> None:
        image = decode_latent(decoder, latent, plan, progress=False)
        assert tuple(image.shape[2:]) == tuple(UPSAMPLE * s for s in args.latent), image.shape

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_peak_rss()
        baseline = peak_rss_mb()
    timing = measure_alternating(
        {"decode": (run_decode, 1, "decode")}, device, args.decode_warmup, args.decode_iterations
    )["decode"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {
        **timing,
        "strategy": strategy,
        "plan": plan.describe(),
        "num_tiles": plan.num_tiles,
        "peak_memory_mb": peak,
        "baseline_memory_mb": baseline,
        "peak_memory_delta_mb": peak - baseline,
        "ru_maxrss_mb": max_rss_mb(),
        "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss_vmhwm",
    }


def bench_decode(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Row 3: one fresh subprocess of this script per decode strategy."""
    parser = load_parser(device, args.tiny)
    strategies = decode_strategies(args.latent, int(parser["autoencoder_def#dim_split"]))
    results = {}
    for strategy in strategies:
        command = [sys.executable, str(Path(__file__).resolve()), "--only-decode", strategy]
        command += ["--latent", *map(str, args.latent), "--decode-iterations", str(args.decode_iterations)]
        command += ["--decode-warmup", str(args.decode_warmup), "--device", args.device, "--seed", str(args.seed)]
        if args.tiny:
            command.append("--tiny")
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        logger.info("decode strategy %s in a subprocess", strategy)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results[strategy] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Machine and software description recorded with the results."""
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _seconds(row: Mapping[str, Any]) -> str:
    return f"{row['mean_s']:.3g} / {row['median_s']:.3g} / {row['min_s']:.3g}"


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: Mapping[str, Any], machine: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Markdown table preceded by the machine and workload description."""
    forward, step = results[ROW_FORWARD], results[ROW_STEP]
    gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
    memory_kind = "CUDA max allocated" if machine["gpu"] else "peak RSS delta over the decode, fresh subprocess"
    latent = "x".join(map(str, settings["latent"]))
    image = "x".join(str(UPSAMPLE * s) for s in settings["latent"])
    lines = [
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), monai {machine['monai']}, device {machine['device']}{gpu}; "
        f"1-min load average {_load(machine.get('load_average_1m'))} at start, "
        f"{_load(machine.get('load_average_1m_end'))} at end",
        f"workload: {'tiny' if settings['tiny'] else 'full-size'} networks, latent {latent} (image {image}), "
        f"{settings['iterations']} timed + {settings['warmup']} warm-up repetitions (decode: "
        f"{settings['decode_iterations']} + {settings['decode_warmup']} per strategy), RFlow {settings['steps']} steps",
        "",
        f"| measurement | s (mean / median / min) | peak memory MiB ({memory_kind}) | CPU s per wall s | notes |",
        "|---|---|---|---|---|",
        f"| ControlNet+UNet forward | {_seconds(forward)} | n/a | {forward['cpu_per_wall']:.2f} | |",
        f"| sample_latent, per step ({settings['steps']} steps) | {_seconds(step)} | n/a | {step['cpu_per_wall']:.2f} "
        f"| loop overhead {step['overhead_percent']:+.1f}% (mean), {step['overhead_percent_median']:+.1f}% (median), "
        f"{step['overhead_percent_min']:+.1f}% (min) |",
    ]
    for strategy, row in results["decode"].items():
        lines.append(
            f"| decode {strategy} | {_seconds(row)} | {row['peak_memory_delta_mb']:.0f} "
            f"(peak {row['peak_memory_mb']:.0f}) | {row['cpu_per_wall']:.2f} | {row['plan']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be an integer >= 1.")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be an integer >= 0.")
    return number


def build_arg_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    cli.add_argument("--tiny", action="store_true", help="shrink the networks for a smoke run")
    cli.add_argument(
        "--latent", type=positive_int, nargs=3, default=[16, 16, 16], help="latent spatial size (default 16 16 16)"
    )
    cli.add_argument("--iterations", type=positive_int, default=3, help="timed repetitions per row (default 3)")
    cli.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repetitions first (default 1)")
    cli.add_argument(
        "--decode-iterations", type=positive_int, default=None, help="timed decodes per strategy (default: --iterations)"
    )
    cli.add_argument(
        "--decode-warmup", type=non_negative_int, default=None, help="untimed decodes per strategy (default: --warmup)"
    )
    cli.add_argument("--steps", type=positive_int, default=4, help="RFlow sampling steps (default 4)")
    cli.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    cli.add_argument("--threads", type=positive_int, default=None, help="torch intra-op CPU threads")
    cli.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs and weights (default 0)")
    cli.add_argument("--json-out", type=Path, default=None, help="also write the results to this JSON file")
    cli.add_argument("--only-decode", default=None, help=argparse.SUPPRESS)  # internal: one decode strategy
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exits with 1 if a timing is not positive and finite."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    args = build_arg_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.decode_iterations is None:
        args.decode_iterations = args.iterations
    if args.decode_warmup is None:
        args.decode_warmup = args.warmup
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import_bundle_scripts()
    if args.only_decode is not None:
        print(json.dumps(decode_once(args, device, args.only_decode)))
        return 0

    machine = describe_machine(device)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    logger.info("machine: %s", machine)
    start = time.perf_counter()
    results = bench_sampling(args, device)
    results["decode"] = bench_decode(args, device)
    logger.info("benchmark finished in %.1f s", time.perf_counter() - start)
    machine["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(format_table(results, machine, settings))
    report = {"machine": machine, "settings": settings, "results": results}
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        logger.info("wrote %s", args.json_out)
    rows = [results[ROW_FORWARD], results[ROW_STEP], *results["decode"].values()]
    seconds = [row[key] for row in rows for key in ("mean_s", "median_s", "min_s")]
    if not all(math.isfinite(value) and value > 0 for value in seconds):
        logger.error("non-positive or non-finite timing in %s", results)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
