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
ControlNet fine-tuning (``configs/train_controlnet.json``): the trainer and what it needs beyond MONAI.

The frozen diffusion UNet and the trained ControlNet are evaluated exactly as in generation
(``sampler.predict``), on noisy latents (rectified flow or DDPM, the scheduler of the generation
config), conditioned on the bit-plane label mask (``labels.binarize_labels``) and on the spacing /
modality / body-region inputs the UNet was built with.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.networks.schedulers import RFlowScheduler, Scheduler
from monai.networks.utils import copy_model_state
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd

from .checkpoint import load_network_weights, unwrap_module
from .constants import MAX_CONTROLNET_LABEL
from .embeddings import LATENT_DOWNSAMPLE, LoadLatentd
from .labels import binarize_labels, region_condition, remap_mr_labels_for_controlnet, remove_tumors, spacing_condition
from .sampler import SamplingConditions, predict
from .training_data import check_amp, check_non_negative, check_positive_int, check_positive_number

__all__ = [
    "ControlNetTrainer",
    "check_controlnet_training_settings",
    "controlnet_train_transforms",
    "init_controlnet",
    "load_frozen_unet",
    "polynomial_total_iters",
]

logger = logging.getLogger(__name__)

L1_LOSS = "l1_loss"
REGION_CONTRASTIVE_LOSS = "region_contrastive_loss"


def check_controlnet_training_settings(
    max_epochs: Any,
    lr: Any,
    batch_size: Any,
    weighted_loss_label: Any,
    weighted_loss: Any,
    use_region_contrastive_loss: Any,
    region_contrastive_loss_weight: Any,
    region_contrastive_loss_delta: Any,
    amp: Any,
    device: torch.device | str,
    trained_diffusion_path: Any = None,
    controlnet_init_path: Any = None,
) -> None:
    """
    Refuse bad ControlNet-training ids before any data or weights are read.

    Raises
    ------
    ValueError
        naming the first bad id, its value and what is allowed.
    FileNotFoundError
        ``trained_diffusion_path`` or (when given) ``controlnet_init_path`` does not exist.
    """
    check_positive_int("max_epochs", max_epochs)
    check_positive_number("lr", lr)
    check_positive_int("batch_size", batch_size)
    if not isinstance(weighted_loss_label, Sequence) or isinstance(weighted_loss_label, str) or any(
        isinstance(v, bool) or not isinstance(v, Integral) or not 0 < v <= MAX_CONTROLNET_LABEL for v in weighted_loss_label
    ):
        raise ValueError(
            f"weighted_loss_label={weighted_loss_label!r} is not allowed; it must be a list of label ids in "
            f"[1, {MAX_CONTROLNET_LABEL}] (see configs/label_dict.json)."
        )
    if isinstance(weighted_loss, bool) or not isinstance(weighted_loss, Real) or not 1 <= float(weighted_loss) < float("inf"):
        raise ValueError(f"weighted_loss={weighted_loss!r} is not allowed; it must be a finite number >= 1 (1 disables it).")
    if not isinstance(use_region_contrastive_loss, bool):
        raise ValueError(f"use_region_contrastive_loss={use_region_contrastive_loss!r} is not allowed; it must be true or false.")
    check_non_negative(
        {"region_contrastive_loss_weight": region_contrastive_loss_weight, "region_contrastive_loss_delta": region_contrastive_loss_delta}
    )
    check_amp(amp, device)
    if trained_diffusion_path is not None and not os.path.isfile(trained_diffusion_path):
        raise FileNotFoundError(f"trained_diffusion_path={trained_diffusion_path} does not exist; the ControlNet trains against this UNet.")
    if controlnet_init_path is not None and not os.path.isfile(controlnet_init_path):
        raise FileNotFoundError(
            f"controlnet_init_path={controlnet_init_path} does not exist; download the published ControlNet or set "
            "--controlnet_init_path '$None' to start from the diffusion UNet's weights."
        )


