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
What a MAISI generation run writes: image and label volumes, a PNG preview per sample, a JSON run report.

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
``monai.data.ITKWriter`` for the extensions that need itk; see ``validation.OUTPUT_EXT_BACKENDS``) with
no resampling, no intensity scaling and no detour through float: the file's data type is exactly the one
asked for (int16 HU for CT, non-negative int16 for MR, uint8/int16 raw MAISI ids for labels).
"""

from __future__ import annotations

import colorsys
import dataclasses
import datetime
import enum
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data.image_writer import ITKWriter, NibabelWriter, resolve_writer
from monai.utils import convert_to_numpy
from PIL import Image

from .checkpoint import atomic_write
from .constants import BACKGROUND_LABEL, BODY_LABEL, CT_HU_MAX, CT_HU_MIN
from .labels import filter_label_map, label_output_dtype
from .quality import QualityReport
from .validation import OUTPUT_EXT_BACKENDS, check_output_ext

__all__ = [
    "PREVIEW_GAP",
    "PREVIEW_MAX_PANEL_SIZE",
    "REPORT_FORMAT_VERSION",
    "RunReport",
    "jsonable",
    "label_colors",
    "load_run_report",
    "make_affine",
    "orientation_codes",
    "orthogonal_views",
    "preview_png",
    "quality_report_dict",
    "sample_filenames",
    "software_versions",
    "volume_extension",
    "write_labels",
    "write_run_report",
    "write_volume",
]

PREVIEW_GAP = 4  # black pixels between the three panels of a preview
PREVIEW_MAX_PANEL_SIZE = 512  # longest side of a preview panel, in pixels
PREVIEW_PERCENTILES = (0.5, 99.5)  # intensity window of previews without a fixed window (MR)
REPORT_FORMAT_VERSION = 1

# The MONAI writer class of each backend package named in ``validation.OUTPUT_EXT_BACKENDS``.
_WRITER_CLASSES = {"nibabel": NibabelWriter, "itk": ITKWriter}
_NIFTI_EXTS = (".nii", ".nii.gz")
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def _check_spacing(spacing: Any) -> tuple[float, float, float]:
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
    return np.diag([*_check_spacing(spacing), 1.0]).astype(np.float64)


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
    return check_output_ext(config_id, ext)


def _writer_class(ext: str, config_id: str) -> type:
    """The MONAI writer for ``ext``: MONAI's order of preference among the writers that can write it."""
    allowed = tuple(_WRITER_CLASSES[module] for module in OUTPUT_EXT_BACKENDS[ext])
    for writer in resolve_writer(ext, error_if_not_found=False):
        if writer in allowed:
            return writer
    raise ValueError(  # check_output_ext has normally refused the extension already
        f"{config_id}={ext!r}: MONAI has no usable writer for it (needs {' or '.join(OUTPUT_EXT_BACKENDS[ext])})."
    )


def _as_volume(array: Any, what: str) -> np.ndarray:
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
    volume = _cast_exactly(_as_volume(array, f"the volume for '{path}'"), dtype, path)
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
    volume = _as_volume(labels, f"the label map for '{path}'")
    if keep_ids is not None:
        volume = filter_label_map(volume, keep_ids)
    if volume.size and volume.min() < 0:
        raise ValueError(f"cannot write '{path}': label ids must be non-negative, found {volume.min()}.")
    max_id = int(volume.max()) if volume.size else BACKGROUND_LABEL
    return write_volume(volume, path, spacing, label_output_dtype(max_id), config_id=config_id)


# ----------------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------------


