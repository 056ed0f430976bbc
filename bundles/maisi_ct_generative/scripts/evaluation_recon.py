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
Reconstruction quality of the MAISI autoencoder: encode and decode every volume of a datalist.

Each volume is loaded as the autoencoder was trained (RAS, ``intensity.intensity_transforms``: CT HU
window onto [0, 1], MR 99.5th percentile onto 1), padded at the end to a multiple of 4, encoded to the
posterior mean (``embeddings.encode_posterior_mean``, optionally window by window) and decoded with the
planned decoder (``decode.plan_decode`` within ``memory_budget_gb``, then ``decode.decode_latent``). The
padding is cropped off and the reconstruction is compared with the input in the units users read:

- CT: Hounsfield units, both images on [-1000, 1000] HU (the reconstruction clipped to the autoencoder's
  [0, 1] first, as generation does); PSNR and SSIM with data range 2000 HU, MAE in HU;
- MR: the autoencoder's normalised units (1 = the volume's 99.5th percentile); data range 1.

The report (``evaluation_report`` format: per case, mean, worst cases) goes to
``<output_dir>/reconstruction_report.json``; the ``num_worst_cases`` lowest-PSNR cases get a PNG preview
(rows: input, reconstruction, absolute difference; columns: axial, coronal, sagittal).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric
from PIL import Image
from tqdm import tqdm

from .checkpoint import atomic_write, unwrap_module
from .constants import CT_HU_MAX, CT_HU_MIN
from .decode import DEFAULT_OVERLAP, DecodePlan, LatentDecoder, decode_latent, get_autoencoder_splits, plan_decode
from .embeddings import LATENT_DOWNSAMPLE, encode_posterior_mean
from .evaluation import INTENSITIES
from .evaluation_report import reconstruction_report, worst_case_indices, write_json_report
from .preview import orthogonal_views
from .output_intensity import to_ct_hu

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "REPORT_NAME",
    "AutoencoderReconstruction",
    "DecodeOptions",
    "reconstruction_metrics",
    "to_evaluation_units",
]

REPORT_NAME = "reconstruction_report.json"
METRICS = ("psnr", "ssim", "mae")
UNITS = {"ct": {"psnr": "dB", "ssim": "1", "mae": "HU"}, "mr": {"psnr": "dB", "ssim": "1", "mae": "normalised MR units"}}
DATA_RANGE = {"ct": CT_HU_MAX - CT_HU_MIN, "mr": 1.0}
PREVIEW_GAP = 4
DIFFERENCE_WINDOW_SHARE = 0.25  # the difference row maps [0, 25 % of the data range] to black..white


@dataclass(frozen=True)
class DecodeOptions:
    """
    The decode settings of the bundle (ids of ``inference.json``), planned per latent by ``decode.plan_decode``.

    Attributes
    ----------
    roi_size
        ``autoencoder_sliding_window_infer_size`` (latent voxels) or ``None`` (planned).
    overlap
        ``autoencoder_sliding_window_infer_overlap``.
    num_splits
        ``autoencoder_tp_num_splits`` or ``None`` (planned).
    memory_budget_gb
        ``memory_budget_gb`` or ``None`` (what the device has free).
    """

    roi_size: Sequence[int] | int | None = None
    overlap: float = DEFAULT_OVERLAP
    num_splits: int | None = None
    memory_budget_gb: float | None = None

    def plan(self, latent_shape: Sequence[int], device: torch.device, dim_split: int) -> DecodePlan:
        """The decode plan of one latent."""
        return plan_decode(
            latent_shape, device, self.roi_size, self.overlap, self.num_splits, self.memory_budget_gb, dim_split=dim_split
        )


def to_evaluation_units(image: torch.Tensor, intensity: str, reconstruction: bool) -> torch.Tensor:
    """
    An autoencoder-space image ([0, 1]) in the evaluation units: CT HU (a reconstruction clipped to [0, 1]
    first, i.e. ``quality.to_ct_hu``), MR unchanged.
    """
    if intensity == "mr":
        return image
    return to_ct_hu(image) if reconstruction else image * (CT_HU_MAX - CT_HU_MIN) + CT_HU_MIN


