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
The candidate-mask database ("Path B" of MAISI paired generation): reading it, unpacking its mask folder,
and retrieving the masks that fit a request.

Retrieval: the database (``all_mask_files_json``) describes every mask of the mask folder
(``all_mask_files_base_dir``). :func:`retrieve_masks` keeps the masks that contain the requested
anatomies and body regions (and no unrequested tumour), takes the masks that already have the requested
size and spacing, and fills up with the geometrically closest ones, resampled and kept only when no
requested label was lost. Label ids are the raw MAISI ids throughout; nothing is renumbered.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm import tqdm

from .constants import BODY_REGIONS, TUMOR_LABELS
from .label_io import SPACING_TOLERANCE, has_geometry, load_label_file, resample_mask

logger = logging.getLogger(__name__)

__all__ = [
    "DOWNLOAD_HINT",
    "Candidate",
    "RetrievedMask",
    "exact_matches",
    "filter_candidates",
    "load_candidate_database",
    "load_mask",
    "mask_archive",
    "missing_mask_files",
    "parse_database",
    "prepare_mask_folder",
    "rank_by_geometry",
    "read_database_entries",
    "regions_by_anatomy",
    "retrieve_masks",
]

DOWNLOAD_HINT = "python -m monai.bundle download_large_files --bundle_path <bundle>"
MIN_DIM_MARGIN = 128  # a candidate with any dim <= output_size - 128 is too small to resample


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




def read_database_entries(database_json: str | os.PathLike) -> list[dict]:
    """
    Read the raw entries of the candidate-mask database (config id ``all_mask_files_json``).

    Raises
    ------
    FileNotFoundError
        the file is missing; the message names the config id and the download command.
    ValueError
        the file is not a JSON list of objects.
    """
    database_json = Path(database_json)
    if not database_json.is_file():
        raise FileNotFoundError(
            f"all_mask_files_json={str(database_json)!r}: the candidate-mask database was not found. Download it with "
            f"`{DOWNLOAD_HINT}`, or point all_mask_files_json to it."
        )
    try:
        entries = json.loads(database_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"all_mask_files_json={str(database_json)!r} is not a readable JSON file ({error}).") from error
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"all_mask_files_json={str(database_json)!r} must hold a JSON list of mask entries (objects).")
    return entries


def parse_database(entries: Sequence[dict], mask_folder: str | os.PathLike) -> list[Candidate]:
    """One :class:`Candidate` per database entry, in database order (``mask_folder`` is not read)."""
    return [_parse_entry(entry, Path(mask_folder), position) for position, entry in enumerate(entries)]


def mask_archive(mask_folder: str | os.PathLike) -> Path:
    """The archive ``<mask_folder>.zip`` the mask folder is unpacked from on first use."""
    folder = Path(mask_folder)
    return folder.with_name(folder.name + ".zip")


def _archive_members(archive: Path, folder_name: str) -> set[str]:
    """The file names of ``archive``, relative to the mask folder (the archive may hold the folder itself)."""
    with zipfile.ZipFile(archive) as handle:
        names = [info.filename for info in handle.infolist() if not info.is_dir()]
    prefix = f"{folder_name}/"
    if names and all(name.startswith(prefix) for name in names):
        names = [name[len(prefix) :] for name in names]
    return set(names)


def missing_mask_files(candidates: Sequence[Candidate], mask_folder: str | os.PathLike) -> list[str]:
    """
    The database files that neither the mask folder nor (when the folder is absent) its zip holds.

    The zip is checked against its member list only, without unpacking, so pairing a database with another
    release's mask folder is caught in a second.

    Raises
    ------
    FileNotFoundError
        neither the folder nor its zip exists; the message names ``all_mask_files_base_dir``.
    """
    folder = Path(mask_folder)
    if folder.is_dir():
        return [c.filename for c in candidates if not (folder / c.filename).is_file()]
    archive = mask_archive(folder)
    if not archive.is_file():
        raise FileNotFoundError(
            f"all_mask_files_base_dir={str(folder)!r}: the candidate-mask folder was not found, nor its archive "
            f"{archive}. Download it with `{DOWNLOAD_HINT}`, or point all_mask_files_base_dir to the folder."
        )
    members = _archive_members(archive, folder.name)
    return [c.filename for c in candidates if c.filename not in members]