def sample_filenames(
    output_dir: str | os.PathLike,
    index: int,
    seed: int,
    image_ext: str,
    label_ext: str,
    prefix: str = "sample",
) -> dict[str, Path]:
    """
    The predictable file names of one sample.

    ``<prefix>_<index:04d>_seed<seed>_image<image_ext>``, ``..._label<label_ext>`` and ``..._preview.png``,
    e.g. ``sample_0000_seed42_image.nii.gz``.

    Parameters
    ----------
    output_dir
        Folder of the outputs (not created here).
    index
        Sample index, >= 0.
    seed
        The seed that produced the sample.
    image_ext, label_ext
        Volume extensions, checked as the config ids ``image_output_ext`` and ``label_output_ext``
        (``validation.check_output_ext``); the leading dot is optional.
    prefix
        File name prefix, without path separators.

    Returns
    -------
    dict[str, Path]
        ``{"image": ..., "label": ..., "preview": ...}``.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be an integer >= 0, got {index!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if not isinstance(prefix, str) or not prefix or any(sep in prefix for sep in ("/", "\\", os.sep)):
        raise ValueError(f"prefix must be a non-empty file name part without path separators, got {prefix!r}.")
    image_ext = check_output_ext("image_output_ext", image_ext)
    label_ext = check_output_ext("label_output_ext", label_ext)
    stem = Path(output_dir) / f"{prefix}_{int(index):04d}_seed{int(seed)}"
    return {
        "image": stem.with_name(f"{stem.name}_image{image_ext}"),
        "label": stem.with_name(f"{stem.name}_label{label_ext}"),
        "preview": stem.with_name(f"{stem.name}_preview.png"),
    }


# ----------------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------------


def label_colors(label_ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """
    The overlay colour of each label id: fixed, hash-free, the same on every machine.

    Hue follows the golden-ratio sequence ``(id * 0.618...) mod 1`` (neighbouring ids get distant hues);
    saturation cycles through 0.65/0.85/1.0 with ``id mod 3`` and value through 1.0/0.8 with
    ``(id // 3) mod 2``.

    Parameters
    ----------
    label_ids
        Non-negative ids.

    Returns
    -------
    numpy.ndarray
        ``(N, 3)`` uint8 RGB, one row per id.
    """
    ids = [int(i) for i in np.asarray(label_ids if isinstance(label_ids, np.ndarray) else list(label_ids)).ravel()]
    if any(i < 0 for i in ids):
        raise ValueError(f"label ids must be non-negative, got {sorted(i for i in ids if i < 0)}.")
    rows = []
    for label_id in ids:
        hue = (label_id * _GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation = (0.65, 0.85, 1.0)[label_id % 3]
        value = (1.0, 0.8)[(label_id // 3) % 2]
        rows.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(rows, dtype=np.uint8).reshape(len(ids), 3)


def _view_centre(labels: np.ndarray | None, shape: tuple[int, ...], exclude_ids: Sequence[int] = ()) -> tuple[int, int, int]:
    """
    Centre of mass of the labels that are neither background nor ``exclude_ids`` (e.g. the body envelope,
    which would pull the cut away from the organs), else of all non-background labels, else the volume centre.
    """
    if labels is not None:
        foreground = (labels != BACKGROUND_LABEL) & ~np.isin(labels, list(exclude_ids))
        if not foreground.any():
            foreground = labels != BACKGROUND_LABEL
        total = int(np.count_nonzero(foreground))
        if total:
            centre = []
            for axis in range(3):
                others = tuple(a for a in range(3) if a != axis)
                counts = foreground.sum(axis=others, dtype=np.int64)
                centre.append(int(round(float(np.dot(np.arange(shape[axis]), counts)) / total)))
            return tuple(min(max(c, 0), n - 1) for c, n in zip(centre, shape))  # type: ignore[return-value]
    return tuple(n // 2 for n in shape)  # type: ignore[return-value]


def _linear_positions(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(x).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, x - low


def _nearest_positions(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _resize_linear(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = plane.astype(np.float64)
    for axis, n_out in enumerate(shape):
        low, high, weight = _linear_positions(out.shape[axis], n_out)
        weight = weight.reshape((-1, 1) if axis == 0 else (1, -1))
        out = np.take(out, low, axis=axis) * (1 - weight) + np.take(out, high, axis=axis) * weight
    return out


def _resize_nearest(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = (_nearest_positions(n_in, n_out) for n_in, n_out in zip(plane.shape, shape))
    return plane[np.ix_(rows, cols)]


def _window(
    window: Sequence[float] | None, planes: Sequence[np.ndarray], label_planes: Sequence[np.ndarray | None]
) -> tuple[float, float]:
    if window is not None:
        try:
            low, high = (float(w) for w in window)
        except (TypeError, ValueError) as error:
            raise ValueError(f"window must be (low, high) or None, got {window!r}.") from error
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"window must be two finite numbers with low < high, got {window!r}.")
        return low, high
    else:  # percentile window over the displayed voxels (inside the labels when there are any)
        values = np.concatenate([p.ravel() for p in planes]).astype(np.float64)
        if all(lp is not None for lp in label_planes):
            inside = np.concatenate([lp.ravel() != BACKGROUND_LABEL for lp in label_planes])  # type: ignore[union-attr]
            if inside.any():
                values = values[inside]
        values = values[np.isfinite(values)]
        low, high = (float(v) for v in np.percentile(values, PREVIEW_PERCENTILES)) if values.size else (0.0, 1.0)
    return (low, high) if high > low else (low, low + 1.0)  # a constant image: any window works


def orthogonal_views(
    image: NdarrayOrTensor,
    labels: NdarrayOrTensor | None,
    *,
    spacing: Sequence[float],
    window: Sequence[float] | None = (CT_HU_MIN, CT_HU_MAX),
    overlay_alpha: float = 0.35,
    max_panel_size: int = PREVIEW_MAX_PANEL_SIZE,
    exclude_ids: Iterable[int] = (BODY_LABEL,),
) -> dict[str, np.ndarray]:
    """
    The axial, coronal and sagittal RGB panels of a preview, in radiological convention with square pixels.

    Slices pass through the centre of mass of the non-background labels (the volume centre when there
    are none): axial at that ``z``, coronal at that ``y``, sagittal at that ``x``. Display convention
    (radiological; input in RAS, see the module docstring):

    - axial: seen from the feet; patient right on the image's left, anterior at the top;
    - coronal: seen from the front; patient right on the image's left, superior at the top;
    - sagittal: seen from the patient's left; anterior on the image's left, superior at the top.

    Every panel is resampled to one common pixel size in mm (the finest spacing, coarsened only so that
    no side exceeds ``max_panel_size``): the intensities linearly, the labels by nearest neighbour. Grey
    levels map ``window`` to 0..255; each label id other than background and ``exclude_ids`` is blended
    with its :func:`label_colors` colour with weight ``overlay_alpha``.

    Parameters
    ----------
    image
        ``(X, Y, Z)`` volume (CT in HU, MR in its units).
    labels
        Label map of the same shape, or ``None`` for no overlay.
    spacing
        Voxel size in mm.
    window
        ``(low, high)`` grey-level window; ``None`` for the 0.5-99.5 percentile window of the displayed
        voxels inside the labels (MR).
    overlay_alpha
        Overlay opacity in ``[0, 1]``.
    max_panel_size
        Longest side of a panel, in pixels.
    exclude_ids
        Ids not coloured (default: the body envelope, which would tint the whole body).

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{"axial", "coronal", "sagittal"}`` -> ``(rows, cols, 3)`` uint8.
    """
    sx, sy, sz = _check_spacing(spacing)
    volume = _as_volume(image, "image")
    label_map = None if labels is None else _as_volume(labels, "labels")
    if label_map is not None and label_map.shape != volume.shape:
        raise ValueError(f"image and labels must have the same shape, got {volume.shape} and {label_map.shape}.")
    if not 0.0 <= float(overlay_alpha) <= 1.0:
        raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha!r}.")
    if isinstance(max_panel_size, bool) or not isinstance(max_panel_size, (int, np.integer)) or max_panel_size < 1:
        raise ValueError(f"max_panel_size must be an integer >= 1, got {max_panel_size!r}.")
    nx, ny, nz = volume.shape
    extents = (nx * sx, ny * sy, nz * sz)
    pixel_mm = max(min(sx, sy, sz), max(extents) / max_panel_size)
    px, py, pz = (max(1, int(round(extent / pixel_mm))) for extent in extents)
    excluded = [int(i) for i in exclude_ids]
    i, j, k = _view_centre(label_map, volume.shape, excluded)

    def display(plane: np.ndarray) -> np.ndarray:  # (first axis, second axis) -> rows = second axis, both flipped
        return plane.T[::-1, ::-1]

    take = {
        "axial": (lambda v: v[:, :, k], (py, px)),
        "coronal": (lambda v: v[:, j, :], (pz, px)),
        "sagittal": (lambda v: v[i, :, :], (pz, py)),
    }
    planes = {name: display(get(volume)) for name, (get, _) in take.items()}
    label_planes = {name: None if label_map is None else display(get(label_map)) for name, (get, _) in take.items()}
    low, high = _window(window, list(planes.values()), list(label_planes.values()))
    excluded = {int(e) for e in exclude_ids} | {BACKGROUND_LABEL}
    views = {}
    for name, (_, shape) in take.items():
        grey = np.clip((_resize_linear(planes[name], shape) - low) / (high - low), 0.0, 1.0) * 255.0
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if label_planes[name] is not None:
            ids = _resize_nearest(label_planes[name], shape)
            present = [int(v) for v in np.unique(ids) if int(v) not in excluded]
            for label_id, colour in zip(present, label_colors(present)):
                inside = ids == label_id
                rgb[inside] = (1.0 - overlay_alpha) * rgb[inside] + overlay_alpha * colour.astype(np.float64)
        views[name] = np.round(rgb).astype(np.uint8)
    return views


def preview_png(
    image: NdarrayOrTensor,
    labels: NdarrayOrTensor | None,
    path: str | os.PathLike,
    window: Sequence[float] | None = (CT_HU_MIN, CT_HU_MAX),
    overlay_alpha: float = 0.35,
    *,
    spacing: Sequence[float],
    max_panel_size: int = PREVIEW_MAX_PANEL_SIZE,
    exclude_ids: Iterable[int] = (BODY_LABEL,),
) -> Path:
    """
    Write one PNG with the axial, coronal and sagittal views side by side (left to right), atomically.

    See :func:`orthogonal_views` for slice positions, the radiological display convention, square-pixel
    resampling and the overlay. Panels are top-aligned on a black canvas, ``PREVIEW_GAP`` pixels apart:
    width = ``2 * X' + Y' + 2 * PREVIEW_GAP``, height = ``max(Y', Z')``, where ``X'``, ``Y'``, ``Z'`` are the
    extents in mm divided by the common pixel size. The same input always gives the same bytes.

    Parameters
    ----------
    image, labels, window, overlay_alpha, spacing, max_panel_size, exclude_ids
        As in :func:`orthogonal_views`; CT: the default HU window, MR: ``window=None``.
    path
        Destination ``.png`` file.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"preview path must end with .png, got '{path}'.")
    views = orthogonal_views(
        image,
        labels,
        spacing=spacing,
        window=window,
        overlay_alpha=overlay_alpha,
        max_panel_size=max_panel_size,
        exclude_ids=exclude_ids,
    )
    panels = [views["axial"], views["coronal"], views["sagittal"]]
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + PREVIEW_GAP * (len(panels) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    column = 0
    for panel in panels:
        canvas[: panel.shape[0], column : column + panel.shape[1]] = panel
        column += panel.shape[1] + PREVIEW_GAP
    picture = Image.fromarray(canvas, mode="RGB")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", optimize=False, compress_level=6), suffix=".png")


# ----------------------------------------------------------------------------------------------------
# Run report
# ----------------------------------------------------------------------------------------------------


def _is_quality_report(value: Any) -> bool:
    # duck-typed too: a bundle's copy of ``quality`` (or a re-import) has its own QualityReport class
    return isinstance(value, QualityReport) or (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and type(value).__name__ == "QualityReport"
        and all(hasattr(value, a) for a in ("passed", "organs", "skipped", "no_statistics", "attempts"))
    )


def quality_report_dict(report: Any) -> dict[str, Any] | None:
    """
    A quality report as plain JSON data.

    Parameters
    ----------
    report
        ``quality.QualityReport`` (or an already serialised mapping, or ``None`` when no check ran).

    Returns
    -------
    dict | None
        ``{"passed", "attempts", "organs": {organ: {"median", "low", "high", "voxels", "passed"}},
        "failed_organs", "skipped", "no_statistics", "summary"}``; non-finite numbers become ``None``.
    """
    if report is None:
        return None
    if isinstance(report, Mapping):
        return jsonable(report)
    if not _is_quality_report(report):
        raise TypeError(f"expected a QualityReport, got {type(report).__name__}.")
    return jsonable(
        {
            "passed": bool(report.passed),
            "attempts": int(report.attempts),
            "organs": {name: dict(result) for name, result in report.organs.items()},
            "failed_organs": [name for name, result in report.organs.items() if not result.get("passed", False)],
            "skipped": list(report.skipped),
            "no_statistics": list(report.no_statistics),
            "summary": report.summary(),
        }
    )


def jsonable(value: Any) -> Any:
    """
    Plain JSON data from settings, samples and timings.

    NaN and infinities become ``None`` (JSON ``null``); numpy and torch scalars and arrays become numbers and
    lists; paths, devices and dtypes become strings; mapping keys become strings; sets become sorted lists;
    quality reports go through :func:`quality_report_dict`, other dataclasses through their fields; anything
    else is written as ``str(value)``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist() if value.ndim else value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (Path, torch.device, torch.dtype, np.dtype)):
        return str(value)
    if _is_quality_report(value):
        return quality_report_dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=lambda v: (str(type(v)), str(v)))
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def software_versions() -> dict[str, str | None]:
    """Versions of Python, torch (and its CUDA), MONAI, numpy, nibabel and Pillow."""
    import PIL

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "nibabel": nib.__version__,
        "pillow": PIL.__version__,
    }


def _device_description(device: Any) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device)
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError):
        return text
    if parsed.type == "cuda" and torch.cuda.is_available():
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        return f"{text} ({torch.cuda.get_device_name(index)})"
    if parsed.type == "cpu":
        return f"{text} ({platform.machine() or 'unknown machine'}, {os.cpu_count()} logical cores)"
    return text


@dataclasses.dataclass
class RunReport:
    """
    The JSON report of one generation run.

    Attributes
    ----------
    settings
        Every public config id the run used (id -> value).
    samples
        One entry per sample, with at least ``seed`` and ``mask_source`` (``"database:<file> (...)"``,
        ``"generated"`` or ``"user:<path>"``); generation adds ``index``, the output files ``image``,
        ``label``, ``preview`` and ``quality_check`` (a ``QualityReport`` or ``None``).
    timings
        Seconds per phase (e.g. ``mask_s``, ``diffusion_s``, ``decode_s``).
    versions
        :func:`software_versions`.
    device
        The device the run used, with its name.
    created
        UTC time the report was made (ISO 8601).
    format_version
        ``REPORT_FORMAT_VERSION``.
    """

    settings: dict[str, Any]
    samples: list[dict[str, Any]]
    timings: dict[str, float | None]
    versions: dict[str, str | None] = dataclasses.field(default_factory=software_versions)
    device: str = dataclasses.field(default_factory=lambda: _device_description(None))
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    format_version: int = REPORT_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data (non-finite numbers as ``None``)."""
        return {
            "format_version": self.format_version,
            "created": self.created,
            "device": self.device,
            "versions": jsonable(self.versions),
            "settings": jsonable(self.settings),
            "timings": jsonable(self.timings),
            "samples": jsonable(self.samples),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a loaded JSON file)."""
        missing = [key for key in ("settings", "samples", "timings", "versions", "device") if key not in data]
        if missing:
            raise ValueError(f"not a run report: missing {', '.join(missing)}.")
        return cls(
            settings=dict(data["settings"]),
            samples=[dict(s) for s in data["samples"]],
            timings=dict(data["timings"]),
            versions=dict(data["versions"]),
            device=str(data["device"]),
            created=str(data.get("created", "")),
            format_version=int(data.get("format_version", REPORT_FORMAT_VERSION)),
        )

    def to_json(self) -> str:
        """Indented JSON text; strict (no NaN or Infinity literals)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _check_samples(samples: Any) -> list[dict[str, Any]]:
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"samples must be a list of dicts, got {type(samples).__name__}.")
    checked = []
    for position, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise ValueError(f"samples[{position}] must be a dict, got {type(sample).__name__}.")
        missing = [key for key in ("seed", "mask_source") if key not in sample]
        if missing:
            raise ValueError(
                f"samples[{position}] lacks {', '.join(missing)} (every sample records its seed and mask source)."
            )
        checked.append(dict(sample))
    return checked