def reconstruction_metrics(original: torch.Tensor, reconstruction: torch.Tensor, data_range: float) -> dict[str, float]:
    """PSNR (``max_val=data_range``), 3D SSIM (``data_range``) and MAE of two ``(X, Y, Z)`` volumes."""
    pred, target = reconstruction.float()[None, None], original.float()[None, None]
    return {
        "psnr": float(PSNRMetric(max_val=data_range)(pred, target).mean()),
        "ssim": float(SSIMMetric(spatial_dims=3, data_range=data_range)(pred, target).mean()),
        "mae": float(MAEMetric()(pred, target).mean()),
    }


def _preview(original: np.ndarray, reconstruction: np.ndarray, spacing: Sequence[float], intensity: str) -> np.ndarray:
    """Rows input / reconstruction / |difference|, each axial | coronal | sagittal (radiological views)."""
    window = (CT_HU_MIN, CT_HU_MAX) if intensity == "ct" else None
    difference = np.abs(reconstruction - original)
    rows = [
        orthogonal_views(original, None, spacing=spacing, window=window),
        orthogonal_views(reconstruction, None, spacing=spacing, window=window),
        orthogonal_views(difference, None, spacing=spacing, window=(0.0, DIFFERENCE_WINDOW_SHARE * DATA_RANGE[intensity])),
    ]
    strips = []
    for views in rows:
        panels = [views["axial"], views["coronal"], views["sagittal"]]
        height = max(p.shape[0] for p in panels)
        strip = np.zeros((height, sum(p.shape[1] for p in panels) + PREVIEW_GAP * 2, 3), dtype=np.uint8)
        column = 0
        for panel in panels:
            strip[: panel.shape[0], column : column + panel.shape[1]] = panel
            column += panel.shape[1] + PREVIEW_GAP
        strips.append(strip)
    width = max(s.shape[1] for s in strips)
    canvas = np.zeros((sum(s.shape[0] for s in strips) + PREVIEW_GAP * 2, width, 3), dtype=np.uint8)
    row = 0
    for strip in strips:
        canvas[row : row + strip.shape[0], : strip.shape[1]] = strip
        row += strip.shape[0] + PREVIEW_GAP
    return canvas


def _write_nifti(volume: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    return atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp), suffix=".nii.gz")


