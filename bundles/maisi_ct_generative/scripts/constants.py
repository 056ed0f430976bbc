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
The MAISI facts every module shares: label ids, body regions, conditioning scales, modality codes, intensity ranges.

Label ids are the raw MAISI ids of ``label_dict.json`` (a test checks every id here against that file).
"""

from __future__ import annotations

from types import MappingProxyType

# Conditioning scales: the UNet sees spacing in mm x 100 and body-region one-hots x 100.
SPACING_SCALE = 100.0
REGION_INDEX_SCALE = 100.0

# Modality codes of modality_mapping.json: 0 is "unknown", the class that classifier-free guidance contrasts
# with (training drops labels to it, sampling uses it for the unconditional branch); 1..7 are CT ("ct" = 1 is
# the generic CT code); 8 and above are MR ("mri" = 8 is the generic MR code).
UNCONDITIONAL_CLASS_LABEL = 0
CT_MODALITY_CODES = range(1, 8)
MR_MIN_MODALITY_CODE = 8
GENERIC_CT_CODE = 1
GENERIC_MR_CODE = MR_MIN_MODALITY_CODE

# Body regions, in the order of the 4-slot one-hot region indices (ddpm-ct).
BODY_REGIONS = ("head", "chest", "abdomen", "pelvis")
BODY_REGION_ALIASES = MappingProxyType(
    {
        "head": 0,
        "chest": 1,
        "thorax": 1,
        "chest/thorax": 1,
        "abdomen": 2,
        "pelvis": 3,
        "lower": 3,
        "pelvis/lower": 3,
    }
)
# Labels whose presence in a mask marks a body region (top = first region present, bottom = last).
REGION_LABELS = MappingProxyType(
    {
        0: frozenset({22, 120}),
        1: frozenset({28, 29, 30, 31, 32}),
        2: frozenset({1, 2, 3, 4, 5, 14}),
        3: frozenset({93, 94}),
    }
)

# Tumours MAISI can place, by label name, with their ids.
TUMOR_LABELS = MappingProxyType(
    {
        "lung tumor": 23,
        "pancreatic tumor": 24,
        "hepatic tumor": 26,
        "colon cancer primaries": 27,
        "bone lesion": 128,
    }
)
# The 10 slots of the mask generator's size condition (``controllable_anatomy_size``), in order.
CONTROLLABLE_ANATOMIES = (
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "colon",
    "lung tumor",
    "pancreatic tumor",
    "hepatic tumor",
    "colon cancer primaries",
    "bone lesion",
)

BODY_LABEL = 200  # body envelope
COLON_LABEL = 62  # host organ of "colon cancer primaries" (label_dict.json "colon")
COSTAL_CARTILAGE_LABEL = 114  # a bone lesion may sit there too (label_dict.json "costal cartilages")
BACKGROUND_LABEL = 0
MAX_CONTROLNET_LABEL = 255  # the ControlNet condition is 8 bit planes
# MR label ids above MAX_CONTROLNET_LABEL and the ids they take before binarisation
# (``labels.remap_mr_labels_for_controlnet``): BraTS tumour sub-regions 401 (necrotic / non-enhancing core),
# 402 (peritumoural oedema) and 403 (enhancing tumour) go to the free placeholder ids 129, 130 and 131
# (dummy6..8 of label_dict.json; the published rflow-mr ControlNet recipe weights label 129), and the
# CT/MR body envelope 500 goes to the CT body id BODY_LABEL (200).
MR_CONTROLNET_LABEL_MAP = MappingProxyType({401: 129, 402: 130, 403: 131, 500: BODY_LABEL})

# Organ groups of the CT quality check (names match image_median_statistics_ct.json).
QC_LABEL_GROUPS = MappingProxyType(
    {
        "liver": (1,),
        "spleen": (3,),
        "pancreas": (4,),
        "kidney": (5, 14),
        "lung": (28, 29, 30, 31, 32),
        "brain": (22,),
        "bone": tuple(range(33, 57)) + tuple(range(63, 98)) + (120, 122, 127),
    }
)

# Intensity conventions of the decoded image (autoencoder output in [0, 1]).
CT_HU_MIN, CT_HU_MAX = -1000.0, 1000.0
CT_BACKGROUND_HU = -1000.0
MR_SCALE = 1000.0  # MR: arbitrary units, 1000 ~ the 99.5th percentile, no negative values
