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
From decoded latents to output intensities: CT HU (int16, background -1000) and MR units (int16, >= 0).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_numpy

from .constants import BACKGROUND_LABEL, CT_BACKGROUND_HU, CT_HU_MAX, CT_HU_MIN, MR_SCALE

__all__ = ["finalize_ct", "finalize_mr", "to_ct_hu", "to_mr_intensity"]

_MR_BACKGROUND = 0.0  # MR intensities are non-negative; background is the lower bound
_INT16_MAX = float(np.iinfo(np.int16).max)


def _float(image: NdarrayOrTensor) -> NdarrayOrTensor:
    """float64 stays float64; anything else (fp16, bf16, ints) becomes float32 before scaling."""
    if isinstance(image, torch.Tensor):
        return image if image.dtype == torch.float64 else image.to(torch.float32)
    return image if image.dtype == np.float64 else np.asarray(image, dtype=np.float32)


def _clip(image: NdarrayOrTensor, low: float, high: float) -> NdarrayOrTensor:
    return torch.clamp(image, low, high) if isinstance(image, torch.Tensor) else np.clip(image, low, high)


def _set_background(image: NdarrayOrTensor, labels: NdarrayOrTensor, value: float) -> NdarrayOrTensor:
    if isinstance(image, torch.Tensor):
        background = torch.as_tensor(labels, device=image.device) == BACKGROUND_LABEL
        return image.masked_fill(background, value)
    return np.where(convert_to_numpy(labels) == BACKGROUND_LABEL, np.asarray(value, dtype=image.dtype), image)


def _round_int16(image: NdarrayOrTensor) -> NdarrayOrTensor:
    if isinstance(image, torch.Tensor):
        return torch.round(image).to(torch.int16)
    return np.round(image).astype(np.int16)


def _finalize(image: NdarrayOrTensor, labels: NdarrayOrTensor, background: float, low: float, high: float) -> NdarrayOrTensor:
    """Set label 0 to ``background``, clip to ``[low, high]``, round to int16 (the last step of CT and MR)."""
    return _round_int16(_clip(_set_background(_float(image), labels, background), low, high))


def to_ct_hu(decoded: NdarrayOrTensor) -> NdarrayOrTensor:
    """
    Map the autoencoder output to HU: clip to ``[0, 1]``, then scale to ``[CT_HU_MIN, CT_HU_MAX]``.

    Parameters
    ----------
    decoded
        Decoded image, nominally in ``[0, 1]``.

    Returns
    -------
    NdarrayOrTensor
        Float HU image (float32, or float64 for float64 input).
    """
    return _clip(_float(decoded), 0.0, 1.0) * (CT_HU_MAX - CT_HU_MIN) + CT_HU_MIN


def finalize_ct(image_hu: NdarrayOrTensor, labels: NdarrayOrTensor) -> NdarrayOrTensor:
    """
    Final CT image: background (label 0) set to ``CT_BACKGROUND_HU``, clipped to HU range, rounded, int16.

    Parameters
    ----------
    image_hu
        HU image, e.g. from :func:`to_ct_hu`.
    labels
        Label map broadcastable to the image.

    Returns
    -------
    NdarrayOrTensor
        int16 image.
    """
    return _finalize(image_hu, labels, CT_BACKGROUND_HU, CT_HU_MIN, CT_HU_MAX)


def to_mr_intensity(decoded: NdarrayOrTensor) -> NdarrayOrTensor:
    """
    Map the autoencoder output to MR units: ``x * MR_SCALE``, clipped to ``[0, int16 max]``.

    Values above 1 (above the 99.5th percentile of training intensities) are kept, up to what int16 holds.

    Parameters
    ----------
    decoded
        Decoded image.

    Returns
    -------
    NdarrayOrTensor
        Float MR image.
    """
    return _clip(_float(decoded) * MR_SCALE, _MR_BACKGROUND, _INT16_MAX)


def finalize_mr(image: NdarrayOrTensor, labels: NdarrayOrTensor) -> NdarrayOrTensor:
    """
    Final MR image: background (label 0) set to 0, clipped to ``[0, int16 max]``, rounded, int16.

    Parameters
    ----------
    image
        MR image, e.g. from :func:`to_mr_intensity`.
    labels
        Label map broadcastable to the image.

    Returns
    -------
    NdarrayOrTensor
        int16 image.
    """
    return _finalize(image, labels, _MR_BACKGROUND, _MR_BACKGROUND, _INT16_MAX)
