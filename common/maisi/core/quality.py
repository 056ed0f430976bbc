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
Decoded-image intensities (CT HU, MR units) and the CT quality check with bounded, explicit retries.

The quality check compares the median HU inside each organ group of ``constants.QC_LABEL_GROUPS`` with
the organ's range from ``image_median_statistics_ct.json``. Organs absent from the mask are reported as
skipped and tumours (which have no statistics) as unchecked; neither is silently counted as a pass.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_numpy

from .constants import (
    BACKGROUND_LABEL,
    CT_BACKGROUND_HU,
    CT_HU_MAX,
    CT_HU_MIN,
    MR_SCALE,
    QC_LABEL_GROUPS,
    TUMOR_LABELS,
)
from .labels import default_data_path, load_json

__all__ = [
    "CT_STATISTICS_FILENAME",
    "QualityReport",
    "check_ct_quality",
    "finalize_ct",
    "finalize_mr",
    "generate_with_quality_check",
    "load_ct_statistics",
    "organ_hu_range",
    "to_ct_hu",
    "to_mr_intensity",
]

logger = logging.getLogger(__name__)

CT_STATISTICS_FILENAME = "image_median_statistics_ct.json"
# Keys of a statistics entry that define the accepted range of the organ's median HU.
_RANGE_KEYS = ("sigma_6_low", "percentile_0_5", "sigma_6_high", "percentile_99_5")
# Organs whose upper bound is the top of the HU range (dense bone medians are legitimately very high).
_OPEN_ENDED_ORGANS = frozenset({"bone"})
_MR_BACKGROUND = 0.0  # MR intensities are non-negative; background is the lower bound
_INT16_MAX = float(np.iinfo(np.int16).max)

ImageT = TypeVar("ImageT")
LabelsT = TypeVar("LabelsT")


# ----------------------------------------------------------------------------------------------------
# Statistics and ranges
# ----------------------------------------------------------------------------------------------------


