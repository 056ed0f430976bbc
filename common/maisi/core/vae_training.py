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
What ``configs/train_autoencoder.json`` needs beyond MONAI: setting checks, the data options of the
published recipe (``random_aug``, ``spacing_type``), the reconstruction loss by name, the learning-rate
warm-up and a sliding-window inferer for the ``(reconstruction, z_mu, z_sigma)`` autoencoder output.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, sliding_window_inference
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CopyItemsd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    Orientationd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandGibbsNoised,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
    Spacingd,
    SpatialPadd,
)

from .checks import check_amp, check_non_negative, check_positive_int, check_positive_number
from .intensity import intensity_transforms, modality_family

__all__ = [
    "RECONSTRUCTION_LOSSES",
    "SPACING_TYPES",
    "ReconstructionSlidingWindowInferer",
    "autoencoder_train_transforms",
    "autoencoder_val_transforms",
    "check_autoencoder_training_settings",
    "lr_warmup_factor",
    "reconstruction_loss",
]

RECONSTRUCTION_LOSSES = ("l1", "l2")
SPACING_TYPES = ("original", "fixed", "rand_zoom")
AUTOENCODER_DOWNSAMPLE = 4  # image voxels per latent voxel along each axis
RAND_ZOOM_RANGE = (0.5, 1.5)


def _check_size(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < AUTOENCODER_DOWNSAMPLE for v in value)
        or any(v % AUTOENCODER_DOWNSAMPLE for v in value)
    ):
        allowed = "null or " if allow_none else ""
        raise ValueError(
            f"{name}={value!r} is not allowed; it must be {allowed}three integers divisible by "
            f"{AUTOENCODER_DOWNSAMPLE} (the autoencoder downsamples 4x per axis)."
        )


def check_autoencoder_training_settings(
    max_epochs: Any,
    lr: Any,
    batch_size: Any,
    val_batch_size: Any,
    val_interval: Any,
    patch_size: Any,
    val_patch_size: Any,
    val_sliding_window_patch_size: Any,
    recon_loss: Any,
    spacing_type: Any,
    resample_spacing: Any,
    random_aug: Any,
    select_channel: Any,
    weights: Mapping[str, Any],
    amp: Any,
    device: torch.device | str,
    initial_autoencoder_path: Any = None,
) -> None:
    """
    Refuse bad autoencoder-training ids before any data or weights are read.

    Every error names the id, the bad value and what is allowed.

    Raises
    ------
    ValueError
        for the first bad id.
    FileNotFoundError
        ``initial_autoencoder_path`` (``trained_autoencoder_path`` when fine-tuning) does not exist.
    """
    check_positive_int("max_epochs", max_epochs)
    check_positive_number("lr", lr)
    check_positive_int("batch_size", batch_size)
    check_positive_int("val_batch_size", val_batch_size)
    check_positive_int("val_interval", val_interval)
    _check_size("patch_size", patch_size, allow_none=False)
    _check_size("val_patch_size", val_patch_size, allow_none=True)
    _check_size("val_sliding_window_patch_size", val_sliding_window_patch_size, allow_none=True)
    if recon_loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r} is not allowed; choose one of {RECONSTRUCTION_LOSSES}.")
    if spacing_type not in SPACING_TYPES:
        raise ValueError(f"spacing_type={spacing_type!r} is not allowed; choose one of {SPACING_TYPES}.")
    if not isinstance(random_aug, bool):
        raise ValueError(f"random_aug={random_aug!r} is not allowed; it must be true or false.")
    if spacing_type == "rand_zoom" and not random_aug:
        raise ValueError("spacing_type='rand_zoom' is not allowed with random_aug=False; use 'original' or 'fixed'.")
    if spacing_type == "fixed":
        if (
            not isinstance(resample_spacing, Sequence)
            or len(resample_spacing) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in resample_spacing)
        ):
            raise ValueError(
                f"resample_spacing={resample_spacing!r} is not allowed with spacing_type='fixed'; "
                "it must be three positive voxel sizes in mm."
            )
    if isinstance(select_channel, bool) or not isinstance(select_channel, int) or select_channel < 0:
        raise ValueError(f"select_channel={select_channel!r} is not allowed; it must be an integer >= 0.")
    check_non_negative(weights)
    check_amp(amp, device)
    if initial_autoencoder_path is not None and not os.path.isfile(initial_autoencoder_path):
        raise FileNotFoundError(
            f"trained_autoencoder_path={initial_autoencoder_path} does not exist; download the published autoencoder "
            "or set --finetune False to train from scratch."
        )