def _staging_folder(folder: Path) -> Path:
    """
    Create an empty, uniquely named hidden sibling of ``folder`` to unpack into. Unlike ``tempfile.mkdtemp``
    (always mode 0700), its mode follows the umask, so the mask folder it is renamed to is as readable as any
    other new folder (e.g. for the other users of a shared bundle).
    """
    for _ in range(100):
        staging = folder.with_name(f".{folder.name}.extracting-{secrets.token_hex(4)}")
        try:
            staging.mkdir(mode=0o777)
            return staging
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder next to '{folder}'.")


def prepare_mask_folder(mask_folder: str | os.PathLike, progress: bool = True) -> Path:
    """
    Unpack ``<mask_folder>.zip`` into ``mask_folder`` when the folder does not exist yet, atomically.

    The archive is unpacked member by member (with a progress bar) into a temporary sibling folder that is
    then renamed, so an interrupted extraction never leaves a half-filled mask folder behind. The archive may
    hold the folder itself or its files directly.

    Returns
    -------
    Path
        the mask folder.
    """
    folder = Path(mask_folder)
    if folder.is_dir():
        return folder
    archive = mask_archive(folder)
    logger.info("Unpacking the candidate masks %s (%.1f GB) into %s, once.", archive, archive.stat().st_size / 1e9, folder)
    staging = _staging_folder(folder)
    try:
        with zipfile.ZipFile(archive) as handle:
            members = handle.infolist()
            for member in tqdm(members, desc="unpacking candidate masks", unit="file", disable=not progress):
                handle.extract(member, staging)
        entries = list(staging.iterdir())
        nested = staging / folder.name
        source = nested if entries == [nested] and nested.is_dir() else staging
        try:
            os.replace(source, folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent extraction that won the race
                raise
            logger.info("%s was unpacked concurrently; keeping that copy.", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_candidate_database(database_json: str | os.PathLike, mask_folder: str | os.PathLike, progress: bool = True) -> list[Candidate]:
    """
    Read the candidate-mask database, unpacking the mask folder from ``<mask_folder>.zip`` on first use.

    Parameters
    ----------
    database_json
        the database (config id ``all_mask_files_json``): a JSON list of entries with
        ``pseudo_label_filename``, ``spacing``, ``dim``, ``label_list`` and optionally
        ``label_filename``, ``top_region_index``, ``bottom_region_index`` (4-slot one-hots).
    mask_folder
        the folder holding the masks (config id ``all_mask_files_base_dir``).
    progress
        show a progress bar while unpacking.

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
    candidates = parse_database(read_database_entries(database_json), mask_folder)
    missing_mask_files([], mask_folder)  # raises when neither the folder nor its zip exists
    prepare_mask_folder(mask_folder, progress)
    return candidates


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




def load_mask(candidate: Candidate, device: torch.device | str | None = None) -> MetaTensor:
    """Load a candidate's mask (see :func:`load_label_file`)."""
    return load_label_file(candidate.path, device)



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
        resampled = not has_geometry(mask, output_size, spacing)
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


def regions_by_anatomy(candidates: Iterable[Candidate], exclude_tumors: Iterable[int] = ()) -> dict[int, frozenset[int | None]]:
    """
    Where the database holds each anatomy: label id -> the body-region indices its masks span.

    ``None`` stands for masks without region information. Masks holding any id of ``exclude_tumors`` are left out
    (retrieval never uses a mask with an unrequested tumour).
    """
    excluded = frozenset(int(i) for i in exclude_tumors)
    found: dict[int, set[int | None]] = {}
    for candidate in candidates:
        if candidate.label_ids & excluded:
            continue
        span = candidate.region_span
        regions: Iterable[int | None] = (None,) if span is None else span
        for label in candidate.label_ids:
            found.setdefault(label, set()).update(regions)
    return {label: frozenset(regions) for label, regions in found.items()}
