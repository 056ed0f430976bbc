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
Estimated peak memory and time of one MAISI image (or image + mask pair) generation, for a dry run.

Every figure here is an **estimate** from measured per-voxel costs, not a measurement of the run:

- CPU: measured on a 2-core AMD EPYC (torch 2.14.1, 2 threads, float32, memory-efficient attention),
  whole-process resident memory (``VmHWM``), by ``bench/bench_maisi_ct.py --sections memory`` (figures
  and method in ``common/maisi/DECODE_MEMORY.md`` and ``bench/RESULTS.md``). Times on another CPU
  scale with its speed.
- CUDA: the diffusion time per step is fitted to the published A100 80 GB table of MAISI (rflow-ct,
  ``docs/performance.md``; the ControlNet is included in it), and the decoder's memory comes from the
  decode planner's CUDA model (:data:`decode.CUDA_DECODER_MEMORY`, fitted to the same table). The
  memory of a sampling step on CUDA has not been measured: it is reported as ``None``.

:func:`estimate_generation_resources` returns a :class:`GenerationResources` with one
:class:`PhaseEstimate` per network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .decode import GB, HALO, DecodePlan, plan_decode

__all__ = [
    "CPU_COSTS",
    "CUDA_COSTS",
    "EXACT_GROUP_NORM_WORK",
    "DeviceCosts",
    "GenerationResources",
    "PhaseEstimate",
    "estimate_generation_resources",
    "largest_fitting_volume",
    "pair_generation_peak_gb",
    "resident_gb",
]


@dataclass(frozen=True)
class DeviceCosts:
    """
    Per-voxel costs of the generation networks on one kind of device (``N`` = latent voxels, batch 1).

    Attributes
    ----------
    name
        What the figures are and where they come from.
    resident_bytes
        Memory held before any network runs (the Python process with torch and MONAI imported on the
        CPU; the CUDA context on a GPU).
    unet_weight_bytes, controlnet_weight_bytes, autoencoder_weight_bytes
        Weights held while generating (float32).
    unet_seconds, controlnet_seconds
        ``(fixed, per voxel)`` seconds of one forward; ``None`` where not known separately.
    diffusion_step_seconds
        ``(fixed, per voxel)`` seconds of one sampling step (ControlNet + UNet) where only the sum is
        known (the published CUDA table); ``None`` on devices measured per network.
    unet_bytes_per_voxel, controlnet_bytes_per_voxel
        Peak activation memory of one forward per latent voxel; ``None`` where not measured.
    step_bytes_per_voxel
        Peak memory of one ControlNet + UNet step per latent voxel (the ControlNet's residuals stay
        while the UNet runs); ``None`` where not measured.
    decode_seconds_per_voxel
        Seconds per decoded latent voxel (tiles count their halos or overlaps).
    """

    name: str
    resident_bytes: float
    unet_weight_bytes: float
    controlnet_weight_bytes: float
    autoencoder_weight_bytes: float
    unet_seconds: tuple[float, float] | None
    controlnet_seconds: tuple[float, float] | None
    diffusion_step_seconds: tuple[float, float] | None
    unet_bytes_per_voxel: float | None
    controlnet_bytes_per_voxel: float | None
    step_bytes_per_voxel: float | None
    decode_seconds_per_voxel: float