def load_ct_statistics(path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """
    Read the per-organ CT median statistics.

    Parameters
    ----------
    path
        ``image_median_statistics_ct.json``; ``None`` reads the packaged file.

    Returns
    -------
    dict[str, dict[str, float]]
        Organ name -> statistics entry.

    Raises
    ------
    ValueError
        If the file is not an object of organ entries holding the numeric range keys.
    """
    path = default_data_path(CT_STATISTICS_FILENAME) if path is None else Path(path)
    data = load_json(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object of organ -> statistics, got {type(data).__name__}.")
    for organ, entry in data.items():
        missing = [key for key in _RANGE_KEYS if not isinstance(entry, Mapping) or not isinstance(entry.get(key), (int, float))]
        if missing:
            raise ValueError(f"{path}: organ '{organ}' lacks numeric {', '.join(missing)}.")
    return {organ: dict(entry) for organ, entry in data.items()}


def organ_hu_range(stats_entry: Mapping[str, float], organ: str | None = None) -> tuple[float, float]:
    """
    The accepted range of an organ's median HU.

    ``[min(sigma_6_low, percentile_0_5), max(sigma_6_high, percentile_99_5)]``; for bone the upper bound
    is ``CT_HU_MAX``.

    Parameters
    ----------
    stats_entry
        One organ's entry of ``image_median_statistics_ct.json``.
    organ
        Organ name; ``"bone"`` opens the upper bound.

    Returns
    -------
    tuple[float, float]
        ``(low, high)`` in HU.
    """
    low = min(float(stats_entry["sigma_6_low"]), float(stats_entry["percentile_0_5"]))
    high = max(float(stats_entry["sigma_6_high"]), float(stats_entry["percentile_99_5"]))
    if organ in _OPEN_ENDED_ORGANS:
        high = CT_HU_MAX
    return low, high


# ----------------------------------------------------------------------------------------------------
# Quality check
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QualityReport:
    """
    Outcome of a CT quality check.

    Attributes
    ----------
    passed
        ``True`` when every checked organ passed.
    organs
        Checked organ -> ``{"median", "low", "high", "voxels", "passed"}``.
    skipped
        Organ groups absent from the mask (or below ``min_voxels``): not checked, not failed.
    no_statistics
        Structures present in the mask that cannot be checked for lack of statistics (tumours, and organ
        groups missing from the statistics file).
    attempts
        Generation attempts that led to this report (set by :func:`generate_with_quality_check`).
    """

    passed: bool
    organs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    no_statistics: list[str] = dataclasses.field(default_factory=list)
    attempts: int = 1

    @property
    def failed_organs(self) -> list[str]:
        """Names of the organs whose median HU is out of range."""
        return [name for name, result in self.organs.items() if not result["passed"]]

    def summary(self) -> str:
        """One line for logs: verdict, failing organs with their medians and ranges, skipped and unchecked."""
        verdict = "passed" if self.passed else "FAILED"
        parts = [f"quality check {verdict} after {self.attempts} attempt(s)"]
        for name in self.failed_organs:
            r = self.organs[name]
            parts.append(f"{name} median {r['median']:.1f} HU outside [{r['low']:.1f}, {r['high']:.1f}]")
        if self.skipped:
            parts.append(f"skipped (absent): {', '.join(self.skipped)}")
        if self.no_statistics:
            parts.append(f"no statistics: {', '.join(self.no_statistics)}")
        return "; ".join(parts)


def _matching_volumes(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if image.shape != labels.shape:
        image, labels = np.squeeze(image), np.squeeze(labels)
    if image.shape != labels.shape:
        raise ValueError(f"image and labels must have the same shape, got {image.shape} and {labels.shape}.")
    return image, labels


def check_ct_quality(
    image_hu: NdarrayOrTensor,
    labels: NdarrayOrTensor,
    statistics: Mapping[str, Mapping[str, float]],
    min_voxels: int = 1,
) -> QualityReport:
    """
    Check that the median HU inside each organ group lies in the organ's range.

    Groups are ``constants.QC_LABEL_GROUPS`` (lung includes all five lobes); ranges come from
    :func:`organ_hu_range`.

    Parameters
    ----------
    image_hu
        CT image in HU.
    labels
        MAISI label map of the same shape (singleton axes are squeezed if the shapes differ).
    statistics
        Organ -> statistics entry, from :func:`load_ct_statistics`.
    min_voxels
        Groups with fewer voxels are skipped.

    Returns
    -------
    QualityReport
        ``passed`` is ``True`` only if every checked organ passed (a NaN median fails).
    """
    if min_voxels < 1:
        raise ValueError(f"min_voxels must be >= 1, got {min_voxels}.")
    image, label_map = _matching_volumes(convert_to_numpy(image_hu), convert_to_numpy(labels))
    report = QualityReport(passed=True)
    for organ, ids in QC_LABEL_GROUPS.items():
        inside = np.isin(label_map, ids)
        voxels = int(np.count_nonzero(inside))
        if voxels < min_voxels:
            report.skipped.append(organ)
            continue
        if organ not in statistics:
            report.no_statistics.append(organ)
            continue
        low, high = organ_hu_range(statistics[organ], organ)
        median = float(np.median(image[inside]))
        passed = bool(low <= median <= high)
        report.organs[organ] = {"median": median, "low": low, "high": high, "voxels": voxels, "passed": passed}
        report.passed &= passed
    tumor_values = label_map[np.isin(label_map, list(TUMOR_LABELS.values()))]
    present = set(np.unique(tumor_values).tolist())
    report.no_statistics.extend(name for name, tumor_id in TUMOR_LABELS.items() if tumor_id in present)
    return report


def generate_with_quality_check(
    generate: Callable[[int], tuple[ImageT, LabelsT]],
    max_attempts: int,
    check: Callable[[ImageT, LabelsT], QualityReport],
) -> tuple[ImageT, LabelsT, QualityReport, int]:
    """
    Generate until the quality check passes, at most ``max_attempts`` times.

    Parameters
    ----------
    generate
        Called with the attempt index (0, 1, ...) so the caller can derive a deterministic seed; returns
        ``(image, labels)``.
    max_attempts
        Upper bound on attempts (the bundle's ``quality_check_max_attempts``).
    check
        Quality check of one ``(image, labels)`` pair, e.g. a ``functools.partial`` of
        :func:`check_ct_quality`.

    Returns
    -------
    tuple
        ``(image, labels, report, attempts)``: the first passing pair, or the last attempt with
        ``report.passed`` ``False`` (logged as a warning; the caller decides whether to keep it).

    Raises
    ------
    ValueError
        If ``max_attempts < 1``.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, (int, np.integer)) or max_attempts < 1:
        raise ValueError(f"quality_check_max_attempts must be an integer >= 1, got {max_attempts!r}.")
    for attempt in range(int(max_attempts)):
        image, labels = generate(attempt)
        report = dataclasses.replace(check(image, labels), attempts=attempt + 1)
        if report.passed:
            return image, labels, report, attempt + 1
        logger.info("attempt %d/%d: %s", attempt + 1, max_attempts, report.summary())
    logger.warning("keeping a sample that failed the quality check: %s", report.summary())
    return image, labels, report, int(max_attempts)


# ----------------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------------


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
