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
PNG previews of generated volumes: the axial, coronal and sagittal views side by side, with a label overlay.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from monai.config import NdarrayOrTensor
from PIL import Image

from .checkpoint import atomic_write
from .constants import BACKGROUND_LABEL, BODY_LABEL, CT_HU_MAX, CT_HU_MIN
from .writers import as_volume, check_spacing

__all__ = ["PREVIEW_GAP", "PREVIEW_MAX_PANEL_SIZE", "label_colors", "orthogonal_views", "preview_png"]

PREVIEW_GAP = 4  # black pixels between the three panels of a preview
PREVIEW_MAX_PANEL_SIZE = 512  # longest side of a preview panel, in pixels
PREVIEW_PERCENTILES = (0.5, 99.5)  # intensity window of previews without a fixed window (MR)
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


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
    sx, sy, sz = check_spacing(spacing)
    volume = as_volume(image, "image")
    label_map = None if labels is None else as_volume(labels, "labels")
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
