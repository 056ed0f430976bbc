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
The MAISI latent sampler: rectified flow (``RFlowScheduler``) or DDPM, with an optional ControlNet and
classifier-free guidance.

The loop is kept lean: conditioning tensors are built once, timesteps stay on the device, and nothing
in the loop synchronises with the host, so a step costs one ControlNet forward plus one UNet forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from monai.networks.schedulers import RFlowScheduler, Scheduler
from tqdm import tqdm

from .constants import UNCONDITIONAL_CLASS_LABEL


@dataclass(frozen=True)
class SamplingConditions:
    """
    Everything a denoising step is conditioned on, built once per sample.

    Attributes
    ----------
    spacing
        (B, 3) spacing condition, already scaled (``labels.spacing_condition``), or ``None``.
    class_labels
        (B,) long modality codes (rflow versions), or ``None``.
    top_region
        (B, 4) scaled top body-region one-hot (ddpm-ct), or ``None``.
    bottom_region
        (B, 4) scaled bottom body-region one-hot (ddpm-ct), or ``None``.
    controlnet_cond
        (B, 8, X, Y, Z) bit-plane mask for the ControlNet, or ``None`` (no ControlNet).
    unconditional_controlnet_cond
        the mask of the unconditional branch of classifier-free guidance
        (tumour-free, ``labels.remove_tumors``); defaults to ``controlnet_cond``.
    """

    spacing: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    top_region: torch.Tensor | None = None
    bottom_region: torch.Tensor | None = None
    controlnet_cond: torch.Tensor | None = None
    unconditional_controlnet_cond: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SamplingConditions:
        """Move every tensor to ``device``; floating tensors are also cast to ``dtype`` when given."""

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            return tensor.to(device=device, dtype=cast)

        return SamplingConditions(**{k: move(v) for k, v in vars(self).items()})

    def with_guidance_batch(self) -> SamplingConditions:
        """Stack the unconditional and the conditional branch into one batch of twice the size."""

        def pair(conditional: torch.Tensor | None, unconditional: torch.Tensor | None) -> torch.Tensor | None:
            if conditional is None:
                return None
            return torch.cat([conditional if unconditional is None else unconditional, conditional])

        unconditional_labels = None
        if self.class_labels is not None:
            unconditional_labels = torch.full_like(self.class_labels, UNCONDITIONAL_CLASS_LABEL)
        return SamplingConditions(
            spacing=pair(self.spacing, None),
            class_labels=pair(self.class_labels, unconditional_labels),
            top_region=pair(self.top_region, None),
            bottom_region=pair(self.bottom_region, None),
            controlnet_cond=pair(self.controlnet_cond, self.unconditional_controlnet_cond),
        )


def predict(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    latent: torch.Tensor,
    timesteps: torch.Tensor,
    conditions: SamplingConditions,
) -> torch.Tensor:
    """One ControlNet + UNet evaluation (the ControlNet residuals are added inside the UNet)."""
    residuals: dict[str, object] = {}
    if controlnet is not None:
        if conditions.controlnet_cond is None:
            raise ValueError("a ControlNet needs SamplingConditions.controlnet_cond (the bit-plane mask).")
        down, mid = controlnet(
            x=latent, timesteps=timesteps, controlnet_cond=conditions.controlnet_cond, class_labels=conditions.class_labels
        )
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    optional = {
        "class_labels": conditions.class_labels,
        "spacing_tensor": conditions.spacing,
        "top_region_index_tensor": conditions.top_region,
        "bottom_region_index_tensor": conditions.bottom_region,
    }
    return unet(x=latent, timesteps=timesteps, **{k: v for k, v in optional.items() if v is not None}, **residuals)


def guided_prediction(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    latent: torch.Tensor,
    timesteps: torch.Tensor,
    conditions: SamplingConditions,
    guidance_conditions: SamplingConditions | None,
    guidance_scale: float,
) -> torch.Tensor:
    """
    The model prediction, with classifier-free guidance when ``guidance_conditions`` is given.

    Guidance evaluates the unconditional and the conditional branch in one doubled batch and returns
    ``u + guidance_scale * (c - u)``.
    """
    if guidance_conditions is None:
        return predict(unet, controlnet, latent, timesteps, conditions)
    doubled = predict(unet, controlnet, torch.cat([latent, latent]), torch.cat([timesteps, timesteps]), guidance_conditions)
    unconditional, conditional = doubled.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def set_schedule(scheduler: Scheduler, num_inference_steps: int, latent: torch.Tensor) -> list[tuple[torch.Tensor, int | None]]:
    """
    Set ``num_inference_steps`` on the scheduler and return ``(t, next_t)`` pairs on the latent's device.

    A rectified-flow schedule is shifted by the latent size (``input_img_size_numel``); ``next_t`` is
    ``None`` for DDPM-style schedulers, which step on ``t`` alone.
    """
    if isinstance(scheduler, RFlowScheduler):
        numel = math.prod(latent.shape[2:])
        scheduler.set_timesteps(num_inference_steps, device=latent.device, input_img_size_numel=numel)
        timesteps = list(scheduler.timesteps)
        next_timesteps: list[int | None] = [int(t) for t in timesteps[1:]] + [0]
        return list(zip(timesteps, next_timesteps))
    scheduler.set_timesteps(num_inference_steps, device=latent.device)
    return [(t, None) for t in scheduler.timesteps]


