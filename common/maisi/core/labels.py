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
MAISI label maps: the label dictionary, ControlNet bit planes, body-region and spacing conditions, tumour
removal and label filtering.

Every function keeps the raw MAISI ids of ``label_dict.json`` (no renumbering). Functions that take a
label map accept a ``torch.Tensor`` (``MetaTensor`` included) or a ``numpy.ndarray`` and return the same
kind unless stated otherwise.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from .constants import (
    BACKGROUND_LABEL,
    BODY_REGION_ALIASES,
    BODY_REGIONS,
    MAX_CONTROLNET_LABEL,
    MR_CONTROLNET_LABEL_MAP,
    QC_LABEL_GROUPS,
    REGION_INDEX_SCALE,
    REGION_LABELS,
    SPACING_SCALE,
    TUMOR_LABELS,
)
from .value_checks import as_list, did_you_mean, load_json_file

__all__ = [
    "BRAIN_TUMOR_LABELS",
    "LABEL_DICT_FILENAME",
    "NEIGHBOUR_FILLED_LESIONS",
    "TUMOR_HOST_ORGANS",
    "binarize_labels",
    "body_region_indices_from_mask",
    "check_body_region",
    "default_data_path",
    "filter_label_map",
    "format_ids",
    "label_id_of",
    "label_output_dtype",
    "load_json",
    "load_label_dict",
    "load_name_to_code",
    "region_condition",
    "remap_labels_for_controlnet",
    "remap_mr_labels_for_controlnet",
    "remove_tumors",
    "spacing_condition",
    "tumor_free_mapping",
]

LABEL_DICT_FILENAME = "label_dict.json"
# Where the data files live next to ``scripts/``: ``data/`` in common/maisi, ``configs/`` in a bundle.
_DATA_FOLDERS = ("data", "configs")
_MAX_EQUALITY_PASSES = 16  # torch membership tests with more ids use torch.isin

# Brain-tumour ids of the CT/MR label dictionary (``label_dict_ctmr.json``): 176 "brain tumor" and the
# BraTS-like sub-regions 401 (NCR/NETC), 402 (ED), 403 (ET). They are not in ``label_dict.json``.
BRAIN_TUMOR_LABELS = (176, 401, 402, 403)

# Tumour (or cyst) name -> host organ name: the lesion is replaced by its host organ. Names resolve to ids
# through ``constants.TUMOR_LABELS`` (tumours) and ``label_dict.json`` (everything else).
TUMOR_HOST_ORGANS = MappingProxyType(
    {
        "hepatic tumor": "liver",
        "pancreatic tumor": "pancreas",
        "colon cancer primaries": "colon",
        "left kidney cyst": "left kidney",
        "right kidney cyst": "right kidney",
    }
)
# Lesions replaced by the majority host label in a one-voxel ring around each connected component.
NEIGHBOUR_FILLED_LESIONS = MappingProxyType(
    {
        "lung tumor": QC_LABEL_GROUPS["lung"],  # the five lung lobes
        "bone lesion": QC_LABEL_GROUPS["bone"],  # vertebrae, ribs, limb/girdle bones, skull, sternum, S1
    }
)


# ----------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------


