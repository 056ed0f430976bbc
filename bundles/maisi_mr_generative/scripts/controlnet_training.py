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
ControlNet fine-tuning (``configs/train_controlnet.json``) on MONAI's ``SupervisedTrainer``.

The trainer's three replaceable parts are here: :class:`ControlNetPrepareBatch` (noisy latents, rectified
flow or DDPM as in diffusion training, and the UNet conditions with the bit-plane label mask,
``labels.binarize_labels``), :class:`ControlNetInferer` (the frozen diffusion UNet and the trained
ControlNet evaluated exactly as in generation, ``sampler.predict``) and :class:`ControlNetLoss` (an
element-wise loss weighted per latent voxel, plus the optional region-contrastive term). Because the
iteration is ``SupervisedTrainer``'s own, MONAI's ``IterationEvents`` (``FORWARD_COMPLETED``,
``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``) fire, e.g. for gradient clipping.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.engines import IterationEvents
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.networks.schedulers import Scheduler
from monai.networks.utils import copy_model_state
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd

from .checkpoint import load_network_weights, unwrap_module
from .checks import check_amp, check_bool, check_non_negative, check_positive_int, check_positive_number
from .constants import MAX_CONTROLNET_LABEL
from .diffusion_training import noisy_latents_and_target, polynomial_decay, unet_condition_inputs
from .embeddings import LATENT_DOWNSAMPLE, LoadLatentd
from .labels import binarize_labels, remap_mr_labels_for_controlnet, remove_tumors
from .sampler import SamplingConditions, predict

__all__ = [
    "ControlNetInferer",
    "ControlNetLoss",
    "ControlNetPrepareBatch",
    "LossTermsToOutput",
    "check_controlnet_loss_settings",
    "check_controlnet_training_settings",
    "check_controlnet_weights",
    "constant_lr_factor",
    "controlnet_train_transforms",
    "init_controlnet",
    "load_frozen_unet",
    "loss_terms",
    "lr_factor",
    "polynomial_total_iters",
    "region_contrastive_loss",
]

logger = logging.getLogger(__name__)

L1_LOSS = "l1_loss"
REGION_CONTRASTIVE_LOSS = "region_contrastive_loss"
_NEW_CONTROLNET_HINT = "set --controlnet_init_path '$None' to start from the diffusion UNet's weights"


def check_controlnet_training_settings(
    max_epochs: Any, lr: Any, batch_size: Any, lr_schedule: Any, amp: Any, device: torch.device | str
) -> None:
    """
    Refuse bad ControlNet optimisation ids before any data or weights are read.

    Raises
    ------
    ValueError
        naming the first bad id, its value and what is allowed.
    """
    check_positive_int("max_epochs", max_epochs)
    check_positive_number("lr", lr)
    check_positive_int("batch_size", batch_size)
    check_bool("lr_schedule", lr_schedule)
    check_amp(amp, device)


def check_controlnet_loss_settings(
    weighted_loss_label: Any,
    weighted_loss: Any,
    use_region_contrastive_loss: Any,
    region_contrastive_loss_weight: Any,
    region_contrastive_loss_delta: Any,
) -> None:
    """
    Refuse bad ControlNet loss ids before any data or weights are read.

    Raises
    ------
    ValueError
        naming the first bad id, its value and what is allowed.
    """
    if not isinstance(weighted_loss_label, Sequence) or isinstance(weighted_loss_label, str) or any(
        isinstance(v, bool) or not isinstance(v, Integral) or not 0 < v <= MAX_CONTROLNET_LABEL for v in weighted_loss_label
    ):
        raise ValueError(
            f"weighted_loss_label={weighted_loss_label!r} is not allowed; it must be a list of label ids in "
            f"[1, {MAX_CONTROLNET_LABEL}] (see configs/label_dict.json)."
        )
    if isinstance(weighted_loss, bool) or not isinstance(weighted_loss, Real) or not 1 <= float(weighted_loss) < float("inf"):
        raise ValueError(f"weighted_loss={weighted_loss!r} is not allowed; it must be a finite number >= 1 (1 disables it).")
    check_bool("use_region_contrastive_loss", use_region_contrastive_loss)
    check_non_negative(
        {"region_contrastive_loss_weight": region_contrastive_loss_weight, "region_contrastive_loss_delta": region_contrastive_loss_delta}
    )