# decode work of a halo plan with exact group norms relative to tile statistics: 529 against 134 CPU seconds
# at latent 32x32x16 (bench/RESULTS.md)
EXACT_GROUP_NORM_WORK = 4.0
# measured on this project's 2-core CPU machine, 2 threads, 2026-12-01 (bench/RESULTS.md, "maisi_ct_generative:
# speed and memory"): latents 32x32x16, 32^3, 64x64x32 and 128x128x32. UNet forward 1.12 / 2.13 / 9.75 / 44 s,
# ControlNet 0.60 / 1.54 / 6.3 / 28 s (contended runs scaled to an idle machine by their CPU seconds); peak of
# one step 2055 / 2298 / 3303 / 7628 MiB for the whole process with the weights loaded: the envelope 2.14 GB
# (process and all weights) + 11.6 kB per voxel; activations alone: UNet 3.5-5.3 kB, ControlNet 8.5 kB per voxel.
# Decode: 2.1e-3 s per decoded voxel (direct 37 s for 16384 voxels on 2 idle-equivalent cores; halo tiles the
# same per decoded voxel).
CPU_COSTS = DeviceCosts(
    name="CPU, float32, memory-efficient attention: measured on a 2-core AMD EPYC (bench/bench_maisi_ct.py)",
    resident_bytes=1.05 * GB,
    unet_weight_bytes=180.5e6 * 4,
    controlnet_weight_bytes=72.0e6 * 4,
    autoencoder_weight_bytes=20.9e6 * 4,
    unet_seconds=(0.0, 8.2e-5),
    controlnet_seconds=(0.0, 5.1e-5),
    diffusion_step_seconds=None,
    unet_bytes_per_voxel=5.3e3,
    controlnet_bytes_per_voxel=8.6e3,
    step_bytes_per_voxel=11.6e3,
    decode_seconds_per_voxel=2.1e-3,
)

# published A100 80 GB figures of MAISI rflow-ct (30 steps): DM time 2 s at latent 64x64x32, 5 s at
# 128x128x32, 19 s at 128^3, 30 s at 128x128x192 -> about 0.026 s + 3.1e-7 s per latent voxel per step;
# VAE time 1 s for a whole 64x64x32 latent, 32 s for 8 tiles of 80^3 -> about 7.7e-6 s per decoded voxel.
CUDA_COSTS = DeviceCosts(
    name="CUDA: published MAISI A100 80 GB figures (rflow-ct, docs/performance.md), not measured here",
    resident_bytes=0.5 * GB,
    unet_weight_bytes=180.5e6 * 4,
    controlnet_weight_bytes=72.0e6 * 4,
    autoencoder_weight_bytes=20.9e6 * 4,
    unet_seconds=None,
    controlnet_seconds=None,
    diffusion_step_seconds=(0.026, 3.1e-7),
    unet_bytes_per_voxel=None,
    controlnet_bytes_per_voxel=None,
    step_bytes_per_voxel=None,
    decode_seconds_per_voxel=7.7e-6,
)


@dataclass(frozen=True)
class PhaseEstimate:
    """
    Estimated peak memory and time of one network's part of a generation.

    Attributes
    ----------
    name
        ``"unet"``, ``"controlnet"`` or ``"decoder"``.
    peak_gb
        Estimated peak memory of the device (host RAM on the CPU, the process included) while this
        network runs, or ``None`` when not known.
    seconds
        Estimated time over the whole generation (all sampling steps), or ``None`` when not known
        separately.
    note
        How the figures were obtained.
    """

    name: str
    peak_gb: float | None
    seconds: float | None
    note: str


