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
What the MAISI evaluations read and how they prepare it: volume lists, the 2.5D FID preprocessing, checks.

Preprocessing of the published 2.5D FID (``compute_fid_2-5d_ct.py`` of NV-Generate-CTMR), applied alike to
real and synthetic volumes by :func:`fid_preprocessing`:

1. load, channel first, orient to RAS;
2. optionally resample to ``target_spacing`` (bilinear);
3. CT: pad with -1000 HU to ``target_shape``, centre-crop to it, clip to [-1000, 1000] HU.

MR has no published protocol; the evaluation uses the MR convention of the autoencoder
(``intensity.MR_PERCENTILE_RANGE``: 0 stays 0, the volume's 99.5th percentile becomes 1), clipped to [0, 1]
so that a few bright voxels do not compress the range, applied before padding (with 0, the MR
background) so that the padding does not shift the percentile.

CT or MR is the ``evaluation_intensity`` id (``"ct"``/``"mr"``), by default derived from the bundle's
``modality`` id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
    Spacingd,
)

from .checks import check_positive_int
from .constants import CT_BACKGROUND_HU, CT_HU_MAX, CT_HU_MIN
from .intensity import MR_PERCENTILE_RANGE, modality_family
from .labels import load_json
from .training_data import load_datalist

__all__ = [
    "INTENSITIES",
    "LABEL_SUFFIX",
    "VOLUME_EXTENSIONS",
    "check_center_slices_ratio",
    "check_optional_positive_int",
    "check_target_shape",
    "check_target_spacing",
    "evaluation_intensity",
    "evaluation_items",
    "fid_preprocessing",
    "list_volumes",
    "load_volume",
    "to_unit_range",
]

INTENSITIES = ("ct", "mr")
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_SUFFIX = "_label"  # generation writes <stem>_image<ext> and <stem>_label<ext>: labels are not images
MR_PAD_VALUE = 0.0


def evaluation_intensity(modality: Any, modality_mapping_json: str | os.PathLike | None = None) -> str:
    """
    ``"ct"`` or ``"mr"`` for the bundle's ``modality`` id (a name or code of ``modality_mapping.json``).

    Raises
    ------
    ValueError
        ``modality`` is unknown or code 0.
    """
    mapping = None if modality_mapping_json is None else load_json(modality_mapping_json)
    return modality_family(modality, mapping)


def _check_intensity(intensity: Any) -> str:
    if intensity not in INTENSITIES:
        raise ValueError(f"evaluation_intensity={intensity!r} is not allowed; choose one of {list(INTENSITIES)}.")
    return intensity


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """``None`` or an integer >= 1 (see :func:`check_positive_int`)."""
    return None if value is None else check_positive_int(name, value)