def load_json(path: str | Path) -> Any:
    """
    Read a JSON file, naming the file in every error.

    Parameters
    ----------
    path
        JSON file to read.

    Returns
    -------
    Any
        The decoded JSON document.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not valid JSON.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"JSON file not found: '{path}'.") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}).") from error


def default_data_path(filename: str) -> Path:
    """
    Locate a MAISI data file next to this ``scripts`` package.

    The canonical copy keeps data files in ``common/maisi/data``; a bundle keeps them in its ``configs``.

    Parameters
    ----------
    filename
        Name of the file, e.g. ``"label_dict.json"``.

    Returns
    -------
    Path
        The first existing ``<package parent>/data/<filename>`` or ``<package parent>/configs/<filename>``.

    Raises
    ------
    FileNotFoundError
        If the file is in neither folder.
    """
    root = Path(__file__).resolve().parent.parent
    candidates = [root / folder / filename for folder in _DATA_FOLDERS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"'{filename}' not found; looked for {', '.join(repr(str(c)) for c in candidates)}.")


def load_name_to_code(path: str | Path, config_id: str, minimum: int) -> dict[str, int]:
    """
    Read a JSON object mapping names to integer codes (``label_dict.json``, ``modality_mapping.json``).

    Parameters
    ----------
    path
        the JSON file.
    config_id
        the config id named in errors, e.g. ``"label_dict_json"``.
    minimum
        the smallest allowed code.

    Returns
    -------
    dict[str, int]
        The mapping, in file order.

    Raises
    ------
    ValueError
        the file is missing, is not JSON, or does not map names to integers >= ``minimum``.
    """
    content = load_json_file(config_id, path)
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{config_id}={str(path)!r} must hold a non-empty JSON object mapping names to integers.")
    bad = {k: v for k, v in content.items() if isinstance(v, bool) or not isinstance(v, int) or v < minimum}
    if bad:
        shown = dict(list(bad.items())[:5])
        raise ValueError(f"{config_id}={str(path)!r} maps names to values that are not integers >= {minimum}: {shown}.")
    return {str(k): int(v) for k, v in content.items()}


def load_label_dict(path: str | Path | None = None) -> dict[str, int]:
    """
    Read a MAISI label dictionary (anatomy name -> label id), by default the packaged one.

    Parameters
    ----------
    path
        JSON file (the ``label_dict_json`` id); ``None`` reads the packaged ``label_dict.json`` (once).

    Returns
    -------
    dict[str, int]
        A new dictionary (the caller may modify it).

    Raises
    ------
    ValueError
        If the file is missing, not JSON, or not a mapping of names to integer ids >= 1; the message names
        ``label_dict_json``.
    """
    if path is None:
        return dict(_packaged_label_dict())
    return load_name_to_code(path, "label_dict_json", minimum=1)


@functools.lru_cache(maxsize=1)
def _packaged_label_dict() -> Mapping[str, int]:
    return MappingProxyType(load_name_to_code(default_data_path(LABEL_DICT_FILENAME), "label_dict_json", minimum=1))


# ----------------------------------------------------------------------------------------------------
# Small backend-agnostic helpers
# ----------------------------------------------------------------------------------------------------


def _isin(labels: NdarrayOrTensor, ids: Iterable[int]) -> NdarrayOrTensor:
    ids = sorted({int(i) for i in ids})
    if not isinstance(labels, torch.Tensor):
        return np.isin(labels, ids)
    # ids the dtype cannot hold are dropped: casting them would wrap (401 -> 145 in uint8)
    ids = [i for i in ids if _fits(i, labels)]
    if len(ids) > _MAX_EQUALITY_PASSES:
        return torch.isin(labels, torch.as_tensor(ids, dtype=labels.dtype, device=labels.device))
    found = torch.zeros_like(labels, dtype=torch.bool)
    for label_id in ids:  # a few equality passes are much faster than torch.isin's sort
        found |= labels == label_id
    return found


def _fits(value: int, labels: NdarrayOrTensor) -> bool:
    """Whether ``value`` is representable in the dtype of ``labels`` (torch would wrap it in comparisons)."""
    dtype = labels.dtype
    if isinstance(labels, torch.Tensor):
        if dtype.is_floating_point or dtype == torch.bool:
            return True
        info = torch.iinfo(dtype)
    else:
        if not np.issubdtype(dtype, np.integer):
            return True
        info = np.iinfo(dtype)
    return info.min <= value <= info.max


def _outside(labels: NdarrayOrTensor, low: int, high: int) -> list[int]:
    """Sorted distinct ids of ``labels`` outside ``[low, high]`` (empty when all are inside)."""
    size = labels.numel() if isinstance(labels, torch.Tensor) else labels.size
    if size == 0 or (low <= float(labels.min()) and float(labels.max()) <= high):
        return []
    # error path only: a float64 copy so that the bounds cannot wrap in the labels' dtype
    wide = labels.double() if isinstance(labels, torch.Tensor) else labels.astype(np.float64)
    return _unique_ids(wide[(wide < low) | (wide > high)])


def _unique_ids(values: NdarrayOrTensor) -> list[int]:
    """Sorted distinct ids of a (small) selection of label values."""
    values = convert_to_numpy(values)
    return [int(v) for v in np.unique(values)]


def format_ids(ids: Sequence[int], limit: int = 20) -> str:
    """``ids`` as ``1, 2, 3`` for messages: at most ``limit`` of them, then ``, ... (N ids)`` with the total count."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} ids)" if len(ids) > limit else "")