@dataclass(frozen=True)
class GenerationResources:
    """
    Estimated resources of one generation (all figures are estimates; see the module docstring).

    Attributes
    ----------
    device
        ``"cpu"`` or ``"cuda"``.
    latent_shape
        Spatial latent shape.
    num_inference_steps
        Sampling steps.
    unet, controlnet, decoder
        One estimate per network (``controlnet`` is ``None`` without a ControlNet).
    basis
        Where the per-voxel figures come from.
    """

    device: str
    latent_shape: tuple[int, int, int]
    num_inference_steps: int
    unet: PhaseEstimate
    controlnet: PhaseEstimate | None
    decoder: PhaseEstimate
    basis: str

    @property
    def peak_gb(self) -> float | None:
        """The largest known phase peak, or ``None`` when no peak is known."""
        peaks = [p.peak_gb for p in self.phases if p.peak_gb is not None]
        return max(peaks) if peaks else None

    @property
    def seconds(self) -> float | None:
        """The sum of the known phase times, or ``None`` when none is known."""
        times = [p.seconds for p in self.phases if p.seconds is not None]
        return sum(times) if times else None

    @property
    def phases(self) -> list[PhaseEstimate]:
        return [p for p in (self.unet, self.controlnet, self.decoder) if p is not None]

    def describe(self) -> str:
        """Lines for the dry run: one per network, then the total, each marked as an estimate."""
        lines = [f"estimated resources on {self.device}, latent {self.latent_shape}, {self.num_inference_steps} steps "
                 f"({self.basis}):"]
        for phase in self.phases:
            peak = "peak not measured" if phase.peak_gb is None else f"peak ~{phase.peak_gb:.1f} GB"
            time = "time included above" if phase.seconds is None else f"~{_duration(phase.seconds)}"
            lines.append(f"  {phase.name}: {peak}, {time} ({phase.note})")
        peak = "not known" if self.peak_gb is None else f"~{self.peak_gb:.1f} GB"
        total = "not known" if self.seconds is None else f"~{_duration(self.seconds)}"
        lines.append(f"  whole generation: peak {peak}, time {total} (estimates)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _linear(coefficients: tuple[float, float] | None, voxels: float) -> float | None:
    return None if coefficients is None else coefficients[0] + coefficients[1] * voxels


def _spatial(latent_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) not in (3, 4, 5) or any(s < 1 for s in shape):
        raise ValueError(f"latent_shape must be (D, H, W), (C, D, H, W) or (B, C, D, H, W) with positive sizes, got {shape}.")
    return shape[-3], shape[-2], shape[-1]


def costs_for(device: torch.device | str) -> DeviceCosts:
    """:data:`CUDA_COSTS` on a CUDA device, :data:`CPU_COSTS` elsewhere."""
    return CUDA_COSTS if torch.device(device).type == "cuda" else CPU_COSTS


def resident_gb(device: torch.device | str, uses_controlnet: bool = True) -> float:
    """
    Estimated memory held before any network runs: the process (CPU) and every generation network's weights.

    Parameters
    ----------
    device
        The generation device.
    uses_controlnet
        Whether the ControlNet is loaded.

    Returns
    -------
    float
        GB; pass it to ``decode.plan_decode(resident_gb=...)`` to count the whole run against a budget.
    """
    costs = costs_for(device)
    weights = costs.unet_weight_bytes + costs.autoencoder_weight_bytes
    weights += costs.controlnet_weight_bytes if uses_controlnet else 0.0
    return (costs.resident_bytes + weights) / GB


def estimate_generation_resources(
    latent_shape: Sequence[int],
    device: torch.device | str,
    num_inference_steps: int,
    uses_controlnet: bool,
    cfg_guidance: bool,
    decode_plan: DecodePlan,
) -> GenerationResources:
    """
    Estimate the peak memory and time of the UNet, the ControlNet and the decoder of one generation.

    Sampling holds every network's weights (all are loaded before sampling starts) and runs each
    forward on a batch of 2 with classifier-free guidance (time and activations double). The
    decoder's peak is the plan's estimate (:func:`decode.plan_decode`) on top of the resident process
    and weights; its time counts every decoded voxel (``decode_plan.decoded_voxels``, both passes of a
    halo plan with whole-volume statistics).

    Parameters
    ----------
    latent_shape
        The latent shape (``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)``).
    device
        The generation device.
    num_inference_steps
        Sampling steps (``num_inference_steps``).
    uses_controlnet
        Whether a ControlNet runs every step (CT pairs, MR image-from-mask).
    cfg_guidance
        Whether classifier-free guidance is on (``cfg_guidance_scale`` > 0).
    decode_plan
        The decode plan of the run.

    Returns
    -------
    GenerationResources
        The estimates.

    Raises
    ------
    ValueError
        For an invalid latent shape or step count.
    """
    spatial = _spatial(latent_shape)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is not allowed; it must be an integer >= 1.")
    costs = costs_for(device)
    voxels = math.prod(spatial)
    batch = 2 if cfg_guidance else 1
    resident = resident_gb(device, uses_controlnet) * GB

    def sampling_peak(per_voxel: float | None) -> float | None:
        return None if per_voxel is None else (resident + per_voxel * voxels * batch) / GB

    def sampling_time(coefficients: tuple[float, float] | None) -> float | None:
        single = _linear(coefficients, voxels * batch)
        return None if single is None else single * num_inference_steps

    unet_seconds = sampling_time(costs.unet_seconds)
    if costs.diffusion_step_seconds is not None:
        unet_seconds = sampling_time(costs.diffusion_step_seconds)
        unet_note = "UNet + ControlNet per step, " + costs.name
    else:
        unet_note = costs.name
    # with a ControlNet the UNet runs while its residuals are held: the measured step figure
    unet_activation = costs.step_bytes_per_voxel if uses_controlnet else costs.unet_bytes_per_voxel
    unet = PhaseEstimate("unet", sampling_peak(unet_activation), unet_seconds, unet_note)
    controlnet = None
    if uses_controlnet:
        controlnet = PhaseEstimate("controlnet", sampling_peak(costs.controlnet_bytes_per_voxel),
                                   sampling_time(costs.controlnet_seconds), costs.name)
    decode_bytes = (decode_plan.estimated_peak_gb or 0.0) * GB - decode_plan.resident_gb * GB
    work = EXACT_GROUP_NORM_WORK if decode_plan.kind == HALO and decode_plan.group_norm == "exact" else 1.0
    decoded = (decode_plan.decoded_voxels or voxels) * work
    decoder = PhaseEstimate(
        "decoder",
        None if decode_plan.estimated_peak_gb is None else (resident + decode_bytes) / GB,
        costs.decode_seconds_per_voxel * decoded,
        f"{decode_plan.describe()}; {costs.name}",
    )
    return GenerationResources(
        device=torch.device(device).type,
        latent_shape=spatial,
        num_inference_steps=num_inference_steps,
        unet=unet,
        controlnet=controlnet,
        decoder=decoder,
        basis="estimates from per-voxel figures",
    )


def pair_generation_peak_gb(output_size: Sequence[int], device: torch.device | str, budget_gb: float) -> float:
    """
    Estimated peak memory of one CT pair generation (ControlNet, no guidance) at ``output_size``, with the
    decode planned within ``budget_gb`` for the whole run (:func:`resident_gb` counted).

    Parameters
    ----------
    output_size
        Image size (4x the latent per axis).
    device
        The generation device.
    budget_gb
        The memory of the device (host RAM on the CPU).

    Returns
    -------
    float
        GB: the larger of the sampling peak and the decode peak (or ``inf`` when sampling is not known).
    """
    latent = tuple(int(s) // 4 for s in output_size)
    plan = plan_decode((4, *latent), device, memory_budget_gb=budget_gb, resident_gb=resident_gb(device, True))
    estimate = estimate_generation_resources(latent, device, 1, uses_controlnet=True, cfg_guidance=False, decode_plan=plan)
    if estimate.unet.peak_gb is None or estimate.peak_gb is None:
        return math.inf
    return estimate.peak_gb  # the decoder's is the plan's estimate: above the budget when nothing fitted


def largest_fitting_volume(
    budget_gb: float, device: torch.device | str, sizes: Sequence[Sequence[int]]
) -> tuple[tuple[int, int, int], float]:
    """
    The output size with the most voxels whose estimated pair-generation peak fits ``budget_gb``.

    Parameters
    ----------
    budget_gb
        The memory of the device, GB.
    device
        The generation device.
    sizes
        Candidate output sizes (e.g. the CT sizes the bundle allows).

    Returns
    -------
    tuple
        ``(size, estimated peak GB)``.

    Raises
    ------
    ValueError
        When no output size fits.
    """
    fitting = []
    for size in sizes:
        peak = pair_generation_peak_gb(size, device, budget_gb)
        if peak <= budget_gb:
            fitting.append((math.prod(size), tuple(int(s) for s in size), peak))
    if not fitting:
        raise ValueError(f"no output size of {list(sizes)} fits {budget_gb} GB on {device} (estimates).")
    _, size, peak = max(fitting)
    return size, peak  # type: ignore[return-value]