def _check_label_geometry(label: torch.Tensor, image: torch.Tensor, where: Any) -> None:
    expected = tuple(LATENT_DOWNSAMPLE * s for s in image.shape[1:])
    if tuple(label.shape[1:]) != expected:
        raise ValueError(
            f"{where}: label shape {tuple(label.shape[1:])} does not match its latent {tuple(image.shape[1:])}; "
            f"the mask must have the image resolution, {LATENT_DOWNSAMPLE}x the latent: {expected}."
        )


def _label_matches_latent(data: Mapping[str, Any]) -> dict[str, Any]:
    _check_label_geometry(data["label"], data["image"], "training pair")
    return dict(data)


def _labels_in_controlnet_range(data: Mapping[str, Any], label_mapping: Mapping[Any, Any] | None = None) -> dict[str, Any]:
    """
    Map label ids above 255 (MR, e.g. BraTS 401-403 and body 500) into the 8-bit ControlNet range with
    ``labels.remap_mr_labels_for_controlnet`` (+ ``label_mapping``); ids up to 255 are unchanged.
    """
    label = data["label"]
    try:
        mapped = remap_mr_labels_for_controlnet(label, label_mapping)
    except ValueError as error:
        source = getattr(label, "meta", {}).get("filename_or_obj", "a training label map")
        raise ValueError(f"{source}: {error} Add the ids to controlnet_label_mapping.") from error
    return {**data, "label": mapped}


def controlnet_train_transforms(default_modality: int | None = None, label_mapping: Mapping[Any, Any] | None = None) -> Compose:
    """
    Load a training pair: the latent and its sidecar conditions (``embeddings.LoadLatentd``) and the raw-id mask.

    The mask is read at the image resolution (RAS, integer ids), and must be 4x the latent size per axis.
    MR ids above 255 (BraTS tumour 401-403, body 500) are mapped as generation maps them
    (``labels.remap_mr_labels_for_controlnet`` + ``label_mapping``); ids up to 255 are unchanged.

    Parameters
    ----------
    default_modality
        modality code for sidecars without ``modality`` (``None``: such sidecars are an error).
    label_mapping
        extra ``{source_id: target_id}`` entries for ids above 255 (``controlnet_label_mapping``).
    """
    return Compose(
        [
            LoadLatentd(keys="image", default_modality=default_modality),
            LoadImaged(keys="label", image_only=True),
            EnsureChannelFirstd(keys="label"),
            Orientationd(keys="label", axcodes="RAS"),
            EnsureTyped(keys="label", dtype=torch.int16),
            functools.partial(_labels_in_controlnet_range, label_mapping=label_mapping),
            EnsureTyped(keys="label", dtype=torch.int16, track_meta=False),
            _label_matches_latent,
        ]
    )


def load_frozen_unet(unet: torch.nn.Module, path: str | os.PathLike, device: torch.device | str) -> float:
    """
    Load the diffusion UNet (``{"unet_state_dict", "scale_factor"}``) strictly, freeze it and return its scale factor.

    Raises
    ------
    KeyError
        the file has no ``scale_factor`` (the latent scale the UNet was trained with).
    """
    extras = load_network_weights(unet, path, state_dict_key="unet_state_dict", map_location=device)
    if "scale_factor" not in extras:
        raise KeyError(f"trained_diffusion_path={path} has no 'scale_factor' entry; it is not a MAISI diffusion checkpoint.")
    unet.requires_grad_(False)
    unet.eval()
    return float(extras["scale_factor"])


def init_controlnet(
    controlnet: torch.nn.Module, unet: torch.nn.Module, controlnet_init_path: str | os.PathLike | None, device: torch.device | str
) -> str:
    """
    Initialise the ControlNet: from ``controlnet_init_path`` (strict, ``{"controlnet_state_dict"}``), or, when
    it is ``None``, from the diffusion UNet's matching weights, as MAISI does for a new ControlNet.

    Returns
    -------
    str
        where the weights came from (for the log).

    Raises
    ------
    FileNotFoundError
        ``controlnet_init_path`` is given but does not exist.
    """
    if controlnet_init_path is None:
        _, copied, _ = copy_model_state(unwrap_module(controlnet), unwrap_module(unet).state_dict())
        logger.info("ControlNet initialised from %d tensors of the diffusion UNet", len(copied))
        return "diffusion_unet"
    if not os.path.isfile(controlnet_init_path):
        raise FileNotFoundError(
            f"controlnet_init_path={controlnet_init_path} does not exist; download the published ControlNet or set "
            "--controlnet_init_path '$None' to start from the diffusion UNet's weights."
        )
    load_network_weights(controlnet, controlnet_init_path, state_dict_key="controlnet_state_dict", map_location=device)
    return str(controlnet_init_path)


