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
Evaluation of the 2D BraTS model: 2D FID of generated against real slices, and the reconstruction report.

**FID** (``configs/evaluate_fid.json``): the real slices are the central ``num_slices_per_volume`` axial
slices of the MSD volumes of ``real_section``, loaded as the reconstruction check loads them (FLAIR,
RAS, centre crop to ``infer_patch_size``, intensities scaled to [0, 1] per volume); the synthetic slices
are the ``*.nii.gz`` files of ``synthetic_dir`` that ``inference.json`` writes (``(H, W, 1)``, [0, 1]).
Both are fed to the feature backbone (``fid.py``: RadImageNet or ImageNet ResNet50 from a local file)
on their fixed [0, 1] range, grey repeated to BGR, the channel means subtracted; the spatially averaged
layer-4 features give the FID (``monai.metrics.FIDMetric``, float64). Features are cached per file,
keyed by content and settings.

**Reconstruction report** (``configs/inference_autoencoder.json``): :class:`ReconstructionReportWriter`
writes the report in the format shared with the MAISI autoencoder evaluation
(``evaluation_report.py``): per-case and mean PSNR, SSIM and MAE (data range 1), worst-case previews.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine
from PIL import Image
from tqdm import tqdm

from .checkpoint import atomic_write, is_main_process
from .data import check_choice
from .evaluation_report import reconstruction_report, worst_case_indices, write_json_report
from .fid import FeatureBackbone, FeatureCache, frechet_distance
from .inference import ReconstructionWriter, to_display

logger = logging.getLogger(__name__)

__all__ = ["FID_REPORT_NAME", "Fid2D", "ReconstructionReportWriter", "check_section", "list_slices", "read_slice", "real_items"]

FID_REPORT_NAME = "fid_report.json"
PROTOCOL = "brats-2d-fid/1"  # part of the cache key: bump it when the feature computation changes
VALUE_RANGE = (0.0, 1.0)  # real and synthetic slices are on [0, 1]; mapped to [0, 1] as they are
SECTIONS = ("training", "validation")
RECONSTRUCTION_UNITS = {"psnr": "dB", "ssim": "1", "mae": "intensity on [0, 1]"}
PREVIEW_GAP = 4


