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
Label files: loading a label map in RAS as integer ids, its spacing, and nearest-neighbour resampling.

Shared by the candidate-mask database (CT), user masks (CT and MR) and the mask checks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, Orientation, ResizeWithPadOrCrop, Spacing

__all__ = ["LABEL_FILE_EXTENSIONS", "MASK_DTYPE", "SPACING_TOLERANCE", "has_geometry", "load_label_file", "mask_spacing", "resample_mask"]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's world axes: the affine maps voxels to RAS mm
MASK_DTYPE = torch.int16  # holds every MAISI id (CT ids < 256, MR ids up to 500) at half the memory of int32
SPACING_TOLERANCE = 1e-3  # mm; an "exact" spacing match
LABEL_FILE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")  # label files a mask folder may hold


def _as_label_map(mask: torch.Tensor) -> torch.Tensor:
    """Round a (float) label map to :data:`MASK_DTYPE`, keeping its metadata."""
    return mask.round().to(MASK_DTYPE) if mask.is_floating_point() else mask.to(MASK_DTYPE)


def load_label_file(path: str | os.PathLike, device: torch.device | str | None = None, strict: bool = False) -> MetaTensor:
    """
    Load a label file as a (1, X, Y, Z) integer label map in RAS orientation.

    Parameters
    ----------
    path
        a file any MONAI reader opens (NIfTI, ...).
    device
        where to put the mask; defaults to the CPU.
    strict
        refuse non-integer or negative values instead of rounding them (for user files).

    Returns
    -------
    MetaTensor
        A ``MetaTensor`` of :data:`MASK_DTYPE` carrying the file's affine (reoriented to RAS).

    Raises
    ------
    ValueError
        with ``strict``, when the file is not a label map of non-negative integer ids.
    """
    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    if image.shape[0] != 1:
        raise ValueError(f"{path} has {image.shape[0]} channels; a label map has one.")
    if strict and (not torch.equal(image, image.round()) or bool((image < 0).any())):
        raise ValueError(f"{path} holds non-integer or negative values; it must be a label map of MAISI ids.")
    image = Orientation(axcodes="RAS", labels=_RAS_LABELS)(image)
    return _as_label_map(image).to(device or "cpu")




def mask_spacing(mask: torch.Tensor) -> tuple[float, ...]:
    """Voxel spacing (mm) of a ``MetaTensor`` mask, from its affine."""
    return tuple(float(s) for s in affine_to_spacing(mask.affine, r=3))


def has_geometry(mask: torch.Tensor, output_size: Sequence[int], spacing: Sequence[float]) -> bool:
    same_size = tuple(mask.shape[1:]) == tuple(int(s) for s in output_size)
    return same_size and np.allclose(mask_spacing(mask), spacing, rtol=0.0, atol=SPACING_TOLERANCE)


def resample_mask(mask: MetaTensor, target_spacing: Sequence[float], output_size: Sequence[int]) -> MetaTensor:
    """
    Resample a label map to ``target_spacing`` (nearest neighbour), then pad (with 0) or crop it to ``output_size``.

    Parameters
    ----------
    mask
        (1, X, Y, Z) label map with its affine.
    target_spacing
        spacing in mm.
    output_size
        spatial size in voxels.

    Returns
    -------
    MetaTensor
        A (1, *output_size) ``MetaTensor`` of :data:`MASK_DTYPE` whose affine carries ``target_spacing``.
    """
    resampled = Spacing(pixdim=tuple(target_spacing), mode="nearest", padding_mode="zeros", dtype=torch.float32)(mask.float())
    resized = ResizeWithPadOrCrop(spatial_size=tuple(int(s) for s in output_size), mode="constant", value=0)(resampled)
    return _as_label_map(resized)

