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
Speed and memory of ``maisi_ct_generative`` generation, side by side with the reference, in one run.

The reference is MONAI's own MAISI networks (built from ``configs/inference.json`` as MONAI defines them:
on the CPU ``use_flash_attention`` off), its schedulers and ``monai.inferers.SlidingWindowInferer``.
Both sides run the same weights: seeded random initialisation, with the layers MONAI initialises to
zero (the UNet's output convolution, the ControlNet's zero convolutions) re-initialised from the seed
so that outputs are not trivially zero. fp32. Sections (``--sections``):

``forward``
    one ControlNet + UNet forward (``scripts.sampler.predict``): reference (explicit attention) against
    ours (memory-efficient attention, ``scripts.attention``), and ours in channels-last 3D; timed
    alternately (A B A B ...), medians, with the max abs difference of the outputs to the reference.
``loop``
    ``scripts.sampler.sample_latent`` per step against the forward: ``step / forward`` (target <= 1.01),
    and the loop's own cost measured exactly by running it with a network that returns a cached output.
``decode``
    each in a fresh subprocess, the whole process' peak resident memory (``VmHWM``) measured:
    the direct decode (reference ``decode_stage_2_outputs``; ours, planned whole, must be identical),
    the reference sliding window (``--reference-roi``, ``--reference-overlap``) and ours planned under
    ``--budget-gb`` counting the whole process (``resident_gb``), with the planner's estimate next to
    the measured peak and the max abs difference to the direct decode.
``memory``
    peak resident memory of one sampling step (ControlNet + UNet, memory-efficient attention) at each
    ``--memory-latents`` size, and of decoding a halo tile, in fresh subprocesses: the per-voxel figures
    behind ``scripts.resources`` and ``scripts.decode``.
``compile``
    ``torch.compile`` (``scripts.acceleration.compile_module``) of the UNet at ``--compile-latent``:
    compile time, steady-state speed-up against eager, max abs difference.
``mask``
    one DDIM step of the mask-generation UNet (``mask_generation_diffusion_def``) at ``--mask-latent``,
    times ``--mask-steps`` (DDIM) and 1000 (the published DDPM).

Examples::

    python bench/bench_maisi_ct.py --sections forward loop --latent 32 32 16 --iterations 5
    python bench/bench_maisi_ct.py --sections decode --latent 32 32 16 --budget-gb 1.5
    python bench/bench_maisi_ct.py --tiny --latent 8 8 8 --iterations 1 --warmup 0 --json-out /tmp/b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
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
MIB = 2**20
MONAI_UNET = "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi"
SECTIONS = ("forward", "loop", "decode", "memory", "compile", "mask")
DECODE_RUNS = ("direct", "reference-sliding", "planned", "planned-exact")

TINY_OVERRIDES: dict[str, Any] = {
    "diffusion_unet_def#num_channels": [8, 16, 16],
    "diffusion_unet_def#attention_levels": [False, False, True],
    "diffusion_unet_def#num_head_channels": [0, 0, 8],
    "diffusion_unet_def#num_res_blocks": 1,
    "diffusion_unet_def#norm_num_groups": 8,
    "controlnet_def#num_channels": [8, 16, 16],
    "controlnet_def#attention_levels": [False, False, True],
    "controlnet_def#num_head_channels": [0, 0, 8],
    "controlnet_def#num_res_blocks": 1,
    "controlnet_def#norm_num_groups": 8,
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#norm_num_groups": 8,
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "mask_generation_diffusion_def#channels": [8, 16, 16],
    "mask_generation_diffusion_def#attention_levels": [False, False, True],
    "mask_generation_diffusion_def#num_head_channels": [0, 0, 8],
    "mask_generation_diffusion_def#num_res_blocks": 1,
    "mask_generation_diffusion_def#norm_num_groups": 8,
}


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mib() -> float:
    """Current resident set of this process, MiB (``VmRSS``); 0 where the host does not report it."""
    return _status_mib("VmRSS") or 0.0


