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
Diversity and distribution metrics of generated MAISI volumes: MS-SSIM, MMD and per-organ HU medians.

All volumes go through the 2.5D FID preprocessing (``evaluation.fid_preprocessing``) and are mapped to
[0, 1] (``evaluation.to_unit_range``), so every metric uses data range 1:

- **MS-SSIM** (``monai.metrics.MultiScaleSSIMMetric``, 3D, 5 scales) between ``ms_ssim_num_pairs`` pairs of
  synthetic volumes (diversity: lower is more diverse) and, as its reference, between as many pairs of
  real volumes. Pairs are drawn without repetition from all pairs with a fixed seed. Five scales of a
  ``k``-voxel kernel need every side of ``target_shape`` above ``16 * (k - 1)``.
- **MMD** (``monai.metrics.MMDMetric``: unbiased, linear kernel on the voxels) between the first ``n``
  real and the first ``n`` synthetic volumes (``n`` the smaller count), each resized to ``mmd_shape``
  (area interpolation) so that all volumes fit in memory at once.
- **Per-organ HU medians** (CT, paired generation): for every synthetic image with a label map, the
  median HU inside each organ group, checked against the range of the quality-check statistics file
  (``quality.check_ct_quality``, CT only), tabulated over the cases.

Under ``torchrun`` these metrics are computed by rank 0 alone.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import MMDMetric, MultiScaleSSIMMetric
from monai.transforms import Compose, LoadImaged, Orientationd
from tqdm import tqdm

from .checks import check_positive_int
from .evaluation import check_target_shape, load_volume, to_unit_range
from .evaluation_fid import FidSettings
from .evaluation_report import write_json_report
from .fid import process_rank

logger = logging.getLogger(__name__)

__all__ = [
    "MS_SSIM_SCALES",
    "REPORT_NAME",
    "DistributionMetrics",
    "check_ms_ssim_size",
    "mmd",
    "ms_ssim",
    "organ_hu_table",
    "pair_indices",
]

REPORT_NAME = "distribution_report.json"
MS_SSIM_SCALES = 5  # MONAI's default weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
PAIR_SEED = 0


def pair_indices(count: int, num_pairs: int, seed: int = PAIR_SEED) -> list[tuple[int, int]]:
    """
    ``num_pairs`` distinct pairs ``(i, j)``, ``i < j < count``, drawn with ``seed`` (all pairs if fewer), sorted.
    """
    check_positive_int("ms_ssim_num_pairs", num_pairs)
    every = list(itertools.combinations(range(count), 2))
    chosen = every if num_pairs >= len(every) else random.Random(seed).sample(every, num_pairs)
    return sorted(chosen)


def check_ms_ssim_size(shape: Sequence[int] | None, kernel_size: int) -> None:
    """
    Refuse volumes too small for 5-scale MS-SSIM with a ``kernel_size`` kernel (MONAI's own condition).

    Raises
    ------
    ValueError
        naming ``ms_ssim_kernel_size`` and ``target_shape``.
    """
    check_positive_int("ms_ssim_kernel_size", kernel_size)
    divisor = (MS_SSIM_SCALES - 1) ** 2
    if shape is not None and any(int(side) // divisor <= kernel_size - 1 for side in shape):
        raise ValueError(
            f"ms_ssim_kernel_size={kernel_size} needs every side of target_shape={list(shape)} to be at least "
            f"{divisor * kernel_size} voxels ({MS_SSIM_SCALES}-scale MS-SSIM); use a smaller kernel, a larger "
            "target_shape or ms_ssim_num_pairs=0."
        )


def ms_ssim(first: torch.Tensor, second: torch.Tensor, kernel_size: int) -> float:
    """MS-SSIM of two ``(X, Y, Z)`` volumes on [0, 1] (data range 1)."""
    if first.shape != second.shape:
        raise ValueError(f"MS-SSIM needs volumes of one shape, got {tuple(first.shape)} and {tuple(second.shape)}; set target_shape.")
    check_ms_ssim_size(tuple(first.shape), kernel_size)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=kernel_size)
    return float(metric(first[None, None], second[None, None]).mean())


