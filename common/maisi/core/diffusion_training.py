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
What MONAI's ``SupervisedTrainer`` needs to train the MAISI diffusion UNet on latent embeddings.

- :class:`LatentDiffusionPrepareBatch` turns a batch of latents + sidecar conditions into the noisy input,
  the regression target and the UNet's keyword inputs, with modality label dropout for classifier-free guidance.
- :func:`noisy_latents_and_target` (rectified flow: velocity ``x0 - noise``; DDPM: ``epsilon``/``v_prediction``/
  ``sample``) and :func:`unet_condition_inputs` are the two steps it shares with ControlNet training
  (``controlnet_training.ControlNetPrepareBatch``).
- :func:`resolve_scale_factor`: the latent scale factor, computed once (``1 / std`` of the first batch)
  and afterwards always read back (resume, fine-tuning).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.networks.schedulers import RFlowScheduler, Scheduler

from .checkpoint import LAST_CHECKPOINT_NAME, load_network_weights, unwrap_module
from .checks import check_bool, check_positive_int, check_positive_number
from .constants import (
    CT_MODALITY_CODES,
    GENERIC_CT_CODE,
    GENERIC_MR_CODE,
    REGION_INDEX_SCALE,
    SPACING_SCALE,
    UNCONDITIONAL_CLASS_LABEL,
)
from .embeddings import read_latent

logger = logging.getLogger(__name__)

__all__ = [
    "LatentDiffusionPrepareBatch",
    "augment_modality_labels",
    "check_diffusion_training_settings",
    "compute_scale_factor",
    "load_pretrained_unet",
    "noisy_latents_and_target",
    "polynomial_decay",
    "resolve_scale_factor",
    "training_loss",
    "unet_condition_inputs",
]


