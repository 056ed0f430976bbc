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
2.5D FID of MAISI volumes, computed as the published evaluation does, offline, in one or several processes.

For each preprocessed volume ``(X, Y, Z)`` in RAS (``evaluation.fid_preprocessing``), three stacks of 2D
slices are taken:

- ``xy``: slices along the third axis (``volume[:, :, k]``, each ``(X, Y)``);
- ``yz``: slices along the first axis (``volume[i, :, :]``, each ``(Y, Z)``);
- ``zx``: slices along the second axis (``volume[:, j, :]``, each ``(X, Z)``).

With ``center_slices_ratio = r`` only indices ``int((1 - r) / 2 * D)`` to ``int((1 + r) / 2 * D)`` (exclusive)
are kept; blank slices are kept. Each stack is scaled with its own global min and max (not per slice),
fed to the backbone ``slice_batch_size`` slices at a time (``fid.extract_features``), and the spatially
averaged layer-4 maps of all volumes of a set are the plane's feature rows. The FID of each plane comes
from ``monai.metrics.FIDMetric`` (float64); ``fid_avg`` is the plain mean of the three.

Features are cached per volume (``fid.FeatureCache``), keyed by the file's content and every
preprocessing and backbone setting. Under ``torchrun`` every rank extracts the features of its share of
the volumes (round robin), the features are gathered in the single-process order and rank 0 computes and
writes the report, so the figures equal the single-process ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from tqdm import tqdm

from .checks import check_positive_int
from .evaluation import (
    INTENSITIES,
    check_center_slices_ratio,
    check_target_shape,
    check_target_spacing,
    fid_preprocessing,
    load_volume,
)
from .evaluation_report import bar_chart_png, write_json_report
from .fid import FeatureBackbone, FeatureCache, frechet_distance, gather_items, process_rank, shard

logger = logging.getLogger(__name__)

__all__ = [
    "CHART_NAME",
    "PLANES",
    "PLANE_AXES",
    "REPORT_NAME",
    "Fid25D",
    "FidSettings",
    "center_slice_range",
    "plane_slices",
]

PLANES = ("xy", "yz", "zx")
PLANE_AXES = {"xy": 2, "yz": 0, "zx": 1}  # the axis of the (X, Y, Z) volume each plane's slices run along
PROTOCOL = "maisi-2.5d-fid/1"  # part of the cache key: bump it when the feature computation changes
REPORT_NAME = "fid_report.json"
CHART_NAME = "fid_planes.png"


def center_slice_range(length: int, ratio: float | None) -> tuple[int, int]:
    """
    ``(start, stop)`` of the central slices: ``int((1 - r) / 2 * length)``, ``int((1 + r) / 2 * length)``.

    ``ratio=None`` keeps every slice, ``(0, length)``. E.g. ``length=512, ratio=0.4`` gives ``(153, 358)``.
    """
    ratio = check_center_slices_ratio(ratio)
    if ratio is None:
        return 0, int(length)
    return int((1.0 - ratio) / 2.0 * length), int((1.0 + ratio) / 2.0 * length)


def plane_slices(volume: torch.Tensor, plane: str, ratio: float | None = None) -> torch.Tensor:
    """
    The slices of one plane of an ``(X, Y, Z)`` volume as an ``(N, H, W)`` stack (module docstring).

    Raises
    ------
    ValueError
        ``plane`` is not one of :data:`PLANES` or the volume is not 3D.
    """
    if plane not in PLANE_AXES:
        raise ValueError(f"plane={plane!r} is not one of {list(PLANES)}.")
    if volume.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {tuple(volume.shape)}.")
    axis = PLANE_AXES[plane]
    start, stop = center_slice_range(volume.shape[axis], ratio)
    return volume.movedim(axis, 0)[start:stop]


@dataclass(frozen=True)
class FidSettings:
    """
    The preprocessing and slicing settings of a 2.5D FID run (config ids of the same names).

    Attributes
    ----------
    target_shape
        pad (CT -1000 HU, MR 0) and centre-crop every volume to it; ``None`` keeps each shape.
    target_spacing
        resample to it (mm, bilinear) first; ``None``: no resampling.
    center_slices_ratio
        keep this central share of the slices of each plane; ``None``: every slice.
    intensity
        ``"ct"`` or ``"mr"`` (``evaluation_intensity``).
    slice_batch_size
        slices per backbone forward pass (memory only; the figures do not depend on it).
    """

    target_shape: Sequence[int] | None
    target_spacing: Sequence[float] | None
    center_slices_ratio: float | None
    intensity: str
    slice_batch_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_shape", check_target_shape(self.target_shape))
        object.__setattr__(self, "target_spacing", check_target_spacing(self.target_spacing))
        object.__setattr__(self, "center_slices_ratio", check_center_slices_ratio(self.center_slices_ratio))
        if self.intensity not in INTENSITIES:
            raise ValueError(f"evaluation_intensity={self.intensity!r} is not allowed; choose one of {list(INTENSITIES)}.")
        object.__setattr__(self, "slice_batch_size", check_positive_int("slice_batch_size", self.slice_batch_size))

    def feature_settings(self) -> dict[str, Any]:
        """Everything that shapes the features (not ``slice_batch_size``)."""
        return {
            "protocol": PROTOCOL,
            "target_shape": None if self.target_shape is None else list(self.target_shape),
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
            "center_slices_ratio": self.center_slices_ratio,
            "intensity": self.intensity,
        }

    def transform(self) -> Compose:
        """The volume preprocessing (``evaluation.fid_preprocessing``)."""
        return fid_preprocessing(self.target_shape, self.target_spacing, self.intensity)


