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
The body envelope (MAISI label 200) of a CT or MR volume, or around the organs of a label mask.

MAISI's ControlNet was trained on masks where every body voxel without an organ label carries
``constants.BODY_LABEL`` (200); masks from segmentation tools lack it, and the image generated from such a
mask is poor. These functions build the envelope; ``scripts.data_prep body_mask`` runs them on folders.

From an image (``image_envelope``):

1. foreground: CT voxels above ``threshold_hu`` (-500 HU: fat is about -100 HU, air -1000 HU); MR voxels
   above ``threshold_fraction`` of the image's 99th intensity percentile (the MR background is noise
   near 0);
2. holes filled slice by slice (axial slices: lungs, bowel gas and the airway are enclosed in a slice even
   where they reach the outside in 3D);
3. the scanner table and other objects outside the body are removed by an opening: erosion by
   ``opening_mm`` in-plane, the largest connected component of what remains, dilation by ``opening_mm``
   again, kept inside the foreground. Objects not connected to the body go with the component selection;
   objects touching the body through a contact thinner than about ``2 * opening_mm`` (a table, a pad, a
   cable) are cut off there;
4. the largest connected component, holes filled slice by slice again.

From labels only (``labels_envelope``): the labelled voxels are closed in-plane (dilated by ``bridge_mm``
and eroded by ``bridge_mm - margin_mm``, which bridges gaps between organs up to about ``2 * bridge_mm``
and leaves ``margin_mm`` around the outer organs for the unlabelled fat and skin), then holes are filled
slice by slice. It is an approximation of the body outline, which the image shows and the labels do not.