class AutoencoderReconstruction:
    """
    Encode-decode every volume of a datalist and report PSNR, SSIM and MAE (module docstring).

    Parameters
    ----------
    autoencoder
        the trained ``AutoencoderKlMaisi`` (DDP wrappers are unwrapped), weights loaded.
    transform
        loads a datalist item: ``image`` as a ``(1, X, Y, Z)`` MetaTensor on the autoencoder's [0, 1] scale.
    intensity
        ``"ct"`` or ``"mr"`` (``evaluation_intensity``).
    device
        where encoder, decoder and metrics run.
    decode_options
        the decode settings.
    encoder_sliding_window_size
        encode window by window above this size (image voxels, multiples of 4); ``None``: in one pass.
    encoder_sliding_window_overlap
        overlap of the encoding windows.
    num_worst_cases
        previews of this many lowest-PSNR cases.
    write_reconstructions
        also write ``reconstructions/case_<i>_{original,reconstruction}.nii.gz`` (float32, evaluation units).
    report_settings
        extra settings copied into the report.
    progress
        a progress bar over the cases.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        transform: Any,
        intensity: str,
        device: torch.device | str,
        decode_options: DecodeOptions,
        encoder_sliding_window_size: Sequence[int] | None = None,
        encoder_sliding_window_overlap: float = 0.4,
        num_worst_cases: int = 3,
        write_reconstructions: bool = False,
        report_settings: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if intensity not in INTENSITIES:
            raise ValueError(f"evaluation_intensity={intensity!r} is not allowed; choose one of {list(INTENSITIES)}.")
        if isinstance(num_worst_cases, bool) or not isinstance(num_worst_cases, int) or num_worst_cases < 0:
            raise ValueError(f"num_worst_cases={num_worst_cases!r} is not allowed; it must be an integer >= 0.")
        self.autoencoder = unwrap_module(autoencoder)
        self.transform = transform
        self.intensity = intensity
        self.device = torch.device(device)
        self.decode_options = decode_options
        self.encoder_window = encoder_sliding_window_size
        self.encoder_overlap = encoder_sliding_window_overlap
        self.num_worst_cases = num_worst_cases
        self.write_reconstructions = bool(write_reconstructions)
        self.report_settings = dict(report_settings or {})
        self.progress = progress

    def reconstruct(self, image: torch.Tensor) -> tuple[torch.Tensor, DecodePlan]:
        """Encode-decode a ``(1, X, Y, Z)`` image; returns the ``(X, Y, Z)`` reconstruction and the decode plan."""
        spatial = tuple(int(s) for s in image.shape[1:])
        padding = [(0, -s % LATENT_DOWNSAMPLE) for s in spatial]
        padded = torch.nn.functional.pad(torch.as_tensor(image, dtype=torch.float32), [p for pair in reversed(padding) for p in pair])
        latent = encode_posterior_mean(self.autoencoder, padded[None].to(self.device), self.encoder_window, self.encoder_overlap)
        splits = get_autoencoder_splits(self.autoencoder)
        plan = self.decode_options.plan(latent.shape, self.device, 1 if splits is None else splits[1])
        decoded = decode_latent(LatentDecoder(self.autoencoder), latent, plan, progress=False)
        return decoded[0, 0, : spatial[0], : spatial[1], : spatial[2]].to(self.device), plan

    def evaluate_case(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any]:
        """Metrics of one datalist item, with the original and reconstruction (evaluation units) and its affine."""
        try:
            image = self.transform(dict(item))["image"]
        except Exception as error:  # readers raise many types for bad files
            raise ValueError(f"image '{item['image']}' cannot be loaded: {error}") from error
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"image '{item['image']}' has shape {tuple(image.shape)} after loading; the autoencoder needs one channel.")
        start = time.perf_counter()
        reconstruction, plan = self.reconstruct(image)
        original = to_evaluation_units(torch.as_tensor(image[0], dtype=torch.float32).to(self.device), self.intensity, False)
        reconstruction = to_evaluation_units(reconstruction.float(), self.intensity, True)
        case = {
            "image": str(item["image"]),
            **reconstruction_metrics(original, reconstruction, DATA_RANGE[self.intensity]),
            "shape": list(original.shape),
            "spacing": [float(s) for s in image.pixdim],
            "decode_plan": plan.describe(),
            "seconds": time.perf_counter() - start,
        }
        return case, original.cpu(), reconstruction.cpu(), image.affine

    @torch.no_grad()
    def __call__(self, items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict[str, Any]:
        """Evaluate ``items``; write the report, the worst-case previews and optionally the volumes."""
        output_dir = Path(output_dir)
        self.autoencoder.to(self.device).eval()
        cases: list[dict[str, Any]] = []
        previews: dict[int, np.ndarray] = {}
        for index, item in enumerate(tqdm(items, desc="reconstructing", unit="volume", disable=not self.progress)):
            case, original, reconstruction, affine = self.evaluate_case(item)
            cases.append(case)
            if self.write_reconstructions:
                for name, volume in (("original", original), ("reconstruction", reconstruction)):
                    path = output_dir / "reconstructions" / f"case_{index:04d}_{name}.nii.gz"
                    case[name] = str(_write_nifti(volume.numpy(), np.asarray(affine, dtype=np.float64), path))
            if self.num_worst_cases:  # keep the previews of the worst cases so far
                previews[index] = _preview(original.numpy(), reconstruction.numpy(), case["spacing"], self.intensity)
                keep = set(worst_case_indices(cases, "psnr", self.num_worst_cases))
                previews = {i: p for i, p in previews.items() if i in keep}
            logger.info("%s: PSNR %.2f dB, SSIM %.4f, MAE %.4g", case["image"], case["psnr"], case["ssim"], case["mae"])
        worst = worst_case_indices(cases, "psnr", self.num_worst_cases)
        for position, index in enumerate(worst):
            path = output_dir / f"worst_{position + 1:02d}_case_{index:04d}.png"
            picture = Image.fromarray(previews[index])
            cases[index]["preview"] = str(atomic_write(path, lambda tmp, p=picture: p.save(tmp, format="PNG"), suffix=".png"))
        settings = {"intensity": self.intensity, "data_range": DATA_RANGE[self.intensity], **self.report_settings}
        report = reconstruction_report(cases, METRICS, UNITS[self.intensity], settings, "psnr", worst)
        write_json_report(output_dir / REPORT_NAME, report)
        logger.info("reconstruction of %d volumes, mean: %s", len(cases), report["mean"])
        return report