class Fid25D:
    """
    The 2.5D FID of a synthetic set against a real set (module docstring).

    Parameters
    ----------
    backbone
        the loaded feature backbone (``fid.load_feature_backbone``).
    settings
        preprocessing and slicing.
    cache_dir
        feature cache folder (``feature_cache_dir``); ``None`` disables the cache.
    report_settings
        extra settings copied into the report (e.g. the input folders and ``num_images``).
    progress
        a progress bar per set (rank 0).
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        settings: FidSettings,
        cache_dir: str | os.PathLike | None = None,
        report_settings: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.settings = settings
        self.cache = FeatureCache(cache_dir, {**settings.feature_settings(), **backbone.settings()})
        self.report_settings = dict(report_settings or {})
        self.progress = progress
        self._transform = settings.transform()

    def volume_features(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """``{plane: (N, C)}`` features of one volume, from the cache when its key matches."""
        cached = self.cache.load(path)
        if cached is not None:
            return cached
        volume = load_volume(self._transform, path)
        features = {
            plane: self.backbone.features(plane_slices(volume, plane, self.settings.center_slices_ratio), self.settings.slice_batch_size)
            for plane in PLANES
        }
        self.cache.save(path, features)
        return features

    def set_features(self, items: Sequence[Mapping[str, Any]], description: str) -> dict[str, torch.Tensor]:
        """
        The stacked ``{plane: (rows, C)}`` features of a set, this rank's share extracted, all ranks' gathered.
        """
        rank, world_size = process_rank()
        mine = shard(list(items), rank, world_size)
        bar = tqdm(mine, desc=f"{description} features", unit="volume", disable=not self.progress or rank != 0)
        local = [self.volume_features(item["image"]) for item in bar]
        gathered = gather_items(local, self.backbone.device)
        return {plane: torch.cat([volume[plane] for volume in gathered]) for plane in PLANES}

    def __call__(
        self, real_items: Sequence[Mapping[str, Any]], synthetic_items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike
    ) -> dict[str, Any] | None:
        """
        Compute the FIDs and write ``<output_dir>/fid_report.json`` and ``fid_planes.png`` (rank 0).

        Returns
        -------
        dict | None
            the report on rank 0, ``None`` on the other ranks.
        """
        real = self.set_features(real_items, "real")
        synthetic = self.set_features(synthetic_items, "synthetic")
        rank, world_size = process_rank()
        if rank != 0:
            return None
        figures = {f"fid_{plane}": frechet_distance(synthetic[plane], real[plane]) for plane in PLANES}
        figures["fid_avg"] = sum(figures[f"fid_{plane}"] for plane in PLANES) / len(PLANES)
        output_dir = Path(output_dir)
        chart = bar_chart_png({plane: figures[f"fid_{plane}"] for plane in PLANES}, output_dir / CHART_NAME, f"2.5D FID per plane (average {figures['fid_avg']:.4g})")
        report = {
            **figures,
            "num_real_volumes": len(real_items),
            "num_synthetic_volumes": len(synthetic_items),
            "num_slices": {
                "real": {plane: int(real[plane].shape[0]) for plane in PLANES},
                "synthetic": {plane: int(synthetic[plane].shape[0]) for plane in PLANES},
            },
            "feature_dim": int(real[PLANES[0]].shape[1]),
            "settings": {
                **self.settings.feature_settings(),
                "slice_batch_size": self.settings.slice_batch_size,
                **self.backbone.settings(),
                "backbone_weights_path": self.backbone.weights_path,
                "world_size": world_size,
                **self.report_settings,
            },
            "chart": str(chart),
            "real_volumes": [str(item["image"]) for item in real_items],
            "synthetic_volumes": [str(item["image"]) for item in synthetic_items],
        }
        write_json_report(output_dir / REPORT_NAME, report)
        logger.info("2.5D FID: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        return report