def check_target_shape(value: Any, name: str = "target_shape") -> tuple[int, int, int] | None:
    """``None`` or three integers >= 1."""
    if value is None:
        return None
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in value)
    ):
        raise ValueError(f"{name}={value!r} is not allowed; it must be null or three integers >= 1, e.g. [512, 512, 512].")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def check_target_spacing(value: Any) -> tuple[float, float, float] | None:
    """``None`` (no resampling) or three positive numbers (mm)."""
    if value is None:
        return None
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, Real) or not 0 < float(v) < float("inf") for v in value)
    ):
        raise ValueError(f"target_spacing={value!r} is not allowed; it must be null or three positive numbers in mm, e.g. [1.0, 1.0, 1.0].")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def check_center_slices_ratio(value: Any) -> float | None:
    """``None`` (every slice) or a ratio in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"center_slices_ratio={value!r} is not allowed; it must be null (every slice) or a number in (0, 1].")
    return float(value)


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    ext = next((e for e in VOLUME_EXTENSIONS if name.endswith(e)), None)
    return ext is not None and not name.startswith(".") and not name[: -len(ext)].endswith(LABEL_SUFFIX)


def _label_for(image: Path) -> str | None:
    """``<stem>_label<ext>`` (any volume extension) next to ``<stem>_image<ext>``, when it exists."""
    name = image.name
    ext = next((e for e in VOLUME_EXTENSIONS if name.lower().endswith(f"_image{e}")), None)
    if ext is None:
        return None
    stem = name[: -len(f"_image{ext}")]
    labels = [image.with_name(f"{stem}{LABEL_SUFFIX}{e}") for e in VOLUME_EXTENSIONS]
    return next((str(label) for label in labels if label.is_file()), None)


def list_volumes(folder: Any, datalist: Any, num_images: Any, set_name: str) -> list[dict[str, str]]:
    """
    The volumes of one set (``real`` or ``synthetic``), sorted by path and cut to ``num_images``.

    Exactly one of ``<set>_dir`` and ``<set>_datalist`` is given:

    - a folder: every ``.nii.gz``/``.nii``/``.nrrd``/``.mha``/``.mhd`` file in it (not in sub-folders),
      except hidden files and label maps named ``*_label<ext>``; an image ``<stem>_image<ext>`` gets the
      ``label`` ``<stem>_label<ext>`` when that file exists (the files generation writes);
    - a datalist JSON: the ``"training"`` list of ``{"image": ..., "label": ...}`` entries (relative
      paths are relative to the datalist's folder), as ``scripts.data_prep datalist`` writes it.

    Sorting and cutting follow the published script, so ``num_images`` selects the same files.

    Returns
    -------
    list[dict[str, str]]
        ``{"image": path}`` entries, with ``"label"`` where known.

    Raises
    ------
    ValueError
        naming the ids: both or neither given, a missing folder or datalist, no volumes, a bad ``num_images``.
    """
    dir_id, list_id = f"{set_name}_dir", f"{set_name}_datalist"
    limit = check_optional_positive_int("num_images", num_images)
    if (folder is None) == (datalist is None):
        raise ValueError(f"set exactly one of {dir_id} and {list_id} (got {dir_id}={folder!r}, {list_id}={datalist!r}).")
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"{dir_id}={str(folder)!r} is not a folder.")
        files = sorted(p for p in root.iterdir() if p.is_file() and _is_volume_file(p))
        items = [{"image": str(p), **({"label": label} if (label := _label_for(p)) else {})} for p in files]
        where = f"{dir_id}={str(folder)!r}"
    else:
        try:
            entries = load_datalist(datalist, "training")
        except ValueError as error:
            raise ValueError(f"{list_id}={str(datalist)!r} is not a usable datalist: {error}") from error
        items = [{"image": e["image"], **({"label": e["label"]} if e.get("label") else {})} for e in entries]
        items.sort(key=lambda item: item["image"])
        where = f"{list_id}={str(datalist)!r}"
    if not items:
        raise ValueError(f"{where} holds no volumes ({', '.join(VOLUME_EXTENSIONS)}; files named *{LABEL_SUFFIX}.* are label maps).")
    return items[:limit] if limit is not None else items


def evaluation_items(datalist_file: Any, datalist_base_dir: Any, validation_fold: Any) -> list[dict[str, Any]]:
    """
    The ``"training"`` entries of ``datalist_file`` in fold ``validation_fold`` (``None``: every entry).

    Raises
    ------
    ValueError
        the datalist is unusable (see ``training_data.load_datalist``) or the fold holds no entry.
    """
    items = load_datalist(datalist_file, "training", datalist_base_dir)
    if validation_fold is None:
        return items
    if isinstance(validation_fold, bool) or not isinstance(validation_fold, Integral):
        raise ValueError(f"validation_fold={validation_fold!r} is not allowed; it must be an integer fold or null (every entry).")
    selected = [item for item in items if item["fold"] == validation_fold]
    if not selected:
        folds = sorted({item["fold"] for item in items})
        raise ValueError(f"validation_fold={validation_fold} holds no entry of datalist_file={str(datalist_file)!r}; its folds are {folds} (null: every entry).")
    return selected


def fid_preprocessing(target_shape: Any, target_spacing: Any, intensity: Any) -> Compose:
    """
    The dictionary transform (key ``image``) of the module docstring: path -> ``(1, X, Y, Z)`` float32 in RAS.

    CT values are HU clipped to [-1000, 1000]; MR values are in [0, 1]. ``target_shape=None`` keeps each
    volume's shape (no padding or cropping).
    """
    shape = check_target_shape(target_shape)
    spacing = check_target_spacing(target_spacing)
    intensity = _check_intensity(intensity)
    transforms: list[Any] = [
        LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
        Orientationd(keys="image", axcodes="RAS", labels=None),
    ]
    if spacing is not None:
        transforms.append(Spacingd(keys="image", pixdim=spacing, mode="bilinear"))
    if intensity == "mr":
        lower, upper = MR_PERCENTILE_RANGE
        transforms.append(ScaleIntensityRangePercentilesd(keys="image", lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True))
    if shape is not None:
        pad_value = CT_BACKGROUND_HU if intensity == "ct" else MR_PAD_VALUE
        transforms += [
            SpatialPadd(keys="image", spatial_size=shape, mode="constant", value=pad_value),
            CenterSpatialCropd(keys="image", roi_size=shape),
        ]
    if intensity == "ct":
        transforms.append(ScaleIntensityRanged(keys="image", a_min=CT_HU_MIN, a_max=CT_HU_MAX, b_min=CT_HU_MIN, b_max=CT_HU_MAX, clip=True))
    transforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(transforms)


def load_volume(transform: Compose, path: str | os.PathLike) -> torch.Tensor:
    """
    ``(X, Y, Z)`` float32 volume of ``path`` after ``transform`` (:func:`fid_preprocessing`).

    Raises
    ------
    ValueError
        the file cannot be read or is not a one-channel 3D volume; the message names it.
    """
    try:
        image = transform({"image": str(path)})["image"]
    except Exception as error:  # readers raise many types for bad files
        raise ValueError(f"volume '{path}' cannot be loaded: {error}") from error
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"volume '{path}' must hold one 3D channel, got shape {tuple(image.shape)} after loading.")
    return torch.as_tensor(image[0], dtype=torch.float32)


def to_unit_range(volume: torch.Tensor, intensity: str) -> torch.Tensor:
    """A preprocessed volume on [0, 1]: CT ``(HU + 1000) / 2000``; MR unchanged (already on [0, 1])."""
    if _check_intensity(intensity) == "ct":
        return (volume - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)
    return volume