def reconstruction_loss(name: str) -> torch.nn.Module:
    """The reconstruction loss named by the ``recon_loss`` id: ``"l1"`` (L1Loss) or ``"l2"`` (MSELoss)."""
    if name == "l1":
        return torch.nn.L1Loss()
    if name == "l2":
        return torch.nn.MSELoss()
    raise ValueError(f"recon_loss={name!r} is not allowed; choose one of {RECONSTRUCTION_LOSSES}.")


def lr_warmup_factor(epoch: int, enabled: bool = True) -> float:
    """
    Learning-rate multiplier of the published autoencoder recipe: 0.01 for epochs 0-9, 0.1 for 10-19, then 1.

    Parameters
    ----------
    epoch
        the number of completed epochs (``LambdaLR`` stepped once per epoch).
    enabled
        ``False`` keeps the factor at 1 (config id ``lr_warmup``).
    """
    if not enabled:
        return 1.0
    if epoch < 10:
        return 0.01
    if epoch < 20:
        return 0.1
    return 1.0


def _select_channel(image: torch.Tensor, channel: int) -> torch.Tensor:
    if channel >= image.shape[0]:
        raise ValueError(f"select_channel={channel} is not allowed for an image with {image.shape[0]} channel(s).")
    return image[channel : channel + 1]


def _load_and_scale(modality: Any, select_channel: int, modality_mapping: Mapping[str, int] | None) -> list:
    return [
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Lambdad(keys="image", func=functools.partial(_select_channel, channel=select_channel)),
        EnsureTyped(keys="image", dtype=torch.float32),
        Orientationd(keys="image", axcodes="RAS"),
        *intensity_transforms("image", modality, modality_mapping),
    ]


def _resampling(spacing_type: str, resample_spacing: Sequence[float] | None) -> list:
    if spacing_type == "fixed":
        return [Spacingd(keys="image", pixdim=resample_spacing, mode="bilinear")]
    return []


def mr_artifact_augmentations() -> list:
    """
    The published MR-only augmentations of autoencoder training: bias field, Gibbs ringing, gamma, histogram shift.

    Returns
    -------
    list
        ``RandBiasFieldd`` (p 0.3), ``RandGibbsNoised`` (p 0.3), ``RandAdjustContrastd`` (gamma 0.5-2, p 0.3)
        and ``RandHistogramShiftd`` (p 0.05) on the key ``"image"``.
    """
    return [
        RandBiasFieldd(keys="image", prob=0.3),
        RandGibbsNoised(keys="image", prob=0.3),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.5, 2.0)),
        RandHistogramShiftd(keys="image", prob=0.05),
    ]


