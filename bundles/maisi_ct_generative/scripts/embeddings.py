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
Latent embeddings on disk: the files the diffusion UNet and the ControlNet train on.

A latent is the autoencoder's posterior MEAN for one training image (never a noisy sample: a frozen
``mu + sigma * eps`` puts a floor under the diffusion loss). It is stored as

- ``<case>_emb.nii.gz``: float32, channel-last ``(X', Y', Z', 4)``, affine ``diag(spacing * 4)`` (one
  latent voxel covers 4 x 4 x 4 image voxels), and
- ``<case>_emb.nii.gz.json``, the sidecar: ``dim`` (image shape), ``spacing`` (image spacing, mm),
  ``modality`` (integer code of ``modality_mapping.json``), ``top_region_index`` and
  ``bottom_region_index`` (4-slot one-hots head / chest / abdomen / pelvis, all zeros when unknown).

:class:`LoadLatentd` reads both into a training sample: ``image`` (the latent, channel-first), ``spacing``
(mm, float32, 3), ``modality`` (int64 scalar), ``top_region_index`` / ``bottom_region_index`` (float32, 4).
The x100 conditioning scale of the UNet is applied when the batch is fed to the network, not here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .outputs import _atomic_write

__all__ = [
    "LATENT_CHANNELS",
    "LATENT_DOWNSAMPLE",
    "LATENT_SUFFIX",
    "SIDECAR_SUFFIX",
    "LoadLatentd",
    "latent_path_for",
    "make_sidecar",
    "read_latent",
    "read_sidecar",
    "sidecar_path",
    "write_latent",
]

LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 4  # one latent voxel = 4 image voxels per axis
LATENT_SUFFIX = "_emb.nii.gz"
SIDECAR_SUFFIX = ".json"
_REGION_SLOTS = 4


def sidecar_path(latent_path: str | os.PathLike) -> Path:
    """The sidecar of a latent file: ``<latent_path>.json`` (a path already ending in ``.json`` is kept)."""
    path = Path(latent_path)
    return path if path.name.endswith(SIDECAR_SUFFIX) else path.with_name(path.name + SIDECAR_SUFFIX)


