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
Modalities: the modality mapping file (name -> code) and resolving a user's ``modality`` to a code of one family.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .constants import CT_MODALITY_CODES, MR_MIN_MODALITY_CODE
from .labels import load_name_to_code
from .value_checks import did_you_mean, is_int

__all__ = ["load_modality_mapping", "modality_family_of_code", "resolve_modality"]


def load_modality_mapping(path: str | os.PathLike) -> dict[str, int]:
    """
    Read ``modality_mapping.json`` (modality name -> code, e.g. ``"ct": 1``, ``"mri_t1": 9``).

    Parameters
    ----------
    path
        the file, the ``modality_mapping_json`` config id.

    Raises
    ------
    ValueError
        the file is missing, is not JSON, or does not map names to integer codes >= 0.
    """
    return load_name_to_code(path, "modality_mapping_json", minimum=0)


def modality_family_of_code(code: int) -> str | None:
    """``"ct"`` for codes 1..7, ``"mr"`` for codes >= 8, ``None`` for 0 (the unconditional class)."""
    if code in CT_MODALITY_CODES:
        return "ct"
    if code >= MR_MIN_MODALITY_CODE:
        return "mr"
    return None


def resolve_modality(modality: Any, modality_mapping: Mapping[str, int], allowed: str) -> int:
    """
    Resolve ``modality`` (a name such as ``"ct"`` or ``"mri_t1"``, case-insensitive, or an integer code
    of ``modality_mapping``) to its code, refusing the other family.

    Parameters
    ----------
    modality
        the ``modality`` config id.
    modality_mapping
        ``modality_mapping.json`` (name -> code).
    allowed
        ``"ct"`` (codes 1..7) or ``"mr"`` (codes >= 8). Code 0 ("unknown", the
        classifier-free-guidance null class) is never allowed.

    Returns
    -------
    int
        The modality code.
    """
    family = allowed.strip().lower() if isinstance(allowed, str) else allowed
    if family not in ("ct", "mr"):
        raise ValueError(f"allowed={allowed!r} is not allowed; it must be 'ct' or 'mr'.")
    valid = {name: code for name, code in modality_mapping.items() if modality_family_of_code(code) == family}
    listing = ", ".join(f"{name} ({code})" for name, code in valid.items())
    other = "maisi_mr_generative" if family == "ct" else "maisi_ct_generative"
    if isinstance(modality, str) and modality.strip().isdigit():
        modality = int(modality.strip())
    if isinstance(modality, str):
        by_lower = {name.lower(): name for name in modality_mapping}
        key = modality.strip().lower()
        if key not in by_lower:
            raise ValueError(
                f"modality={modality!r} is not a modality of modality_mapping_json.{did_you_mean(modality, valid)} "
                f"Allowed ({family.upper()}): {listing}."
            )
        name, code = by_lower[key], modality_mapping[by_lower[key]]
    elif is_int(modality):
        code = int(modality)
        names = [name for name, value in modality_mapping.items() if value == code]
        if not names:
            raise ValueError(
                f"modality={modality!r} is not a code of modality_mapping_json; allowed ({family.upper()}): {listing}."
            )
        name = names[0]
    else:
        raise ValueError(f"modality={modality!r} is not allowed; give a name or an integer code: {listing}.")
    code_family = modality_family_of_code(code)
    if code_family is None:
        raise ValueError(
            f"modality={modality!r} ({name}, code {code}) is not allowed: code 0 is the unconditional "
            f"(classifier-free-guidance) class, not a modality. Allowed ({family.upper()}): {listing}."
        )
    if code_family != family:
        article = "a CT" if code_family == "ct" else "an MR"
        raise ValueError(
            f"modality={modality!r} ({name}, code {code}) is {article} modality, but this is "
            f"{family.upper()} generation (use the {other} bundle for it). Allowed ({family.upper()}): {listing}."
        )
    return code