def augment_modality_labels(
    labels: torch.Tensor, generalize_prob: float = 0.1, dropout_prob: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    Modality label dropout for classifier-free guidance (applied per sample, during training only).

    With probability ``generalize_prob`` a specific code becomes its generic family code (CT 2..7 -> 1
    "ct", MR >= 9 -> 8 "mri"), so the generic codes stay meaningful; then, with probability
    ``dropout_prob``, any code becomes 0 (the unconditional class that guidance contrasts with).

    Parameters
    ----------
    labels
        ``(B,)`` int64 modality codes.
    generalize_prob, dropout_prob
        probabilities in [0, 1].
    generator
        optional random generator (on ``labels``' device).

    Returns
    -------
    torch.Tensor
        a new ``(B,)`` int64 tensor.
    """
    for name, value in (("modality_generalize_prob", generalize_prob), ("modality_dropout_prob", dropout_prob)):
        if not isinstance(value, Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}={value!r} must be a probability in [0, 1].")
    labels = labels.reshape(-1).long().clone()
    draw = torch.rand((2, labels.numel()), generator=generator, device=labels.device)
    generalize = draw[0] < generalize_prob
    is_ct = (labels >= CT_MODALITY_CODES.start) & (labels < CT_MODALITY_CODES.stop)
    labels = torch.where(generalize & is_ct, torch.full_like(labels, GENERIC_CT_CODE), labels)
    labels = torch.where(generalize & (labels > GENERIC_MR_CODE), torch.full_like(labels, GENERIC_MR_CODE), labels)
    return torch.where(draw[1] < dropout_prob, torch.full_like(labels, UNCONDITIONAL_CLASS_LABEL), labels)


def noisy_latents_and_target(
    scheduler: Scheduler, latents: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Draw training timesteps and return ``(timesteps, noisy_latents, target)`` for one batch.

    - Rectified flow (``RFlowScheduler``): ``t`` from the scheduler's ``sample_timesteps`` (with its
      resolution-dependent shift), ``x_t = (1 - t/T) x0 + (t/T) noise``, target = velocity ``x0 - noise``.
    - DDPM (any other MONAI scheduler): ``t ~ U{0..T-1}``, ``x_t = scheduler.add_noise``, target per
      ``prediction_type``: ``noise`` (epsilon), ``get_velocity`` (v_prediction) or ``x0`` (sample).

    Parameters
    ----------
    scheduler
        the ``noise_scheduler`` of the generation config.
    latents
        ``(B, C, X, Y, Z)`` scaled latents ``x0``.
    noise
        Gaussian noise of the same shape.

    Raises
    ------
    ValueError
        the scheduler's ``prediction_type`` is none of the three above.
    """
    if isinstance(scheduler, RFlowScheduler):
        timesteps = scheduler.sample_timesteps(latents)
        return timesteps, scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps), latents - noise
    prediction_type = getattr(scheduler, "prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"noise_scheduler prediction_type={prediction_type!r} is not supported for training; "
            "use 'epsilon', 'v_prediction' or 'sample'."
        )
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    if prediction_type == "epsilon":
        return timesteps, noisy, noise
    if prediction_type == "v_prediction":
        return timesteps, noisy, scheduler.get_velocity(latents, noise, timesteps)
    return timesteps, noisy, latents


def unet_condition_inputs(
    unet: torch.nn.Module, batchdata: Mapping[str, Any], device: torch.device | str | None
) -> dict[str, torch.Tensor]:
    """
    The conditioning keyword inputs of a MAISI diffusion UNet for a batch of :class:`scripts.embeddings.LoadLatentd` samples.

    Exactly the inputs the network was built with are returned, under the names of its ``forward``:
    ``class_labels`` (``num_class_embeds``; the modality codes, int64, ``(B,)``), ``spacing_tensor``
    (``include_spacing_input``; mm x 100, ``(B, 3)``) and ``top_region_index_tensor`` /
    ``bottom_region_index_tensor`` (``include_top/bottom_region_index_input``; one-hots x 100, ``(B, 4)``).

    Parameters
    ----------
    unet
        the diffusion UNet (a DDP wrapper is unwrapped); only its input flags are read.
    batchdata
        the collated batch (``modality``, ``spacing``, ``top_region_index``, ``bottom_region_index``).
    device
        where the tensors go.

    Raises
    ------
    ValueError
        the UNet is conditioned on body regions but a sample has none (all zeros).
    """
    unet = unwrap_module(unet)
    inputs: dict[str, torch.Tensor] = {}
    if getattr(unet, "num_class_embeds", None) is not None:
        inputs["class_labels"] = torch.as_tensor(batchdata["modality"]).to(device).reshape(-1).long()
    if getattr(unet, "include_spacing_input", False):
        inputs["spacing_tensor"] = torch.as_tensor(batchdata["spacing"]).to(device).float() * SPACING_SCALE
    for key, flag in (("top_region_index", "include_top_region_index_input"), ("bottom_region_index", "include_bottom_region_index_input")):
        if getattr(unet, flag, False):
            region = torch.as_tensor(batchdata[key]).to(device).float()
            if not bool(region.sum(dim=-1).gt(0).all()):
                raise ValueError(
                    f"this UNet is conditioned on {key} but a training sample has none (all zeros); "
                    "write the body regions into the datalist (scripts.data_prep datalist --top_region ... "
                    "--bottom_region ...) and recreate the embeddings."
                )
            inputs[f"{key}_tensor"] = region * REGION_INDEX_SCALE
    return inputs


class LatentDiffusionPrepareBatch(PrepareBatch):
    """
    Prepare one training batch of the MAISI diffusion UNet (used as ``SupervisedTrainer(prepare_batch=...)``
    with a ``SimpleInferer``).

    From a batch of :class:`scripts.embeddings.LoadLatentd` samples it draws noise and timesteps
    (:func:`noisy_latents_and_target`), and returns ``(noisy_latents, target, (), unet_kwargs)``; the UNet is
    then called as ``unet(noisy_latents, timesteps=..., **unet_condition_inputs(...))`` with exactly the
    inputs the network was built with. While the UNet trains, its modality labels go through
    :func:`augment_modality_labels`.

    Parameters
    ----------
    scheduler
        the ``noise_scheduler`` of the generation config.
    network
        the UNet (DDP wrappers are unwrapped) whose inputs decide which conditions are passed.
    scale_factor
        the latent scale factor (:func:`resolve_scale_factor`); latents are multiplied by it.
    modality_generalize_prob, modality_dropout_prob
        modality label dropout (:func:`augment_modality_labels`); both 0 disables it.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        network: torch.nn.Module,
        scale_factor: float,
        modality_generalize_prob: float = 0.1,
        modality_dropout_prob: float = 0.1,
    ) -> None:
        if not isinstance(scale_factor, Real) or not math.isfinite(float(scale_factor)) or float(scale_factor) <= 0:
            raise ValueError(f"scale_factor={scale_factor!r} must be a positive finite number.")
        augment_modality_labels(torch.zeros(1, dtype=torch.long), modality_generalize_prob, modality_dropout_prob)
        self.scheduler = scheduler
        self.network = network
        self.scale_factor = float(scale_factor)
        self.modality_generalize_prob = float(modality_generalize_prob)
        self.modality_dropout_prob = float(modality_dropout_prob)

    def conditions(self, batchdata: Mapping[str, Any], device: torch.device | str | None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs (:func:`unet_condition_inputs`), modality labels augmented while training."""
        inputs = unet_condition_inputs(self.network, batchdata, device)
        if "class_labels" in inputs and unwrap_module(self.network).training:
            inputs["class_labels"] = augment_modality_labels(
                inputs["class_labels"], self.modality_generalize_prob, self.modality_dropout_prob
            )
        return inputs

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        latents = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking, **kwargs).float()
        latents = latents * self.scale_factor
        timesteps, noisy, target = noisy_latents_and_target(self.scheduler, latents, torch.randn_like(latents))
        unet_kwargs = {"timesteps": timesteps, **self.conditions(batchdata, device)}
        return noisy, target, (), unet_kwargs


