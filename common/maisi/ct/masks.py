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
Label masks from the candidate-mask database ("Path B" of MAISI paired generation) and their augmentation.

Retrieval: the database (``all_mask_files_json``) describes every mask of the mask folder
(``all_mask_files_base_dir``). :func:`retrieve_masks` keeps the masks that contain the requested
anatomies and body regions (and no unrequested tumour), takes the masks that already have the requested
size and spacing, and fills up with the geometrically closest ones, resampled and kept only when no
requested label was lost.

Augmentation: :func:`augment_tumor` moves and deforms a tumour inside its host organ and gives up after a
bounded number of attempts (returning the mask unchanged); :func:`augment_mask` dispatches by the tumours
a mask holds and otherwise zooms the whole mask slightly. Every random draw comes from a
``numpy.random.Generator``, so a seed reproduces a mask exactly.

Label ids are the raw MAISI ids throughout; nothing is renumbered.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from monai.apps.utils import extractall
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, Orientation, Rand3DElastic, RandAffine, RandZoom, ResizeWithPadOrCrop, Spacing
from monai.utils import convert_to_tensor
from scipy import ndimage

from .constants import BODY_REGIONS, QC_LABEL_GROUPS, TUMOR_LABELS
from .labels import load_label_dict

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentationResult",
    "Candidate",
    "RetrievedMask",
    "TUMOR_AUGMENTATION_ORDER",
    "augment_body",
    "augment_mask",
    "augment_tumor",
    "close_labels",
    "exact_matches",
    "filter_candidates",
    "load_candidate_database",
    "load_mask",
    "mask_spacing",
    "rank_by_geometry",
    "resample_mask",
    "retrieve_masks",
]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's world axes: the affine maps voxels to RAS mm
DOWNLOAD_HINT = "python -m monai.bundle download_large_files --bundle_path <bundle>"
MASK_DTYPE = torch.int16  # holds every MAISI id (CT ids < 256, MR ids up to 500) at half the memory of int32

SPACING_TOLERANCE = 1e-3  # mm; an "exact" spacing match
MIN_DIM_MARGIN = 128  # a candidate with any dim <= output_size - 128 is too small to resample
CLOSING_SIZE = 5  # edge of the cubic structuring element of the closing that smooths a moved tumour

# Host organs augmentation needs beyond constants.py, resolved by name from the packaged label_dict.json.
_COLON_LABEL = load_label_dict()["colon"]  # host organ of "colon cancer primaries"
_COSTAL_CARTILAGE_LABEL = load_label_dict()["costal cartilages"]  # a bone lesion may sit there too


# ----------------------------------------------------------------------------------------------------------
# The database
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """
    One entry of the candidate-mask database.

    Attributes
    ----------
    filename
        ``pseudo_label_filename``, relative to ``folder``.
    folder
        the mask folder (``all_mask_files_base_dir``).
    spacing
        voxel spacing in mm.
    dim
        spatial size in voxels.
    label_ids
        the label ids present in the mask (``label_list``).
    top_region
        index (0 head, 1 chest, 2 abdomen, 3 pelvis) of the top body region, ``None`` if unknown.
    bottom_region
        index of the bottom body region, ``None`` if unknown.
    label_filename
        optional ``label_filename`` (manual label), relative to ``folder``.
    """

    filename: str
    folder: Path
    spacing: tuple[float, float, float]
    dim: tuple[int, int, int]
    label_ids: frozenset[int]
    top_region: int | None = None
    bottom_region: int | None = None
    label_filename: str | None = None

    @property
    def path(self) -> Path:
        """Absolute path of the mask file."""
        return self.folder / self.filename

    @property
    def region_span(self) -> range | None:
        """The body-region indices the mask covers, ``None`` when the database does not say."""
        if self.top_region is None or self.bottom_region is None:
            return None
        low, high = sorted((self.top_region, self.bottom_region))
        return range(low, high + 1)


def _one_hot_index(values: Sequence[float] | None, key: str, position: int) -> int | None:
    """Index of the first non-zero entry of a region one-hot, ``None`` when the entry has no such key."""
    if values is None:
        return None
    hits = np.flatnonzero(np.asarray(values, dtype=float))
    if hits.size == 0:
        raise ValueError(f"candidate-mask database entry {position}: `{key}` {list(values)} has no non-zero entry.")
    return int(hits[0])