def latent_path_for(image_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/<case>_emb.nii.gz`` for ``image_path`` = ``.../<case>.nii[.gz]`` (or any other extension)."""
    name = Path(image_path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return Path(output_dir) / f"{name}{LATENT_SUFFIX}"


def _one_hot(value: Any, key: str, where: str) -> list[int]:
    if value is None:
        return [0] * _REGION_SLOTS
    values = list(np.asarray(value).reshape(-1).tolist()) if not isinstance(value, list) else value
    if len(values) != _REGION_SLOTS or any(v not in (0, 1) for v in values) or sum(values) > 1:
        raise ValueError(
            f"{key}={value!r} in {where} is not allowed; it must be a 4-slot one-hot list "
            "(head, chest, abdomen, pelvis), e.g. [0, 1, 0, 0], or all zeros when unknown."
        )
    return [int(v) for v in values]


def _spacing(value: Any, where: str) -> list[float]:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError) as error:
        raise ValueError(f"spacing={value!r} in {where} must be three positive numbers (mm).") from error
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing={value!r} in {where} must be three positive finite numbers (mm).")
    return values


def _modality_code(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(
            f"modality={value!r} in {where} is not allowed; it must be an integer code of modality_mapping.json "
            "(e.g. 1 = ct, 9 = mri_t1)."
        )
    return int(value)


def make_sidecar(
    dim: Sequence[int],
    spacing: Sequence[float],
    modality: int,
    top_region_index: Sequence[int] | None = None,
    bottom_region_index: Sequence[int] | None = None,
) -> dict[str, Any]:
    """
    A checked sidecar dictionary (see the module docstring); missing region indices become all zeros.

    Raises
    ------
    ValueError
        a field has the wrong type, length or range; the message names the field and the value.
    """
    where = "the sidecar"
    dims = [int(d) for d in dim]
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise ValueError(f"dim={list(dim)!r} in {where} must be three positive integers (the image shape).")
    return {
        "dim": dims,
        "spacing": _spacing(spacing, where),
        "modality": _modality_code(modality, where),
        "top_region_index": _one_hot(top_region_index, "top_region_index", where),
        "bottom_region_index": _one_hot(bottom_region_index, "bottom_region_index", where),
    }


def write_latent(
    path: str | os.PathLike, latent: torch.Tensor | np.ndarray, spacing: Sequence[float], sidecar: Mapping[str, Any]
) -> Path:
    """
    Write a latent and its sidecar atomically.

    Parameters
    ----------
    path
        the latent file, conventionally ``<case>_emb.nii.gz``; the sidecar goes to ``<path>.json``.
    latent
        ``(4, X', Y', Z')`` or ``(1, 4, X', Y', Z')``, channel-first (the autoencoder's layout).
    spacing
        the IMAGE spacing in mm; the latent's affine is ``diag(spacing * 4)``.
    sidecar
        ``dim``, ``spacing``, ``modality`` and optional region indices (checked by :func:`make_sidecar`).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    array = latent.detach().float().cpu().numpy() if isinstance(latent, torch.Tensor) else np.asarray(latent)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 4 or array.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"the latent for '{path}' must be (4, X, Y, Z), got shape {tuple(array.shape)}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"the latent for '{path}' contains NaN or inf values.")
    checked = make_sidecar(
        sidecar["dim"],
        sidecar["spacing"],
        sidecar["modality"],
        sidecar.get("top_region_index"),
        sidecar.get("bottom_region_index"),
    )
    affine = np.diag([*(s * LATENT_DOWNSAMPLE for s in _spacing(spacing, f"'{path}'")), 1.0])
    channel_last = np.ascontiguousarray(np.moveaxis(array.astype(np.float32), 0, -1))

    def write_nifti(tmp_name: str) -> None:
        image = nib.Nifti1Image(channel_last, affine)
        image.header.set_data_dtype(np.float32)
        image.header.set_xyzt_units("mm")
        nib.save(image, tmp_name)

    def write_json(tmp_name: str) -> None:
        with open(tmp_name, "w") as handle:
            json.dump(checked, handle, indent=4)

    _atomic_write(path, ".nii.gz", write_nifti)
    _atomic_write(sidecar_path(path), SIDECAR_SUFFIX, write_json)
    return path


def read_latent(path: str | os.PathLike) -> torch.Tensor:
    """
    Read a latent written by :func:`write_latent` as a float32 ``(4, X', Y', Z')`` tensor.

    Raises
    ------
    ValueError
        the file is missing, unreadable or not a channel-last 4-channel volume (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latent file '{path}' does not exist.")
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise ValueError(f"latent file '{path}' cannot be read: {error}") from error
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C) NIfTI vector layout
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != LATENT_CHANNELS:
        raise ValueError(f"latent file '{path}' must hold a (X, Y, Z, 4) volume, got shape {data.shape}.")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0)))


def read_sidecar(path: str | os.PathLike, default_modality: int | None = None) -> dict[str, Any]:
    """
    Read and check the sidecar of a latent (``path`` is the latent file or the ``.json`` itself).

    Sidecars written by the published notebook lack ``modality`` and (for rflow) the region indices:
    region indices then default to zeros, and ``modality`` to ``default_modality`` when given.

    Raises
    ------
    ValueError
        the sidecar is missing, not JSON, or a field is invalid; the message names the file.
    """
    json_path = sidecar_path(path)
    if not json_path.is_file():
        raise ValueError(
            f"sidecar '{json_path}' does not exist; create the embeddings with configs/create_embeddings.json "
            "or write it with scripts.data_prep (it needs dim, spacing and modality)."
        )
    try:
        with open(json_path) as handle:
            content = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"sidecar '{json_path}' cannot be read as JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"sidecar '{json_path}' must hold a JSON object, got {type(content).__name__}.")
    missing = [key for key in ("dim", "spacing") if key not in content]
    if "modality" not in content and default_modality is None:
        missing.append("modality")
    if missing:
        raise ValueError(f"sidecar '{json_path}' lacks {missing}; it needs dim, spacing and modality.")
    try:
        return make_sidecar(
            content["dim"],
            content["spacing"],
            content.get("modality", default_modality),
            content.get("top_region_index"),
            content.get("bottom_region_index"),
        )
    except ValueError as error:
        raise ValueError(f"sidecar '{json_path}': {error}") from error


class LoadLatentd(MapTransform):
    """
    Load a latent and its sidecar conditions into a training sample.

    ``data[key]`` is the latent file path; afterwards it is the ``(4, X', Y', Z')`` float32 latent, and the
    sample also holds ``spacing`` (float32, 3, mm), ``modality`` (int64 scalar), ``top_region_index`` and
    ``bottom_region_index`` (float32, 4) and ``dim`` (int64, 3). With several keys, the conditions come from
    the first key's sidecar.

    Parameters
    ----------
    keys
        the key(s) holding latent paths, normally ``"image"``.
    default_modality
        modality code used for sidecars without ``modality`` (published notebook sidecars); ``None`` makes
        such sidecars an error.
    allow_missing_keys
        do not raise when a key is absent.
    """

    def __init__(
        self, keys: KeysCollection = "image", default_modality: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.default_modality = default_modality

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        conditions = None
        for key in self.key_iterator(sample):
            path = sample[key]
            sample[key] = read_latent(path)
            if conditions is None:
                conditions = read_sidecar(path, self.default_modality)
        if conditions is not None:
            sample["spacing"] = torch.tensor(conditions["spacing"], dtype=torch.float32)
            sample["modality"] = torch.tensor(conditions["modality"], dtype=torch.long)
            sample["top_region_index"] = torch.tensor(conditions["top_region_index"], dtype=torch.float32)
            sample["bottom_region_index"] = torch.tensor(conditions["bottom_region_index"], dtype=torch.float32)
            sample["dim"] = torch.tensor(conditions["dim"], dtype=torch.long)
        return sample
