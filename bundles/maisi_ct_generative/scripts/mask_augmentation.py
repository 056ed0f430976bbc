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
Augmentation of retrieved candidate masks.

:func:`augment_tumor` moves and deforms a tumour inside its host organ and gives up after a bounded number
of attempts (returning the mask unchanged); :func:`augment_mask` dispatches by the tumours a mask holds and
otherwise zooms the whole mask slightly. Every random draw comes from a ``numpy.random.Generator``, so a
seed reproduces a mask exactly. Label ids are the raw MAISI ids throughout; nothing is renumbered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Rand3DElastic, RandAffine, RandZoom
from monai.utils import convert_to_tensor
from scipy import ndimage

from .constants import COLON_LABEL, COSTAL_CARTILAGE_LABEL, QC_LABEL_GROUPS, TUMOR_LABELS

logger = logging.getLogger(__name__)

__all__ = ["AugmentationResult", "TUMOR_AUGMENTATION_ORDER", "augment_body", "augment_mask", "augment_tumor", "close_labels"]

CLOSING_SIZE = 5  # edge of the cubic structuring element of the closing that smooths a moved tumour


def _closing(stack: np.ndarray, size: int) -> np.ndarray:
    """
    Binary closing of each (X, Y, Z) volume of a (L, X, Y, Z) boolean stack with a ``size``^3 cube.

    The volumes are padded with background (0) first, so that the closing never grows from or shrinks
    at the volume border; all labels are processed in one scipy call (a (1, size, size, size) element).
    """
    radius = size // 2
    padded = np.pad(stack, [(0, 0)] + [(radius, radius)] * 3, constant_values=False)
    element = np.ones((1, size, size, size), dtype=bool)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, element), element, border_value=0)
    return closed[:, radius:-radius, radius:-radius, radius:-radius] if radius else closed


def close_labels(label_map: np.ndarray, label_ids: Sequence[int], size: int = CLOSING_SIZE) -> np.ndarray:
    """
    Close each label of ``label_ids`` with a ``size``^3 cube (dilation, then erosion; background padding).

    Parameters
    ----------
    label_map
        (X, Y, Z) integer label map.
    label_ids
        labels to close; voxels claimed by several closed labels go to the later one.
    size
        edge of the cubic structuring element.

    Returns
    -------
    np.ndarray
        A new label map; voxels outside every closed label keep their value.
    """
    ids = np.asarray(list(label_ids), dtype=label_map.dtype)
    if ids.size == 0:
        return label_map.copy()
    closed = _closing(label_map[None] == ids[:, None, None, None], size)
    result = label_map.copy()
    for label_id, region in zip(ids, closed):
        result[region] = label_id
    return result


# ----------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TumorMotion:
    """How a tumour type is moved: host organ, transform ranges (voxels / radians), acceptance ratio."""

    host_labels: tuple[int, ...]
    elastic: bool
    translate: tuple[float, float, float]
    rotate: tuple[float, float, float]
    scale: tuple[float, float, float]
    min_size_ratio: float
    close_host: bool


_ELASTIC_SIGMA = (5.0, 8.0)
_ELASTIC_MAGNITUDE = (100.0, 200.0)
_SMALL_ROTATION = math.pi / 36

_ELASTIC_TUMOR = {"elastic": True, "close_host": True}
_SMALL_ROTATIONS = (_SMALL_ROTATION,) * 3