def _parse_entry(entry: dict, folder: Path, position: int) -> Candidate:
    """Turn one JSON entry into a :class:`Candidate`, naming the entry and key of any missing field."""
    missing = [key for key in ("pseudo_label_filename", "spacing", "dim", "label_list") if key not in entry]
    if missing:
        raise ValueError(f"candidate-mask database entry {position} lacks {missing}; every entry needs them.")
    spacing = tuple(float(s) for s in entry["spacing"])
    dim = tuple(int(d) for d in entry["dim"])
    if len(spacing) != 3 or len(dim) != 3:
        raise ValueError(f"candidate-mask database entry {position}: `spacing` and `dim` need 3 values each.")
    return Candidate(
        filename=str(entry["pseudo_label_filename"]),
        folder=folder,
        spacing=spacing,  # type: ignore[arg-type]
        dim=dim,  # type: ignore[arg-type]
        label_ids=frozenset(int(i) for i in entry["label_list"]),
        top_region=_one_hot_index(entry.get("top_region_index"), "top_region_index", position),
        bottom_region=_one_hot_index(entry.get("bottom_region_index"), "bottom_region_index", position),
        label_filename=entry.get("label_filename"),
    )


def _extract_mask_folder(archive: Path, folder: Path) -> None:
    """
    Extract ``archive`` (``<folder>.zip``) into ``folder``, atomically.

    The archive is unpacked into a temporary sibling folder that is then renamed, so an interrupted
    extraction never leaves a half-filled mask folder behind. The archive may hold the folder itself or
    its files directly.
    """
    logger.info("Extracting the candidate masks %s into %s (once).", archive, folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.extracting-", dir=folder.parent))
    try:
        extractall(filepath=archive, output_dir=staging, file_type="zip", has_base=False)
        entries = list(staging.iterdir())
        nested = staging / folder.name
        source = nested if entries == [nested] and nested.is_dir() else staging
        try:
            os.replace(source, folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent extraction that won the race
                raise
            logger.info("%s was extracted concurrently; keeping that copy.", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_candidate_database(database_json: str | os.PathLike, mask_folder: str | os.PathLike) -> list[Candidate]:
    """
    Read the candidate-mask database, extracting the mask folder from ``<mask_folder>.zip`` on first use.

    Parameters
    ----------
    database_json
        the database (config id ``all_mask_files_json``): a JSON list of entries with
        ``pseudo_label_filename``, ``spacing``, ``dim``, ``label_list`` and optionally
        ``label_filename``, ``top_region_index``, ``bottom_region_index`` (4-slot one-hots).
    mask_folder
        the folder holding the masks (config id ``all_mask_files_base_dir``).

    Returns
    -------
    list[Candidate]
        One :class:`Candidate` per entry, in database order.

    Raises
    ------
    FileNotFoundError
        the database or the mask folder (and its zip) is missing; the message names the
        config id and the command that downloads it.
    ValueError
        the database is not a list of valid entries.
    """
    database_json, mask_folder = Path(database_json), Path(mask_folder)
    if not database_json.is_file():
        raise FileNotFoundError(
            f"The candidate-mask database (config id `all_mask_files_json`) was not found at {database_json}. "
            f"Download the bundle's large files with `{DOWNLOAD_HINT}`, or point `all_mask_files_json` to it."
        )
    if not mask_folder.is_dir():
        archive = mask_folder.with_name(mask_folder.name + ".zip")
        if not archive.is_file():
            raise FileNotFoundError(
                f"The candidate-mask folder (config id `all_mask_files_base_dir`) was not found at {mask_folder}, "
                f"nor its archive {archive}. Download the bundle's large files with `{DOWNLOAD_HINT}`, "
                "or point `all_mask_files_base_dir` to the folder."
            )
        _extract_mask_folder(archive, mask_folder)
    with open(database_json) as handle:
        entries = json.load(handle)
    if not isinstance(entries, list):
        raise ValueError(
            f"`all_mask_files_json` ({database_json}) must hold a JSON list of mask entries, got {type(entries).__name__}."
        )
    return [_parse_entry(entry, mask_folder, position) for position, entry in enumerate(entries)]


# ----------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------


def _check_regions(region_indices: Iterable[int]) -> tuple[int, ...]:
    regions = tuple(int(r) for r in region_indices)
    invalid = [r for r in regions if not 0 <= r < len(BODY_REGIONS)]
    if invalid:
        raise ValueError(f"body_region indices {invalid} are not in 0..{len(BODY_REGIONS) - 1} ({', '.join(BODY_REGIONS)}).")
    return regions


def filter_candidates(candidates: Iterable[Candidate], anatomy_ids: Iterable[int], region_indices: Iterable[int]) -> list[Candidate]:
    """
    The candidates that fit the requested anatomies and body regions.

    A candidate is kept when its ``label_list`` holds every anatomy id, its [top, bottom] region span covers
    every requested region (entries without region information are not filtered on regions), and it holds
    no tumour (``constants.TUMOR_LABELS``) that was not requested.

    Parameters
    ----------
    candidates
        database entries.
    anatomy_ids
        raw MAISI label ids that must be present (``anatomy_list``).
    region_indices
        body-region indices (0 head, 1 chest, 2 abdomen, 3 pelvis) to cover (``body_region``).

    Returns
    -------
    list[Candidate]
        The kept candidates, in input order.
    """
    required = frozenset(int(i) for i in anatomy_ids)
    regions = _check_regions(region_indices)
    unwanted_tumors = frozenset(TUMOR_LABELS.values()) - required

    def fits(candidate: Candidate) -> bool:
        span = candidate.region_span
        return (
            required <= candidate.label_ids
            and (span is None or all(r in span for r in regions))
            and not unwanted_tumors & candidate.label_ids
        )

    return [c for c in candidates if fits(c)]


def _geometry(candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) dims and (N, 3) spacings of ``candidates``."""
    dims = np.array([c.dim for c in candidates], dtype=float).reshape(-1, 3)
    spacings = np.array([c.spacing for c in candidates], dtype=float).reshape(-1, 3)
    return dims, spacings


def exact_matches(candidates: Sequence[Candidate], output_size: Sequence[int], spacing: Sequence[float]) -> list[Candidate]:
    """The candidates whose ``dim`` equals ``output_size`` and whose spacing is within 1e-3 mm of ``spacing``."""
    dims, spacings = _geometry(candidates)
    same = (dims == np.asarray(output_size, dtype=float)).all(1)
    same &= (np.abs(spacings - np.asarray(spacing, dtype=float)) <= SPACING_TOLERANCE).all(1)
    return [c for c, keep in zip(candidates, same) if keep]


def rank_by_geometry(candidates: Sequence[Candidate], output_size: Sequence[int], spacing: Sequence[float]) -> list[Candidate]:
    """
    The candidates ordered from the closest to the requested geometry to the farthest.

    Candidates with any ``dim <= output_size - 128`` are left out (too small to resample). The score sums
    over the axes ``|FOV_c - FOV_t| / 10 + |dim_c - dim_t| / 100 + |spacing_c - spacing_t|`` (FOV in mm =
    dim * spacing); ties are broken by filename.
    """
    if not candidates:
        return []
    dims, spacings = _geometry(candidates)
    target_dim, target_spacing = np.asarray(output_size, dtype=float), np.asarray(spacing, dtype=float)
    large_enough = (dims > target_dim - MIN_DIM_MARGIN).all(1)
    scores = (
        np.abs(dims * spacings - target_dim * target_spacing) / 10.0
        + np.abs(dims - target_dim) / 100.0
        + np.abs(spacings - target_spacing)
    ).sum(1)
    order = sorted(np.flatnonzero(large_enough), key=lambda i: (scores[i], candidates[i].filename))
    return [candidates[i] for i in order]


# ----------------------------------------------------------------------------------------------------------
# Loading and resampling
# ----------------------------------------------------------------------------------------------------------


def _as_label_map(mask: torch.Tensor) -> torch.Tensor:
    """Round a (float) label map to :data:`MASK_DTYPE`, keeping its metadata."""
    return mask.round().to(MASK_DTYPE) if mask.is_floating_point() else mask.to(MASK_DTYPE)


def load_label_file(path: str | os.PathLike, device: torch.device | str | None = None, strict: bool = False) -> MetaTensor:
    """
    Load a label file as a (1, X, Y, Z) integer label map in RAS orientation.

    Parameters
    ----------
    path
        a file any MONAI reader opens (NIfTI, ...).
    device
        where to put the mask; defaults to the CPU.
    strict
        refuse non-integer or negative values instead of rounding them (for user files).

    Returns
    -------
    MetaTensor
        A ``MetaTensor`` of :data:`MASK_DTYPE` carrying the file's affine (reoriented to RAS).

    Raises
    ------
    ValueError
        with ``strict``, when the file is not a label map of non-negative integer ids.
    """
    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    if image.shape[0] != 1:
        raise ValueError(f"{path} has {image.shape[0]} channels; a label map has one.")
    if strict and (not torch.equal(image, image.round()) or bool((image < 0).any())):
        raise ValueError(f"{path} holds non-integer or negative values; it must be a label map of MAISI ids.")
    image = Orientation(axcodes="RAS", labels=_RAS_LABELS)(image)
    return _as_label_map(image).to(device or "cpu")


def load_mask(candidate: Candidate, device: torch.device | str | None = None) -> MetaTensor:
    """Load a candidate's mask (see :func:`load_label_file`)."""
    return load_label_file(candidate.path, device)


def mask_spacing(mask: torch.Tensor) -> tuple[float, ...]:
    """Voxel spacing (mm) of a ``MetaTensor`` mask, from its affine."""
    return tuple(float(s) for s in affine_to_spacing(mask.affine, r=3))


def _has_geometry(mask: torch.Tensor, output_size: Sequence[int], spacing: Sequence[float]) -> bool:
    same_size = tuple(mask.shape[1:]) == tuple(int(s) for s in output_size)
    return same_size and np.allclose(mask_spacing(mask), spacing, rtol=0.0, atol=SPACING_TOLERANCE)


def resample_mask(mask: MetaTensor, target_spacing: Sequence[float], output_size: Sequence[int]) -> MetaTensor:
    """
    Resample a label map to ``target_spacing`` (nearest neighbour), then pad (with 0) or crop it to ``output_size``.

    Parameters
    ----------
    mask
        (1, X, Y, Z) label map with its affine.
    target_spacing
        spacing in mm.
    output_size
        spatial size in voxels.

    Returns
    -------
    MetaTensor
        A (1, *output_size) ``MetaTensor`` of :data:`MASK_DTYPE` whose affine carries ``target_spacing``.
    """
    resampled = Spacing(pixdim=tuple(target_spacing), mode="nearest", padding_mode="zeros", dtype=torch.float32)(mask.float())
    resized = ResizeWithPadOrCrop(spatial_size=tuple(int(s) for s in output_size), mode="constant", value=0)(resampled)
    return _as_label_map(resized)


def _missing_labels(mask: torch.Tensor, label_ids: Iterable[int]) -> list[int]:
    """The ids of ``label_ids`` absent from ``mask``."""
    return [i for i in label_ids if not bool((mask == i).any())]


# ----------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RetrievedMask:
    """
    A mask chosen for generation.

    Attributes
    ----------
    source
        the database filename it came from (``pseudo_label_filename``).
    resampled
        whether it was resampled to the requested geometry.
    mask
        the (1, X, Y, Z) label map (``MetaTensor``); shared between repeats of the same source, so
        copy it before editing in place.
    candidate
        its database entry.
    """

    source: str
    resampled: bool
    mask: MetaTensor
    candidate: Candidate


def _describe_request(anatomy_ids: Sequence[int], regions: Sequence[int], output_size: Sequence[int], spacing: Sequence[float]) -> str:
    names = [BODY_REGIONS[r] for r in regions]
    return (
        f"anatomy_list={list(anatomy_ids)}, body_region={names} (indices {list(regions)}), "
        f"output_size={list(output_size)}, spacing={list(spacing)}"
    )


def _usable_masks(
    exact: Sequence[Candidate],
    ranked: Sequence[Candidate],
    anatomy_ids: Sequence[int],
    output_size: Sequence[int],
    spacing: Sequence[float],
    needed: int,
    resample_budget: int,
    device: torch.device | str | None,
) -> Iterator[RetrievedMask]:
    """
    Yield usable masks: the exact matches first, then resampled closest ones, at most ``needed``.

    Each candidate is loaded (and resampled, when its geometry differs) once; a mask that lacks a requested
    label is skipped. At most ``resample_budget`` candidates are resampled.
    """
    found, resampled_count = 0, 0
    for candidate in [*exact, *ranked]:
        if found >= needed:
            return
        mask = load_mask(candidate, device)
        resampled = not _has_geometry(mask, output_size, spacing)
        if resampled:
            if resampled_count >= resample_budget:
                return
            resampled_count += 1
            mask = resample_mask(mask, spacing, output_size)
        missing = _missing_labels(mask, anatomy_ids)
        if missing:
            logger.info("Skipping candidate mask %s: labels %s are missing%s.", candidate.filename, missing, " after resampling" if resampled else "")
            continue
        found += 1
        yield RetrievedMask(source=candidate.filename, resampled=resampled, mask=mask, candidate=candidate)


def retrieve_masks(
    candidates: Sequence[Candidate],
    anatomy_ids: Sequence[int],
    region_indices: Sequence[int],
    output_size: Sequence[int],
    spacing: Sequence[float],
    num_masks: int,
    rng: np.random.Generator,
    device: torch.device | str | None = None,
    max_resample_candidates: int | None = None,
) -> list[RetrievedMask]:
    """
    Retrieve ``num_masks`` label masks of the requested geometry from the candidate database.

    Candidates are filtered (:func:`filter_candidates`); those with exactly the requested size and spacing
    are used as they are (in an ``rng``-shuffled order). When they are fewer than ``num_masks``, the
    closest others (:func:`rank_by_geometry`) are resampled one by one and kept only when they still
    contain every requested label, until the pool is full or ``max_resample_candidates`` (default
    ``max(2 * num_masks, 5)``) have been tried. The pool is shuffled with ``rng`` and cycled through when
    ``num_masks`` exceeds it.

    Parameters
    ----------
    candidates
        the database (:func:`load_candidate_database`).
    anatomy_ids
        raw MAISI ids every mask must contain (``anatomy_list``).
    region_indices
        body-region indices every mask must cover (``body_region``).
    output_size
        requested spatial size.
    spacing
        requested spacing in mm.
    num_masks
        how many masks to return.
    rng
        source of every random choice.
    device
        where to load the masks.
    max_resample_candidates
        how many non-exact candidates may be resampled at most.

    Returns
    -------
    list[RetrievedMask]
        ``num_masks`` :class:`RetrievedMask` (repeats share their tensor).

    Raises
    ------
    ValueError
        no candidate fits; the message names the request and what to relax.
    """
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}.")
    anatomy_ids = [int(i) for i in anatomy_ids]
    regions = _check_regions(region_indices)
    output_size = tuple(int(s) for s in output_size)
    spacing = tuple(float(s) for s in spacing)
    request = _describe_request(anatomy_ids, regions, output_size, spacing)

    pool = filter_candidates(candidates, anatomy_ids, regions)
    if not pool:
        raise ValueError(
            f"No candidate mask contains every id of anatomy_list within body_region ({request}) without other tumours. "
            "Ask for fewer anatomies or other body regions."
        )
    exact = exact_matches(pool, output_size, spacing)
    exact = [exact[i] for i in rng.permutation(len(exact))]
    exact_names = {c.filename for c in exact}
    ranked = [c for c in rank_by_geometry(pool, output_size, spacing) if c.filename not in exact_names]
    budget = max(2 * num_masks, 5) if max_resample_candidates is None else max_resample_candidates

    usable = list(_usable_masks(exact, ranked, anatomy_ids, output_size, spacing, num_masks, budget, device))
    if not usable:
        too_small = len(pool) - len(exact) - len(ranked)
        raise ValueError(
            f"{len(pool)} candidate masks contain anatomy_list within body_region, but none keeps every requested label "
            f"at output_size and spacing ({request}): {len(exact)} exact matches, {min(budget, len(ranked))} tried after "
            f"resampling, {too_small} too small (a dim <= output_size - {MIN_DIM_MARGIN}). Choose an output_size/spacing "
            "closer to the database masks (a field of view covering the anatomies), or raise max_resample_candidates."
        )
    logger.info(
        "Retrieved %d candidate masks (%d resampled) for %s.", len(usable), sum(m.resampled for m in usable), request
    )
    usable = [usable[i] for i in rng.permutation(len(usable))]
    return [usable[i % len(usable)] for i in range(num_masks)]


# ----------------------------------------------------------------------------------------------------------
# Morphology
# ----------------------------------------------------------------------------------------------------------


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
            host_labels=(*QC_LABEL_GROUPS["bone"], _COSTAL_CARTILAGE_LABEL),
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
            host_labels=(_COLON_LABEL,), translate=(5,) * 3, rotate=_SMALL_ROTATIONS, scale=(0.1,) * 3, min_size_ratio=0.8, **_ELASTIC_TUMOR
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
