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
Writing generated volumes: the output geometry, exact-dtype atomic volume writers and the output extensions.

Geometry
--------
Every volume is an ``(X, Y, Z)`` array in MONAI's ``"RAS"`` orientation, i.e. what
``monai.transforms.Orientation(axcodes="RAS")`` produces: the voxel index grows toward the patient's
Right along axis 0, toward Anterior along axis 1 and toward Superior along axis 2. The world frame is
NIfTI's RAS+ frame (+x = patient right, +y = anterior, +z = superior, in mm), so the affine is simply
``diag(sx, sy, sz, 1)`` (:func:`make_affine`) and ``nibabel.aff2axcodes`` of it is ``('R', 'A', 'S')``.
The origin is 0: the *centre* of voxel ``(0, 0, 0)`` is at world ``(0, 0, 0)``, so voxel ``(i, j, k)`` is at
``(i * sx, j * sy, k * sz)`` mm. ITK-based writers (``.nrrd``, ``.mha``) receive the same RAS
affine and convert it to ITK's LPS convention themselves, so every format describes the same geometry.

Files
-----
Writes are atomic: the data goes to a hidden temporary file in the destination folder (with the
destination's extension, which is how the writers pick the format), is flushed to disk and then renamed
over the destination with ``os.replace``. A failed write removes its temporary file and leaves any
previous file untouched; a reader never sees a half-written file.

Volumes are written with MONAI's image writers (``monai.data.NibabelWriter`` for ``.nii``/``.nii.gz``,
``monai.data.ITKWriter`` for the extensions that need itk; see :data:`OUTPUT_EXT_BACKENDS`) with
no resampling, no intensity scaling and no detour through float: the file's data type is exactly the one
asked for (int16 HU for CT, non-negative int16 for MR, uint8/int16 raw MAISI ids for labels).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import NdarrayOrTensor
from monai.data.image_writer import ITKWriter, NibabelWriter, resolve_writer
from monai.utils import convert_to_numpy

from .checkpoint import atomic_write
from .constants import BACKGROUND_LABEL
from .labels import filter_label_map, label_output_dtype

__all__ = [
    "OUTPUT_EXT_BACKENDS",
    "DICOM_EXT",
    "as_volume",
    "check_output_ext",
    "check_spacing",
    "make_affine",
    "orientation_codes",
    "volume_extension",
    "write_labels",
    "write_volume",
]

# Output extensions a 3D volume can be written with by MONAI's SaveImage, and the package each needs
# (the first one installed wins). PIL formats (.png, .jpg, .tif, ...) are 2D only and are refused. MONAI
# lists NibabelWriter as a fallback for .nrrd, but nibabel cannot write NRRD, so without itk the write
# fails only after generation: these extensions are checked against the installed packages up front.
OUTPUT_EXT_BACKENDS = MappingProxyType(
    {
        ".nii.gz": ("nibabel", "itk"),
        ".nii": ("nibabel", "itk"),
        ".nrrd": ("itk",),
        ".mha": ("itk",),
    }
)
# ".dcm" is written by ``dicom.py`` (a DICOM series per image, a Segmentation per label map), not by a MONAI
# writer: itk's DICOM writer cannot store int16 HU as one 3D file.
DICOM_EXT = ".dcm"
DICOM_BACKENDS = ("pydicom", "highdicom")


# The MONAI writer class of each backend package named in ``OUTPUT_EXT_BACKENDS``.
_WRITER_CLASSES = {"nibabel": NibabelWriter, "itk": ITKWriter}