class ConditioningEmbeddingMemo(torch.nn.Module):
    """
    Stands in for a ControlNet's ``controlnet_cond_embedding`` during one denoising loop: the condition (the
    bit-plane mask) is the same tensor at every step, so its embedding, a stack of convolutions at the image's
    full resolution, is computed at the first step and returned again while the input is that same tensor.

    Parameters
    ----------
    embedding
        the ControlNet's conditioning embedding.
    """

    def __init__(self, embedding: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        if self._input is not condition:
            self._input, self._output = condition, self.embedding(condition)
        return self._output


@contextlib.contextmanager
def conditioning_embedding_computed_once(controlnet: torch.nn.Module | None) -> Iterator[None]:
    """
    Within the block, ``controlnet`` embeds each condition tensor once (:class:`ConditioningEmbeddingMemo`).

    Applies only without gradients (inference) and to an eager ControlNet that has the MAISI
    ``controlnet_cond_embedding``; a compiled ControlNet (``configs/inference_compile.json``) is left as it is,
    since swapping one of its modules would make it recompile. The embedding is restored on exit.
    """
    embedding = getattr(controlnet, "controlnet_cond_embedding", None)
    compiled = getattr(controlnet, "_compiled_call_impl", None) is not None
    if embedding is None or compiled or torch.is_grad_enabled():
        yield
        return
    controlnet.controlnet_cond_embedding = ConditioningEmbeddingMemo(embedding)
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = embedding


@torch.no_grad()
def sample_latent(
    unet: torch.nn.Module,
    scheduler: Scheduler,
    noise: torch.Tensor,
    conditions: SamplingConditions,
    num_inference_steps: int,
    controlnet: torch.nn.Module | None = None,
    guidance_scale: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    step_callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """
    Denoise ``noise`` into a latent.

    Parameters
    ----------
    unet
        ``DiffusionModelUNetMaisi`` (or any UNet with the same keyword interface).
    scheduler
        ``RFlowScheduler`` (velocity prediction) or ``DDPMScheduler``/``DDIMScheduler``.
    noise
        (B, C, x, y, z) start noise; its dtype is the dtype of the loop (fp16 only on CUDA).
    conditions
        conditioning tensors (``SamplingConditions``).
    num_inference_steps
        number of denoising steps.
    controlnet
        ``ControlNetMaisi`` for mask-conditioned generation, or ``None``.
    guidance_scale
        classifier-free guidance scale; 0 turns guidance off (one branch only).
    generator
        random generator of stochastic schedulers (DDPM), for reproducible samples.
    progress
        show a progress bar.
    step_callback
        called with ``(step_index, latent)`` after every step.

    Returns
    -------
    torch.Tensor
        The denoised latent, same shape and dtype as ``noise``.
    """
    if guidance_scale < 0 or not math.isfinite(guidance_scale):
        raise ValueError(f"cfg_guidance_scale={guidance_scale} is not allowed; it must be a finite number >= 0.")
    conditions = conditions.to(noise.device)
    guidance_conditions = conditions.with_guidance_batch() if guidance_scale > 0 else None
    stochastic = not isinstance(scheduler, RFlowScheduler)
    latent = noise
    schedule = set_schedule(scheduler, num_inference_steps, latent)
    with conditioning_embedding_computed_once(controlnet):
        for index, (t, next_t) in enumerate(tqdm(schedule, desc="denoising", unit="step", disable=not progress)):
            timesteps = t.reshape(1).expand(latent.shape[0])
            prediction = guided_prediction(unet, controlnet, latent, timesteps, conditions, guidance_conditions, guidance_scale)
            if stochastic:
                latent, _ = scheduler.step(prediction, t, latent, generator=generator)
            else:
                latent, _ = scheduler.step(prediction, t, latent, next_t)
            if step_callback is not None:
                step_callback(index, latent)
    return latent



class LatentSampler:
    """
    The denoising loop of a generation run as a config component: scheduler, steps and guidance fixed once.

    Parameters
    ----------
    scheduler
        the noise scheduler (``noise_scheduler``).
    num_inference_steps
        denoising steps (the normalised ``num_inference_steps``).
    guidance_scale
        classifier-free guidance scale (the normalised ``cfg_guidance_scale``; 0 = off).
    progress
        show a progress bar per sample.
    """

    def __init__(self, scheduler: Scheduler, num_inference_steps: int, guidance_scale: float = 0.0, progress: bool = True) -> None:
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.progress = progress

    def __call__(
        self,
        unet: torch.nn.Module,
        noise: torch.Tensor,
        conditions: SamplingConditions,
        controlnet: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise ``noise`` (see :func:`sample_latent`)."""
        return sample_latent(
            unet,
            self.scheduler,
            noise,
            conditions,
            self.num_inference_steps,
            controlnet=controlnet,
            guidance_scale=self.guidance_scale,
            generator=generator,
            progress=self.progress,
        )