def check_controlnet_weights(trained_diffusion_path: Any = None, controlnet_init_path: Any = None) -> None:
    """
    Check the weight files ControlNet training reads, before any of them loads.

    Raises
    ------
    FileNotFoundError
        ``trained_diffusion_path`` or (when given) ``controlnet_init_path`` does not exist.
    """
    if trained_diffusion_path is not None and not os.path.isfile(trained_diffusion_path):
        raise FileNotFoundError(f"trained_diffusion_path={trained_diffusion_path} does not exist; the ControlNet trains against this UNet.")
    if controlnet_init_path is not None and not os.path.isfile(controlnet_init_path):
        raise FileNotFoundError(
            f"controlnet_init_path={controlnet_init_path} does not exist; download the published ControlNet or "
            f"{_NEW_CONTROLNET_HINT}."
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
    check_controlnet_weights(controlnet_init_path=controlnet_init_path)
    load_network_weights(controlnet, controlnet_init_path, state_dict_key="controlnet_state_dict", map_location=device)
    return str(controlnet_init_path)


def polynomial_total_iters(max_epochs: int, iterations_per_epoch: int) -> int:
    """The LR schedule's length: every iteration of this process (per rank under DDP), never zero."""
    return max(1, int(max_epochs) * int(iterations_per_epoch))


def constant_lr_factor(step: int) -> float:
    """The ``LambdaLR`` factor of a run without an LR schedule (``lr_schedule: false``): always 1."""
    return 1.0


def lr_factor(lr_schedule: bool, total_iters: int, power: float = 2.0) -> Callable[[int], float]:
    """
    The ``LambdaLR`` factor of ControlNet training: ``diffusion_training.polynomial_decay(total_iters, power)``
    when ``lr_schedule`` is true, otherwise :func:`constant_lr_factor`.

    ``LambdaLR`` keeps no schedule length in its checkpointed state (``PolynomialLR`` does), so a run resumed
    with a larger ``max_epochs`` continues the decay over the new length instead of training at LR 0.
    """
    check_bool("lr_schedule", lr_schedule)
    return polynomial_decay(total_iters, power) if lr_schedule else constant_lr_factor


def _sampling_conditions(unet_inputs: Mapping[str, torch.Tensor], controlnet_cond: torch.Tensor) -> SamplingConditions:
    """``diffusion_training.unet_condition_inputs`` (UNet keyword names) as the sampler's conditions, plus the mask."""
    return SamplingConditions(
        spacing=unet_inputs.get("spacing_tensor"),
        class_labels=unet_inputs.get("class_labels"),
        top_region=unet_inputs.get("top_region_index_tensor"),
        bottom_region=unet_inputs.get("bottom_region_index_tensor"),
        controlnet_cond=controlnet_cond,
    )


class ControlNetPrepareBatch(PrepareBatch):
    """
    Prepare one ControlNet training batch for ``SupervisedTrainer(prepare_batch=...)`` with a :class:`ControlNetInferer`.

    From a batch of :func:`controlnet_train_transforms` samples (``image``: latents, ``label``: raw-id masks at
    the image resolution, plus the sidecar conditions) it scales the latents by ``scale_factor``, draws noise
    and timesteps (``diffusion_training.noisy_latents_and_target``: rectified flow or DDPM, as diffusion
    training does) and builds the UNet's conditions (``diffusion_training.unet_condition_inputs``) with the
    bit-plane mask (``labels.binarize_labels``). It returns ``(noisy_latents, targets, (), inferer_kwargs)``:

    - ``targets``: ``{"target": regression target, "label": the mask at latent resolution (nearest), int64}``,
      plus ``"lesion_region"`` (latent voxels touching a lesion, float) with ``lesion_free_condition``;
    - ``inferer_kwargs``: ``{"timesteps", "conditions"}``, plus ``"lesion_free_cond"`` (the bit planes of the
      lesion-free mask, ``labels.remove_tumors``) with ``lesion_free_condition``.

    Parameters
    ----------
    scheduler
        the ``noise_scheduler`` of the generation config.
    diffusion_unet
        the frozen diffusion UNet; only its input flags are read (which conditions it takes).
    scale_factor
        the latent scale of the diffusion UNet checkpoint.
    lesion_free_condition
        also prepare the lesion-free mask, for the region-contrastive loss (``use_region_contrastive_loss``).
    """

    def __init__(
        self, scheduler: Scheduler, diffusion_unet: torch.nn.Module, scale_factor: float, lesion_free_condition: bool = False
    ) -> None:
        check_positive_number("scale_factor", scale_factor)
        check_bool("lesion_free_condition", lesion_free_condition)
        self.scheduler = scheduler
        self.diffusion_unet = diffusion_unet
        self.scale_factor = float(scale_factor)
        self.lesion_free_condition = lesion_free_condition

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, Any]]:
        latents = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking, **kwargs).float()
        latents = latents * self.scale_factor
        labels = torch.as_tensor(batchdata["label"]).to(device=device, non_blocking=non_blocking).long()
        _check_label_geometry(labels[0], latents[0], "batch")
        timesteps, noisy, target = noisy_latents_and_target(self.scheduler, latents, torch.randn_like(latents))
        unet_inputs = unet_condition_inputs(self.diffusion_unet, batchdata, latents.device)
        inferer_kwargs: dict[str, Any] = {"timesteps": timesteps, "conditions": _sampling_conditions(unet_inputs, binarize_labels(labels))}
        targets = {"target": target, "label": F.interpolate(labels.float(), size=latents.shape[2:], mode="nearest").long()}
        if self.lesion_free_condition:
            lesion_free = torch.as_tensor(remove_tumors(labels.cpu())).to(labels.device)
            changed = (lesion_free != labels).float()  # (B, 1, X, Y, Z), per sample: the channel axis is kept
            targets["lesion_region"] = F.max_pool3d(changed, kernel_size=LATENT_DOWNSAMPLE, stride=LATENT_DOWNSAMPLE)
            inferer_kwargs["lesion_free_cond"] = binarize_labels(lesion_free)
        return noisy, targets, (), inferer_kwargs