def list_slices(folder: Any, num_images: Any) -> list[str]:
    """
    The ``.nii.gz``/``.nii`` files directly in ``folder`` (the config id ``synthetic_dir``), sorted, cut to ``num_images``.

    Raises
    ------
    ValueError
        ``folder`` is not a folder, holds no slices, or ``num_images`` is not null or an integer >= 1.
    """
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"num_images={num_images!r} is not allowed; it must be null (all) or an integer >= 1.")
    root = Path(folder) if folder is not None else None
    if root is None or not root.is_dir():
        raise ValueError(f"synthetic_dir={folder!r} is not a folder; set it to the output_dir of configs/inference.json.")
    files = sorted(str(p) for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise ValueError(f"synthetic_dir={str(folder)!r} holds no .nii.gz slices; generate some with configs/inference.json.")
    return files[:num_images] if num_images is not None else files


def read_slice(path: str | os.PathLike) -> torch.Tensor:
    """A generated slice ``(H, W, 1)`` (or ``(H, W)``) as an ``(H, W)`` float32 tensor."""
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    data = data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data
    if data.ndim != 2:
        raise ValueError(f"'{path}' is not a 2D slice: shape {data.shape} (expected (H, W, 1) as inference.json writes).")
    return torch.from_numpy(np.ascontiguousarray(data))


def _slice_stack(path: str) -> torch.Tensor:
    """One generated slice as a ``(1, H, W)`` stack."""
    return read_slice(path)[None]


class Fid2D:
    """
    FID of generated slices against real MSD slices (module docstring).

    Parameters
    ----------
    backbone
        the loaded feature backbone (``fid.load_feature_backbone``).
    real_transform
        loads an MSD datalist item: ``image`` as ``(1, H, W, S)`` on [0, 1] (``preprocessing_transforms``).
    cache_dir
        feature cache folder (``feature_cache_dir``); ``None`` disables the cache.
    slice_batch_size
        slices per backbone forward pass.
    real_preprocessing
        the settings of ``real_transform`` (channel, crop, slices): they key the real-slice cache.
    report_settings
        further settings copied into the report.
    progress
        progress bars.
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        real_transform: Any,
        cache_dir: str | os.PathLike | None = None,
        slice_batch_size: int = 64,
        real_preprocessing: Mapping[str, Any] | None = None,
        report_settings: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if isinstance(slice_batch_size, bool) or not isinstance(slice_batch_size, int) or slice_batch_size < 1:
            raise ValueError(f"slice_batch_size={slice_batch_size!r} is not allowed; it must be an integer >= 1.")
        self.backbone = backbone
        self.real_transform = real_transform
        self.slice_batch_size = slice_batch_size
        self.real_preprocessing = dict(real_preprocessing or {})
        self.report_settings = dict(report_settings or {})
        self.progress = progress
        common = {"protocol": PROTOCOL, "value_range": list(VALUE_RANGE), **backbone.settings()}
        self.real_cache = FeatureCache(cache_dir, {**common, "set": "real", **self.real_preprocessing})
        self.synthetic_cache = FeatureCache(cache_dir, {**common, "set": "synthetic"})

    def _features(self, cache: FeatureCache, path: str, load_slices: Callable[[], torch.Tensor]) -> torch.Tensor:
        cached = cache.load(path)
        if cached is None:
            cached = {"slices": self.backbone.features(load_slices(), self.slice_batch_size, VALUE_RANGE)}
            cache.save(path, cached)
        return cached["slices"]

    def _real_slices(self, item: Mapping[str, Any]) -> torch.Tensor:
        """The ``(S, H, W)`` central axial slices of one MSD volume."""
        return torch.as_tensor(self.real_transform(dict(item))["image"][0]).movedim(-1, 0)

    def real_features(self, items: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """``(slices, C)`` features of the central axial slab of every real volume."""
        bar = tqdm(items, desc="real features", unit="volume", disable=not self.progress)
        return torch.cat([self._features(self.real_cache, str(item["image"]), functools.partial(self._real_slices, item)) for item in bar])

    def synthetic_features(self, paths: Sequence[str]) -> torch.Tensor:
        """``(slices, C)`` features of the generated slices."""
        bar = tqdm(paths, desc="synthetic features", unit="slice", disable=not self.progress)
        return torch.cat([self._features(self.synthetic_cache, path, functools.partial(_slice_stack, path)) for path in bar])

    def __call__(self, real_items: Sequence[Mapping[str, Any]], synthetic_paths: Sequence[str], output_dir: str | os.PathLike) -> dict[str, Any]:
        """Compute the FID and write ``<output_dir>/fid_report.json``."""
        real = self.real_features(real_items)
        synthetic = self.synthetic_features(synthetic_paths)
        report = {
            "fid": frechet_distance(synthetic, real),
            "num_real_volumes": len(real_items),
            "num_real_slices": int(real.shape[0]),
            "num_synthetic_slices": int(synthetic.shape[0]),
            "feature_dim": int(real.shape[1]),
            "settings": {
                "protocol": PROTOCOL,
                **self.backbone.settings(),
                "backbone_weights_path": self.backbone.weights_path,
                "slice_batch_size": self.slice_batch_size,
                **self.real_preprocessing,
                **self.report_settings,
            },
            "real_volumes": [str(item["image"]) for item in real_items],
            "synthetic_slices": list(synthetic_paths),
        }
        write_json_report(Path(output_dir) / FID_REPORT_NAME, report)
        logger.info("2D FID %.4f (%d synthetic vs %d real slices)", report["fid"], synthetic.shape[0], real.shape[0])
        return report


def real_items(dataset: Any, num_images: Any) -> list[dict[str, Any]]:
    """The datalist items of a ``DecathlonDataset`` section, cut to ``num_images`` volumes (null: all)."""
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"num_images={num_images!r} is not allowed; it must be null (all) or an integer >= 1.")
    items = [dict(item) for item in dataset.data]
    return items[:num_images] if num_images is not None else items


def check_section(real_section: Any) -> str:
    """``real_section`` must be ``training`` or ``validation`` (the split of ``val_frac``)."""
    return str(check_choice("real_section", real_section, SECTIONS))


def _side_by_side(images: Sequence[np.ndarray]) -> np.ndarray:
    pictures = [to_display(image) for image in images]
    height = max(p.shape[0] for p in pictures)
    canvas = np.zeros((height, sum(p.shape[1] for p in pictures) + PREVIEW_GAP * (len(pictures) - 1)), dtype=np.uint8)
    column = 0
    for picture in pictures:
        canvas[: picture.shape[0], column : column + picture.shape[1]] = picture
        column += picture.shape[1] + PREVIEW_GAP
    return canvas


class ReconstructionReportWriter(ReconstructionWriter):
    """
    :class:`~scripts.inference.ReconstructionWriter` that writes the shared reconstruction report format.

    Each slice and its reconstruction are written as before (``case_<i>_{original,reconstruction}``); at the
    end ``reconstruction_report.json`` holds per-case and mean PSNR, SSIM and MAE (data range 1) and the
    ``num_worst_cases`` lowest-PSNR cases get ``worst_<k>_case_<i>.png`` (input | reconstruction |
    absolute difference). Rank 0 only.

    Parameters
    ----------
    output_dir
        output folder.
    metric_names
        the evaluator's metrics to report.
    num_worst_cases
        number of previews.
    settings
        copied into the report.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metric_names: Sequence[str] = ("psnr", "ssim", "mae"),
        num_worst_cases: int = 3,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(output_dir, metric_names)
        if isinstance(num_worst_cases, bool) or not isinstance(num_worst_cases, int) or num_worst_cases < 0:
            raise ValueError(f"num_worst_cases={num_worst_cases!r} is not allowed; it must be an integer >= 0.")
        self.num_worst_cases = num_worst_cases
        self.settings = dict(settings or {})

    def write_summary(self, engine: Engine) -> None:
        """Write the previews of the worst cases and ``reconstruction_report.json``."""
        if not is_main_process():
            return
        details = getattr(engine.state, "metric_details", {}) or {}
        cases = [
            {**files, **{name: float(torch.as_tensor(details[name])[index].mean()) for name in self.metric_names}}
            for index, files in enumerate(self.written)
        ]
        worst = worst_case_indices(cases, "psnr", self.num_worst_cases)
        for position, index in enumerate(worst):
            original, reconstruction = (read_slice(cases[index][key]).numpy() for key in ("original", "reconstruction"))
            picture = Image.fromarray(_side_by_side([original, reconstruction, np.abs(reconstruction - original)]))
            path = self.output_dir / f"worst_{position + 1:02d}_case_{index:04d}.png"
            cases[index]["preview"] = str(atomic_write(path, lambda tmp, p=picture: p.save(tmp, format="PNG"), suffix=".png"))
        units = {name: RECONSTRUCTION_UNITS.get(name, "") for name in self.metric_names}
        report = reconstruction_report(cases, self.metric_names, units, self.settings, "psnr", worst)
        write_json_report(self.output_dir / "reconstruction_report.json", report)