# In the order a mask's tumours are augmented (the reference's priority).
_TUMOR_MOTIONS = MappingProxyType(
    {
        TUMOR_LABELS["bone lesion"]: _TumorMotion(
            host_labels=(*QC_LABEL_GROUPS["bone"], COSTAL_CARTILAGE_LABEL),
            translate=(5, 5, 0),
            rotate=(0, 0, 0.1),
            scale=(0.15, 0.15, 0),
            min_size_ratio=0.8,
            elastic=False,
            close_host=False,
        ),
        TUMOR_LABELS["hepatic tumor"]: _TumorMotion(
            host_labels=QC_LABEL_GROUPS["liver"], translate=(10,) * 3, rotate=_SMALL_ROTATIONS, scale=(0.2,) * 3, min_size_ratio=0.8, **_ELASTIC_TUMOR
        ),
        TUMOR_LABELS["lung tumor"]: _TumorMotion(
            host_labels=QC_LABEL_GROUPS["lung"],
            translate=(20,) * 3,
            rotate=(_SMALL_ROTATION, _SMALL_ROTATION, math.pi),
            scale=(0.15,) * 3,
            min_size_ratio=0.85,
            **_ELASTIC_TUMOR,
        ),
        TUMOR_LABELS["pancreatic tumor"]: _TumorMotion(
            host_labels=QC_LABEL_GROUPS["pancreas"],
            translate=(15,) * 3,
            rotate=_SMALL_ROTATIONS,
            scale=(0.1,) * 3,
            min_size_ratio=0.8,
            **_ELASTIC_TUMOR,
        ),
        TUMOR_LABELS["colon cancer primaries"]: _TumorMotion(
            host_labels=(COLON_LABEL,), translate=(5,) * 3, rotate=_SMALL_ROTATIONS, scale=(0.1,) * 3, min_size_ratio=0.8, **_ELASTIC_TUMOR
        ),
    }
)
TUMOR_AUGMENTATION_ORDER: tuple[int, ...] = tuple(_TUMOR_MOTIONS)


@dataclass(frozen=True)
class AugmentationResult:
    """
    What an augmentation did.

    Attributes
    ----------
    augmented
        whether the mask was changed.
    kind
        ``"tumor"``, ``"zoom"`` or ``"none"``.
    tumor_id
        the tumour label that was moved (``None`` for the other kinds).
    attempts
        random transforms drawn.
    size_ratio
        fraction of the tumour's voxels kept inside its organ by the accepted (or best) draw.
    message
        a human-readable summary.
    """

    augmented: bool
    kind: str
    tumor_id: int | None = None
    attempts: int = 0
    size_ratio: float | None = None
    message: str = ""


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The data of a ``MetaTensor`` as a plain tensor sharing its storage (other tensors pass through)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**32 - 1))


def _tumor_transform(motion: _TumorMotion, rng: np.random.Generator, device: torch.device) -> RandAffine | Rand3DElastic:
    """The MONAI random transform of a tumour type, seeded from ``rng``."""
    ranges = {"translate_range": motion.translate, "rotate_range": motion.rotate, "scale_range": motion.scale}
    if motion.elastic:
        transform = Rand3DElastic(
            sigma_range=_ELASTIC_SIGMA, magnitude_range=_ELASTIC_MAGNITUDE, prob=1.0, mode="nearest", padding_mode="zeros", device=device, **ranges
        )
    else:
        transform = RandAffine(prob=1.0, mode="nearest", padding_mode="zeros", device=device, **ranges)
    transform.set_random_state(seed=_seed(rng))
    return transform


