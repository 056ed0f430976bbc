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
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .checkpoint import atomic_write, is_main_process, unwrap_module
from .training_data import load_datalist, select_folds  # the one datalist reader, re-exported for the configs

logger = logging.getLogger(__name__)

__all__ = [
    "LATENT_CHANNELS",
    "LATENT_DOWNSAMPLE",
    "LATENT_SUFFIX",
    "SIDECAR_SUFFIX",
    "LoadLatentd",
    "PosteriorMean",
    "check_divisible_k",
    "check_latent_names",
    "check_latent_shapes",
    "create_embeddings",
    "encode_items",
    "encode_posterior_mean",
    "latent_path_for",
    "load_datalist",
    "make_sidecar",
    "modality_code",
    "read_latent",
    "read_sidecar",
    "require_file",
    "select_folds",
    "shard_items",
    "sidecar_path",
    "write_latent",
    "write_latent_datalist",
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


def modality_code(modality: Any, modality_mapping_json: str | os.PathLike) -> int:
    """
    The integer code of the ``modality`` config id (a name such as ``"ct"``/``"mri_t1"`` or a code) for sidecars.

    CT or MR is decided by the value itself, so one config serves both bundles.

    Raises
    ------
    ValueError
        unknown name, code 0 ("unknown") or a code missing from ``modality_mapping_json``.
    """
    from .intensity import modality_family
    from .modality import load_modality_mapping, resolve_modality

    mapping = load_modality_mapping(modality_mapping_json)
    return resolve_modality(modality, mapping, modality_family(modality, mapping))


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


def _write_json(path: Path, content: Any) -> Path:
    """Write ``content`` as indented JSON, atomically."""

    def write(tmp_name: str) -> None:
        with open(tmp_name, "w") as handle:
            json.dump(content, handle, indent=4)

    return atomic_write(path, write, suffix=".json")


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

    atomic_write(path, write_nifti, suffix=".nii.gz")
    _write_json(sidecar_path(path), checked)
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


# ---------------------------------------------------------------------------------------------------
# datalists
# ---------------------------------------------------------------------------------------------------


def check_latent_shapes(items: Sequence[Mapping[str, Any]], batch_size: int, key: str = "image") -> None:
    """
    Refuse ``batch_size > 1`` when the latents differ in shape (they could not be stacked into a batch).

    Only the NIfTI headers are read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"train_batch_size={batch_size!r} must be an integer >= 1.")
    if batch_size == 1:
        return
    shapes: dict[tuple[int, ...], str] = {}
    for item in items:
        shapes.setdefault(tuple(nib.load(str(item[key])).shape), str(item[key]))
    if len(shapes) > 1:
        listing = "; ".join(f"{shape} e.g. '{file}'" for shape, file in shapes.items())
        raise ValueError(
            f"train_batch_size={batch_size} needs latents of one shape, but they differ: {listing}. "
            "Use train_batch_size=1 or resample the images to one shape (scripts.data_prep resample)."
        )


# ---------------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------------


class PosteriorMean(torch.nn.Module):
    """Wrap an autoencoder so that calling it returns the posterior mean ``z_mu`` of its encoder."""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        z_mu, _ = self.autoencoder.encode(image)
        return z_mu


def _check_window(roi_size: Sequence[int] | None) -> tuple[int, int, int] | None:
    if roi_size is None:
        return None
    values = list(roi_size)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, Integral) or v <= 0 or v % LATENT_DOWNSAMPLE for v in values):
        raise ValueError(
            f"embedding_sliding_window_size={roi_size!r} must be null or three positive multiples of "
            f"{LATENT_DOWNSAMPLE} (e.g. [320, 320, 160])."
        )
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@torch.no_grad()
def encode_posterior_mean(
    autoencoder: torch.nn.Module,
    image: torch.Tensor,
    sliding_window_size: Sequence[int] | None = None,
    overlap: float = 0.4,
) -> torch.Tensor:
    """
    Encode ``(1, C, X, Y, Z)`` image(s) to the posterior mean ``(1, 4, X/4, Y/4, Z/4)``.

    When ``sliding_window_size`` is given and the image is larger than it along any axis, the image is
    encoded window by window (Gaussian-blended) so that memory stays bounded; otherwise in one pass.
    """
    from monai.inferers import sliding_window_inference

    from .decode import get_autoencoder_splits, set_autoencoder_splits, splits_compatible

    model = PosteriorMean(autoencoder)
    roi = _check_window(sliding_window_size)
    spatial = tuple(int(s) for s in image.shape[2:])
    if any(s % LATENT_DOWNSAMPLE for s in spatial):
        raise ValueError(f"image shape {spatial} must be divisible by {LATENT_DOWNSAMPLE} to encode (pad it first).")
    whole = roi is None or all(s <= r for s, r in zip(spatial, roi))
    window = spatial if whole else tuple(min(s, r) for s, r in zip(spatial, roi))
    splits = get_autoencoder_splits(autoencoder)
    if splits is not None and not splits_compatible(window[splits[1]] // LATENT_DOWNSAMPLE, splits[0]):
        logger.info("encoding %s without tensor splits (num_splits=%d does not divide it)", window, splits[0])
        set_autoencoder_splits(autoencoder, 1)
    try:
        if whole:
            return model(image)
        return sliding_window_inference(image, list(window), 1, model, overlap=overlap, mode="gaussian", progress=False)
    finally:
        if splits is not None:
            set_autoencoder_splits(autoencoder, splits[0])


def check_divisible_k(k: Any) -> int | list[int]:
    """
    Check ``embedding_divisible_k``: images are padded to multiples of it before encoding.

    A positive multiple of 4 (or three): the latent is 4x smaller, and the diffusion UNet halves it once per
    level after the first, so the published 4-level UNet needs latents divisible by 8, i.e. k = 32.
    """
    values = list(k) if isinstance(k, (list, tuple)) else [k]
    if len(values) not in (1, 3) or any(
        isinstance(v, bool) or not isinstance(v, Integral) or v <= 0 or v % LATENT_DOWNSAMPLE for v in values
    ):
        raise ValueError(f"embedding_divisible_k={k!r} must be a positive multiple of {LATENT_DOWNSAMPLE} (or three), e.g. 32.")
    return k


def require_file(config_id: str, path: str | os.PathLike | None) -> Path:
    """Return ``path`` as a ``Path`` or raise ``ValueError`` naming ``config_id`` when the file does not exist."""
    if path is None or not Path(path).is_file():
        raise ValueError(f"{config_id}={None if path is None else str(path)!r} does not exist; set {config_id} to the weights file.")
    return Path(path)


def _image_spacing(image: Any) -> list[float]:
    affine = np.asarray(image.affine if hasattr(image, "affine") else np.eye(4), dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def shard_items(items: Sequence[Mapping[str, Any]], rank: int, world_size: int) -> list[Mapping[str, Any]]:
    """
    The items process ``rank`` of ``world_size`` encodes: ``items[rank::world_size]`` (every item exactly once over the ranks).

    Raises
    ------
    ValueError
        ``world_size`` < 1 or ``rank`` outside ``[0, world_size)``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, Integral) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1.")
    if isinstance(rank, bool) or not isinstance(rank, Integral) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an integer in [0, {world_size}).")
    return list(items)[rank::world_size]