def _backend_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_output_ext(name: str, ext: Any) -> str:
    """
    Check an output extension: a 3D volume format of MONAI's writers, or ``.dcm``.

    ``.nii.gz`` and ``.nii`` need nibabel (or itk); ``.nrrd`` and ``.mha`` need itk (``OUTPUT_EXT_BACKENDS``);
    ``.dcm`` (a DICOM series per image, a DICOM Segmentation per label map) needs pydicom and highdicom. The
    leading dot is optional and case is ignored, as in ``SaveImage``.

    Parameters
    ----------
    name
        the config id, ``image_output_ext`` or ``label_output_ext``.
    ext
        the extension.

    Returns
    -------
    str
        The extension, lower-case with its leading dot.
    """
    key = ext.strip().lower() if isinstance(ext, str) else None
    if key and not key.startswith("."):
        key = f".{key}"
    choices = {**{e: " or ".join(m) for e, m in OUTPUT_EXT_BACKENDS.items()}, DICOM_EXT: " and ".join(DICOM_BACKENDS)}
    if key not in choices:
        raise ValueError(f"{name}={ext!r} is not allowed; allowed 3D image extensions (with the package each needs): {choices}.")
    if key == DICOM_EXT:
        missing = [m for m in DICOM_BACKENDS if not _backend_available(m)]
        if missing:
            raise ValueError(f"{name}={ext!r} needs {' and '.join(missing)}, which is not installed; pip install {' '.join(missing)}.")
        return key
    backends = OUTPUT_EXT_BACKENDS[key]
    if not any(_backend_available(module) for module in backends):
        usable = [e for e, modules in OUTPUT_EXT_BACKENDS.items() if any(_backend_available(m) for m in modules)]
        raise ValueError(
            f"{name}={ext!r} needs the {' or '.join(repr(m) for m in backends)} package, which is not installed; "
            f"install it (pip install {backends[0]}) or use one of {usable}."
        )
    return key


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def check_spacing(spacing: Any) -> tuple[float, float, float]:
    """Three positive finite numbers (mm), else a ``ValueError``."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as error:
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing!r}.") from error
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive finite numbers (mm), got {spacing!r}.")
    return values  # type: ignore[return-value]


def make_affine(spacing: Sequence[float]) -> np.ndarray:
    """
    The voxel-to-world affine of an output volume: ``diag(sx, sy, sz, 1)``, origin 0.

    The array axes are RAS (index grows toward patient right, anterior, superior) and the world frame is
    NIfTI's RAS+, so the affine has a positive diagonal and no translation: the centre of voxel ``(i, j, k)``
    is at ``(i * sx, j * sy, k * sz)`` mm.

    Parameters
    ----------
    spacing
        Voxel size ``(sx, sy, sz)`` in mm.

    Returns
    -------
    numpy.ndarray
        4x4 float64 affine.

    Raises
    ------
    ValueError
        If ``spacing`` is not three positive finite numbers.
    """
    return np.diag([*check_spacing(spacing), 1.0]).astype(np.float64)


def orientation_codes(affine: NdarrayOrTensor) -> tuple[str, str, str]:
    """
    The anatomical direction toward which each array axis points, e.g. ``('R', 'A', 'S')``.

    ``nibabel.aff2axcodes`` in NIfTI's RAS+ world: ``'R'`` means the index along that axis grows toward the
    patient's right (``'L'`` toward the left, ``'A'``/``'P'`` anterior/posterior, ``'S'``/``'I'``
    superior/inferior). :func:`make_affine` always gives ``('R', 'A', 'S')``.

    Parameters
    ----------
    affine
        4x4 voxel-to-world affine.

    Returns
    -------
    tuple[str, str, str]
        One code per array axis.
    """
    return tuple(nib.aff2axcodes(np.asarray(convert_to_numpy(affine), dtype=np.float64)))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------------------------------


def volume_extension(path: str | os.PathLike, config_id: str = "output_ext") -> str:
    """
    The volume extension of ``path`` (``".nii.gz"``, ``".nii"``, ``".nrrd"`` or ``".mha"``),
    checked against the installed writer packages.

    Parameters
    ----------
    path
        Destination file.
    config_id
        Config id named in the error message (e.g. ``"image_output_ext"``).

    Returns
    -------
    str
        The lower-case extension with its leading dot.

    Raises
    ------
    ValueError
        If the extension is not a 3D volume format, or its writer package (itk) is not installed; the
        message names ``config_id``, the extension and what is allowed.
    """
    name = Path(path).name.lower()
    matches = [ext for ext in OUTPUT_EXT_BACKENDS if name.endswith(ext)]
    ext = max(matches, key=len) if matches else "".join(Path(name).suffixes[-1:])
    ext = check_output_ext(config_id, ext)
    if ext == DICOM_EXT:
        raise ValueError(f"{config_id}: '{path}' is DICOM, which is written as a series (dicom.write_dicom_series), not as one volume file.")
    return ext


def _writer_class(ext: str, config_id: str) -> type:
    """The MONAI writer for ``ext``: MONAI's order of preference among the writers that can write it."""
    allowed = tuple(_WRITER_CLASSES[module] for module in OUTPUT_EXT_BACKENDS[ext])
    for writer in resolve_writer(ext, error_if_not_found=False):
        if writer in allowed:
            return writer
    raise ValueError(  # check_output_ext has normally refused the extension already
        f"{config_id}={ext!r}: MONAI has no usable writer for it (needs {' or '.join(OUTPUT_EXT_BACKENDS[ext])})."
    )


def as_volume(array: Any, what: str) -> np.ndarray:
    """``array`` (numpy, torch or MetaTensor; ``(X, Y, Z)`` or ``(1, X, Y, Z)``) as an ``(X, Y, Z)`` numpy array."""
    volume = convert_to_numpy(array.as_tensor() if hasattr(array, "as_tensor") else array)
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[0] == 1:  # (1, X, Y, Z): a single channel
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"{what} must be a 3D (X, Y, Z) array (or (1, X, Y, Z)), got shape {tuple(volume.shape)}.")
    return volume