def write_run_report(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    timings: Mapping[str, float],
    *,
    device: Any = None,
    versions: Mapping[str, str | None] | None = None,
) -> Path:
    """
    Write the run's JSON report atomically (see :class:`RunReport`).

    Parameters
    ----------
    path
        Destination, e.g. ``<output_dir>/generation_report.json``.
    settings
        Every public config id used (id -> value).
    samples
        One dict per sample; each needs ``seed`` and ``mask_source``. ``QualityReport`` values are
        serialised with :func:`quality_report_dict`.
    timings
        Seconds per phase.
    device
        The run's device; ``None`` takes ``settings["device"]`` if present, else CUDA if available, else CPU.
    versions
        Overrides :func:`software_versions` (tests).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``settings``/``timings`` are not mappings or a sample lacks its seed or mask source.
    """
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}.")
    if not isinstance(timings, Mapping):
        raise ValueError(f"timings must be a dict of seconds per phase, got {type(timings).__name__}.")
    if device is None:
        device = settings.get("device")
    report = RunReport(
        settings=dict(settings),
        samples=_check_samples(samples),
        timings={str(k): v for k, v in timings.items()},
        versions=dict(versions) if versions is not None else software_versions(),
        device=_device_description(device),
    )
    text = report.to_json()
    path = Path(path)

    def write(tmp_name: str) -> None:
        with open(tmp_name, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write, suffix=path.suffix)


def load_run_report(path: str | os.PathLike) -> RunReport:
    """Read a report written by :func:`write_run_report`."""
    with open(path, encoding="utf-8") as handle:
        return RunReport.from_dict(json.load(handle))