def autoencoder_train_transforms(
    modality: Any,
    patch_size: Sequence[int],
    random_aug: bool,
    spacing_type: str,
    resample_spacing: Sequence[float] | None = None,
    select_channel: int = 0,
    modality_mapping: Mapping[str, int] | None = None,
) -> Compose:
    """
    Training transforms of the autoencoder: load, RAS, intensity to [0, 1], optional resampling, one random patch.

    Parameters
    ----------
    modality
        the ``modality`` id (CT or MR intensity handling, ``intensity.intensity_transforms``).
    patch_size
        training patch size (config id ``patch_size``); smaller images are zero padded.
    random_aug
        add random zoom (``spacing_type='rand_zoom'``), a left-right flip and intensity augmentations, and for
        MR also ``mr_artifact_augmentations``.
    spacing_type
        ``"original"`` (no resampling), ``"fixed"`` (resample to ``resample_spacing``) or ``"rand_zoom"``
        (random zoom by 0.5-1.5, needs ``random_aug``).
    resample_spacing
        voxel size in mm for ``"fixed"``.
    select_channel
        channel of multi-channel images to train on.
    modality_mapping
        optional ``modality_mapping.json`` content.

    Returns
    -------
    Compose
        the transform producing ``{"image": (1, *patch_size) float32 in [0, 1]-ish}``.
    """
    transforms = [*_load_and_scale(modality, select_channel, modality_mapping), *_resampling(spacing_type, resample_spacing)]
    if random_aug and spacing_type == "rand_zoom":
        low, high = RAND_ZOOM_RANGE
        transforms.append(RandZoomd(keys="image", prob=0.5, min_zoom=low, max_zoom=high, keep_size=False, mode="trilinear"))
    transforms += [
        SpatialPadd(keys="image", spatial_size=patch_size, mode="constant"),
        RandSpatialCropd(keys="image", roi_size=patch_size, random_size=False),
    ]
    if random_aug:
        transforms += [
            RandFlipd(keys="image", prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
            RandGaussianNoised(keys="image", prob=0.1, std=0.01),
        ]
        if modality_family(modality, modality_mapping) == "mr":
            transforms += mr_artifact_augmentations()
    transforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(transforms)


def autoencoder_val_transforms(
    modality: Any,
    val_patch_size: Sequence[int] | None,
    spacing_type: str,
    resample_spacing: Sequence[float] | None = None,
    select_channel: int = 0,
    modality_mapping: Mapping[str, int] | None = None,
) -> Compose:
    """
    Validation transforms: as training without randomness, the whole volume (or a central ``val_patch_size``)
    padded to a multiple of 4, with the target copied to ``label`` for the evaluator's metrics.
    """
    transforms = [*_load_and_scale(modality, select_channel, modality_mapping), *_resampling(spacing_type, resample_spacing)]
    if val_patch_size is not None:
        transforms += [
            SpatialPadd(keys="image", spatial_size=val_patch_size, mode="constant"),
            CenterSpatialCropd(keys="image", roi_size=val_patch_size),
        ]
    transforms += [
        DivisiblePadd(keys="image", k=AUTOENCODER_DOWNSAMPLE, mode="constant"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        CopyItemsd(keys="image", names="label"),
    ]
    return Compose(transforms)


class ReconstructionSlidingWindowInferer(Inferer):
    """
    Reconstruct a volume with an autoencoder whose forward returns ``(reconstruction, z_mu, z_sigma)``.

    Parameters
    ----------
    roi_size
        sliding-window size (config id ``val_sliding_window_patch_size``); ``None`` runs the whole volume at once.
    overlap
        overlap of neighbouring windows, in [0, 1).
    sw_batch_size
        windows per forward pass.
    """

    def __init__(self, roi_size: Sequence[int] | None, overlap: float = 0.25, sw_batch_size: int = 1) -> None:
        super().__init__()
        if not 0 <= overlap < 1:
            raise ValueError(f"val_sliding_window_overlap={overlap!r} is not allowed; it must lie in [0, 1).")
        self.roi_size = None if roi_size is None else tuple(roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the reconstruction of ``inputs`` (B, C, X, Y, Z)."""

        def reconstruct(patch: torch.Tensor) -> torch.Tensor:
            return network(patch)[0]

        if self.roi_size is None:
            return reconstruct(inputs)
        return sliding_window_inference(
            inputs, self.roi_size, self.sw_batch_size, reconstruct, overlap=self.overlap, mode="gaussian"
        )


def load_initial_autoencoder(network: torch.nn.Module, path: str | os.PathLike | None, device: torch.device | str) -> None:
    """
    Fine-tuning start: load ``path`` (the published plain state dict) strictly, or keep the random init if ``None``.

    Raises
    ------
    FileNotFoundError
        ``path`` is given but does not exist (the message names ``trained_autoencoder_path``).
    """
    if path is None:
        return
    from .checkpoint import load_network_weights

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"trained_autoencoder_path={path} does not exist; download the published autoencoder or set "
            "--finetune False to train from scratch."
        )
    load_network_weights(network, path, map_location=device)