def check_latent_names(items: Sequence[Mapping[str, Any]], embedding_dir: str | os.PathLike) -> None:
    """
    Refuse two images that would be encoded to the same ``<case>_emb.nii.gz`` (same file name in different folders).

    Run on all items before any rank encodes, so that no process overwrites another's latent.
    """
    names: dict[Path, str] = {}
    for item in items:
        source, target = str(item["image"]), latent_path_for(item["image"], embedding_dir)
        if target in names:
            raise ValueError(f"images '{names[target]}' and '{source}' would both be encoded to '{target}'; rename one.")
        names[target] = source


def encode_items(
    autoencoder: torch.nn.Module,
    items: Sequence[Mapping[str, Any]],
    transform: Any,
    embedding_dir: str | os.PathLike,
    modality: int,
    device: torch.device | str,
    sliding_window_size: Sequence[int] | None = None,
    overlap: float = 0.4,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """
    Encode every image of ``items`` and write its latent and sidecar (:func:`write_latent`) into ``embedding_dir``.

    Each latent depends on its own image only, so a process encoding a share of the items
    (:func:`shard_items`) writes the same files as one process encoding them all.

    Parameters
    ----------
    autoencoder
        the trained ``AutoencoderKlMaisi`` (DDP wrappers are unwrapped); put in eval mode here.
    items
        datalist items with absolute ``image`` paths (:func:`load_datalist`); optional per-item
        ``modality`` (code), ``top_region_index``/``bottom_region_index`` (one-hots) override the defaults.
    transform
        loads one item and returns ``image`` as a channel-first ``(1, X, Y, Z)`` MetaTensor in [0, 1]
        (intensity mapping done), with its affine; spatial sizes divisible by 4.
    embedding_dir
        folder of the ``<case>_emb.nii.gz`` files and their sidecars.
    modality
        modality code written to sidecars of items without their own ``modality``.
    device
        where the encoder runs.
    sliding_window_size, overlap
        see :func:`encode_posterior_mean`.
    overwrite
        re-encode images whose latent and sidecar already exist (otherwise they are kept: an interrupted
        run continues where it stopped).
    progress
        show a progress bar.

    Returns
    -------
    list[Path]
        the latent files of ``items``, in order.
    """
    from tqdm import tqdm

    encoder = unwrap_module(autoencoder).to(device).eval()
    check_latent_names(items, embedding_dir)
    targets = []
    for item in tqdm(items, desc="encoding images", unit="image", disable=not progress):
        source = str(item["image"])
        target = latent_path_for(source, embedding_dir)
        targets.append(target)
        if not overwrite and target.is_file() and sidecar_path(target).is_file():
            continue
        try:
            image = transform(dict(item))["image"]
        except Exception as error:
            raise ValueError(f"image '{source}' cannot be loaded: {error}") from error
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(
                f"image '{source}' has shape {tuple(image.shape)} after loading; the autoencoder needs one channel "
                "(split multi-channel images into one file per channel)."
            )
        item_modality = item.get("modality", modality)
        if isinstance(item_modality, str):
            raise ValueError(
                f"the datalist entry of '{source}' has modality={item_modality!r}; it must be an integer code of "
                "modality_mapping.json (e.g. 1 = ct, 9 = mri_t1), as `scripts.data_prep datalist` writes it."
            )
        spacing = _image_spacing(image)
        tensor = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
        latent = encode_posterior_mean(encoder, tensor, sliding_window_size, overlap)
        sidecar = make_sidecar(
            dim=list(image.shape[1:]),
            spacing=spacing,
            modality=item_modality,
            top_region_index=item.get("top_region_index"),
            bottom_region_index=item.get("bottom_region_index"),
        )
        write_latent(target, latent[0], spacing, sidecar)
    return targets


def write_latent_datalist(
    items: Sequence[Mapping[str, Any]], embedding_dir: str | os.PathLike, latent_datalist_path: str | os.PathLike
) -> Path:
    """
    Write the datalist of the latents of ``items`` for diffusion and ControlNet training, once.

    Entries keep each item's order, ``fold`` and ``label`` (absolute path); latent paths are relative to the
    datalist's folder. Under ``torch.distributed`` (``multi_gpu_create_embeddings.json``) every rank waits
    here until all ranks have encoded their share (a barrier), then rank 0 alone writes the file, atomically.

    Parameters
    ----------
    items
        ALL datalist items (not one rank's share).
    embedding_dir
        the folder the latents were written to.
    latent_datalist_path
        the datalist file.

    Returns
    -------
    Path
        ``latent_datalist_path``.
    """
    datalist_path = Path(latent_datalist_path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not is_main_process():
        return datalist_path
    entries = []
    for item in items:
        latent = latent_path_for(item["image"], embedding_dir)
        entry = {"image": os.path.relpath(latent, datalist_path.parent), "fold": int(item.get("fold", 0))}
        if item.get("label") is not None:
            entry["label"] = str(Path(item["label"]).resolve())
        entries.append(entry)
    return _write_json(datalist_path, {"training": entries})


def create_embeddings(
    autoencoder: torch.nn.Module,
    items: Sequence[Mapping[str, Any]],
    transform: Any,
    embedding_dir: str | os.PathLike,
    latent_datalist_path: str | os.PathLike,
    modality: int,
    device: torch.device | str,
    sliding_window_size: Sequence[int] | None = None,
    overlap: float = 0.4,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """
    Encode every image of ``items`` (:func:`encode_items`) and write the latent datalist (:func:`write_latent_datalist`).

    The parameters are those of the two functions; returns ``latent_datalist_path``.
    """
    encode_items(autoencoder, items, transform, embedding_dir, modality, device, sliding_window_size, overlap, overwrite, progress)
    return write_latent_datalist(items, embedding_dir, latent_datalist_path)