def peak_rss_mib() -> float:
    """
    Peak resident set of this process, MiB: ``VmHWM`` (whole process, absolute), else ``ru_maxrss``.

    ``ru_maxrss`` alone is useless in a subprocess: Linux carries the parent's high-water mark over
    ``fork`` + ``exec``. ``VmHWM`` can lag ``VmRSS`` by a few pages (the kernel folds per-thread RSS counters
    in lazily), so the peak is never reported below the current resident set.
    """
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return max(hwm, rss_mib())
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024


def stats(samples: Sequence[float], cpu_per_wall: float) -> dict[str, Any]:
    """Median / mean / min / max of timings in seconds."""
    return {
        "median_s": float(np.median(samples)),
        "mean_s": float(np.mean(samples)),
        "min_s": float(np.min(samples)),
        "max_s": float(np.max(samples)),
        "samples_s": [float(s) for s in samples],
        "repetitions": len(samples),
        "cpu_per_wall": cpu_per_wall,
    }


def measure_alternating(
    operations: Mapping[str, Callable[[], Any]], warmup: int, repetitions: int, per_call: Mapping[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Time operations alternating between them every repetition (A B A B ...), so background load hits all alike."""
    per_call = dict(per_call or {})
    for _ in range(warmup):
        for operation in operations.values():
            operation()
    wall: dict[str, list[float]] = {name: [] for name in operations}
    cpu = dict.fromkeys(operations, 0.0)
    for _ in range(repetitions):
        for name, operation in operations.items():
            cpu_start, start = time.process_time(), time.perf_counter()
            operation()
            wall[name].append((time.perf_counter() - start) / per_call.get(name, 1))
            cpu[name] += time.process_time() - cpu_start
    return {
        name: stats(wall[name], cpu[name] / (sum(wall[name]) * per_call.get(name, 1))) for name in operations
    }


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------------------
# networks and inputs
# ----------------------------------------------------------------------------------------------------------


def import_bundle_scripts() -> Any:
    """Put ``bundles/maisi_ct_generative`` on ``sys.path`` and import its ``scripts`` package."""
    if str(BUNDLE_DIR) not in sys.path:
        sys.path.insert(0, str(BUNDLE_DIR))
    import scripts

    return scripts


def load_parser(tiny: bool) -> ConfigParser:
    """``configs/inference.json`` on the CPU, with the shrinking overrides for ``--tiny``."""
    import_bundle_scripts()
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "inference.json"))
    parser["bundle_root"] = str(BUNDLE_DIR)
    parser["device"] = torch.device("cpu")
    # the reference networks exactly as MONAI defines them; ours switch attention on in place (same weights)
    parser["diffusion_unet_def#_target_"] = MONAI_UNET
    parser["use_flash_attention"] = False
    if tiny:
        for config_id, value in TINY_OVERRIDES.items():
            parser[config_id] = value
    return parser


def randomize_zero_layers(network: torch.nn.Module, seed: int) -> int:
    """Re-initialise (seeded) every convolution/linear layer MONAI initialises to zero; return how many."""
    torch.manual_seed(seed)
    count = 0
    for module in network.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "reset_parameters") and isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            if not weight.detach().any():
                module.reset_parameters()
                count += 1
    return count


def build(parser: ConfigParser, config_id: str, seed: int) -> torch.nn.Module:
    """A network of the config with seeded random weights, in eval mode on the CPU."""
    torch.manual_seed(seed)
    network = parser.get_parsed_content(config_id, instantiate=True)
    if callable(network) and not isinstance(network, torch.nn.Module):
        network = network()
    randomize_zero_layers(network, seed + 1000)
    return network.eval()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_conditions(latent: Sequence[int], seed: int) -> Any:
    """Random bit-plane mask of the image size, the spacing condition and class label 1."""
    from scripts.labels import binarize_labels, spacing_condition
    from scripts.sampler import SamplingConditions

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, MAX_LABEL + 1, (1, 1, *(UPSAMPLE * s for s in latent)), generator=generator)
    return SamplingConditions(
        spacing=spacing_condition(SPACING),
        class_labels=torch.tensor([CLASS_LABEL], dtype=torch.long),
        controlnet_cond=binarize_labels(labels, bits=MASK_BITS),
    )


def random_latent(channels: int, latent: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn((1, channels, *latent), generator=torch.Generator().manual_seed(seed))


def channels_last(conditions: Any) -> Any:
    from scripts.sampler import SamplingConditions

    cond = conditions.controlnet_cond.contiguous(memory_format=torch.channels_last_3d)
    return SamplingConditions(spacing=conditions.spacing, class_labels=conditions.class_labels, controlnet_cond=cond)


# ----------------------------------------------------------------------------------------------------------
# sections run in this process
# ----------------------------------------------------------------------------------------------------------


class PairNetworks:
    """The UNet and ControlNet of the config with seeded weights, and the inputs of one step."""

    def __init__(self, args: argparse.Namespace) -> None:
        parser = load_parser(args.tiny)
        self.unet = build(parser, "diffusion_unet_def", args.seed)
        self.controlnet = build(parser, "controlnet_def", args.seed + 1)
        self.scheduler = parser.get_parsed_content("noise_scheduler")
        self.conditions = make_conditions(args.latent, args.seed + 2)
        self.noise = random_latent(int(parser["diffusion_unet_def#in_channels"]), args.latent, args.seed + 3)
        self.timesteps = torch.full((1,), 500.0)
        self.parameters = {"unet": num_params(self.unet), "controlnet": num_params(self.controlnet)}

    def attention(self, enabled: bool) -> None:
        from scripts.attention import use_memory_efficient_attention

        use_memory_efficient_attention(self.unet, enabled)
        use_memory_efficient_attention(self.controlnet, enabled)

    def forward(self) -> torch.Tensor:
        from scripts.sampler import predict

        with torch.no_grad():
            return predict(self.unet, self.controlnet, self.noise, self.timesteps, self.conditions)


def bench_forward(args: argparse.Namespace, pair: PairNetworks) -> dict[str, Any]:
    """Reference forward (explicit attention) against ours (memory-efficient attention), and channels-last."""
    from scripts.attention import use_memory_efficient_attention
    from scripts.sampler import predict

    unet_cl = copy.deepcopy(pair.unet).to(memory_format=torch.channels_last_3d)
    controlnet_cl = copy.deepcopy(pair.controlnet).to(memory_format=torch.channels_last_3d)
    use_memory_efficient_attention(unet_cl)
    use_memory_efficient_attention(controlnet_cl)
    noise_cl = pair.noise.contiguous(memory_format=torch.channels_last_3d)
    conditions_cl = channels_last(pair.conditions)

    def reference() -> torch.Tensor:
        pair.attention(False)
        return pair.forward()

    def ours() -> torch.Tensor:
        pair.attention(True)
        return pair.forward()

    def ours_channels_last() -> torch.Tensor:
        with torch.no_grad():
            return predict(unet_cl, controlnet_cl, noise_cl, pair.timesteps, conditions_cl)

    operations = {"reference": reference, "ours": ours, "ours_channels_last": ours_channels_last}
    outputs = {name: operation() for name, operation in operations.items()}
    timings = measure_alternating(operations, args.warmup, args.iterations)
    reference_median = timings["reference"]["median_s"]
    for name in operations:
        timings[name]["max_abs_diff_to_reference"] = max_abs(outputs[name], outputs["reference"])
        timings[name]["speedup_vs_reference"] = reference_median / timings[name]["median_s"]
    timings["output_abs_max"] = float(outputs["reference"].abs().max())
    return timings


class _CachedPrediction(torch.nn.Module):
    """A stand-in UNet that returns a fixed prediction at no cost: the sampling loop's own work alone."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.prediction = prediction

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.prediction


def bench_loop(args: argparse.Namespace, pair: PairNetworks) -> dict[str, Any]:
    """``sample_latent`` per step against the bare forward (ours), and the loop's own cost."""
    from scripts.sampler import sample_latent

    pair.attention(True)

    def sampling() -> None:
        sample_latent(pair.unet, pair.scheduler, pair.noise, pair.conditions, args.steps, controlnet=pair.controlnet,
                      progress=False)

    timings = measure_alternating(
        {"forward": pair.forward, "step": sampling}, args.warmup, args.iterations, per_call={"step": args.steps}
    )
    stub = _CachedPrediction(pair.forward())
    stub_runs = []
    for _ in range(max(args.iterations, 5)):
        start = time.perf_counter()
        sample_latent(stub, pair.scheduler, pair.noise, pair.conditions, args.steps, progress=False)
        stub_runs.append((time.perf_counter() - start) / args.steps)
    forward = timings["forward"]["median_s"]
    return {
        **timings,
        "step_over_forward_median": timings["step"]["median_s"] / forward,
        "step_over_forward_min": timings["step"]["min_s"] / timings["forward"]["min_s"],
        "loop_own_seconds_per_step": float(np.median(stub_runs)),
        "loop_own_over_forward": 1.0 + float(np.median(stub_runs)) / forward,
    }


def bench_compile(args: argparse.Namespace) -> dict[str, Any]:
    """Compile time and steady-state speed of a compiled UNet forward against eager, and their difference."""
    from scripts.acceleration import compile_module
    from scripts.attention import use_memory_efficient_attention
    from scripts.sampler import predict

    latent = tuple(args.compile_latent)
    parser = load_parser(args.tiny)
    unet = build(parser, "diffusion_unet_def", args.seed)
    use_memory_efficient_attention(unet)
    compiled = compile_module(copy.deepcopy(unet), mode=args.compile_mode)
    conditions = make_conditions(latent, args.seed + 2)
    conditions = type(conditions)(spacing=conditions.spacing, class_labels=conditions.class_labels)
    noise = random_latent(int(parser["diffusion_unet_def#in_channels"]), latent, args.seed + 3)
    timesteps = torch.full((1,), 500.0)

    def run(network: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return predict(network, None, noise, timesteps, conditions)

        return forward

    start = time.perf_counter()
    first = run(compiled)()
    compile_seconds = time.perf_counter() - start
    eager_output = run(unet)()
    timings = measure_alternating({"eager": run(unet), "compiled": run(compiled)}, args.warmup, args.iterations)
    return {
        **timings,
        "latent": list(latent),
        "mode": args.compile_mode,
        "first_call_seconds": compile_seconds,
        "speedup": timings["eager"]["median_s"] / timings["compiled"]["median_s"],
        "max_abs_diff": max_abs(first, eager_output),
        "output_abs_max": float(eager_output.abs().max()),
    }


def bench_mask(args: argparse.Namespace) -> dict[str, Any]:
    """One DDIM step of the mask-generation UNet at ``--mask-latent``, extrapolated to whole runs."""
    from monai.networks.schedulers import DDIMScheduler
    from scripts.attention import use_memory_efficient_attention
    from scripts.mask_generation import generate_mask_latent

    parser = load_parser(args.tiny)
    unet = build(parser, "mask_generation_diffusion_def", args.seed)
    blocks = use_memory_efficient_attention(unet)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                              schedule="scaled_linear_beta", clip_sample=False)
    condition = torch.rand((1, 1, 10), generator=torch.Generator().manual_seed(args.seed))
    shape = (int(parser["mask_generation_diffusion_def#in_channels"]), *args.mask_latent)
    reset_peak_rss()
    before = rss_mib()
    seconds = []
    for steps in (1, 2):  # the difference removes the one-off cost of the first step
        start = time.perf_counter()
        generate_mask_latent(unet, scheduler, condition, shape, torch.Generator().manual_seed(0), "cpu", steps)
        seconds.append(time.perf_counter() - start)
    per_step = max(seconds[1] - seconds[0], seconds[0] / 2)
    return {
        "latent": list(shape),
        "attention_blocks": blocks,
        "seconds_first_step": seconds[0],
        "seconds_per_step": per_step,
        "ddim_steps": args.mask_steps,
        "ddim_total_s": per_step * args.mask_steps,
        "ddpm_1000_total_s": per_step * 1000,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": before,
    }


# ----------------------------------------------------------------------------------------------------------
# sections run in fresh subprocesses (peak memory of one thing at a time)
# ----------------------------------------------------------------------------------------------------------


def _autoencoder_and_latent(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    parser = load_parser(args.tiny)
    autoencoder = build(parser, "autoencoder_def", args.seed + 4)
    from scripts.decode import set_autoencoder_splits

    set_autoencoder_splits(autoencoder, 1)
    latent = random_latent(int(parser["autoencoder_def#latent_channels"]), args.latent, args.seed + 5)
    return autoencoder, latent


def _timed_peak(operation: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    reset_peak_rss()
    resident = rss_mib()
    cpu_start, start = time.process_time(), time.perf_counter()
    result = operation()
    wall = time.perf_counter() - start
    return result, {
        "seconds": wall,
        "cpu_per_wall": (time.process_time() - cpu_start) / wall,
        "resident_mib": resident,
        "peak_rss_mib": max(peak_rss_mib(), resident),  # the call's peak includes its start
    }


def decode_run(args: argparse.Namespace, run: str, direct_file: Path) -> dict[str, Any]:
    """Body of one decode subprocess (see ``decode`` in the module docstring)."""
    from monai.inferers import SlidingWindowInferer
    from scripts.decode import GB, LatentDecoder, decode_latent, plan_decode, resident_memory_bytes

    autoencoder, latent = _autoencoder_and_latent(args)
    decoder = LatentDecoder(autoencoder)
    result: dict[str, Any] = {"run": run}
    if run == "direct":
        with torch.no_grad():
            image, measured = _timed_peak(lambda: autoencoder.decode_stage_2_outputs(latent))
        torch.save(image, direct_file)
        plan = plan_decode(latent.shape, "cpu", memory_budget_gb=1000.0)
        ours, ours_measured = _timed_peak(lambda: decode_latent(decoder, latent, plan, progress=False))
        result.update(reference=measured, ours=ours_measured, ours_plan=plan.describe(),
                      ours_identical=bool(torch.equal(ours, image)), output_abs_max=float(image.abs().max()))
        return result
    if run == "reference-sliding":
        roi = tuple(min(args.reference_roi, s) for s in args.latent)
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=args.reference_overlap, mode="gaussian")
        with torch.no_grad():
            image, measured = _timed_peak(lambda: inferer(latent, decoder))
        result.update(reference=measured, roi=list(roi), overlap=args.reference_overlap)
    else:
        resident = resident_memory_bytes("cpu") / GB
        group_norm = "exact" if run == "planned-exact" else "tile"
        plan = plan_decode(latent.shape, "cpu", memory_budget_gb=args.budget_gb, resident_gb=resident, group_norm=group_norm)
        image, measured = _timed_peak(lambda: decode_latent(decoder, latent, plan, progress=False))
        result.update(ours=measured, plan=plan.describe(), estimated_peak_gb=plan.estimated_peak_gb,
                      budget_gb=args.budget_gb, resident_gb_at_plan=resident, decoded_voxels=plan.decoded_voxels)
    result["max_abs_diff_to_direct"] = max_abs(image, torch.load(direct_file, weights_only=True))
    return result


def memory_step_run(args: argparse.Namespace) -> dict[str, Any]:
    """
    Body of one memory subprocess, memory-efficient attention on: peak RSS and time of the ControlNet forward,
    of the UNet forward (with the ControlNet's residuals held), and of the whole step (``sampler.predict``).
    """
    pair = PairNetworks(args)
    pair.attention(True)
    conditions = pair.conditions

    def controlnet() -> Any:
        with torch.no_grad():
            return pair.controlnet(x=pair.noise, timesteps=pair.timesteps, controlnet_cond=conditions.controlnet_cond,
                                   class_labels=conditions.class_labels)

    residuals = controlnet()

    def unet() -> torch.Tensor:
        with torch.no_grad():
            return pair.unet(x=pair.noise, timesteps=pair.timesteps, class_labels=conditions.class_labels,
                             spacing_tensor=conditions.spacing, down_block_additional_residuals=residuals[0],
                             mid_block_additional_residual=residuals[1])

    _, unet_measured = _timed_peak(unet)
    del residuals
    _, controlnet_measured = _timed_peak(controlnet)
    _, step_measured = _timed_peak(pair.forward)
    return {"latent": list(args.latent), "latent_voxels": math.prod(args.latent), **step_measured,
            "unet": unet_measured, "controlnet": controlnet_measured, "parameters": pair.parameters}


def memory_tile_run(args: argparse.Namespace) -> dict[str, Any]:
    """Body of one memory subprocess: peak RSS of decoding one halo tile (the lean group norm) of ``--latent``."""
    from scripts.decode import DEFAULT_HALO, DecodePlan, LatentDecoder, decode_latent

    autoencoder, latent = _autoencoder_and_latent(args)
    decoder = LatentDecoder(autoencoder)
    plan = DecodePlan(None, 0.4, 1, "cpu", 1, halo_core=tuple(args.latent), halo=DEFAULT_HALO)  # one window
    _, measured = _timed_peak(lambda: decode_latent(decoder, latent, plan, progress=False))
    return {"latent": list(args.latent), "latent_voxels": math.prod(args.latent), **measured}


def run_subprocess(args: argparse.Namespace, only: str, latent: Sequence[int], extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run this script with ``--only`` in a fresh process and return its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--only", only, "--latent", *map(str, latent)]
    command += ["--seed", str(args.seed), "--budget-gb", str(args.budget_gb), "--reference-roi", str(args.reference_roi)]
    command += ["--reference-overlap", str(args.reference_overlap), *extra]
    if args.tiny:
        command.append("--tiny")
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    logger.info("subprocess: %s", " ".join(command[2:]))
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        direct = Path(folder) / "direct.pt"
        results = {run: run_subprocess(args, f"decode:{run}", args.latent, ["--direct-file", str(direct)])
                   for run in DECODE_RUNS}
    direct_s = results["direct"]["reference"]["seconds"]
    for run in DECODE_RUNS[1:]:
        side = "reference" if run == "reference-sliding" else "ours"
        results[run]["time_over_direct"] = results[run][side]["seconds"] / direct_s
    return results


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    steps = [run_subprocess(args, "memory:step", latent) for latent in args.memory_latents]
    tiles = [run_subprocess(args, "memory:tile", latent) for latent in args.tile_latents]
    return {"sampling_step": steps, "halo_tile_decode": tiles}


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """Machine and software description recorded with the results."""
    model = platform.processor() or "unknown"
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _row(name: str, row: Mapping[str, Any], notes: str = "") -> str:
    return f"| {name} | {row['median_s']:.3g} | {row['min_s']:.3g} | {row['cpu_per_wall']:.2f} | {notes} |"


def format_report(report: Mapping[str, Any]) -> str:
    """Markdown tables of the sections that ran."""
    machine, results = report["machine"], report["results"]
    lines = [f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), monai {machine['monai']}; load average at start "
             f"{machine['load_average_start']}, at end {machine.get('load_average_end')}"]
    if "forward" in results:
        f = results["forward"]
        lines += ["", "| forward | median s | min s | CPU s per wall s | notes |", "|---|---|---|---|---|"]
        for name in ("reference", "ours", "ours_channels_last"):
            lines.append(_row(name, f[name], f"x{f[name]['speedup_vs_reference']:.2f} vs reference, "
                                             f"max abs diff {f[name]['max_abs_diff_to_reference']:.2e}"))
    if "loop" in results:
        lp = results["loop"]
        lines += ["", "| loop | median s | min s | CPU s per wall s | notes |", "|---|---|---|---|---|",
                  _row("forward", lp["forward"]),
                  _row("sample_latent per step", lp["step"], f"step/forward {lp['step_over_forward_median']:.3f} "
                       f"(median), {lp['step_over_forward_min']:.3f} (min); loop's own cost "
                       f"{lp['loop_own_seconds_per_step'] * 1e3:.2f} ms/step = x{lp['loop_own_over_forward']:.4f}")]
    if "decode" in results:
        d = results["decode"]
        lines += ["", "| decode | s | x direct | peak RSS MiB (whole process) | max abs diff to direct | plan |",
                  "|---|---|---|---|---|---|",
                  f"| direct (reference) | {d['direct']['reference']['seconds']:.3g} | 1 | "
                  f"{d['direct']['reference']['peak_rss_mib']:.0f} | 0 | MONAI decode_stage_2_outputs |",
                  f"| direct (ours) | {d['direct']['ours']['seconds']:.3g} | | {d['direct']['ours']['peak_rss_mib']:.0f} "
                  f"| identical: {d['direct']['ours_identical']} | {d['direct']['ours_plan']} |",
                  f"| reference sliding window | {d['reference-sliding']['reference']['seconds']:.3g} | "
                  f"{d['reference-sliding']['time_over_direct']:.2f} | {d['reference-sliding']['reference']['peak_rss_mib']:.0f} "
                  f"| {d['reference-sliding']['max_abs_diff_to_direct']:.3g} | roi {d['reference-sliding']['roi']}, overlap "
                  f"{d['reference-sliding']['overlap']} |",
                  *[f"| ours under {d[run]['budget_gb']} GB | {d[run]['ours']['seconds']:.3g} | "
                    f"{d[run]['time_over_direct']:.2f} | {d[run]['ours']['peak_rss_mib']:.0f} (estimate "
                    f"{d[run]['estimated_peak_gb'] * 1e9 / MIB:.0f}) | {d[run]['max_abs_diff_to_direct']:.3g} "
                    f"| {d[run]['plan']} |" for run in DECODE_RUNS[2:]]]
    if "memory" in results:
        lines += ["", "| memory | latent | resident MiB | peak RSS MiB | s |", "|---|---|---|---|---|"]
        for kind, rows in results["memory"].items():
            for row in rows:
                lines.append(f"| {kind} | {row['latent']} | {row['resident_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
                             f"{row['seconds']:.3g} |")
    if "compile" in results:
        c = results["compile"]
        lines += ["", f"compile (UNet, latent {c['latent']}, mode {c['mode']}): first call {c['first_call_seconds']:.1f} s, "
                  f"eager {c['eager']['median_s']:.3g} s, compiled {c['compiled']['median_s']:.3g} s, speed-up "
                  f"x{c['speedup']:.2f}, max abs diff {c['max_abs_diff']:.2e}"]
    if "mask" in results:
        m = results["mask"]
        lines += ["", f"mask generation (latent {m['latent']}): {m['seconds_per_step']:.3g} s per step; DDIM "
                  f"{m['ddim_steps']} steps {m['ddim_total_s'] / 60:.1f} min; DDPM 1000 steps "
                  f"{m['ddpm_1000_total_s'] / 3600:.2f} h; peak RSS {m['peak_rss_mib']:.0f} MiB"]
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


def latent_list(value: str) -> list[int]:
    """argparse type: ``X,Y,Z``."""
    sizes = [positive_int(v) for v in value.split(",")]
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be X,Y,Z.")
    return sizes


def build_arg_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    cli.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    cli.add_argument("--tiny", action="store_true", help="shrink the networks for a smoke run")
    cli.add_argument("--latent", type=positive_int, nargs=3, default=[32, 32, 16], help="latent size (default 32 32 16)")
    cli.add_argument("--iterations", type=positive_int, default=5, help="timed repetitions (default 5)")
    cli.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    cli.add_argument("--steps", type=positive_int, default=10, help="sampling steps of the loop section (default 10)")
    cli.add_argument("--budget-gb", type=float, default=1.5, help="whole-process budget of the planned decode")
    cli.add_argument("--reference-roi", type=positive_int, default=16, help="reference sliding-window roi (latent)")
    cli.add_argument("--reference-overlap", type=float, default=0.67, help="reference sliding-window overlap")
    cli.add_argument("--memory-latents", type=latent_list, nargs="+", default=[[16, 16, 16], [32, 32, 16], [32, 32, 32]],
                     help="latents of the sampling-step memory runs (X,Y,Z ...)")
    cli.add_argument("--tile-latents", type=latent_list, nargs="+", default=[[12, 12, 12], [16, 16, 16], [20, 20, 20]],
                     help="halo-tile windows of the decode memory runs (X,Y,Z ...)")
    cli.add_argument("--compile-latent", type=positive_int, nargs=3, default=[16, 16, 16], help="latent of the compile run")
    cli.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    cli.add_argument("--mask-latent", type=positive_int, nargs=3, default=[64, 64, 64], help="mask-generation latent")
    cli.add_argument("--mask-steps", type=positive_int, default=50, help="DDIM steps of the mask overlay (default 50)")
    cli.add_argument("--threads", type=positive_int, default=None, help="torch intra-op CPU threads")
    cli.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights (default 0)")
    cli.add_argument("--json-out", type=Path, default=None, help="also write the results to this JSON file")
    cli.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one subprocess measurement
    cli.add_argument("--direct-file", type=Path, default=None, help=argparse.SUPPRESS)
    return cli


def run_only(args: argparse.Namespace) -> dict[str, Any]:
    kind, _, name = args.only.partition(":")
    if kind == "decode":
        return decode_run(args, name, args.direct_file)
    if name == "step":
        return memory_step_run(args)
    return memory_tile_run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exits with 1 if a timing is not positive and finite."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    args = build_arg_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import_bundle_scripts()
    if args.only is not None:
        print(json.dumps(run_only(args)))
        return 0
    report: dict[str, Any] = {"machine": describe_machine(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in vars(args).items()}}
    results: dict[str, Any] = {}
    start = time.perf_counter()
    if {"forward", "loop"} & set(args.sections):
        pair = PairNetworks(args)
        results["parameters"] = pair.parameters
        if "forward" in args.sections:
            results["forward"] = bench_forward(args, pair)
        if "loop" in args.sections:
            results["loop"] = bench_loop(args, pair)
        del pair
    if "decode" in args.sections:
        results["decode"] = bench_decode(args)
    if "memory" in args.sections:
        results["memory"] = bench_memory(args)
    if "compile" in args.sections:
        results["compile"] = bench_compile(args)
    if "mask" in args.sections:
        results["mask"] = bench_mask(args)
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["wall_seconds"] = time.perf_counter() - start
    report["results"] = results
    print(format_report(report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        logger.info("wrote %s", args.json_out)
    seconds = [v for v in _walk_seconds(results)]
    if not all(math.isfinite(v) and v > 0 for v in seconds):
        logger.error("non-positive or non-finite timing in %s", results)
        return 1
    return 0


def _walk_seconds(node: Any) -> list[float]:
    """Every timing (keys ending in ``_s`` or ``seconds``) in a nested result."""
    found: list[float] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (key.endswith("_s") or key == "seconds"):
                found.append(float(value))
            else:
                found += _walk_seconds(value)
    elif isinstance(node, list):
        for value in node:
            found += _walk_seconds(value)
    return found


if __name__ == "__main__":
    sys.exit(main())