def _cast_exactly(volume: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """Cast to ``dtype``, refusing values the dtype cannot hold exactly (casting would wrap or truncate)."""
    if volume.dtype == dtype:
        return volume
    if np.issubdtype(dtype, np.integer) and volume.size:
        if np.issubdtype(volume.dtype, np.floating):
            if not bool(np.isfinite(volume).all()) or not bool(np.array_equal(volume, np.round(volume))):
                raise ValueError(f"cannot write '{path}' as {dtype}: it holds non-integer or non-finite values.")
        elif not (np.issubdtype(volume.dtype, np.integer) or volume.dtype == np.bool_):
            raise ValueError(f"cannot write '{path}' as {dtype}: unsupported input dtype {volume.dtype}.")
        info = np.iinfo(dtype)
        low, high = volume.min(), volume.max()
        if low < info.min or high > info.max:
            raise ValueError(
                f"cannot write '{path}' as {dtype}: values span [{low}, {high}], outside [{info.min}, {info.max}]."
            )
    return volume.astype(dtype)


def write_volume(
    array: NdarrayOrTensor,
    path: str | os.PathLike,
    spacing: Sequence[float],
    dtype: Any,
    *,
    config_id: str = "output_ext",
) -> Path:
    """
    Write an ``(X, Y, Z)`` RAS volume atomically with the affine :func:`make_affine` ``(spacing)``.

    The format follows the extension of ``path`` (see :func:`volume_extension`); the writer is MONAI's
    (``NibabelWriter`` for NIfTI, ``ITKWriter`` for itk-only formats). No resampling, no scaling: the
    values are cast once to ``dtype`` (refusing values that would wrap or lose their fraction) and stored
    as ``dtype`` on disk. MONAI's ``set_metadata`` is deliberately not used: even with ``resample=False`` it
    converts the data to float32; the writer's ``affine`` member is set directly instead. NIfTI files also
    get ``mm`` spatial units and their on-disk dtype is verified after writing.

    Parameters
    ----------
    array
        Volume ``(X, Y, Z)`` (or ``(1, X, Y, Z)``), numpy or torch (``MetaTensor`` included).
    path
        Destination file; its folder is created if needed.
    spacing
        Voxel size in mm.
    dtype
        Data type of the file, e.g. ``numpy.int16``.
    config_id
        Config id named if the extension is refused (e.g. ``"image_output_ext"``).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        Bad extension or missing writer package (naming ``config_id``), bad spacing or shape, or values
        that ``dtype`` cannot hold.
    """
    path = Path(path)
    ext = volume_extension(path, config_id)
    affine = make_affine(spacing)
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"cannot write '{path}': dtype must be an integer or floating type, got {dtype}.")
    volume = _cast_exactly(as_volume(array, f"the volume for '{path}'"), dtype, path)
    writer_class = _writer_class(ext, config_id)

    def write(tmp_name: str) -> None:
        writer = writer_class(output_dtype=dtype)
        writer.set_data_array(volume, channel_dim=None, squeeze_end_dims=True)
        if writer.data_obj.shape != volume.shape:  # keep singleton spatial axes: always a 3D file
            writer.data_obj = np.reshape(writer.data_obj, volume.shape)
        writer.affine = affine  # instead of set_metadata, which would resample through float32
        if writer_class is NibabelWriter:
            header = nib.Nifti1Header()
            header.set_data_dtype(dtype)
            header.set_xyzt_units("mm")
            writer.write(tmp_name, verbose=False, header=header)
            written = nib.load(tmp_name).get_data_dtype()
            if written != dtype:
                raise RuntimeError(f"'{path}': the writer stored {written}, not {dtype}.")
        else:
            writer.write(tmp_name, verbose=False)

    return atomic_write(path, write, suffix=ext)


def write_labels(
    labels: NdarrayOrTensor,
    path: str | os.PathLike,
    spacing: Sequence[float],
    *,
    keep_ids: Iterable[int] | None = None,
    config_id: str = "label_output_ext",
) -> Path:
    """
    Write a MAISI label map with its raw ids (never renumbered) in the smallest integer dtype that holds them.

    The dtype is ``labels.label_output_dtype(max id)``: uint8 when every id is <= 255, else int16.

    Parameters
    ----------
    labels
        Label map ``(X, Y, Z)`` of non-negative integer ids.
    path, spacing, config_id
        As in :func:`write_volume`.
    keep_ids
        If given, ids not listed become background first (``labels.filter_label_map``).

    Returns
    -------
    Path
        ``path``.
    """
    volume = as_volume(labels, f"the label map for '{path}'")
    if keep_ids is not None:
        volume = filter_label_map(volume, keep_ids)
    if volume.size and volume.min() < 0:
        raise ValueError(f"cannot write '{path}': label ids must be non-negative, found {volume.min()}.")
    max_id = int(volume.max()) if volume.size else BACKGROUND_LABEL
    return write_volume(volume, path, spacing, label_output_dtype(max_id), config_id=config_id)
