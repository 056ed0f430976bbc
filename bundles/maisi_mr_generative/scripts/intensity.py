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
Image intensity -> autoencoder input in [0, 1], one entry point for CT and MR.

The published MAISI autoencoders were trained on:

- CT: Hounsfield units clipped to [-1000, 1000] and mapped linearly to [0, 1]
  (``ScaleIntensityRanged(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True)``). Air and everything
  below it become 0, dense bone and metal above 1000 HU saturate at 1.
- MR: arbitrary units, 0 stays 0 and the image's own 99.5th percentile goes to 1, without clipping
  (``ScaleIntensityRangePercentilesd(lower=0, upper=99.5, b_min=0, b_max=1, clip=False)``), so the
  brightest 0.5 % of voxels keep values above 1.

Generation maps the decoded [0, 1] back with the inverse of the CT mapping (``x * 2000 - 1000``) or
``x * 1000`` for MR (``outputs.py``). Every training config (autoencoder, embeddings, ControlNet) builds
its intensity step with :func:`intensity_transforms`, so the encoder sees what generation decodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

from monai.transforms import MapTransform, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

from .constants import CT_HU_MAX, CT_HU_MIN, CT_MODALITY_CODES, MR_MIN_MODALITY_CODE

__all__ = [
    "CT_INPUT_RANGE",
    "MR_PERCENTILE_RANGE",
    "intensity_transforms",
    "modality_family",
]

# CT: HU window mapped onto [0, 1] (clipped).
CT_INPUT_RANGE = (CT_HU_MIN, CT_HU_MAX)
# MR: (lower, upper) percentiles mapped onto [0, 1] (not clipped).
MR_PERCENTILE_RANGE = (0.0, 99.5)

_FAMILY_NAMES = {"ct": "ct", "mr": "mr", "mri": "mr"}


def _family_of_code(code: int, shown: Any) -> str:
    if code in CT_MODALITY_CODES:
        return "ct"
    if code >= MR_MIN_MODALITY_CODE:
        return "mr"
    raise ValueError(
        f"modality={shown!r} (code {code}) has no intensity convention: code 0 is 'unknown' (the "
        "classifier-free-guidance null class) and negative codes do not exist. Use a CT code 1..7 or an MR code >= 8."
    )


def modality_family(modality: Any, modality_mapping: Mapping[str, int] | None = None) -> str:
    """
    Decide whether ``modality`` is CT or MR.

    Parameters
    ----------
    modality
        ``"ct"``, ``"mr"``/``"mri"``, a name of ``modality_mapping`` (case-insensitive, e.g. ``"mri_t1"``),
        or an integer code of it (1..7 CT, >= 8 MR; digits in a string are accepted).
    modality_mapping
        ``modality_mapping.json`` (name -> code). Without it, names other than ``ct``/``mr``/``mri`` are
        decided by their prefix (``ct...`` or ``mri...``).

    Returns
    -------
    str
        ``"ct"`` or ``"mr"``.

    Raises
    ------
    ValueError
        ``modality`` is code 0 ("unknown"), an unknown name, or neither a name nor an integer.
    """
    if isinstance(modality, str) and modality.strip().isdigit():
        return _family_of_code(int(modality.strip()), modality)
    if isinstance(modality, Integral) and not isinstance(modality, bool):
        return _family_of_code(int(modality), modality)
    if not isinstance(modality, str):
        raise ValueError(f"modality={modality!r} is not allowed; give a modality name (e.g. 'ct', 'mri_t1') or code.")
    key = modality.strip().lower()
    if key in _FAMILY_NAMES:
        return _FAMILY_NAMES[key]
    if modality_mapping is not None:
        by_lower = {name.lower(): code for name, code in modality_mapping.items()}
        if key in by_lower:
            return _family_of_code(int(by_lower[key]), modality)
        raise ValueError(
            f"modality={modality!r} is not a modality of modality_mapping_json; allowed: {', '.join(modality_mapping)}."
        )
    if key.startswith("ct"):
        return "ct"
    if key.startswith("mri"):
        return "mr"
    raise ValueError(f"modality={modality!r} is not allowed; use 'ct', 'mr' or a name of modality_mapping.json.")


def intensity_transforms(
    keys: str | Sequence[str], modality: Any, modality_mapping: Mapping[str, int] | None = None
) -> list[MapTransform]:
    """
    The dictionary transforms that map image intensities to the autoencoder's [0, 1] input.

    Parameters
    ----------
    keys
        the image key(s) of the data dictionary (never a label key: labels must not be rescaled).
    modality
        the ``modality`` config id (see :func:`modality_family`).
    modality_mapping
        optional ``modality_mapping.json`` content, to resolve names such as ``"mri_flair"``.

    Returns
    -------
    list[MapTransform]
        one transform: CT ``ScaleIntensityRanged(-1000, 1000 -> 0, 1, clip=True)``; MR
        ``ScaleIntensityRangePercentilesd(0, 99.5 -> 0, 1, clip=False)`` (per image, per channel off).
    """
    if modality_family(modality, modality_mapping) == "ct":
        a_min, a_max = CT_INPUT_RANGE
        return [ScaleIntensityRanged(keys=keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)]
    lower, upper = MR_PERCENTILE_RANGE
    return [ScaleIntensityRangePercentilesd(keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=False)]
