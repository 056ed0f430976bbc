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
The settings of CT generation (``maisi_ct_generative``): every user-facing id checked before any weight loads.

:class:`CTGenerationSettings` is the ``settings`` component of ``configs/inference.json``. It normalises the ids
(names to codes, aliases, version defaults), turns them into requests (one, or one per row of
``request_manifest`` / file of ``mask_dir``) and checks everything knowable without weights: geometry, the
candidate-mask database (a mask with the anatomies in the body regions, the mask folder or its zip, every file
the database names), user masks (label ids, foreground, region labels for ddpm-ct), the files the run reads and
the output folder. Every error names the id (and the manifest row), the value and what is allowed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from tqdm import tqdm

from .constants import BODY_REGIONS, MAX_CONTROLNET_LABEL, REGION_LABELS, TUMOR_LABELS
from .label_io import load_label_file, resample_mask
from .labels import body_region_indices_from_mask, check_body_region, format_ids, load_label_dict
from .distributed import barrier, rank_and_world_size
from .mask_database import (
    Candidate,
    filter_candidates,
    mask_archive,
    missing_mask_files,
    parse_database,
    prepare_mask_folder,
    read_database_entries,
    regions_by_anatomy,
)
from .mask_checks import MaskFinding, MaskRequest, check_user_mask, load_organ_volume_reference, raise_for_refusals, summarize_mask
from .mask_generation import check_controllable_anatomy_size
from .modality import load_modality_mapping, resolve_modality
from .checks import check_int_at_least
from .settings import (
    GenerationSettings,
    RequestBase,
    RequiredFiles,
    check_bool,
    check_decode_settings,
    check_run_ids,
    in_row,
    request_id_of,
    request_rows,
    row_value,
)
from .value_checks import (
    as_list,
    check_cfg_guidance_scale,
    check_num_steps,
    check_version,
    did_you_mean,
    float_triple,
    int_triple,
    is_int,
)
from .writers import DICOM_EXT, check_output_ext

logger = logging.getLogger(__name__)

__all__ = [
    "CT_MIN_FIELD_OF_VIEW_MM",
    "CT_OUTPUT_SIZE_XY",
    "CT_OUTPUT_SIZE_Z",
    "CT_SPACING_XY_RANGE",
    "CT_SPACING_Z_RANGE",
    "CT_VERSIONS",
    "CTGenerationSettings",
    "CTRequest",
    "check_anatomy_in_database",
    "check_anatomy_list",
    "check_output_size_ct",
    "check_spacing_ct",
]

# CT geometry the released CT weights support (the model zoo's ``check_input``, NV ``check_input_ct``).
CT_OUTPUT_SIZE_XY = (256, 384, 512)
CT_OUTPUT_SIZE_Z = (128, 256, 384, 512, 640, 768)
CT_SPACING_XY_RANGE = (0.5, 3.0)  # mm, inclusive
CT_SPACING_Z_RANGE = (0.5, 5.0)  # mm, inclusive
CT_MIN_FIELD_OF_VIEW_MM = 256.0  # output_size[0] * spacing[0]

CT_VERSIONS = ("rflow-ct", "ddpm-ct")
DEFAULT_STEPS = MappingProxyType({"rflow-ct": 30, "ddpm-ct": 1000})
DEFAULT_CFG_SCALE = MappingProxyType({"rflow-ct": 0.0, "ddpm-ct": 0.0})
MAX_INFERENCE_STEPS = 1000  # num_train_timesteps of every MAISI noise scheduler
MANIFEST_FIELDS = (
    "id",
    "output_size",
    "spacing",
    "mask_path",
    "body_region",
    "anatomy_list",
    "controllable_anatomy_size",
    "num_samples",
    "seed",
)
# Mask sources of a request.
USER_MASK, DATABASE_MASK, GENERATED_MASK, NO_MASK = "user", "database", "generated", "none"
_MASK_GENERATION_FILES = ("trained_mask_generation_autoencoder_path", "trained_mask_generation_diffusion_path", "all_anatomy_size_condtions_json", "label_dict_remap_json")


# ---------------------------------------------------------------------------------------------------------
# Geometry, regions, anatomies
# ---------------------------------------------------------------------------------------------------------


