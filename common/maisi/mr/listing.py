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
The valid values of the MR generation ids: ``python -m scripts.listing <what>`` from the bundle folder.

``modalities`` (``modality``), ``geometry`` (``output_size``, ``spacing``, field of view) and ``label_mapping``
(the label ids above 255 that image-from-mask generation maps into the ControlNet's range).
"""

from __future__ import annotations

from typing import Any

from .constants import MR_CONTROLNET_LABEL_MAP
from .labels import default_data_path
from .modality import load_modality_mapping, modality_family_of_code
from .settings_mr import MR_MAX_FIELD_OF_VIEW_MM, MR_OUTPUT_SIZES, MR_SPACING_RANGE, MR_VERSIONS

__all__ = ["geometry", "label_mapping", "modalities"]


def modalities(modality_mapping_json: str | None = None) -> dict[str, int]:
    """The MR modalities of ``modality_mapping.json`` (name -> code), for ``modality``."""
    mapping = load_modality_mapping(modality_mapping_json or default_data_path("modality_mapping.json"))
    return {name: code for name, code in mapping.items() if modality_family_of_code(code) == "mr"}


def geometry() -> dict[str, Any]:
    """The ``output_size``, ``spacing`` and field of view MR generation accepts, and the versions."""
    return {
        "version": list(MR_VERSIONS),
        "output_size": {f"z={z}": [list(shape) for shape in shapes] for z, shapes in MR_OUTPUT_SIZES.items()},
        "spacing": f"every axis in {list(MR_SPACING_RANGE)} mm",
        "field of view": f"output_size * spacing <= {MR_MAX_FIELD_OF_VIEW_MM:g} mm per axis (this collection's limit)",
    }


def label_mapping() -> dict[int, int]:
    """Label id above 255 -> the id it takes for the ControlNet (extend it with ``controlnet_label_mapping``)."""
    return dict(MR_CONTROLNET_LABEL_MAP)


if __name__ == "__main__":
    import fire

    fire.Fire({"modalities": modalities, "geometry": geometry, "label_mapping": label_mapping})
