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
The CT quality check with bounded, explicit retries.

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
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_numpy

from .constants import CT_HU_MAX, QC_LABEL_GROUPS, TUMOR_LABELS
from .labels import default_data_path, load_json

__all__ = [
    "CT_STATISTICS_FILENAME",
    "CTQualityCheck",
    "QualityReport",
    "check_ct_quality",
    "generate_with_quality_check",
    "load_ct_statistics",
    "organ_hu_range",
]

logger = logging.getLogger(__name__)

CT_STATISTICS_FILENAME = "image_median_statistics_ct.json"
# Keys of a statistics entry that define the accepted range of the organ's median HU.
_RANGE_KEYS = ("sigma_6_low", "percentile_0_5", "sigma_6_high", "percentile_99_5")
# Organs whose upper bound is the top of the HU range (dense bone medians are legitimately very high).
_OPEN_ENDED_ORGANS = frozenset({"bone"})

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

    def to_dict(self) -> dict[str, Any]:
        """
        The report as plain data for the run report.

        Returns
        -------
        dict[str, Any]
            ``{"passed", "attempts", "organs": {organ: {"median", "low", "high", "voxels", "passed"}},
            "failed_organs", "skipped", "no_statistics", "summary"}``.
        """
        return {
            "passed": bool(self.passed),
            "attempts": int(self.attempts),
            "organs": {name: dict(result) for name, result in self.organs.items()},
            "failed_organs": self.failed_organs,
            "skipped": list(self.skipped),
            "no_statistics": list(self.no_statistics),
            "summary": self.summary(),
        }

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


class CTQualityCheck:
    """
    The quality check of generated CT pairs as a config component: organ HU medians against the statistics.

    Parameters
    ----------
    statistics
        ``image_median_statistics_ct.json`` (the ``real_img_median_statistics`` id).
    max_attempts
        ``quality_check_max_attempts``: how often a failing sample is regenerated (new seed, new mask draw).
    """

    def __init__(self, statistics: str | Path, max_attempts: int = 3) -> None:
        self.statistics = load_ct_statistics(statistics)
        self.max_attempts = int(max_attempts)

    def __call__(self, image_hu: NdarrayOrTensor, labels: NdarrayOrTensor) -> QualityReport:
        """Check one pair (see :func:`check_ct_quality`)."""
        return check_ct_quality(image_hu, labels, self.statistics)