def check_output_size_ct(output_size: Any) -> tuple[int, int, int]:
    """
    Check a CT ``output_size``: x == y, x in ``CT_OUTPUT_SIZE_XY``, z in ``CT_OUTPUT_SIZE_Z``.

    Other sizes (e.g. any multiple of 16) are not supported by the released CT weights.
    """
    x, y, z = int_triple("output_size", output_size)
    allowed = f"x = y in {list(CT_OUTPUT_SIZE_XY)} and z in {list(CT_OUTPUT_SIZE_Z)}"
    if x != y:
        raise ValueError(f"output_size={output_size!r} is not allowed: x ({x}) and y ({y}) must be equal; allowed: {allowed}.")
    if x not in CT_OUTPUT_SIZE_XY:
        raise ValueError(f"output_size={output_size!r} is not allowed: x/y={x} is not supported; allowed: {allowed}.")
    if z not in CT_OUTPUT_SIZE_Z:
        raise ValueError(f"output_size={output_size!r} is not allowed: z={z} is not supported; allowed: {allowed}.")
    return x, y, z


def check_spacing_ct(spacing: Any, output_size: Any) -> tuple[float, float, float]:
    """
    Check a CT ``spacing`` (mm) against ``output_size``: x == y, x/y in ``CT_SPACING_XY_RANGE``, z in
    ``CT_SPACING_Z_RANGE`` and an x/y field of view ``output_size[0] * spacing[0]`` of at least
    ``CT_MIN_FIELD_OF_VIEW_MM`` (smaller views are out of the training distribution and come out poorly).
    """
    sx, sy, sz = float_triple("spacing", spacing)
    size = int_triple("output_size", output_size)
    low_xy, high_xy = CT_SPACING_XY_RANGE
    low_z, high_z = CT_SPACING_Z_RANGE
    allowed = f"x = y in [{low_xy}, {high_xy}] mm and z in [{low_z}, {high_z}] mm"
    if not math.isclose(sx, sy, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(f"spacing={spacing!r} is not allowed: x ({sx}) and y ({sy}) must be equal; allowed: {allowed}.")
    if not low_xy <= sx <= high_xy:
        raise ValueError(f"spacing={spacing!r} is not allowed: x/y={sx} mm is out of range; allowed: {allowed}.")
    if not low_z <= sz <= high_z:
        raise ValueError(f"spacing={spacing!r} is not allowed: z={sz} mm is out of range; allowed: {allowed}.")
    fov = size[0] * sx
    if fov + 1e-6 < CT_MIN_FIELD_OF_VIEW_MM:
        min_spacing = math.ceil(CT_MIN_FIELD_OF_VIEW_MM / size[0] * 1e4) / 1e4
        raise ValueError(
            f"spacing={spacing!r} with output_size={output_size!r} gives an x/y field of view of {fov:g} mm; "
            f"it must be at least {CT_MIN_FIELD_OF_VIEW_MM:g} mm: use spacing x/y >= {min_spacing:g} mm "
            f"for output_size x/y {size[0]}, or a larger output_size."
        )
    return sx, sy, sz


def anatomy_names(label_dict: Mapping[str, int]) -> dict[str, str]:
    """Lower-case name -> name of the real anatomies of ``label_dict`` (``dummy*`` placeholders left out)."""
    return {name.lower(): name for name in label_dict if not name.lower().startswith("dummy")}


def check_anatomy_list(anatomy_list: Any, label_dict: Mapping[str, int]) -> list[int]:
    """
    Map ``anatomy_list`` entries to MAISI label ids, in order.

    An entry is a name of ``label_dict`` (case-insensitive; the ``dummy*`` placeholders are not anatomies) or an
    integer id present in ``label_dict`` (a placeholder id is accepted, since fine-tuning may give it a new
    class). Each anatomy at most once; an empty list is allowed.
    """
    entries = as_list("anatomy_list", anatomy_list)
    names = anatomy_names(label_dict)
    ids = set(label_dict.values())
    seen: dict[int, Any] = {}
    for entry in entries:
        if isinstance(entry, str):
            key = entry.strip().lower()
            if key not in names:
                raise ValueError(
                    f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} is not an anatomy of label_dict_json."
                    f"{did_you_mean(entry, names.values())} Allowed: the names of label_dict_json (case-insensitive, "
                    f"not dummy*), e.g. {list(names.values())[:6]}, or their integer ids (`python -m scripts.listing anatomies`)."
                )
            label = label_dict[names[key]]
        elif is_int(entry):
            if entry not in ids:
                raise ValueError(
                    f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} is not a label id of label_dict_json; "
                    f"allowed ids: {sorted(ids)}."
                )
            label = int(entry)
        else:
            raise ValueError(f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} is neither an anatomy name nor an integer id.")
        if label in seen:
            raise ValueError(
                f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} repeats {seen[label]!r} (label {label}); "
                "list each anatomy once."
            )
        seen[label] = entry
    return list(seen)