def _tumor_region(data: torch.Tensor, tumor_id: int, motion: _TumorMotion) -> tuple[slice, ...] | None:
    """
    The box around the tumour of a (X, Y, Z) label map that any draw of ``motion`` can reach, ``None`` without tumour.

    The box is the tumour's bounding box enlarged by its reach under rotation, scaling and translation
    (plus a few voxels of elastic slack and the radius of the host-organ closing), clipped to the volume.
    It is found on the mask's device, so only the box is copied to the host.
    """
    coords = torch.nonzero(data == tumor_id)
    if coords.shape[0] == 0:
        return None
    low, high = coords.min(0).values.cpu().numpy(), coords.max(0).values.cpu().numpy() + 1
    extent = float((high - low).max())
    reach = 0.5 * extent * (math.sqrt(3) * (1 + max(motion.scale)) - 1) + max(motion.translate)
    margin = int(math.ceil(reach)) + 4 + 2 * (CLOSING_SIZE // 2)
    low, high = np.maximum(low - margin, 0), np.minimum(high + margin, data.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _place(
    transform: RandAffine | Rand3DElastic, tumor: torch.Tensor, allowed: torch.Tensor, min_voxels: float, max_attempts: int
) -> tuple[torch.Tensor | None, int, int]:
    """
    Draw moved tumours until one keeps ``min_voxels`` inside ``allowed``.

    Returns
    -------
    tuple[torch.Tensor | None, int, int]
        The accepted tumour clipped to ``allowed`` (``None`` if every draw failed), the attempts made and
        the largest number of voxels kept by a draw.
    """
    best = 0
    for attempt in range(1, max_attempts + 1):
        kept = (convert_to_tensor(transform(tumor), track_meta=False)[0] > 0.5) & allowed
        count = int(kept.sum())
        best = max(best, count)
        if count >= min_voxels:
            return kept, attempt, best
    return None, max_attempts, best


def _majority_host_label(volume: np.ndarray, tumor: np.ndarray, host: np.ndarray) -> int | None:
    """The most frequent host label around the tumour (or in ``volume``), ``None`` when there is no host organ."""
    shell = ndimage.binary_dilation(tumor, np.ones((3, 3, 3), dtype=bool)) & ~tumor & host
    values = volume[shell] if shell.any() else volume[host & ~tumor]
    if values.size == 0:
        return None
    labels, counts = np.unique(values, return_counts=True)
    return int(labels[np.argmax(counts)])


def _unchanged(mask: torch.Tensor, tumor_id: int, attempts: int, ratio: float | None, message: str) -> tuple[torch.Tensor, AugmentationResult]:
    logger.warning("Tumour %d not augmented: %s", tumor_id, message)
    return mask, AugmentationResult(False, "tumor", tumor_id, attempts, ratio, message)


def augment_tumor(
    mask: torch.Tensor,
    tumor_id: int,
    rng: np.random.Generator,
    device: torch.device | str | None = None,
    max_attempts: int = 40,
    min_size_ratio: float | None = None,
) -> tuple[torch.Tensor, AugmentationResult]:
    """
    Move and deform a tumour inside its host organ, with a bounded number of attempts.

    The tumour's original voxels are refilled with the most frequent host label around it (e.g. the
    surrounding lung lobe). Each attempt draws a MONAI ``RandAffine`` (bone lesion) or ``Rand3DElastic``
    (other tumours) of the tumour, on a region around it; the attempt is accepted when at least
    ``min_size_ratio`` of the original tumour volume lands inside the allowed organ (bone lesions: bones
    and costal cartilage; hepatic: the closed liver; lung: the closed lungs; pancreatic: the closed
    pancreas; colon: the closed colon). The accepted tumour is closed with a 5^3 cube and clipped to the
    allowed organ. After ``max_attempts`` rejections, the original mask is returned unchanged.

    Parameters
    ----------
    mask
        (1, X, Y, Z) integer label map (tensor or ``MetaTensor``); it is not modified.
    tumor_id
        the tumour label (one of :data:`TUMOR_AUGMENTATION_ORDER`).
    rng
        source of every random draw (the MONAI transform is seeded from it).
    device
        where the random transforms run; defaults to the mask's device.
    max_attempts
        random draws before giving up.
    min_size_ratio
        acceptance threshold; ``None`` uses the tumour type's (0.8, lung 0.85).

    Returns
    -------
    tuple[torch.Tensor, AugmentationResult]
        The augmented mask (same type, dtype, device and metadata) and an :class:`AugmentationResult`.

    Raises
    ------
    ValueError
        ``tumor_id`` is not an augmentable tumour or ``max_attempts`` < 1.
    """
    if tumor_id not in _TUMOR_MOTIONS:
        raise ValueError(f"tumour id {tumor_id} cannot be augmented; supported ids: {list(TUMOR_AUGMENTATION_ORDER)}.")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}.")
    motion = _TUMOR_MOTIONS[tumor_id]
    ratio = motion.min_size_ratio if min_size_ratio is None else float(min_size_ratio)
    device = torch.device(device) if device is not None else mask.device

    data = _plain(mask)[0]
    region = _tumor_region(data, tumor_id, motion)
    if region is None:
        return _unchanged(mask, tumor_id, 0, None, "the mask holds no such tumour.")
    volume = data[region].detach().cpu().numpy()
    tumor = volume == tumor_id
    size = int(tumor.sum())
    host = np.isin(volume, np.asarray(motion.host_labels, dtype=volume.dtype))
    refill = _majority_host_label(volume, tumor, host)
    if refill is None:
        return _unchanged(mask, tumor_id, 0, None, f"its host organ {list(motion.host_labels)} is absent.")
    allowed = host | tumor
    if motion.close_host:
        allowed = _closing(allowed[None], CLOSING_SIZE)[0]

    kept, attempts, best = _place(
        _tumor_transform(motion, rng, device),
        torch.as_tensor(tumor[None], dtype=torch.float32, device=device),
        torch.as_tensor(allowed, device=device),
        ratio * size,
        max_attempts,
    )
    if kept is None:
        return _unchanged(
            mask, tumor_id, attempts, best / size, f"no draw kept {ratio:.0%} of the tumour inside its organ in {attempts} attempts."
        )

    placed = _closing(kept.cpu().numpy()[None], CLOSING_SIZE)[0] & allowed
    refilled = np.where(tumor, np.asarray(refill, dtype=volume.dtype), volume)
    new_region = np.where(placed, np.asarray(tumor_id, dtype=volume.dtype), refilled)
    result = mask.clone()
    _plain(result)[(0, *region)] = torch.as_tensor(new_region, device=result.device)
    kept_ratio = best / size
    message = f"moved tumour {tumor_id} in {attempts} attempt(s), {kept_ratio:.0%} of its voxels kept inside its organ."
    logger.info(message)
    return result, AugmentationResult(True, "tumor", tumor_id, attempts, kept_ratio, message)


def augment_body(
    mask: torch.Tensor, rng: np.random.Generator, min_zoom: float = 0.99, max_zoom: float = 1.01
) -> tuple[torch.Tensor, AugmentationResult]:
    """
    Zoom the whole label map slightly (nearest neighbour, same size) for a tumour-free mask.

    The metadata (affine) is kept: the zoom varies the anatomy, not the stated geometry. A zoom-out is
    padded by repeating the border (MONAI's default), so a body cut by the field of view stays cut.

    Parameters
    ----------
    mask
        (1, X, Y, Z) integer label map; it is not modified.
    rng
        source of the zoom factor.
    min_zoom
        smallest zoom factor.
    max_zoom
        largest zoom factor.

    Returns
    -------
    tuple[torch.Tensor, AugmentationResult]
        The zoomed mask (same type, dtype, device and metadata) and an :class:`AugmentationResult`.
    """
    zoom = RandZoom(prob=1.0, min_zoom=min_zoom, max_zoom=max_zoom, mode="nearest", keep_size=True)
    zoom.set_random_state(seed=_seed(rng))
    zoomed = convert_to_tensor(zoom(_plain(mask).float()), track_meta=False).round().to(mask.dtype)
    result = mask.clone()
    _plain(result).copy_(zoomed)
    return result, AugmentationResult(True, "zoom", message=f"zoomed the mask by a factor in [{min_zoom}, {max_zoom}].")


def augment_mask(
    mask: torch.Tensor,
    rng: np.random.Generator,
    device: torch.device | str | None = None,
    zoom: bool = True,
    max_attempts: int = 40,
    min_size_ratio: float | None = None,
) -> tuple[torch.Tensor, tuple[AugmentationResult, ...]]:
    """
    Augment a retrieved mask: move every tumour it holds (:func:`augment_tumor`, in
    :data:`TUMOR_AUGMENTATION_ORDER`), or zoom a tumour-free mask slightly (:func:`augment_body`).

    Parameters
    ----------
    mask
        (1, X, Y, Z) integer label map; it is not modified.
    rng
        source of every random draw.
    device
        where the random transforms run; defaults to the mask's device.
    zoom
        zoom tumour-free masks (otherwise they are returned unchanged).
    max_attempts
        per tumour, see :func:`augment_tumor`.
    min_size_ratio
        per tumour, see :func:`augment_tumor`.

    Returns
    -------
    tuple[torch.Tensor, tuple[AugmentationResult, ...]]
        The augmented mask and one :class:`AugmentationResult` per step.
    """
    present = [t for t in TUMOR_AUGMENTATION_ORDER if bool((mask == t).any())]
    if not present:
        if not zoom:
            return mask, (AugmentationResult(False, "none", message="tumour-free mask, zoom disabled."),)
        result, report = augment_body(mask, rng)
        return result, (report,)
    reports = []
    for tumor_id in present:
        mask, report = augment_tumor(mask, tumor_id, rng, device, max_attempts, min_size_ratio)
        reports.append(report)
    return mask, tuple(reports)