def _replace_ids(labels: NdarrayOrTensor, mapping: Mapping[int, int]) -> NdarrayOrTensor:
    """Apply ``mapping`` simultaneously (every test is on the input), one vectorised pass per entry."""
    out = labels.clone() if isinstance(labels, torch.Tensor) else labels.copy()
    for source, target in mapping.items():
        if not _fits(source, labels):
            continue  # the id cannot occur in this dtype
        if not _fits(target, labels):
            raise ValueError(f"label id {target} (mapped from {source}) does not fit in dtype {labels.dtype}.")
        out[labels == source] = target
    return out


# ----------------------------------------------------------------------------------------------------
# ControlNet conditioning
# ----------------------------------------------------------------------------------------------------


def binarize_labels(labels: torch.Tensor, bits: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """
    Encode an integer label map as bit planes, the ControlNet conditioning of MAISI.

    Plane ``k`` holds ``(label >> k) & 1``, so ``sum_k plane_k * 2**k`` recovers the label.

    Parameters
    ----------
    labels
        Label map of shape ``(B, 1, *spatial)`` with integer ids (float tensors holding whole numbers
        are accepted).
    bits
        Number of planes; ids must lie in ``[0, 2**bits - 1]`` (``[0, MAX_CONTROLNET_LABEL]`` for 8).
    dtype
        Floating dtype of the result.

    Returns
    -------
    torch.Tensor
        Bit planes of shape ``(B, bits, *spatial)``.

    Raises
    ------
    ValueError
        If the shape is not ``(B, 1, ...)``, ids are not whole numbers, or ids fall outside the range
        (the offending ids are listed; map them first with :func:`remap_labels_for_controlnet`).
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}.")
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must have shape (B, 1, *spatial), got {tuple(labels.shape)}.")
    if labels.is_floating_point() and not torch.equal(labels, torch.round(labels)):
        raise ValueError("labels must hold whole-number ids; got fractional values.")
    max_id = (1 << bits) - 1
    offending = _outside(labels, 0, max_id)
    if offending:
        raise ValueError(
            f"label ids {format_ids(offending)} are outside [0, {max_id}], the range {bits} bit planes can encode "
            f"(MAX_CONTROLNET_LABEL = {MAX_CONTROLNET_LABEL}); map them with remap_labels_for_controlnet first."
        )
    ids = torch.as_tensor(labels, dtype=torch.uint8 if bits <= 8 else torch.int64)
    planes = torch.empty((labels.shape[0], bits, *labels.shape[2:]), dtype=dtype, device=labels.device)
    for bit in range(bits):  # a loop over planes, each a vectorised op on the whole volume
        planes[:, bit] = torch.bitwise_and(torch.bitwise_right_shift(ids[:, 0], bit), 1)
    return planes


def remap_labels_for_controlnet(labels: NdarrayOrTensor, mapping: Mapping[int, int]) -> NdarrayOrTensor:
    """
    Map label ids above ``MAX_CONTROLNET_LABEL`` (e.g. BraTS-like 401/402/403) into the ControlNet range.

    8 bit planes cannot hold ids above 255 (401 would alias to 145). The mapping is explicit so that the
    conditioning a ControlNet was trained with is reproduced exactly.

    Parameters
    ----------
    labels
        Integer label map (any shape).
    mapping
        ``{source_id: target_id}`` applied simultaneously; targets must lie in
        ``[0, MAX_CONTROLNET_LABEL]``. Keys may be strings (as read from JSON).

    Returns
    -------
    NdarrayOrTensor
        The remapped label map, same type and dtype.

    Raises
    ------
    ValueError
        If a target is out of range, or ids outside ``[0, MAX_CONTROLNET_LABEL]`` remain unmapped.
    """
    mapping = {int(source): int(target) for source, target in mapping.items()}
    bad_targets = {s: t for s, t in mapping.items() if not BACKGROUND_LABEL <= t <= MAX_CONTROLNET_LABEL}
    if bad_targets:
        raise ValueError(f"mapping targets must lie in [0, {MAX_CONTROLNET_LABEL}]; invalid entries: {bad_targets}.")
    remapped = _replace_ids(labels, mapping)
    unmapped = _outside(remapped, BACKGROUND_LABEL, MAX_CONTROLNET_LABEL)
    if unmapped:
        raise ValueError(
            f"label ids {format_ids(unmapped)} are outside [0, {MAX_CONTROLNET_LABEL}] "
            "and have no entry in the mapping."
        )
    return remapped


def remap_mr_labels_for_controlnet(
    labels: NdarrayOrTensor, extra_mapping: Mapping[int, int] | None = None
) -> NdarrayOrTensor:
    """
    Map MR label ids above ``MAX_CONTROLNET_LABEL`` into the ControlNet range with the MR default table.

    The default table is ``constants.MR_CONTROLNET_LABEL_MAP``: BraTS tumour sub-regions 401, 402, 403 ->
    129, 130, 131 (free placeholder ids) and body 500 -> 200. Ids up to 255 pass unchanged, so a mask
    that already uses ids < 256 is not modified. ``extra_mapping`` adds entries (or replaces default
    ones) for other ids above 255, e.g. brain parcels. Apply the SAME mapping when training a
    ControlNet and when generating with it.

    Parameters
    ----------
    labels
        Integer label map (any shape), e.g. int16 with ids up to 500.
    extra_mapping
        ``{source_id: target_id}`` entries (keys may be strings, as read from JSON), applied
        together with the default table; targets in ``[0, MAX_CONTROLNET_LABEL]``.

    Returns
    -------
    NdarrayOrTensor
        The remapped label map, same type and dtype.

    Raises
    ------
    ValueError
        If ids above ``MAX_CONTROLNET_LABEL`` have no entry (they are listed) or a target is out of range.
    """
    mapping = {int(source): int(target) for source, target in MR_CONTROLNET_LABEL_MAP.items()}
    mapping.update({int(source): int(target) for source, target in (extra_mapping or {}).items()})
    return remap_labels_for_controlnet(labels, mapping)


# ----------------------------------------------------------------------------------------------------
# UNet conditions: body region and spacing
# ----------------------------------------------------------------------------------------------------


def body_region_indices_from_mask(mask: NdarrayOrTensor) -> tuple[list[float], list[float]]:
    """
    Derive the top and bottom body-region one-hots of a mask (ddpm-ct conditioning), unscaled.

    A region is present when the mask holds any of its ``constants.REGION_LABELS``; the top region is the
    first present in head -> pelvis order (``constants.BODY_REGIONS``), the bottom region the last.

    Parameters
    ----------
    mask
        Label map of one volume (any shape, e.g. ``(1, 1, X, Y, Z)``).

    Returns
    -------
    tuple[list[float], list[float]]
        ``(top, bottom)`` one-hots of length ``len(BODY_REGIONS)``; scale them with :func:`region_condition`.

    Raises
    ------
    ValueError
        If the mask holds none of the region labels.
    """
    present = [i for i in range(len(BODY_REGIONS)) if bool(_isin(mask, REGION_LABELS[i]).any())]
    if not present:
        expected = "; ".join(f"{BODY_REGIONS[i]}: {sorted(REGION_LABELS[i])}" for i in range(len(BODY_REGIONS)))
        raise ValueError(
            "cannot derive the body region: the mask contains none of the region labels "
            f"({expected}). Give top/bottom region indices explicitly or use a mask with one of these labels."
        )
    top, bottom = present[0], present[-1]
    return (
        [float(i == top) for i in range(len(BODY_REGIONS))],
        [float(i == bottom) for i in range(len(BODY_REGIONS))],
    )


def _as_row(values: Sequence[float] | NdarrayOrTensor, name: str) -> torch.Tensor:
    row = torch.as_tensor(convert_to_numpy(values, wrap_sequence=True), dtype=torch.float32)
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence (or a (1, n) array), got shape {tuple(row.shape)}.")
    return row


def region_condition(one_hot: Sequence[float] | NdarrayOrTensor) -> torch.Tensor:
    """
    Scale a body-region one-hot to the UNet's region condition (``x REGION_INDEX_SCALE``).

    Parameters
    ----------
    one_hot
        Unscaled one-hot of length ``len(BODY_REGIONS)``, e.g. from :func:`body_region_indices_from_mask`.

    Returns
    -------
    torch.Tensor
        Float32 tensor of shape ``(1, len(BODY_REGIONS))``.
    """
    row = _as_row(one_hot, "one_hot")
    if row.numel() != len(BODY_REGIONS):
        raise ValueError(f"one_hot must have {len(BODY_REGIONS)} entries ({', '.join(BODY_REGIONS)}), got {row.numel()}.")
    return (row * REGION_INDEX_SCALE).unsqueeze(0)


def spacing_condition(spacing: Sequence[float] | NdarrayOrTensor) -> torch.Tensor:
    """
    Scale a voxel spacing in mm to the UNet's spacing condition (``x SPACING_SCALE``).

    Parameters
    ----------
    spacing
        Positive spacing per spatial axis in mm.

    Returns
    -------
    torch.Tensor
        Float32 tensor of shape ``(1, len(spacing))``.
    """
    row = _as_row(spacing, "spacing")
    if not bool(torch.isfinite(row).all()) or bool((row <= 0).any()):
        raise ValueError(f"spacing must be positive and finite, got {row.tolist()}.")
    return (row * SPACING_SCALE).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------
# Tumour removal (the classifier-free-guidance unconditional mask)
# ----------------------------------------------------------------------------------------------------


def check_body_region(body_region: Any) -> list[int]:
    """
    Map ``body_region`` names (case-insensitive, with the aliases of ``BODY_REGION_ALIASES``; one name may be a
    string) to the sorted, distinct body-region indices (0 head, 1 chest, 2 abdomen, 3 pelvis).
    """
    names = [body_region] if isinstance(body_region, str) else as_list("body_region", body_region)
    allowed = list(BODY_REGION_ALIASES)
    indices = set()
    for name in names:
        key = name.strip().lower() if isinstance(name, str) else None
        if key not in BODY_REGION_ALIASES:
            hint = did_you_mean(name, allowed) if isinstance(name, str) else ""
            raise ValueError(
                f"body_region={body_region!r} is not allowed: {name!r} is not a body region.{hint} "
                f"Allowed (case-insensitive): {allowed}."
            )
        indices.add(BODY_REGION_ALIASES[key])
    return sorted(indices)


def label_id_of(name: str, label_dict: Mapping[str, int]) -> int:
    """
    The label id of an anatomy or lesion name.

    Parameters
    ----------
    name
        the anatomy name, e.g. ``"liver"`` or ``"hepatic tumor"``.
    label_dict
        name -> id dictionary; tumour names resolve through ``constants.TUMOR_LABELS`` first.

    Returns
    -------
    int
        the label id.

    Raises
    ------
    ValueError
        ``name`` is neither a tumour name nor in ``label_dict``.
    """
    if name in TUMOR_LABELS:
        return TUMOR_LABELS[name]
    if name not in label_dict:
        raise ValueError(f"label '{name}' is missing from the label dictionary.")
    return int(label_dict[name])


def tumor_free_mapping(label_dict: Mapping[str, int] | None = None) -> dict[int, int]:
    """
    The direct lesion -> host-organ replacements of :func:`remove_tumors`.

    Parameters
    ----------
    label_dict
        Name -> id dictionary; ``None`` reads the packaged ``label_dict.json``.

    Returns
    -------
    dict[int, int]
        ``{lesion_id: host_id}``: hepatic tumour -> liver, pancreatic tumour -> pancreas, colon cancer
        primaries -> colon, kidney cysts -> their kidney, brain tumours (``BRAIN_TUMOR_LABELS``) -> brain.
    """
    label_dict = _packaged_label_dict() if label_dict is None else label_dict
    mapping = {label_id_of(lesion, label_dict): label_id_of(host, label_dict) for lesion, host in TUMOR_HOST_ORGANS.items()}
    brain = label_id_of("brain", label_dict)
    mapping.update({lesion: brain for lesion in BRAIN_TUMOR_LABELS})
    return mapping


def _fill_from_ring(labels: np.ndarray, lesion: int, hosts: Iterable[int], excluded: Sequence[int], spatial_dims: int) -> None:
    """
    Replace each connected component of ``lesion`` (in place) by the majority host label around it.

    The ring is the component dilated by one voxel (full connectivity over the spatial axes only, so
    batch items stay apart) minus the component; ring voxels holding an ``excluded`` (lesion) id are not
    counted. When no host label touches a component, the majority of any counted ring label is used,
    and background when nothing is counted. Ties go to the smallest id. Work is restricted to the
    lesions' bounding box plus one voxel.
    """
    is_lesion = labels == lesion
    if not is_lesion.any():
        return
    lead = labels.ndim - spatial_dims
    box = [slice(None)] * lead
    for axis in range(lead, labels.ndim):
        hits = np.flatnonzero(is_lesion.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    region, is_lesion = labels[tuple(box)], is_lesion[tuple(box)]  # views: writes reach ``labels``
    structure = np.zeros((3,) * labels.ndim, dtype=bool)
    structure[(1,) * lead] = True  # connect neighbours along the spatial axes only
    components, count = ndimage.label(is_lesion, structure=structure)
    # each ring voxel takes the id of a neighbouring component (the largest id where rings touch)
    owner = ndimage.grey_dilation(components, footprint=structure, mode="constant", cval=0)
    ring = (owner > 0) & ~is_lesion & ~np.isin(region, excluded)
    ring_owner, ring_labels = owner[ring].astype(np.int64), region[ring]
    fill = np.full(count + 1, BACKGROUND_LABEL, dtype=np.int64)
    if ring_labels.size:
        values, value_index = np.unique(ring_labels, return_inverse=True)
        votes = np.bincount(ring_owner * values.size + value_index.ravel(), minlength=(count + 1) * values.size)
        votes = votes.reshape(count + 1, values.size)
        host_votes = votes * np.isin(values, list(hosts))[None]
        use_hosts = host_votes.sum(axis=1) > 0
        winner = np.where(use_hosts, host_votes.argmax(axis=1), votes.argmax(axis=1))
        fill = np.where(votes.sum(axis=1) > 0, values[winner], BACKGROUND_LABEL)
    region[is_lesion] = fill[components[is_lesion]]


def remove_tumors(
    labels: NdarrayOrTensor, label_dict: Mapping[str, int] | None = None, spatial_dims: int = 3
) -> NdarrayOrTensor:
    """
    Make the tumour-free mask of the classifier-free-guidance unconditional branch.

    Lesions are replaced by their host anatomy:

    - hepatic tumour -> liver, pancreatic tumour -> pancreas, colon cancer primaries -> colon, left/right
      kidney cyst -> left/right kidney, brain tumours (``BRAIN_TUMOR_LABELS``) -> brain
      (:func:`tumor_free_mapping`);
    - lung tumour -> the majority lung lobe, and bone lesion -> the majority bone, in a one-voxel ring
      around each connected component (``NEIGHBOUR_FILLED_LESIONS``). If no lobe/bone touches a
      component, the majority of the other ring labels is used (background if there are none).

    Unlike the reference implementation, bone lesions are removed too, so tumour guidance also works
    for them.

    Parameters
    ----------
    labels
        Integer label map with ``spatial_dims`` trailing spatial axes (leading axes, e.g. batch and
        channel, are processed independently).
    label_dict
        Name -> id dictionary; ``None`` reads the packaged ``label_dict.json``.
    spatial_dims
        Number of trailing spatial axes.

    Returns
    -------
    NdarrayOrTensor
        A new label map without lesion ids, same type, dtype and device as ``labels``.
    """
    if not 1 <= spatial_dims <= labels.ndim:
        raise ValueError(f"spatial_dims must be in [1, {labels.ndim}], got {spatial_dims}.")
    label_dict = _packaged_label_dict() if label_dict is None else label_dict
    array = convert_to_numpy(labels)
    result = _replace_ids(array, tumor_free_mapping(label_dict))
    neighbour_filled = {label_id_of(name, label_dict): hosts for name, hosts in NEIGHBOUR_FILLED_LESIONS.items()}
    for lesion, hosts in neighbour_filled.items():
        _fill_from_ring(result, lesion, hosts, excluded=list(neighbour_filled), spatial_dims=spatial_dims)
    out, *_ = convert_to_dst_type(result, labels)
    return out


# ----------------------------------------------------------------------------------------------------
# Output label maps
# ----------------------------------------------------------------------------------------------------


def filter_label_map(labels: NdarrayOrTensor, keep_ids: Iterable[int]) -> NdarrayOrTensor:
    """
    Keep only the given label ids, with their raw MAISI values (no renumbering); the rest become background.

    Parameters
    ----------
    labels
        Label map (any shape).
    keep_ids
        MAISI ids to keep.

    Returns
    -------
    NdarrayOrTensor
        A new label map of the same type and dtype.
    """
    keep = _isin(labels, keep_ids)
    out = labels.clone() if isinstance(labels, torch.Tensor) else labels.copy()
    out[~keep] = BACKGROUND_LABEL
    return out


def label_output_dtype(max_id: int) -> np.dtype:
    """
    The smallest integer dtype to save a label map whose largest id is ``max_id``.

    Parameters
    ----------
    max_id
        Largest label id in the map.

    Returns
    -------
    numpy.dtype
        ``uint8`` up to 255, ``int16`` above (``torch`` users: ``torch.uint8`` / ``torch.int16``).

    Raises
    ------
    ValueError
        If ``max_id`` is negative or does not fit in ``int16``.
    """
    max_id = int(max_id)
    if max_id < 0:
        raise ValueError(f"max_id must be non-negative, got {max_id}.")
    for dtype in (np.uint8, np.int16):
        if max_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label id {max_id} does not fit in int16 (max {np.iinfo(np.int16).max}).")