def check_anatomy_in_database(
    anatomy_ids: Sequence[int], region_indices: Sequence[int], candidates: Sequence[Candidate], label_names: Mapping[int, str]
) -> None:
    """
    Check that the candidate-mask database has a mask with every anatomy spanning every region.

    The match is the retrieval's own filter (``mask_database.filter_candidates``: all anatomies, the region span,
    no unrequested tumour).

    Raises
    ------
    ValueError
        no mask matches; the message names ``anatomy_list`` and ``body_region`` and lists, per anatomy, the
        regions in which the database has it.
    """
    if filter_candidates(candidates, anatomy_ids, region_indices):
        return
    unrequested = set(TUMOR_LABELS.values()) - set(anatomy_ids)
    where_found = regions_by_anatomy(candidates, exclude_tumors=unrequested)
    lines = []
    for label in anatomy_ids:
        regions = where_found.get(label, frozenset())
        where = ", ".join(BODY_REGIONS[r] for r in sorted(r for r in regions if r is not None)) or "no mask at all"
        if None in regions:
            where += " (and masks without region information)"
        lines.append(f"{label_names[label]!r} ({label}): {where}" if label in label_names else f"{label}: {where}")
    requested = [label_names.get(i, i) for i in anatomy_ids]
    raise ValueError(
        f"anatomy_list={requested!r} (ids {list(anatomy_ids)}) with body_region={[BODY_REGIONS[r] for r in region_indices]} "
        f"matches none of the {len(candidates)} candidate masks (masks holding a tumour that is not in anatomy_list are "
        f"not used): no mask holds all these anatomies while spanning all these regions. The database has each anatomy "
        f"in: {'; '.join(lines) or 'n/a'}. Choose body_region among those regions or drop anatomies from anatomy_list "
        "(`python -m scripts.listing database` lists the database per region)."
    )


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTRequest(RequestBase):
    """
    One CT generation request.

    Attributes
    ----------
    mask_source
        ``"user"`` (``mask_path``), ``"database"`` (``body_region`` + ``anatomy_list``), ``"generated"``
        (``controllable_anatomy_size``) or ``"none"`` (image-only generation).
    mask_path
        the user label map, for ``"user"``.
    region_indices
        body-region indices the database mask must span, for ``"database"``.
    anatomy_ids
        label ids the mask must hold (database: ``anatomy_list``; generated: the controllable anatomies).
    controllable_anatomy_size
        ``(name, size)`` pairs, for ``"generated"``.
    """

    mask_source: str = DATABASE_MASK
    mask_path: str | None = None
    region_indices: tuple[int, ...] = ()
    anatomy_ids: tuple[int, ...] = ()
    controllable_anatomy_size: tuple[tuple[str, float], ...] = ()