Morphology uses ``scipy.ndimage`` with square in-plane footprints (``minimum_filter``/``maximum_filter``,
separable, cost independent of the radius) and ``label`` + ``bincount`` for the largest component; see
``bench/bench_body_mask.py`` for the comparison with Euclidean distance transforms and with MONAI's
``FillHoles``/``KeepLargestConnectedComponent`` (the latter needs scikit-image, which is not a dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from .constants import BACKGROUND_LABEL, BODY_LABEL

__all__ = [
    "CT_THRESHOLD_HU",
    "FROM_LABELS_BRIDGE_MM",
    "FROM_LABELS_MARGIN_MM",
    "MR_THRESHOLD_FRACTION",
    "OPENING_MM",
    "Envelope",
    "add_body_label",
    "axial_axis",
    "fill_holes_per_slice",
    "image_envelope",
    "labels_envelope",
    "largest_component",
    "voxel_spacing",
]

CT_THRESHOLD_HU = -500.0
MR_THRESHOLD_FRACTION = 0.1  # of the 99th intensity percentile
MR_REFERENCE_PERCENTILE = 99.0
OPENING_MM = 10.0
FROM_LABELS_MARGIN_MM = 15.0  # adult subcutaneous fat is about 5-40 mm thick
FROM_LABELS_BRIDGE_MM = 30.0
_PERCENTILE_SAMPLES = 2_000_000


@dataclass(frozen=True)
class Envelope:
    """
    A body envelope and what was cut away to get it.

    Attributes
    ----------
    mask
        boolean volume, True inside the body.
    removed_voxels
        foreground voxels left outside the envelope (table, objects outside the body); 0 for envelopes built
        from labels.
    threshold
        the intensity threshold used (HU for CT, image units for MR); ``None`` for envelopes from labels.
    """

    mask: np.ndarray
    removed_voxels: int
    threshold: float | None


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis, from the affine's column norms (right for oblique affines)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))  # type: ignore[return-value]


def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to the patient's head-feet direction (the axis that indexes axial slices)."""
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return next(index for index, code in enumerate(codes) if code in ("S", "I"))


def _in_plane_structure(axis: int) -> np.ndarray:
    """4-connectivity within the slices normal to ``axis``, no connection across slices."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    plane = [slice(None)] * 3
    plane[axis] = slice(1, 2)
    structure[tuple(plane)] = ndimage.generate_binary_structure(2, 1).reshape(structure[tuple(plane)].shape)
    return structure


def fill_holes_per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    """
    Fill the holes of every slice normal to ``axis`` (2D holes: regions not connected to the slice border).

    One ``scipy.ndimage.binary_fill_holes`` call with an in-plane structure: the complement's components do
    not connect across slices, so each slice is filled on its own, the first and last slices included.
    """
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool), structure=_in_plane_structure(axis))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (all False when ``mask`` is empty)."""
    components, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _footprint(radius_mm: float, spacing: Sequence[float], axis: int) -> tuple[int, int, int]:
    """Square in-plane footprint of half-width ``radius_mm`` (at least one voxel), one voxel along ``axis``."""
    size = [2 * max(1, int(round(radius_mm / float(s)))) + 1 for s in spacing]
    size[axis] = 1
    return tuple(size)  # type: ignore[return-value]


def _erode(mask: np.ndarray, radius_mm: float, spacing: Sequence[float], axis: int) -> np.ndarray:
    """In-plane erosion; beyond the volume edge counts as background (a table cut by the edge is still eroded)."""
    if radius_mm <= 0:
        return mask.copy()
    return ndimage.minimum_filter(mask.view(np.uint8), size=_footprint(radius_mm, spacing, axis), mode="constant", cval=0).astype(bool)


def _dilate(mask: np.ndarray, radius_mm: float, spacing: Sequence[float], axis: int) -> np.ndarray:
    if radius_mm <= 0:
        return mask.copy()
    return ndimage.maximum_filter(mask.view(np.uint8), size=_footprint(radius_mm, spacing, axis), mode="constant", cval=0).astype(bool)


def _mr_threshold(image: np.ndarray, fraction: float) -> float:
    values = image.ravel()
    step = max(1, values.size // _PERCENTILE_SAMPLES)
    reference = float(np.percentile(values[::step], MR_REFERENCE_PERCENTILE))
    return fraction * reference


def image_envelope(
    image: np.ndarray,
    affine: np.ndarray,
    modality_family: str = "ct",
    threshold: float | None = None,
    opening_mm: float = OPENING_MM,
) -> Envelope:
    """
    The body envelope of a CT or MR volume (see the module docstring for the steps).

    Parameters
    ----------
    image
        3D volume (CT in Hounsfield units; MR in any units with a dark background).
    affine
        its voxel-to-world affine (gives the spacing and the axial axis).
    modality_family
        ``"ct"`` or ``"mr"``.
    threshold
        CT: HU (default ``CT_THRESHOLD_HU``); MR: fraction of the 99th intensity percentile (default
        ``MR_THRESHOLD_FRACTION``).
    opening_mm
        in-plane opening radius that cuts the table off; objects thinner than about twice this are removed
        where they touch the body. ``0`` disables it.

    Returns
    -------
    Envelope
        the envelope, the foreground voxels it left out and the intensity threshold used.

    Raises
    ------
    ValueError
        ``image`` is not 3D, ``modality_family`` is neither ``ct`` nor ``mr``, or nothing is above the
        threshold.
    """
    volume = np.asarray(image, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"the image has shape {volume.shape}; the body envelope needs a 3D volume.")
    if modality_family == "ct":
        level = CT_THRESHOLD_HU if threshold is None else float(threshold)
    elif modality_family == "mr":
        level = _mr_threshold(volume, MR_THRESHOLD_FRACTION if threshold is None else float(threshold))
    else:
        raise ValueError(f"modality_family={modality_family!r} is not allowed; use 'ct' or 'mr'.")
    spacing, axis = voxel_spacing(affine), axial_axis(affine)
    foreground = fill_holes_per_slice(volume > level, axis)
    if not foreground.any():
        raise ValueError(f"no voxel is above the {modality_family.upper()} body threshold {level:g}; is this a {modality_family.upper()} image?")
    core = largest_component(_erode(foreground, opening_mm, spacing, axis))
    if not core.any():  # the body is thinner than the opening: keep the thresholded body as it is
        core = foreground
    body = _dilate(core, opening_mm, spacing, axis) & foreground
    body = fill_holes_per_slice(largest_component(body), axis)
    return Envelope(mask=body, removed_voxels=int(np.count_nonzero(foreground & ~body)), threshold=level)


def labels_envelope(
    labels: np.ndarray, affine: np.ndarray, margin_mm: float = FROM_LABELS_MARGIN_MM, bridge_mm: float = FROM_LABELS_BRIDGE_MM
) -> Envelope:
    """
    An approximate body envelope around the labelled voxels of a mask (no image needed).

    Parameters
    ----------
    labels
        3D label map; every id > 0 counts as inside the body.
    affine
        its voxel-to-world affine.
    margin_mm
        how far the envelope reaches beyond the outer organs (unlabelled fat and skin).
    bridge_mm
        in-plane closing radius that joins neighbouring organs; must be >= ``margin_mm``.

    Returns
    -------
    Envelope
        the envelope (always holding every labelled voxel).

    Raises
    ------
    ValueError
        no labelled voxel, or ``bridge_mm < margin_mm``.
    """
    if bridge_mm < margin_mm or margin_mm < 0:
        raise ValueError(f"bridge_mm={bridge_mm!r} and margin_mm={margin_mm!r} are not allowed; use 0 <= margin_mm <= bridge_mm.")
    labelled = np.asarray(labels) > BACKGROUND_LABEL
    if not labelled.any():
        raise ValueError("the mask has no labelled voxel to build an envelope around.")
    spacing, axis = voxel_spacing(affine), axial_axis(affine)
    closed = _erode(_dilate(labelled, bridge_mm, spacing, axis), bridge_mm - margin_mm, spacing, axis)
    envelope = fill_holes_per_slice(closed | labelled, axis)
    return Envelope(mask=envelope, removed_voxels=0, threshold=None)


def add_body_label(labels: np.ndarray | None, envelope: np.ndarray, body_label: int = BODY_LABEL) -> np.ndarray:
    """
    ``labels`` with ``body_label`` written where the envelope has no label; every existing label is kept.

    Parameters
    ----------
    labels
        the label map, or ``None`` for an envelope-only mask (``body_label`` inside, 0 outside, ``uint8``).
    envelope
        boolean body envelope of the same shape.
    body_label
        the id written (MAISI body: 200).

    Returns
    -------
    np.ndarray
        a new array; its dtype is that of ``labels`` unless ``labels`` cannot hold ``body_label`` (then the
        smallest integer type that holds both).
    """
    if labels is None:
        return np.where(envelope, np.uint8(body_label), np.uint8(BACKGROUND_LABEL))
    array = np.asarray(labels)
    if array.shape != envelope.shape:
        raise ValueError(f"labels of shape {array.shape} and envelope of shape {envelope.shape} differ.")
    dtype = array.dtype if np.can_cast(np.min_scalar_type(body_label), array.dtype, "safe") else np.promote_types(array.dtype, np.min_scalar_type(body_label))
    result = array.astype(dtype, copy=True)
    result[envelope & (array == BACKGROUND_LABEL)] = body_label
    return result
