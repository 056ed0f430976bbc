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
The valid values of the CT generation ids: ``python -m scripts.listing <what>`` from the bundle folder.

``anatomies`` (``anatomy_list``), ``regions`` (``body_region``), ``modalities`` (``modality``), ``controllable``
(``controllable_anatomy_size``), ``geometry`` (``output_size``, ``spacing``) and ``database`` (which anatomies
the candidate-mask database holds in each body region, for ``anatomy_list`` + ``body_region``).
"""

from __future__ import annotations

import os
from typing import Any

from .constants import BODY_REGION_ALIASES, BODY_REGIONS, CONTROLLABLE_ANATOMIES, TUMOR_LABELS
from .labels import default_data_path, load_label_dict
from .mask_database import parse_database, read_database_entries, regions_by_anatomy
from .modality import load_modality_mapping, modality_family_of_code
from .settings_ct import CT_MIN_FIELD_OF_VIEW_MM, CT_OUTPUT_SIZE_XY, CT_OUTPUT_SIZE_Z, CT_SPACING_XY_RANGE, CT_SPACING_Z_RANGE, anatomy_names

__all__ = ["anatomies", "controllable", "database", "geometry", "modalities", "regions"]

DEFAULT_DATABASE = "datasets/candidate_masks_flexible_size_and_spacing_4000.json"


def anatomies(label_dict_json: str | None = None) -> dict[str, int]:
    """Anatomy name -> label id, for ``anatomy_list`` (names are case-insensitive; ``dummy*`` slots left out)."""
    label_dict = load_label_dict(label_dict_json)
    return {name: label_dict[name] for name in anatomy_names(label_dict).values()}


def regions() -> dict[str, list[str]]:
    """Body region -> the names ``body_region`` accepts for it."""
    return {region: [a for a, i in BODY_REGION_ALIASES.items() if i == index] for index, region in enumerate(BODY_REGIONS)}


def modalities(modality_mapping_json: str | None = None) -> dict[str, int]:
    """The CT modalities of ``modality_mapping.json`` (name -> code), for ``modality``."""
    mapping = load_modality_mapping(modality_mapping_json or default_data_path("modality_mapping.json"))
    return {name: code for name, code in mapping.items() if modality_family_of_code(code) == "ct"}


def controllable() -> dict[str, Any]:
    """The anatomies of ``controllable_anatomy_size`` and what their sizes mean."""
    return {
        "anatomies": list(CONTROLLABLE_ANATOMIES),
        "tumours (at most one per request)": list(TUMOR_LABELS),
        "size": "a relative size in [0, 1], or -1 to remove the anatomy",
    }


def geometry() -> dict[str, Any]:
    """The ``output_size`` and ``spacing`` the released CT weights support."""
    return {
        "output_size": f"[x, y, z] with x = y in {list(CT_OUTPUT_SIZE_XY)} and z in {list(CT_OUTPUT_SIZE_Z)}",
        "spacing": f"[x, y, z] mm with x = y in {list(CT_SPACING_XY_RANGE)} and z in {list(CT_SPACING_Z_RANGE)}",
        "field of view": f"output_size[0] * spacing[0] >= {CT_MIN_FIELD_OF_VIEW_MM:g} mm",
    }


def database(all_mask_files_json: str | os.PathLike = DEFAULT_DATABASE, label_dict_json: str | None = None) -> dict[str, list[str]]:
    """
    Body region -> the anatomies the candidate-mask database holds in masks spanning it (tumours included only
    where a mask has them), read from ``all_mask_files_json``.
    """
    candidates = parse_database(read_database_entries(all_mask_files_json), ".")
    names = {label: name for name, label in load_label_dict(label_dict_json).items()}
    found = regions_by_anatomy(candidates)
    listing = {region: [] for region in [*BODY_REGIONS, "no region information"]}
    for label, where in sorted(found.items()):
        for region in where:
            listing[BODY_REGIONS[region] if region is not None else "no region information"].append(names.get(label, str(label)))
    return {region: sorted(anatomy) for region, anatomy in listing.items() if anatomy}


if __name__ == "__main__":
    import fire

    fire.Fire({"anatomies": anatomies, "regions": regions, "modalities": modalities, "controllable": controllable, "geometry": geometry, "database": database})