def compute_scale_factor(latents: Sequence[torch.Tensor]) -> float:
    """``1 / std`` over the given latents (so that scaled latents have unit variance)."""
    std = torch.cat([latent.float().reshape(-1) for latent in latents]).std().item()
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"cannot compute the latent scale factor: the latents have standard deviation {std}.")
    return 1.0 / std


def _stored_scale_factor(path: Path) -> float | None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and "scale_factor" in checkpoint:
        value = checkpoint["scale_factor"]
        return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
    return None


def resolve_scale_factor(
    items: Sequence[Mapping[str, Any]],
    batch_size: int,
    ckpt_dir: str | os.PathLike,
    pretrained_path: str | os.PathLike | None = None,
    resume: bool = True,
) -> float:
    """
    The latent scale factor of a training run, computed once per model.

    In order: the factor stored in ``<ckpt_dir>/checkpoint_last.pt`` (resuming, when ``resume``); the factor
    of the checkpoint being fine-tuned (``pretrained_path``, which must hold one); otherwise ``1 / std`` of
    the first ``batch_size`` latents of ``items`` in datalist order (the first batch; the same on every rank,
    so no communication is needed under DDP).

    Raises
    ------
    ValueError
        ``pretrained_path`` holds no ``scale_factor``.
    """
    checkpoint_file = Path(ckpt_dir) / LAST_CHECKPOINT_NAME
    if resume and checkpoint_file.is_file():
        stored = _stored_scale_factor(checkpoint_file)
        if stored is not None:
            logger.info("latent scale factor %.6f (resumed from %s)", stored, checkpoint_file)
            return stored
    if pretrained_path is not None:
        stored = _stored_scale_factor(Path(pretrained_path))
        if stored is None:
            raise ValueError(
                f"trained_diffusion_path={str(pretrained_path)!r} has no 'scale_factor'; a fine-tuned UNet must keep "
                "the scale factor it was trained with."
            )
        logger.info("latent scale factor %.6f (from the fine-tuned checkpoint %s)", stored, pretrained_path)
        return stored
    first_batch = [read_latent(item["image"]) for item in list(items)[: max(int(batch_size), 1)]]
    scale_factor = compute_scale_factor(first_batch)
    logger.info("latent scale factor %.6f (computed from the first batch of %d latents)", scale_factor, len(first_batch))
    return scale_factor


def load_pretrained_unet(
    network: torch.nn.Module, trained_diffusion_path: str | os.PathLike, finetune: bool, device: torch.device | str
) -> str | None:
    """
    Load ``trained_diffusion_path`` into ``network`` strictly when ``finetune``; return the path loaded (or ``None``).

    Raises
    ------
    ValueError
        ``finetune`` is true but the file does not exist (naming ``trained_diffusion_path``).
    """
    check_bool("finetune", finetune)
    if not finetune:
        return None
    path = Path(trained_diffusion_path)
    if not path.is_file():
        raise ValueError(
            f"finetune=true but trained_diffusion_path={str(path)!r} does not exist; download the published weights "
            "(see docs/README.md) or set finetune=false to train from scratch."
        )
    load_network_weights(network, path, state_dict_key="unet_state_dict", map_location=device)
    logger.info("fine-tuning from %s", path)
    return str(path)


def check_diffusion_training_settings(
    max_epochs: Any, lr: Any, train_batch_size: Any, save_interval: Any, log_every_n_iterations: Any
) -> None:
    """
    Refuse bad training ids before anything is built; each message names the id, the value and what is allowed.
    """
    for name, value in (
        ("max_epochs", max_epochs),
        ("train_batch_size", train_batch_size),
        ("save_interval", save_interval),
        ("log_every_n_iterations", log_every_n_iterations),
    ):
        check_positive_int(name, value)
    check_positive_number("lr", lr)


def polynomial_decay(total_iters: int, power: float = 2.0) -> Callable[[int], float]:
    """
    The LR factor ``(1 - min(step, total_iters) / total_iters) ** power`` for ``torch.optim.lr_scheduler.LambdaLR``.

    Unlike ``PolynomialLR``, whose checkpointed state carries ``total_iters``, the length comes from the
    current config: resuming with a larger ``max_epochs`` continues the decay over the new length.
    """
    if isinstance(total_iters, bool) or not isinstance(total_iters, Integral) or total_iters < 1:
        raise ValueError(f"the LR schedule needs at least one iteration, got total_iters={total_iters!r}.")

    def factor(step: int) -> float:
        return (1.0 - min(step, total_iters) / total_iters) ** power

    return factor


def training_loss(output: Mapping[str, Any]) -> float:
    """The loss of one ``SupervisedTrainer`` iteration (``decollate=False`` output) as a float, for the stats handlers."""
    return float(torch.as_tensor(output["loss"]).detach().float().mean().item())