def check_user_mask_ct(
    path: Any, request: CTRequest, version: str, label_dict: Mapping[str, int], strict: bool, reference: Any
) -> list[MaskFinding]:
    """
    Check a CT user mask (``mask_path``) for a request, without any weights, and return the findings to report.

    The map must be one channel of non-negative integer MAISI ids, ids at most 255 (the ControlNet condition is 8
    bit planes), with foreground left after resampling to the request's geometry, and for ddpm-ct the labels
    that mark its body regions. The mask checks (``mask_checks.check_user_mask``) add what a user mask from
    another tool usually lacks: a body label (refused when ``strict``, ``mask_check_strict``), MAISI ids,
    plausible organ volumes, a trained field of view, labels beyond a thin slab, the geometry to resample.
    """
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        raise ValueError(f"mask_path={str(path)!r} does not exist or is not a file.")
    try:
        raw = load_label_file(path, "cpu", strict=True)
    except ValueError as error:
        raise ValueError(f"mask_path={str(path)!r}: {error}") from error
    too_large = torch.unique(raw[raw > MAX_CONTROLNET_LABEL]).tolist()
    if too_large:
        raise ValueError(
            f"mask_path={str(path)!r} holds label ids above {MAX_CONTROLNET_LABEL}: {format_ids(too_large)}. CT masks use "
            f"the MAISI ids of label_dict.json (0..{MAX_CONTROLNET_LABEL}); remap them with `python -m scripts.data_prep remap`."
        )
    findings = check_user_mask(
        summarize_mask(raw, raw.affine, path), MaskRequest(request.spacing, request.output_size, "ct", strict), label_dict, reference
    )
    raise_for_refusals(findings)
    mask = resample_mask(raw, request.spacing, request.output_size)
    if not bool((mask > 0).any()):
        raise ValueError(
            f"mask_path={str(path)!r} has no foreground label left at output_size={list(request.output_size)}, "
            f"spacing={list(request.spacing)} (the field of view misses the labelled region)."
        )
    if version == "ddpm-ct":
        try:
            body_region_indices_from_mask(mask)
        except ValueError as error:
            needed = "; ".join(f"{BODY_REGIONS[r]}: {sorted(ids)}" for r, ids in REGION_LABELS.items())
            raise ValueError(
                f"mask_path={str(path)!r} with version='ddpm-ct': the mask holds none of the labels that mark its body "
                f"regions ({error}); ddpm-ct needs at least one of them per region it covers: {needed}."
            ) from error
    return findings