class ControlNetInferer(Inferer):
    """
    The ControlNet + frozen diffusion UNet evaluation of generation (``sampler.predict``) as a MONAI ``Inferer``.

    Called by ``SupervisedTrainer`` as ``inferer(noisy_latents, controlnet, timesteps=..., conditions=...)``; the
    ``network`` argument is the (possibly DDP-wrapped) ControlNet being trained.

    Parameters
    ----------
    diffusion_unet
        the diffusion UNet the ControlNet steers; it is frozen and put in eval mode here (never optimised).
    """

    def __init__(self, diffusion_unet: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_unet = diffusion_unet.requires_grad_(False).eval()

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        timesteps: torch.Tensor,
        conditions: SamplingConditions,
        lesion_free_cond: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Returns
        -------
        dict[str, torch.Tensor]
            ``{"pred": prediction}`` (float32), plus ``"lesion_free_pred"``, the prediction on the lesion-free
            mask, when ``lesion_free_cond`` is given.
        """
        outputs = {"pred": predict(self.diffusion_unet, network, inputs, timesteps, conditions).float()}
        if lesion_free_cond is not None:
            lesion_free = dataclasses.replace(conditions, controlnet_cond=lesion_free_cond)
            outputs["lesion_free_pred"] = predict(self.diffusion_unet, network, inputs, timesteps, lesion_free).float()
        return outputs


def _dilate(mask: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    return F.max_pool3d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)


def region_contrastive_loss(
    prediction: torch.Tensor, lesion_free_prediction: torch.Tensor, target: torch.Tensor, region: torch.Tensor, delta: float
) -> torch.Tensor:
    """
    Push the predictions on the real and on the lesion-free mask apart inside the lesion ``region`` (hinged at
    ``delta``), and keep the lesion-free prediction on ``target`` outside the region's dilation.

    Parameters
    ----------
    prediction, lesion_free_prediction, target
        ``(B, C, X, Y, Z)``.
    region
        ``(B, 1, X, Y, Z)`` latent voxels touching a lesion (1) or not (0).
    delta
        the hinge of the foreground term (``region_contrastive_loss_delta``).
    """
    channels = prediction.shape[1]
    foreground = torch.zeros((), device=prediction.device)
    if bool(region.any()):
        difference = ((prediction - lesion_free_prediction).abs() * region).sum() / (region.sum() * channels)
        foreground = F.relu(-difference + delta) - delta
    background = 1.0 - _dilate(region)
    background_l1 = ((lesion_free_prediction - target).abs() * background).sum() / (background.sum() * channels).clamp_min(1.0)
    return foreground + background_l1


class ControlNetLoss(torch.nn.Module):
    """
    The ControlNet training loss: an element-wise loss weighted per latent voxel, plus the optional region-contrastive term.

    Latent voxels whose (nearest-downsampled) label is in ``weighted_loss_label`` weigh ``weighted_loss``, the
    others 1; the weighted element-wise loss is averaged. With ``use_region_contrastive_loss``,
    ``region_contrastive_loss_weight * region_contrastive_loss(...)`` is added, on the lesion-free prediction of
    :class:`ControlNetInferer` (:class:`ControlNetPrepareBatch` with ``lesion_free_condition``). After each call
    :attr:`terms` holds the detached ``l1_loss`` and ``region_contrastive_loss`` (:class:`LossTermsToOutput`
    puts them into the engine output for logging).

    Parameters
    ----------
    elementwise_loss
        e.g. ``torch.nn.L1Loss(reduction="none")`` (config id ``loss``).
    weighted_loss_label
        label ids up-weighted in the loss.
    weighted_loss
        their weight (1 disables the weighting).
    use_region_contrastive_loss
        add the region-contrastive term.
    region_contrastive_loss_weight
        its weight.
    region_contrastive_loss_delta
        the hinge of its foreground term.
    """

    def __init__(
        self,
        elementwise_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weighted_loss_label: Sequence[int] = (),
        weighted_loss: float = 1.0,
        use_region_contrastive_loss: bool = False,
        region_contrastive_loss_weight: float = 0.0,
        region_contrastive_loss_delta: float = 2.0,
    ) -> None:
        super().__init__()
        self.elementwise_loss = elementwise_loss
        self.weighted_loss_label = [int(v) for v in weighted_loss_label]
        self.weighted_loss = float(weighted_loss)
        self.use_region_contrastive_loss = bool(use_region_contrastive_loss)
        self.region_contrastive_loss_weight = float(region_contrastive_loss_weight)
        self.region_contrastive_loss_delta = float(region_contrastive_loss_delta)
        self.terms: dict[str, torch.Tensor] = {}

    def voxel_weights(self, labels_latent: torch.Tensor) -> torch.Tensor | None:
        """Per-voxel weights for label ids at latent resolution, or ``None`` when the weighting is off."""
        if self.weighted_loss <= 1 or not self.weighted_loss_label:
            return None
        selected = torch.isin(labels_latent, torch.tensor(self.weighted_loss_label, device=labels_latent.device))
        return 1.0 + (self.weighted_loss - 1.0) * selected.float()

    def forward(self, prediction: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scalar loss of :class:`ControlNetInferer`'s ``prediction`` against :class:`ControlNetPrepareBatch`'s ``targets``."""
        pred, target = prediction["pred"], targets["target"]
        elementwise = self.elementwise_loss(pred, target)
        weights = self.voxel_weights(targets["label"])
        l1 = (elementwise if weights is None else elementwise * weights).mean()
        contrastive = torch.zeros((), device=pred.device)
        if self.use_region_contrastive_loss:
            if "lesion_free_pred" not in prediction:
                raise ValueError(
                    "use_region_contrastive_loss=true needs the lesion-free prediction: build the prepare_batch with "
                    "lesion_free_condition=@use_region_contrastive_loss."
                )
            contrastive = region_contrastive_loss(
                pred, prediction["lesion_free_pred"], target, targets["lesion_region"], self.region_contrastive_loss_delta
            )
        self.terms = {L1_LOSS: l1.detach(), REGION_CONTRASTIVE_LOSS: contrastive.detach()}
        return l1 + self.region_contrastive_loss_weight * contrastive


class LossTermsToOutput:
    """
    Ignite handler: after each loss (``IterationEvents.LOSS_COMPLETED``) copy ``loss.terms`` into ``engine.state.output``.

    ``SupervisedTrainer`` stores only the total ``loss``; with this handler the ``l1_loss`` and
    ``region_contrastive_loss`` of :class:`ControlNetLoss` reach the stats handlers and ``TerminateOnNan``.

    Parameters
    ----------
    loss
        an object with a ``terms`` mapping, e.g. :class:`ControlNetLoss`.
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def attach(self, engine: Engine) -> None:
        """Register on ``IterationEvents.LOSS_COMPLETED`` (the engine must register MONAI's ``IterationEvents``)."""
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.output.update(self.loss.terms)


def loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    """The scalar loss terms of a ControlNet training iteration's output, for logging and ``TerminateOnNan``."""
    names = ("loss", L1_LOSS, REGION_CONTRASTIVE_LOSS)
    return {name: float(torch.as_tensor(output[name]).detach()) for name in names if name in output}