def polynomial_total_iters(max_epochs: int, iterations_per_epoch: int) -> int:
    """``PolynomialLR`` length: every iteration of this process (per rank under DDP), never zero."""
    return max(1, int(max_epochs) * int(iterations_per_epoch))


def _dilate(mask: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    return F.max_pool3d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)


class ControlNetTrainer(SupervisedTrainer):
    """
    Train a ControlNet against a frozen diffusion UNet on latent embeddings and raw-id label masks.

    One iteration: scale the latent by ``scale_factor``, draw noise and timesteps (``RFlowScheduler``:
    ``sample_timesteps``, target ``latent - noise``; DDPM: uniform integer timesteps, target by the
    scheduler's ``prediction_type``), predict with ``sampler.predict`` and minimise a weighted L1 loss:
    latent voxels whose (nearest-downsampled) label is in ``weighted_loss_label`` weigh ``weighted_loss``.
    The optional region-contrastive term evaluates the ControlNet a second time on the lesion-free mask
    (``labels.remove_tumors``) and pushes the predictions apart inside the lesion region (hinged at
    ``delta``) while keeping the lesion-free prediction on target outside its dilation.

    Parameters
    ----------
    diffusion_unet
        the frozen diffusion UNet (never optimised).
    noise_scheduler
        the scheduler of the generation config (``RFlowScheduler`` or ``DDPMScheduler``).
    scale_factor
        the latent scale of the diffusion UNet checkpoint.
    weighted_loss_label
        label ids up-weighted in the loss.
    weighted_loss
        their weight (1 disables the weighting).
    region_contrastive_loss_weight
        weight of the region-contrastive term; 0 disables it (and its second forward pass).
    region_contrastive_loss_delta
        hinge of the foreground term.
    kwargs
        the arguments of ``monai.engines.SupervisedTrainer`` (``network`` is the ControlNet,
        ``loss_function`` an element-wise loss such as ``L1Loss(reduction="none")``).
    """

    def __init__(
        self,
        diffusion_unet: torch.nn.Module,
        noise_scheduler: Scheduler,
        scale_factor: float,
        weighted_loss_label: Sequence[int] = (),
        weighted_loss: float = 1.0,
        region_contrastive_loss_weight: float = 0.0,
        region_contrastive_loss_delta: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.diffusion_unet = diffusion_unet.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.scale_factor = float(scale_factor)
        self.weighted_loss_label = [int(v) for v in weighted_loss_label]
        self.weighted_loss = float(weighted_loss)
        self.region_contrastive_loss_weight = float(region_contrastive_loss_weight)
        self.region_contrastive_loss_delta = float(region_contrastive_loss_delta)

    def _conditions(self, batch: Mapping[str, Any], controlnet_cond: torch.Tensor, device: torch.device) -> SamplingConditions:
        unet = unwrap_module(self.diffusion_unet)
        size = controlnet_cond.shape[0]

        def rows(key: str, scale: Any) -> torch.Tensor:
            return torch.cat([scale(row) for row in torch.as_tensor(batch[key]).reshape(size, -1)]).to(device)

        return SamplingConditions(
            spacing=rows("spacing", spacing_condition) if getattr(unet, "include_spacing_input", False) else None,
            class_labels=(
                torch.as_tensor(batch["modality"]).reshape(size).long().to(device)
                if getattr(unet, "num_class_embeds", None) is not None
                else None
            ),
            top_region=rows("top_region_index", region_condition) if getattr(unet, "include_top_region_index_input", False) else None,
            bottom_region=(
                rows("bottom_region_index", region_condition) if getattr(unet, "include_bottom_region_index_input", False) else None
            ),
            controlnet_cond=controlnet_cond,
        )

    def _noisy_inputs(self, latents: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scheduler = self.noise_scheduler
        if isinstance(scheduler, RFlowScheduler):
            timesteps = scheduler.sample_timesteps(latents)
            return timesteps, scheduler.add_noise(latents, noise, timesteps), latents - noise
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = getattr(scheduler, "prediction_type", "epsilon")
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "sample":
            target = latents
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"noise_scheduler prediction_type={prediction_type!r} is not supported for training.")
        return timesteps, noisy, target

    def _voxel_weights(self, labels_latent: torch.Tensor) -> torch.Tensor | None:
        if self.weighted_loss <= 1 or not self.weighted_loss_label:
            return None
        selected = torch.isin(labels_latent, torch.tensor(self.weighted_loss_label, device=labels_latent.device))
        return 1.0 + (self.weighted_loss - 1.0) * selected.float()

    def _region_contrastive(
        self,
        engine: ControlNetTrainer,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: SamplingConditions,
        labels: torch.Tensor,
        prediction: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        lesion_free = torch.as_tensor(remove_tumors(labels.cpu())).to(labels.device)
        changed = (lesion_free != labels).float()  # (B, 1, X, Y, Z), per sample: the channel axis is kept
        region = F.max_pool3d(changed, kernel_size=LATENT_DOWNSAMPLE, stride=LATENT_DOWNSAMPLE)
        free_conditions = SamplingConditions(**{**vars(conditions), "controlnet_cond": binarize_labels(lesion_free)})
        free_prediction = predict(self.diffusion_unet, engine.network, noisy, timesteps, free_conditions).float()
        channels = prediction.shape[1]
        foreground = torch.zeros((), device=prediction.device)
        if bool(region.any()):
            difference = ((prediction - free_prediction).abs() * region).sum() / (region.sum() * channels)
            foreground = F.relu(-difference + self.region_contrastive_loss_delta) - self.region_contrastive_loss_delta
        background = 1.0 - _dilate(region)
        background_l1 = ((free_prediction - target).abs() * background).sum() / (background.sum() * channels).clamp_min(1.0)
        return foreground + background_l1

    def _iteration(self, engine: ControlNetTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        """One ControlNet update on ``batchdata`` (``image``: latents, ``label``: raw-id masks, plus conditions)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = torch.device(engine.state.device)
        latents = torch.as_tensor(batchdata["image"]).to(device, non_blocking=engine.non_blocking).float() * self.scale_factor
        labels = torch.as_tensor(batchdata["label"]).to(device, non_blocking=engine.non_blocking).long()
        _check_label_geometry(labels[0], latents[0], "batch")
        noise = torch.randn_like(latents)
        timesteps, noisy, target = self._noisy_inputs(latents, noise)
        conditions = self._conditions(batchdata, binarize_labels(labels), device)
        labels_latent = F.interpolate(labels.float(), size=latents.shape[2:], mode="nearest").long()
        weights = self._voxel_weights(labels_latent)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=device.type, enabled=engine.amp, **engine.amp_kwargs):
            prediction = predict(self.diffusion_unet, engine.network, noisy, timesteps, conditions).float()
            elementwise = engine.loss_function(prediction, target)
            l1 = (elementwise if weights is None else elementwise * weights).mean()
            contrastive = torch.zeros((), device=device)
            if self.region_contrastive_loss_weight > 0:
                contrastive = self._region_contrastive(engine, noisy, timesteps, conditions, labels, prediction, target)
            loss = l1 + self.region_contrastive_loss_weight * contrastive
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        engine.state.output = {
            "image": latents,
            "label": labels,
            "pred": prediction.detach(),
            "loss": loss.detach(),
            L1_LOSS: l1.detach(),
            REGION_CONTRASTIVE_LOSS: contrastive.detach(),
        }
        return engine.state.output


def loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    """The scalar loss terms of a ``ControlNetTrainer`` output, for logging and ``TerminateOnNan``."""
    return {name: float(output[name]) for name in ("loss", L1_LOSS, REGION_CONTRASTIVE_LOSS) if name in output}