class CTGenerationSettings(GenerationSettings):
    """
    The checked, normalised settings of a CT generation run (the ``settings`` component).

    Every parameter is the config id of the same name (see the bundle's docs/README.md); ``files`` maps the ids
    of the files a run may read to their paths, and the settings keep the ones this run needs.

    Raises
    ------
    ValueError
        the first id (or manifest row and field) that fails, naming it, the value and what is allowed.
    """

    def __init__(
        self,
        *,
        version: Any,
        output_size: Any,
        spacing: Any,
        files: Mapping[str, Any],
        label_dict_json: Any,
        modality_mapping_json: Any,
        output_dir: Any,
        num_output_samples: Any = 1,
        random_seed: Any = 0,
        body_region: Any = (),
        anatomy_list: Any = (),
        controllable_anatomy_size: Any = (),
        mask_path: Any = None,
        request_manifest: Any = None,
        mask_dir: Any = None,
        image_only: Any = False,
        modality: Any = "ct",
        num_inference_steps: Any = None,
        mask_generation_num_inference_steps: Any = None,
        cfg_guidance_scale: Any = None,
        autoencoder_sliding_window_infer_size: Any = None,
        autoencoder_sliding_window_infer_overlap: Any = 0.4,
        autoencoder_tp_num_splits: Any = None,
        memory_budget_gb: Any = None,
        quality_check_max_attempts: Any = 3,
        augment_masks: Any = True,
        image_output_ext: Any = ".nii.gz",
        label_output_ext: Any = ".nii.gz",
        overwrite: Any = False,
        mask_check_strict: Any = False,
        progress: Any = True,
        bundle_root: Any = ".",
    ) -> None:
        self.version = check_version(version, CT_VERSIONS, "CT")
        self._check_output_ids(output_dir, overwrite, progress, mask_check_strict, bundle_root)
        self.image_only = check_bool("image_only", image_only)
        if self.image_only and self.version != "rflow-ct":
            raise ValueError(
                f"image_only=true is not allowed with version={self.version!r}: image-only CT generation uses the "
                "rflow-ct UNet without a ControlNet; ddpm-ct needs a mask for its body-region conditions."
            )
        num_samples, seed = check_run_ids(num_output_samples, random_seed)
        self.label_dict = load_label_dict(label_dict_json)
        self.modality = self._modality(modality, modality_mapping_json)
        self.num_inference_steps = check_num_steps(
            "num_inference_steps", DEFAULT_STEPS[self.version] if num_inference_steps is None else num_inference_steps, MAX_INFERENCE_STEPS
        )
        self.mask_generation_num_inference_steps = check_num_steps(
            "mask_generation_num_inference_steps",
            MAX_INFERENCE_STEPS if mask_generation_num_inference_steps is None else mask_generation_num_inference_steps,
            MAX_INFERENCE_STEPS,
        )
        self.cfg_guidance_scale = check_cfg_guidance_scale(
            DEFAULT_CFG_SCALE[self.version] if cfg_guidance_scale is None else cfg_guidance_scale
        )
        self.decode = check_decode_settings(
            autoencoder_sliding_window_infer_size, autoencoder_sliding_window_infer_overlap, autoencoder_tp_num_splits, memory_budget_gb
        )
        self.quality_check_max_attempts = check_int_at_least("quality_check_max_attempts", quality_check_max_attempts, 1)
        self.augment_masks = check_bool("augment_masks", augment_masks)
        self.image_output_ext = check_output_ext("image_output_ext", image_output_ext)
        self.label_output_ext = None if self.image_only else check_output_ext("label_output_ext", label_output_ext)
        if self.label_output_ext == DICOM_EXT and self.image_output_ext != DICOM_EXT:
            raise ValueError(
                f"label_output_ext='.dcm' needs image_output_ext='.dcm' (got {self.image_output_ext!r}): a DICOM "
                "Segmentation references the DICOM image series it segments."
            )
        self.all_files = {str(k): v for k, v in files.items()}

        defaults = {
            "output_size": output_size,
            "spacing": spacing,
            "body_region": body_region,
            "anatomy_list": anatomy_list,
            "controllable_anatomy_size": controllable_anatomy_size,
            "mask_path": mask_path,
        }
        self._build_requests(*request_rows(request_manifest, mask_dir, mask_path, MANIFEST_FIELDS), defaults, num_samples, seed)
        self.files = RequiredFiles(self._needed_files(), self.bundle_root)
        self.candidates = self._check_database()
        self._check_user_masks()
        self._open_output_dir(self.label_output_ext)

    # ids ------------------------------------------------------------------------------------------------

    def _modality(self, modality: Any, modality_mapping_json: Any) -> int | None:
        code = 1 if modality is None else resolve_modality(modality, load_modality_mapping(modality_mapping_json), "ct")
        return None if self.version == "ddpm-ct" else code  # ddpm-ct has no modality input; a CT modality is implied

    # requests -------------------------------------------------------------------------------------------

    def _request(self, row: Mapping[str, Any], defaults: Mapping[str, Any], where: str, position: int, count: int, seed: int) -> CTRequest:
        try:
            request_id = request_id_of(row, where, position)
            size = check_output_size_ct(row_value(row, "output_size", defaults["output_size"]))
            spacing = check_spacing_ct(row_value(row, "spacing", defaults["spacing"]), size)
            common = {"request_id": request_id, "output_size": size, "spacing": spacing, "num_samples": count, "seed": seed}
            if self.image_only:
                given = {k: row_value(row, k, defaults[k]) for k in ("mask_path", "controllable_anatomy_size")}
                given = {k: v for k, v in given.items() if v}
                if given:
                    key, value = next(iter(given.items()))
                    raise ValueError(f"{key}={value!r} is not allowed with image_only=true (no mask is used).")
                return CTRequest(**common, mask_source=NO_MASK)
            path = row_value(row, "mask_path", defaults["mask_path"])
            if path is not None:
                return CTRequest(**common, mask_source=USER_MASK, mask_path=str(path))
            sizes = check_controllable_anatomy_size(row_value(row, "controllable_anatomy_size", defaults["controllable_anatomy_size"]))
            if sizes:
                ids = check_anatomy_list([name for name, _ in sizes], self.label_dict)
                return CTRequest(**common, mask_source=GENERATED_MASK, anatomy_ids=tuple(ids), controllable_anatomy_size=tuple(sizes))
            regions = check_body_region(row_value(row, "body_region", defaults["body_region"]))
            anatomy = check_anatomy_list(row_value(row, "anatomy_list", defaults["anatomy_list"]), self.label_dict)
            return CTRequest(**common, mask_source=DATABASE_MASK, region_indices=tuple(regions), anatomy_ids=tuple(anatomy))
        except ValueError as error:
            raise in_row(where, error) from error

    def sources(self) -> set[str]:
        """The mask sources the requests use."""
        return {request.mask_source for request in self.requests}

    # files ----------------------------------------------------------------------------------------------

    def _needed_files(self) -> dict[str, Any]:
        sources = self.sources()
        keys = ["trained_autoencoder_path", "trained_diffusion_path"]
        if not self.image_only:
            keys += ["trained_controlnet_path", "real_img_median_statistics"]
        if GENERATED_MASK in sources:
            keys += list(_MASK_GENERATION_FILES)
        if DATABASE_MASK in sources:
            keys.append("all_mask_files_json")
        missing = [k for k in keys if self.all_files.get(k) is None]
        if missing:
            raise ValueError(f"files is missing the id(s) {missing}; this run reads them (set them in the config).")
        needed = {k: self.all_files[k] for k in keys}
        if DATABASE_MASK in sources:
            folder = Path(str(self.all_files.get("all_mask_files_base_dir")))
            needed["all_mask_files_base_dir"] = folder if folder.is_dir() or not mask_archive(folder).is_file() else mask_archive(folder)
        return needed

    def _check_database(self) -> list[Candidate]:
        """Parse the database and check every database request against it, plus the mask folder pairing."""
        if DATABASE_MASK not in self.sources() or self.files.missing():
            return []  # nothing to check, or files.require() reports the missing files first
        database_json = self.files["all_mask_files_json"]
        folder = Path(str(self.all_files["all_mask_files_base_dir"]))
        candidates = parse_database(read_database_entries(database_json), folder)
        names = {label: name for name, label in self.label_dict.items()}
        for request, where in zip(self.requests, self.request_places):
            if request.mask_source == DATABASE_MASK:
                try:
                    check_anatomy_in_database(request.anatomy_ids, request.region_indices, candidates, names)
                except ValueError as error:
                    raise in_row(where, error) from error
        absent = missing_mask_files(candidates, folder)
        if absent:
            raise ValueError(
                f"all_mask_files_json={str(database_json)!r} names {len(absent)} mask file(s) that "
                f"all_mask_files_base_dir={str(folder)!r} (or its zip) does not hold, e.g. {absent[:3]}: the database and "
                "the mask folder belong to different releases. Use the matching pair (docs/README.md, 'Candidate masks')."
            )
        if not folder.is_dir():
            logger.warning(
                "all_mask_files_base_dir=%s does not exist yet: it will be unpacked from %s (%.1f GB) before generation.",
                folder,
                mask_archive(folder),
                mask_archive(folder).stat().st_size / 1e9,
            )
        return candidates

    def _check_user_masks(self) -> None:
        """Check every user mask; keep the findings (warnings are logged) for the run report."""
        users = [(r, w) for r, w in zip(self.requests, self.request_places) if r.mask_source == USER_MASK]
        reference = load_organ_volume_reference(self.all_files.get("organ_volume_reference")) if users else None
        for request, where in tqdm(users, desc="checking user masks", unit="mask", disable=not self.progress or len(users) < 2):
            try:
                findings = check_user_mask_ct(request.mask_path, request, self.version, self.label_dict, self.mask_check_strict, reference)
            except ValueError as error:
                raise in_row(where, error) from error
            self._record_mask_findings(request, where, findings)

    def prepare(self) -> None:
        """
        Before any weight loads: require every needed file, and unpack the candidate-mask folder if needed.

        Raises
        ------
        FileNotFoundError
            a needed file is missing (listed with the download command).
        """
        self.files.require()
        if DATABASE_MASK in self.sources():
            if rank_and_world_size()[0] == 0:  # one process unpacks, the others wait for it
                prepare_mask_folder(self.all_files["all_mask_files_base_dir"], self.progress)
            barrier()

    # report ---------------------------------------------------------------------------------------------

    def output_settings(self) -> dict[str, Any]:
        return {
            **super().output_settings(),
            "modality": self.modality,
            "image_only": self.image_only,
            "num_inference_steps": self.num_inference_steps,
            "mask_generation_num_inference_steps": self.mask_generation_num_inference_steps,
            "cfg_guidance_scale": self.cfg_guidance_scale,
            "quality_check_max_attempts": self.quality_check_max_attempts,
            "augment_masks": self.augment_masks,
            "label_output_ext": self.label_output_ext,
        }