def mmd(real: torch.Tensor, synthetic: torch.Tensor) -> float:
    """Unbiased linear-kernel MMD (``monai.metrics.MMDMetric``) of two ``(n, 1, X, Y, Z)`` stacks, in float64."""
    return float(MMDMetric()(real.double(), synthetic.double()))


def organ_hu_table(cases: Sequence[Mapping[str, Any]], statistics: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """
    Tabulate per-case quality reports (``{"image": path, "organs": {organ: {"median", "low", "high", "passed"}}}``).

    Returns
    -------
    dict
        ``{"organs": {organ: {"low", "high", "num_cases", "median_of_medians", "min_median", "max_median",
        "passed_cases"}}, "cases": cases}``, organs in the order of the statistics file.
    """
    table = {}
    for organ in statistics:
        results = [case["organs"][organ] for case in cases if organ in case["organs"]]
        if not results:
            continue
        medians = np.asarray([r["median"] for r in results], dtype=np.float64)
        table[organ] = {
            "low": results[0]["low"],
            "high": results[0]["high"],
            "num_cases": len(results),
            "median_of_medians": float(np.median(medians)),
            "min_median": float(medians.min()),
            "max_median": float(medians.max()),
            "passed_cases": int(sum(bool(r["passed"]) for r in results)),
        }
    return {"organs": table, "cases": list(cases)}


class _VolumeLoader:
    """Preprocessed volumes on [0, 1], the last two kept (pairs often share a volume)."""

    def __init__(self, transform: Compose, intensity: str, device: torch.device) -> None:
        self.transform, self.intensity, self.device = transform, intensity, device
        self._kept: dict[str, torch.Tensor] = {}

    def __call__(self, path: str) -> torch.Tensor:
        if path not in self._kept:
            if len(self._kept) >= 2:
                self._kept.pop(next(iter(self._kept)))
            self._kept[path] = to_unit_range(load_volume(self.transform, path), self.intensity).to(self.device)
        return self._kept[path]


class DistributionMetrics:
    """
    MS-SSIM diversity, MMD and the per-organ HU table of a synthetic set against a real set (module docstring).

    Parameters
    ----------
    settings
        the FID preprocessing settings (the same volumes as the FID).
    ms_ssim_num_pairs
        pairs per set; 0 skips MS-SSIM.
    ms_ssim_kernel_size
        Gaussian kernel size of MS-SSIM.
    mmd_shape
        shape the volumes are resized to for MMD; ``None`` skips MMD.
    organ_statistics_json
        the quality-check statistics (``image_median_statistics_ct.json``), for the CT organ table.
    device
        where MS-SSIM runs.
    report_settings
        extra settings copied into the report.
    progress
        progress bars.
    """

    def __init__(
        self,
        settings: FidSettings,
        ms_ssim_num_pairs: int = 10,
        ms_ssim_kernel_size: int = 11,
        mmd_shape: Sequence[int] | None = (64, 64, 64),
        organ_statistics_json: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        report_settings: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = settings
        if isinstance(ms_ssim_num_pairs, bool) or not isinstance(ms_ssim_num_pairs, int) or ms_ssim_num_pairs < 0:
            raise ValueError(f"ms_ssim_num_pairs={ms_ssim_num_pairs!r} is not allowed; it must be an integer >= 0 (0 skips MS-SSIM).")
        self.num_pairs = ms_ssim_num_pairs
        self.kernel_size = check_positive_int("ms_ssim_kernel_size", ms_ssim_kernel_size)
        if self.num_pairs:
            check_ms_ssim_size(settings.target_shape, self.kernel_size)
        self.mmd_shape = check_target_shape(mmd_shape, "mmd_shape")
        self.organ_statistics_json = organ_statistics_json
        self.device = torch.device(device)
        self.report_settings = dict(report_settings or {})
        self.progress = progress
        self._load = _VolumeLoader(settings.transform(), settings.intensity, self.device)

    def diversity(self, items: Sequence[Mapping[str, Any]], description: str) -> dict[str, Any] | None:
        """Mean, std and per-pair MS-SSIM of ``ms_ssim_num_pairs`` pairs of ``items``; ``None`` if skipped."""
        if not self.num_pairs or len(items) < 2:
            return None
        pairs = pair_indices(len(items), self.num_pairs)
        values = []
        for i, j in tqdm(pairs, desc=f"MS-SSIM {description} pairs", unit="pair", disable=not self.progress):
            values.append(ms_ssim(self._load(items[i]["image"]), self._load(items[j]["image"]), self.kernel_size))
        return {
            "mean": float(np.mean(values)),
            "std": float(np.std(values)),
            "pairs": [{"first": i, "second": j, "ms_ssim": v} for (i, j), v in zip(pairs, values)],
        }

    def _resized_stack(self, items: Sequence[Mapping[str, Any]], description: str) -> torch.Tensor:
        resized = []
        for item in tqdm(items, desc=f"MMD {description} volumes", unit="volume", disable=not self.progress):
            volume = to_unit_range(load_volume(self._load.transform, item["image"]), self.settings.intensity)
            resized.append(F.interpolate(volume[None, None], size=self.mmd_shape, mode="area")[0].cpu())
        return torch.stack(resized)

    def distribution_distance(self, real_items: Sequence[Mapping[str, Any]], synthetic_items: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """MMD between the first ``n`` real and synthetic volumes; ``None`` if skipped or ``n < 2``."""
        count = min(len(real_items), len(synthetic_items))
        if self.mmd_shape is None or count < 2:
            return None
        real = self._resized_stack(real_items[:count], "real")
        synthetic = self._resized_stack(synthetic_items[:count], "synthetic")
        return {"mmd": mmd(real, synthetic), "num_volumes_per_set": count, "mmd_shape": list(self.mmd_shape)}

    def organ_medians(self, synthetic_items: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """The per-organ HU table of the synthetic images that have label maps (CT only); ``None`` otherwise."""
        paired = [item for item in synthetic_items if item.get("label")]
        if self.settings.intensity != "ct" or not paired:
            return None
        from .quality import check_ct_quality, load_ct_statistics  # CT only: MR runs set no organ statistics

        statistics = load_ct_statistics(self.organ_statistics_json)
        loader = Compose([LoadImaged(keys=["image", "label"], ensure_channel_first=True), Orientationd(keys=["image", "label"], axcodes="RAS", labels=None)])
        cases = []
        for item in tqdm(paired, desc="organ HU medians", unit="volume", disable=not self.progress):
            data = loader({"image": item["image"], "label": item["label"]})
            report = check_ct_quality(data["image"][0], data["label"][0], statistics)
            cases.append({"image": item["image"], "label": item["label"], "passed": report.passed, "organs": report.organs})
        return {**organ_hu_table(cases, statistics), "statistics_json": str(self.organ_statistics_json)}

    def __call__(
        self, real_items: Sequence[Mapping[str, Any]], synthetic_items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike
    ) -> dict[str, Any] | None:
        """Compute the metrics and write ``<output_dir>/distribution_report.json`` (rank 0; ``None`` elsewhere)."""
        if process_rank()[0] != 0:
            return None
        report = {
            "ms_ssim": {"synthetic": self.diversity(synthetic_items, "synthetic"), "real": self.diversity(real_items, "real")},
            "mmd": self.distribution_distance(real_items, synthetic_items),
            "organ_hu_medians": self.organ_medians(synthetic_items),
            "settings": {
                **self.settings.feature_settings(),
                "ms_ssim_num_pairs": self.num_pairs,
                "ms_ssim_kernel_size": self.kernel_size,
                "mmd_shape": None if self.mmd_shape is None else list(self.mmd_shape),
                **self.report_settings,
            },
        }
        write_json_report(Path(output_dir) / REPORT_NAME, report)
        synthetic_ms_ssim = report["ms_ssim"]["synthetic"]
        logger.info(
            "diversity: MS-SSIM synthetic %s, MMD %s",
            "skipped" if synthetic_ms_ssim is None else f"{synthetic_ms_ssim['mean']:.4f}",
            "skipped" if report["mmd"] is None else f"{report['mmd']['mmd']:.6g}",
        )
        return report
