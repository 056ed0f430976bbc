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
The settings of MR generation (``maisi_mr_generative``): every user-facing id checked before any weight loads.

:class:`MRGenerationSettings` is the ``settings`` component of ``configs/inference.json``: version, geometry
(allowed MR shapes, spacing, field of view), modality (an MR name or code), guidance, decode knobs, outputs,
and per request an optional user label map for image-from-mask generation (loaded, resampled and mapped into
the ControlNet's 8-bit range here, so an unusable mask fails in seconds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from monai.data import MetaTensor
from tqdm import tqdm

from .label_io import load_label_file, resample_mask
from .labels import load_label_dict, remap_mr_labels_for_controlnet
from .mask_checks import MaskRequest, check_user_mask, load_organ_volume_reference, raise_for_refusals, summarize_mask
from .modality import load_modality_mapping, resolve_modality
from .settings import (
    GenerationSettings,
    RequestBase,
    RequiredFiles,
    check_bool,
    check_decode_settings,
    check_run_ids,
    in_row,
    request_id_of,
    request_rows,
    row_value,
)
from .value_checks import check_cfg_guidance_scale, check_controlnet_label_mapping, check_num_steps, check_version, float_triple, int_triple
from .writers import check_output_ext

logger = logging.getLogger(__name__)

__all__ = [
    "MR_MAX_FIELD_OF_VIEW_MM",
    "MR_OUTPUT_SIZES",
    "MR_SPACING_RANGE",
    "MR_VERSIONS",
    "MRGenerationSettings",
    "MRRequest",
    "check_field_of_view_mr",
    "check_output_size_mr",
    "check_spacing_mr",
    "load_mr_mask",
]

# MR geometry (NV ``check_input_mr``): z selects the allowed (x, y, z) shapes.
MR_OUTPUT_SIZES = MappingProxyType(
    {
        128: ((128, 128, 128), (256, 256, 128), (384, 384, 128), (512, 512, 128)),
        256: ((128, 256, 256), (256, 128, 256), (256, 256, 256)),
    }
)
MR_SPACING_RANGE = (0.4, 5.0)  # mm, inclusive, every axis
# Largest MR field of view per axis (output_size * spacing): MR scanners image at most about 50 cm per axis,
# and the published recommended MR fields of view span 90-380 mm; 512 keeps "512 voxels at 1 mm" allowed.
# This limit is this collection's choice, not a published value.
MR_MAX_FIELD_OF_VIEW_MM = 512.0
MR_VERSIONS = ("rflow-mr", "rflow-mr-brain")
DEFAULT_STEPS = 30
DEFAULT_CFG_SCALE = MappingProxyType({"rflow-mr": 15.0, "rflow-mr-brain": 2.0})
MAX_INFERENCE_STEPS = 1000
MANIFEST_FIELDS = ("id", "output_size", "spacing", "modality", "mask_path", "num_samples", "seed")


def check_output_size_mr(output_size: Any) -> tuple[int, int, int]:
    """
    Check an MR ``output_size``: z = 128 needs x = y in {128, 256, 384, 512}; z = 256 needs (x, y) one of
    (128, 256), (256, 128), (256, 256); other z are not supported (``MR_OUTPUT_SIZES``).
    """
    size = int_triple("output_size", output_size)
    allowed = "; ".join(f"z={z}: {[list(s) for s in shapes]}" for z, shapes in MR_OUTPUT_SIZES.items())
    if size[2] not in MR_OUTPUT_SIZES:
        raise ValueError(f"output_size={output_size!r} is not allowed: z={size[2]} is not supported for MR; allowed: {allowed}.")
    if size not in MR_OUTPUT_SIZES[size[2]]:
        raise ValueError(
            f"output_size={output_size!r} is not allowed: x/y={list(size[:2])} is not supported with z={size[2]}; allowed: {allowed}."
        )
    return size


def check_spacing_mr(spacing: Any) -> tuple[float, float, float]:
    """Check an MR ``spacing`` (mm): every axis in ``MR_SPACING_RANGE``; anisotropic x/y is allowed."""
    values = float_triple("spacing", spacing)
    low, high = MR_SPACING_RANGE
    for axis, value in zip("xyz", values):
        if not low <= value <= high:
            raise ValueError(
                f"spacing={spacing!r} is not allowed: {axis}={value} mm is out of range; allowed: every axis in [{low}, {high}] mm."
            )
    return values


def check_field_of_view_mr(output_size: Any, spacing: Any) -> tuple[float, float, float]:
    """Check an MR field of view (``output_size * spacing``, mm): at most ``MR_MAX_FIELD_OF_VIEW_MM`` per axis."""
    size = int_triple("output_size", output_size)
    values = float_triple("spacing", spacing)
    fov = tuple(float(n * s) for n, s in zip(size, values))
    for axis, extent in zip("xyz", fov):
        if extent > MR_MAX_FIELD_OF_VIEW_MM:
            raise ValueError(
                f"spacing={spacing!r} with output_size={output_size!r} is not allowed: the {axis} field of view is "
                f"{extent:g} mm, more than the {MR_MAX_FIELD_OF_VIEW_MM:g} mm an MR scan covers; reduce the spacing "
                "or the size (recommended fields of view per anatomy are in docs/README.md)."
            )
    return fov  # type: ignore[return-value]


@dataclass(frozen=True)
class MRRequest(RequestBase):
    """
    One MR generation request.

    Attributes
    ----------
    modality
        the MR modality code (>= 8).
    mask_path
        a user label map for image-from-mask generation, ``None`` for image-only.
    """

    modality: int = 9
    mask_path: str | None = None


@dataclass(frozen=True)
class MRMask:
    """
    A user label map for MR image-from-mask generation, at the requested geometry.

    Attributes
    ----------
    source
        where it came from (``"user:<path>"``).
    labels
        (1, X, Y, Z) raw label ids (e.g. BraTS 401-403), as written next to the image.
    controlnet_ids
        the same map with ids above 255 mapped into the ControlNet range (``labels.remap_mr_labels_for_controlnet``).
    """

    source: str
    labels: torch.Tensor
    controlnet_ids: torch.Tensor


def read_mr_mask(path: Any) -> MetaTensor:
    """
    Read an MR ``mask_path`` as a label map, at its own geometry.

    Raises
    ------
    ValueError
        naming ``mask_path`` (missing file, not a label map).
    """
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        raise ValueError(f"mask_path={str(path)!r} does not exist or is not a file.")
    try:
        return load_label_file(path, "cpu", strict=True)
    except ValueError as error:
        raise ValueError(f"mask_path={str(path)!r}: {error}") from error


def encode_mr_mask(
    raw: MetaTensor, path: Any, output_size: Sequence[int], spacing: Sequence[float], mapping: Mapping[int, int]
) -> MRMask:
    """
    Resample (nearest, pad/crop) the label map ``raw`` of ``mask_path`` to the request and encode it for the ControlNet.

    Raises
    ------
    ValueError
        naming ``mask_path`` (no foreground at the requested geometry) or ``controlnet_label_mapping`` (ids above
        255 without a mapping entry).
    """
    try:
        mask = resample_mask(raw, spacing, output_size)
    except ValueError as error:
        raise ValueError(f"mask_path={str(path)!r}: {error}") from error
    if not bool((mask > 0).any()):
        raise ValueError(
            f"mask_path={str(path)!r} has no foreground label left at output_size={list(output_size)}, "
            f"spacing={list(spacing)} (the field of view misses the labelled region)."
        )
    try:
        encoded = remap_mr_labels_for_controlnet(mask.as_tensor(), mapping)
    except ValueError as error:
        raise ValueError(f"mask_path={str(path)!r}: {error} Add the ids to controlnet_label_mapping.") from error
    return MRMask(source=f"user:{path}", labels=mask.as_tensor(), controlnet_ids=encoded)


def load_mr_mask(path: Any, output_size: Sequence[int], spacing: Sequence[float], mapping: Mapping[int, int]) -> MRMask:
    """Read, check, resample and encode an MR ``mask_path`` (:func:`read_mr_mask`, :func:`encode_mr_mask`)."""
    return encode_mr_mask(read_mr_mask(path), path, output_size, spacing, mapping)


class MRGenerationSettings(GenerationSettings):
    """
    The checked, normalised settings of an MR generation run (the ``settings`` component).

    Every parameter is the config id of the same name (see the bundle's docs/README.md); ``files`` maps the ids
    of the files a run may read to their paths, and the settings keep the ones this run needs (the ControlNet
    only for image-from-mask requests).
    """

    def __init__(
        self,
        *,
        version: Any,
        output_size: Any,
        spacing: Any,
        modality: Any,
        files: Mapping[str, Any],
        modality_mapping_json: Any,
        label_dict_json: Any,
        output_dir: Any,
        num_output_samples: Any = 1,
        random_seed: Any = 0,
        mask_path: Any = None,
        request_manifest: Any = None,
        mask_dir: Any = None,
        controlnet_label_mapping: Any = None,
        zero_outside_mask: Any = False,
        num_inference_steps: Any = None,
        cfg_guidance_scale: Any = None,
        autoencoder_sliding_window_infer_size: Any = None,
        autoencoder_sliding_window_infer_overlap: Any = 0.4,
        autoencoder_tp_num_splits: Any = None,
        memory_budget_gb: Any = None,
        image_output_ext: Any = ".nii.gz",
        overwrite: Any = False,
        mask_check_strict: Any = False,
        progress: Any = True,
        bundle_root: Any = ".",
    ) -> None:
        self.version = check_version(version, MR_VERSIONS, "MR")
        self._check_output_ids(output_dir, overwrite, progress, mask_check_strict, bundle_root)
        self.label_dict = load_label_dict(label_dict_json)
        num_samples, seed = check_run_ids(num_output_samples, random_seed)
        self.modality_mapping = load_modality_mapping(modality_mapping_json)
        self.num_inference_steps = check_num_steps(
            "num_inference_steps", DEFAULT_STEPS if num_inference_steps is None else num_inference_steps, MAX_INFERENCE_STEPS
        )
        self.cfg_guidance_scale = check_cfg_guidance_scale(
            DEFAULT_CFG_SCALE[self.version] if cfg_guidance_scale is None else cfg_guidance_scale
        )
        self.controlnet_label_mapping = check_controlnet_label_mapping(controlnet_label_mapping)
        self.zero_outside_mask = check_bool("zero_outside_mask", zero_outside_mask)
        self.decode = check_decode_settings(
            autoencoder_sliding_window_infer_size, autoencoder_sliding_window_infer_overlap, autoencoder_tp_num_splits, memory_budget_gb
        )
        self.image_output_ext = check_output_ext("image_output_ext", image_output_ext)
        defaults = {"output_size": output_size, "spacing": spacing, "modality": modality, "mask_path": mask_path}
        self._build_requests(*request_rows(request_manifest, mask_dir, mask_path, MANIFEST_FIELDS), defaults, num_samples, seed)
        needed = ["trained_autoencoder_path", "trained_diffusion_path"]
        if any(r.mask_path is not None for r in self.requests):
            needed.append("trained_controlnet_path")
        absent = [k for k in needed if files.get(k) is None]
        if absent:
            raise ValueError(f"{absent[0]}=None: this run reads it (image-from-mask needs trained_controlnet_path).")
        self.files = RequiredFiles({k: files[k] for k in needed}, self.bundle_root)
        self._check_masks()
        self._open_output_dir(self.image_output_ext)

    def _request(self, row: Mapping[str, Any], defaults: Mapping[str, Any], where: str, position: int, count: int, seed: int) -> MRRequest:
        try:
            request_id = request_id_of(row, where, position)
            size = check_output_size_mr(row_value(row, "output_size", defaults["output_size"]))
            spacing = check_spacing_mr(row_value(row, "spacing", defaults["spacing"]))
            check_field_of_view_mr(size, spacing)
            modality = row_value(row, "modality", defaults["modality"])
            if modality is None:
                raise ValueError("modality=None is not allowed: MR generation needs an MR modality name or code, e.g. 'mri_t1' (9).")
            code = resolve_modality(modality, self.modality_mapping, "mr")
            path = row_value(row, "mask_path", defaults["mask_path"])
            return MRRequest(
                request_id=request_id, output_size=size, spacing=spacing, num_samples=count, seed=seed, modality=code,
                mask_path=None if path is None else str(path),
            )
        except ValueError as error:
            raise in_row(where, error) from error

    def _check_masks(self) -> None:
        """Check every user mask (loadable, mappable, the mask checks); keep the findings for the run report."""
        with_masks = [(r, w) for r, w in zip(self.requests, self.request_places) if r.mask_path is not None]
        reference = load_organ_volume_reference() if with_masks else None
        # ids the user maps for the ControlNet are known ids for the mask checks
        known_ids = {**self.label_dict, **{f"controlnet_label_mapping[{s}]": s for s in self.controlnet_label_mapping}}
        for request, where in tqdm(with_masks, desc="checking masks", unit="mask", disable=not self.progress or len(with_masks) < 2):
            try:
                raw = read_mr_mask(request.mask_path)  # read once: encoded here to check it, summarised below
                encode_mr_mask(raw, request.mask_path, request.output_size, request.spacing, self.controlnet_label_mapping)
                findings = check_user_mask(
                    summarize_mask(raw, raw.affine, request.mask_path),
                    MaskRequest(request.spacing, request.output_size, "mr", self.mask_check_strict),
                    known_ids,
                    reference,
                )
                raise_for_refusals(findings)
            except ValueError as error:
                raise in_row(where, error) from error
            self._record_mask_findings(request, where, findings)

    def uses_controlnet(self, request: MRRequest) -> bool:
        """Image-from-mask requests run the ControlNet; image-only requests do not."""
        return request.mask_path is not None

    def load_mask(self, request: MRRequest) -> MRMask | None:
        """The request's mask at its geometry, mapped for the ControlNet; ``None`` for image-only requests."""
        if request.mask_path is None:
            return None
        return load_mr_mask(request.mask_path, request.output_size, request.spacing, self.controlnet_label_mapping)

    def prepare(self) -> None:
        """Before any weight loads: require every needed file (listed with the download command when missing)."""
        self.files.require()

    def output_settings(self) -> dict[str, Any]:
        return {
            **super().output_settings(),
            "num_inference_steps": self.num_inference_steps,
            "cfg_guidance_scale": self.cfg_guidance_scale,
            "controlnet_label_mapping": self.controlnet_label_mapping,
            "zero_outside_mask": self.zero_outside_mask,
        }
