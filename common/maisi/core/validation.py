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
Validation of the user-facing inputs of MAISI generation, meant to run before any weights load.

Every function is pure (apart from reading the JSON file it is given) and raises ``ValueError`` whose
message names the config id, the rejected value and what is allowed, so a typo costs a second rather
than the minutes it takes to load five networks. ``validate_ct_generation_inputs`` and
``validate_mr_generation_inputs`` run every check of one bundle and return the normalised values.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .constants import BODY_REGION_ALIASES, BODY_REGIONS, CONTROLLABLE_ANATOMIES, TUMOR_LABELS

__all__ = [
    "CT_OUTPUT_SIZE_XY",
    "CT_OUTPUT_SIZE_Z",
    "CT_SPACING_XY_RANGE",
    "CT_SPACING_Z_RANGE",
    "CT_MIN_FIELD_OF_VIEW_MM",
    "CT_MODALITY_CODES",
    "CT_VERSIONS",
    "CTGenerationInputs",
    "MAX_CONTROLLABLE_ANATOMIES",
    "MAX_INFERENCE_STEPS",
    "MR_MAX_FIELD_OF_VIEW_MM",
    "MR_MIN_MODALITY_CODE",
    "MR_OUTPUT_SIZES",
    "MR_SPACING_RANGE",
    "MR_VERSIONS",
    "MRGenerationInputs",
    "OUTPUT_EXT_BACKENDS",
    "REFUSED_OUTPUT_EXTS",
    "check_anatomy_list",
    "check_anatomy_matches_regions",
    "check_body_region",
    "check_cfg_guidance_scale",
    "check_controllable_anatomy_size",
    "check_controlnet_label_mapping",
    "check_field_of_view_mr",
    "check_num_steps",
    "check_output_ext",
    "check_output_size_ct",
    "check_output_size_mr",
    "check_sliding_window",
    "check_spacing_ct",
    "check_spacing_mr",
    "load_label_dict",
    "load_modality_mapping",
    "resolve_modality",
    "validate_ct_generation_inputs",
    "validate_mr_generation_inputs",
]

# CT geometry the released CT weights support (the model zoo's ``check_input``, NV ``check_input_ct``).
CT_OUTPUT_SIZE_XY = (256, 384, 512)
CT_OUTPUT_SIZE_Z = (128, 256, 384, 512, 640, 768)
CT_SPACING_XY_RANGE = (0.5, 3.0)  # mm, inclusive
CT_SPACING_Z_RANGE = (0.5, 5.0)  # mm, inclusive
CT_MIN_FIELD_OF_VIEW_MM = 256.0  # output_size[0] * spacing[0]

# MR geometry (NV ``check_input_mr``): z selects the allowed (x, y, z) shapes.
MR_OUTPUT_SIZES = MappingProxyType(
    {
        128: ((128, 128, 128), (256, 256, 128), (384, 384, 128), (512, 512, 128)),
        256: ((128, 256, 256), (256, 128, 256), (256, 256, 256)),
    }
)
MR_SPACING_RANGE = (0.4, 5.0)  # mm, inclusive, every axis
# Largest MR field of view per axis (output_size * spacing): MR scanners image at most about 50 cm per axis,
# and the published recommended MR fields of view span 90-380 mm; 512 keeps "512 voxels at 1 mm" allowed.
MR_MAX_FIELD_OF_VIEW_MM = 512.0

# Modality codes of modality_mapping.json: 0 is "unknown" (the classifier-free-guidance null class),
# 1..7 are CT, 8 and above are MR.
CT_MODALITY_CODES = range(1, 8)
MR_MIN_MODALITY_CODE = 8

CT_VERSIONS = ("rflow-ct", "ddpm-ct")
MR_VERSIONS = ("rflow-mr", "rflow-mr-brain")
# Per-version defaults used when an id is left unset (None): steps and classifier-free guidance scale.
_DEFAULT_STEPS = MappingProxyType({"rflow-ct": 30, "ddpm-ct": 1000, "rflow-mr": 30, "rflow-mr-brain": 30})
_DEFAULT_CFG_SCALE = MappingProxyType({"rflow-ct": 0.0, "ddpm-ct": 0.0, "rflow-mr": 15.0, "rflow-mr-brain": 2.0})
_DEFAULT_CT_MODALITY = 1  # "ct"

MAX_CONTROLLABLE_ANATOMIES = len(CONTROLLABLE_ANATOMIES)  # the mask generator's size condition has 10 slots
MAX_INFERENCE_STEPS = 1000  # num_train_timesteps of every MAISI noise scheduler
_REMOVE_ANATOMY_SIZE = -1.0  # controllable_anatomy_size value that removes the anatomy

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
# Extensions MONAI resolves to a writer that cannot store a generated volume correctly, with the reason.
REFUSED_OUTPUT_EXTS = MappingProxyType(
    {
        ".dcm": (
            "itk's DICOM (GDCM) writer stores a 3D volume as one multi-frame file only for unsigned pixels, so "
            "int16 HU (and label maps with ids above 255) cannot be written; write '.nii.gz', '.nrrd' or '.mha' "
            "and convert it to a DICOM series with a DICOM tool"
        ),
    }
)


# ---------------------------------------------------------------------------------------------------
# small private helpers
# ---------------------------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest of ``choices`` (case-insensitive), or ``""``."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" Did you mean {by_lower[match[0]]!r}?" if match else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _as_list_or_none(value: Any) -> list[Any] | None:
    """``value`` as a list when it is a list, tuple or array-like (not a string or a mapping), else ``None``."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        return None
    return list(value)


def _as_list(name: str, value: Any) -> list[Any]:
    """``value`` as a list, else a ``ValueError`` naming the config id ``name``."""
    items = _as_list_or_none(value)
    if items is None:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a list.")
    return items


def _int_triple(name: str, value: Any) -> tuple[int, int, int]:
    """Three integers >= 1, else a ``ValueError`` naming ``name``."""
    items = _as_list_or_none(value)
    if items is None or len(items) != 3 or not all(_is_int(v) and v >= 1 for v in items):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a list of 3 integers >= 1 (x, y, z).")
    return int(items[0]), int(items[1]), int(items[2])


def _float_triple(name: str, value: Any) -> tuple[float, float, float]:
    """Three finite numbers > 0, else a ``ValueError`` naming ``name``."""
    items = _as_list_or_none(value)
    if items is None or len(items) != 3 or not all(_is_real(v) and v > 0 for v in items):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a list of 3 finite numbers > 0 (x, y, z in mm).")
    return float(items[0]), float(items[1]), float(items[2])


def _check_version(version: Any, allowed: Sequence[str], kind: str) -> str:
    if not isinstance(version, str) or version.strip().lower() not in allowed:
        hint = _did_you_mean(version, allowed) if isinstance(version, str) else ""
        article = "an" if kind == "MR" else "a"
        raise ValueError(f"version={version!r} is not {article} {kind} version.{hint} Allowed: {list(allowed)}.")
    return version.strip().lower()


def _require_empty(name: str, value: Any, reason: str) -> None:
    if value is not None and len(_as_list(name, value)) > 0:
        raise ValueError(f"{name}={value!r} is not allowed: {reason}; leave it empty ([]).")


def _load_json(name: str, path: str | os.PathLike) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{name}={str(path)!r} does not exist or is not a file.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name}={str(path)!r} is not a readable JSON file ({error}).") from error


def _load_name_to_code(name: str, path: str | os.PathLike, minimum: int) -> dict[str, int]:
    content = _load_json(name, path)
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{name}={str(path)!r} must hold a non-empty JSON object mapping names to integers.")
    bad = {k: v for k, v in content.items() if not (_is_int(v) and v >= minimum)}
    if bad:
        shown = dict(list(bad.items())[:5])
        raise ValueError(f"{name}={str(path)!r} maps names to values that are not integers >= {minimum}: {shown}.")
    return {str(k): int(v) for k, v in content.items()}


# ---------------------------------------------------------------------------------------------------
# data files
# ---------------------------------------------------------------------------------------------------


def load_label_dict(path: str | os.PathLike) -> dict[str, int]:
    """
    Read ``label_dict.json`` (anatomy name -> MAISI label id).

    Parameters
    ----------
    path
        the file, the ``label_dict_json`` config id.

    Returns
    -------
    dict[str, int]
        The mapping, in file order.

    Raises
    ------
    ValueError
        the file is missing, is not JSON, or does not map names to integer ids >= 1.
    """
    return _load_name_to_code("label_dict_json", path, minimum=1)


def load_modality_mapping(path: str | os.PathLike) -> dict[str, int]:
    """
    Read ``modality_mapping.json`` (modality name -> code, e.g. ``"ct": 1``, ``"mri_t1": 9``).

    Parameters
    ----------
    path
        the file, the ``modality_mapping_json`` config id.

    Raises
    ------
    ValueError
        the file is missing, is not JSON, or does not map names to integer codes >= 0.
    """
    return _load_name_to_code("modality_mapping_json", path, minimum=0)


# ---------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------


def check_output_size_ct(output_size: Any) -> tuple[int, int, int]:
    """
    Check a CT ``output_size``: x == y, x in ``CT_OUTPUT_SIZE_XY``, z in ``CT_OUTPUT_SIZE_Z``.

    Other sizes (e.g. any multiple of 16) are not supported by the released CT weights.

    Returns
    -------
    tuple[int, int, int]
        ``(x, y, z)`` as integers.
    """
    x, y, z = _int_triple("output_size", output_size)
    allowed = f"x = y in {list(CT_OUTPUT_SIZE_XY)} and z in {list(CT_OUTPUT_SIZE_Z)}"
    if x != y:
        raise ValueError(
            f"output_size={output_size!r} is not allowed: x ({x}) and y ({y}) must be equal; allowed: {allowed}."
        )
    if x not in CT_OUTPUT_SIZE_XY:
        raise ValueError(f"output_size={output_size!r} is not allowed: x/y={x} is not supported; allowed: {allowed}.")
    if z not in CT_OUTPUT_SIZE_Z:
        raise ValueError(f"output_size={output_size!r} is not allowed: z={z} is not supported; allowed: {allowed}.")
    return x, y, z


def check_spacing_ct(spacing: Any, output_size: Any) -> tuple[float, float, float]:
    """
    Check a CT ``spacing`` (mm) against ``output_size``.

    x == y, x/y in ``CT_SPACING_XY_RANGE``, z in ``CT_SPACING_Z_RANGE`` and the x/y field of view
    ``output_size[0] * spacing[0]`` at least ``CT_MIN_FIELD_OF_VIEW_MM`` (smaller views are out of
    the training distribution and come out poorly).

    Returns
    -------
    tuple[float, float, float]
        ``(x, y, z)`` as floats.
    """
    sx, sy, sz = _float_triple("spacing", spacing)
    size = _int_triple("output_size", output_size)
    low_xy, high_xy = CT_SPACING_XY_RANGE
    low_z, high_z = CT_SPACING_Z_RANGE
    allowed = f"x = y in [{low_xy}, {high_xy}] mm and z in [{low_z}, {high_z}] mm"
    if not math.isclose(sx, sy, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(
            f"spacing={spacing!r} is not allowed: x ({sx}) and y ({sy}) must be equal; allowed: {allowed}."
        )
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


def check_output_size_mr(output_size: Any) -> tuple[int, int, int]:
    """
    Check an MR ``output_size``: z = 128 needs x = y in {128, 256, 384, 512}; z = 256 needs (x, y) one
    of (128, 256), (256, 128), (256, 256); other z are not supported (``MR_OUTPUT_SIZES``).

    Returns
    -------
    tuple[int, int, int]
        ``(x, y, z)`` as integers.
    """
    size = _int_triple("output_size", output_size)
    allowed = "; ".join(f"z={z}: {[list(s) for s in shapes]}" for z, shapes in MR_OUTPUT_SIZES.items())
    if size[2] not in MR_OUTPUT_SIZES:
        raise ValueError(
            f"output_size={output_size!r} is not allowed: z={size[2]} is not supported for MR; allowed: {allowed}."
        )
    if size not in MR_OUTPUT_SIZES[size[2]]:
        raise ValueError(
            f"output_size={output_size!r} is not allowed: x/y={list(size[:2])} is not supported with z={size[2]}; "
            f"allowed: {allowed}."
        )
    return size


def check_spacing_mr(spacing: Any) -> tuple[float, float, float]:
    """
    Check an MR ``spacing`` (mm): every axis in ``MR_SPACING_RANGE``; anisotropic x/y is allowed.

    Returns
    -------
    tuple[float, float, float]
        ``(x, y, z)`` as floats.
    """
    values = _float_triple("spacing", spacing)
    low, high = MR_SPACING_RANGE
    for axis, value in zip("xyz", values):
        if not low <= value <= high:
            raise ValueError(
                f"spacing={spacing!r} is not allowed: {axis}={value} mm is out of range; "
                f"allowed: every axis in [{low}, {high}] mm."
            )
    return values


def check_field_of_view_mr(output_size: Any, spacing: Any) -> tuple[float, float, float]:
    """
    Check an MR field of view (``output_size * spacing``, mm): at most ``MR_MAX_FIELD_OF_VIEW_MM`` per axis.

    Returns
    -------
    tuple[float, float, float]
        The field of view ``(x, y, z)`` in mm.
    """
    size = _int_triple("output_size", output_size)
    values = _float_triple("spacing", spacing)
    fov = tuple(float(n * s) for n, s in zip(size, values))
    for axis, extent in zip("xyz", fov):
        if extent > MR_MAX_FIELD_OF_VIEW_MM:
            raise ValueError(
                f"spacing={spacing!r} with output_size={output_size!r} is not allowed: the {axis} field of view is "
                f"{extent:g} mm, more than the {MR_MAX_FIELD_OF_VIEW_MM:g} mm an MR scan covers; reduce the spacing "
                "or the size (recommended fields of view per anatomy are in docs/README.md)."
            )
    return fov  # type: ignore[return-value]


def check_controlnet_label_mapping(mapping: Any) -> dict[int, int]:
    """
    Check ``controlnet_label_mapping``: ``None`` or ``{source_id: target_id}`` of integers (JSON keys may be
    strings) with source ids above 255 and targets in [0, 255]; it extends the default MR table
    (``constants.MR_CONTROLNET_LABEL_MAP``) that maps label ids the 8-bit ControlNet condition cannot hold.

    Returns
    -------
    dict[int, int]
        The mapping with integer keys and values (empty for ``None``).
    """
    if mapping is None:
        return {}
    message = (
        f"controlnet_label_mapping={mapping!r} is not allowed; it must be null or a dict "
        "{source_id: target_id} with integer source ids above 255 and integer targets in [0, 255]."
    )
    if not isinstance(mapping, Mapping):
        raise ValueError(message)
    checked = {}
    for source, target in mapping.items():
        source_id = int(source) if isinstance(source, str) and source.strip().isdigit() else source
        if not (_is_int(source_id) and source_id > 255 and _is_int(target) and 0 <= target <= 255):
            raise ValueError(f"{message} Bad entry: {source!r}: {target!r}.")
        checked[int(source_id)] = int(target)
    return checked


# ---------------------------------------------------------------------------------------------------
# body regions and anatomies
# ---------------------------------------------------------------------------------------------------


def check_body_region(body_region: Any) -> list[int]:
    """
    Map ``body_region`` names to body-region indices (0 head, 1 chest, 2 abdomen, 3 pelvis).

    Names are case-insensitive and include the aliases of ``BODY_REGION_ALIASES`` ("thorax",
    "chest/thorax", "lower", "pelvis/lower"). A single name may be given as a string. An empty list
    means no region filter.

    Returns
    -------
    list[int]
        The distinct region indices, sorted.

    Raises
    ------
    ValueError
        a name is not a body region (the closest valid name is suggested).
    """
    names = [body_region] if isinstance(body_region, str) else _as_list("body_region", body_region)
    allowed = list(BODY_REGION_ALIASES)
    indices = set()
    for name in names:
        key = name.strip().lower() if isinstance(name, str) else None
        if key not in BODY_REGION_ALIASES:
            hint = _did_you_mean(name, allowed) if isinstance(name, str) else ""
            raise ValueError(
                f"body_region={body_region!r} is not allowed: {name!r} is not a body region.{hint} "
                f"Allowed (case-insensitive): {allowed}."
            )
        indices.add(BODY_REGION_ALIASES[key])
    return sorted(indices)


def _anatomy_names(label_dict: Mapping[str, int]) -> dict[str, str]:
    """Lower-case name -> name of the real anatomies of ``label_dict`` (``dummy*`` placeholders left out)."""
    return {name.lower(): name for name in label_dict if not name.lower().startswith("dummy")}


def check_anatomy_list(anatomy_list: Any, label_dict: Mapping[str, int]) -> list[int]:
    """
    Map ``anatomy_list`` entries to MAISI label ids, in order.

    An entry is a name of ``label_dict`` (case-insensitive; the ``dummy*`` placeholders are not
    anatomies) or an integer id present in ``label_dict`` (a placeholder id is accepted, since
    fine-tuning may give it a new class). An empty list is allowed.

    Returns
    -------
    list[int]
        The label ids, in the order given.

    Raises
    ------
    ValueError
        an unknown name (the closest anatomy is suggested), an unknown id, or an anatomy
        listed twice.
    """
    entries = _as_list("anatomy_list", anatomy_list)
    names = _anatomy_names(label_dict)
    ids = set(label_dict.values())
    seen: dict[int, Any] = {}
    for entry in entries:
        if isinstance(entry, str):
            key = entry.strip().lower()
            if key not in names:
                raise ValueError(
                    f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} is not an anatomy of label_dict_json."
                    f"{_did_you_mean(entry, names.values())} Allowed: the names of label_dict_json (case-insensitive, "
                    f"not dummy*), e.g. {list(names.values())[:6]}, or their integer ids."
                )
            label = label_dict[names[key]]
        elif _is_int(entry):
            if entry not in ids:
                raise ValueError(
                    f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} is not a label id of label_dict_json; "
                    f"allowed ids: {sorted(ids)}."
                )
            label = int(entry)
        else:
            raise ValueError(
                f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} is neither an anatomy name nor an integer id."
            )
        if label in seen:
            raise ValueError(
                f"anatomy_list={anatomy_list!r} is not allowed: {entry!r} repeats {seen[label]!r} (label {label}); "
                "list each anatomy once."
            )
        seen[label] = entry
    return list(seen)


def _one_hot_index(entry: Mapping[str, Any], key: str, position: int) -> int | None:
    """First hot slot of a region one-hot of a database entry, ``None`` when the entry lacks ``key``."""
    if entry.get(key) is None:
        return None
    one_hot = _as_list_or_none(entry[key])
    hot = [i for i, v in enumerate(one_hot or []) if v]
    if one_hot is None or len(one_hot) != len(BODY_REGIONS) or not hot:
        raise ValueError(
            f"candidate mask entry {position} has {key}={entry[key]!r}; it must be a one-hot list of "
            f"length {len(BODY_REGIONS)} ({', '.join(BODY_REGIONS)})."
        )
    return hot[0]


def _labels_and_span(entry: Any, position: int) -> tuple[frozenset[int], range | None]:
    """
    The label ids and the covered region indices of a candidate mask, ``None`` span when unknown.

    ``entry`` is a database JSON entry (``label_list``, ``top_region_index``, ``bottom_region_index``)
    or an object with ``label_ids`` and ``region_span`` (``masks.Candidate``).
    """
    if not isinstance(entry, Mapping) and hasattr(entry, "label_ids") and hasattr(entry, "region_span"):
        return frozenset(int(i) for i in entry.label_ids), entry.region_span
    labels = _as_list_or_none(entry.get("label_list")) if isinstance(entry, Mapping) else None
    if labels is None or not all(_is_int(v) for v in labels):
        raise ValueError(f"candidate mask entry {position} has no 'label_list' list of integer label ids.")
    top = _one_hot_index(entry, "top_region_index", position)
    bottom = _one_hot_index(entry, "bottom_region_index", position)
    if top is None or bottom is None:
        return frozenset(int(v) for v in labels), None
    low, high = sorted((top, bottom))
    return frozenset(int(v) for v in labels), range(low, high + 1)


def check_anatomy_matches_regions(
    anatomy_ids: Sequence[int],
    region_indices: Sequence[int],
    candidate_entries: Sequence[Any],
    label_names: Mapping[int, str] | None = None,
    exclude_unrequested_tumors: bool = True,
) -> list[Any]:
    """
    Check that the candidate-mask database holds a mask with every anatomy, spanning every region.

    An entry matches when its ``label_list`` contains all of ``anatomy_ids`` and its region span
    (``top_region_index`` .. ``bottom_region_index``, one-hot lists of length 4) covers every index
    of ``region_indices``; an entry without region information is not filtered on regions. As in the
    mask retrieval (``masks.filter_candidates``), an entry holding a tumour (``TUMOR_LABELS``) that is
    not requested is not used when ``exclude_unrequested_tumors``.

    Parameters
    ----------
    anatomy_ids
        label ids (``check_anatomy_list``).
    region_indices
        body-region indices (``check_body_region``).
    candidate_entries
        the entries of the candidate-mask database JSON (dicts), or objects with
        ``label_ids`` and ``region_span`` such as ``masks.Candidate``.
    label_names
        label id -> name, to name the anatomies in the message (e.g. the inverted label dict).
    exclude_unrequested_tumors
        skip entries that hold a tumour not in ``anatomy_ids``.

    Returns
    -------
    list[Any]
        The matching entries, in input order.

    Raises
    ------
    ValueError
        no entry matches; the message names ``anatomy_list`` and ``body_region`` and lists,
        for each requested anatomy, the body regions in which the database has it.
    """
    wanted = {int(i) for i in anatomy_ids}
    regions = sorted({int(r) for r in region_indices})
    unrequested_tumors = set(TUMOR_LABELS.values()) - wanted if exclude_unrequested_tumors else set()
    usable = []
    for position, entry in enumerate(candidate_entries):
        labels, span = _labels_and_span(entry, position)
        if not labels & unrequested_tumors:
            usable.append((entry, labels, span))

    matches = [
        entry for entry, labels, span in usable if wanted <= labels and (span is None or all(r in span for r in regions))
    ]
    if matches:
        return matches

    names = label_names or {}
    lines = []
    for label in anatomy_ids:
        holders = [span for _, labels, span in usable if label in labels]
        found = sorted({r for span in holders if span is not None for r in span})
        where = ", ".join(BODY_REGIONS[r] for r in found) if found else "no mask at all"
        if holders and any(span is None for span in holders):
            where += " (and masks without region information)"
        lines.append(f"{names[label]!r} ({label}): {where}" if label in names else f"{label}: {where}")
    requested = [names.get(i, i) for i in anatomy_ids]
    region_names = [BODY_REGIONS[r] for r in regions]
    skipped = " (masks holding a tumour that is not in anatomy_list are not used)" if unrequested_tumors else ""
    raise ValueError(
        f"anatomy_list={requested!r} (ids {list(anatomy_ids)}) with body_region={region_names} matches none of the "
        f"{len(candidate_entries)} candidate masks{skipped}: no mask holds all these anatomies while spanning all "
        f"these regions. The database has each anatomy in: {'; '.join(lines) or 'n/a'}. Choose body_region "
        "among those regions or drop anatomies from anatomy_list."
    )


def check_controllable_anatomy_size(controllable_anatomy_size: Any) -> list[tuple[str, float]]:
    """
    Check ``controllable_anatomy_size``, the ``[name, size]`` pairs of the mask generator.

    At most ``MAX_CONTROLLABLE_ANATOMIES`` pairs; names from ``CONTROLLABLE_ANATOMIES``
    (case-insensitive), each at most once, with at most one tumour (``TUMOR_LABELS``); sizes in
    [0, 1] (relative size) or exactly -1 (remove the anatomy). An empty list disables mask generation.

    Returns
    -------
    list[tuple[str, float]]
        The ``(name, size)`` pairs, names lower-case.
    """
    pairs = _as_list("controllable_anatomy_size", controllable_anatomy_size)
    if len(pairs) > MAX_CONTROLLABLE_ANATOMIES:
        raise ValueError(
            f"controllable_anatomy_size has {len(pairs)} entries; at most {MAX_CONTROLLABLE_ANATOMIES} are allowed "
            f"(one per controllable anatomy: {list(CONTROLLABLE_ANATOMIES)})."
        )
    result: list[tuple[str, float]] = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: {pair!r} must be a "
                "[name, size] pair, e.g. ['liver', 0.5]."
            )
        name, size = pair
        key = name.strip().lower() if isinstance(name, str) else None
        if key not in CONTROLLABLE_ANATOMIES:
            hint = _did_you_mean(name, CONTROLLABLE_ANATOMIES) if isinstance(name, str) else ""
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: {name!r} is not a "
                f"controllable anatomy.{hint} Allowed: {list(CONTROLLABLE_ANATOMIES)}."
            )
        if not _is_real(size) or not (0.0 <= size <= 1.0 or size == _REMOVE_ANATOMY_SIZE):
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: size {size!r} of {key!r} "
                "must be in [0, 1] or exactly -1 (remove the anatomy)."
            )
        if any(key == seen for seen, _ in result):
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: {key!r} is given twice."
            )
        result.append((key, float(size)))
    tumors = [name for name, _ in result if name in TUMOR_LABELS]
    if len(tumors) > 1:
        raise ValueError(
            f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: it has {len(tumors)} tumours "
            f"{tumors}; at most one of {list(TUMOR_LABELS)} is allowed."
        )
    return result


# ---------------------------------------------------------------------------------------------------
# modality, sampling and decoding knobs, outputs
# ---------------------------------------------------------------------------------------------------


def _modality_family(code: int) -> str | None:
    if code in CT_MODALITY_CODES:
        return "ct"
    if code >= MR_MIN_MODALITY_CODE:
        return "mr"
    return None


def resolve_modality(modality: Any, modality_mapping: Mapping[str, int], allowed: str) -> int:
    """
    Resolve ``modality`` (a name such as ``"ct"`` or ``"mri_t1"``, case-insensitive, or an integer code
    of ``modality_mapping``) to its code, refusing the other family.

    Parameters
    ----------
    modality
        the ``modality`` config id.
    modality_mapping
        ``modality_mapping.json`` (name -> code).
    allowed
        ``"ct"`` (codes 1..7) or ``"mr"`` (codes >= 8). Code 0 ("unknown", the
        classifier-free-guidance null class) is never allowed.

    Returns
    -------
    int
        The modality code.
    """
    family = allowed.strip().lower() if isinstance(allowed, str) else allowed
    if family not in ("ct", "mr"):
        raise ValueError(f"allowed={allowed!r} is not allowed; it must be 'ct' or 'mr'.")
    valid = {name: code for name, code in modality_mapping.items() if _modality_family(code) == family}
    listing = ", ".join(f"{name} ({code})" for name, code in valid.items())
    other = "maisi_mr_generative" if family == "ct" else "maisi_ct_generative"
    if isinstance(modality, str) and modality.strip().isdigit():
        modality = int(modality.strip())
    if isinstance(modality, str):
        by_lower = {name.lower(): name for name in modality_mapping}
        key = modality.strip().lower()
        if key not in by_lower:
            raise ValueError(
                f"modality={modality!r} is not a modality of modality_mapping_json.{_did_you_mean(modality, valid)} "
                f"Allowed ({family.upper()}): {listing}."
            )
        name, code = by_lower[key], modality_mapping[by_lower[key]]
    elif _is_int(modality):
        code = int(modality)
        names = [name for name, value in modality_mapping.items() if value == code]
        if not names:
            raise ValueError(
                f"modality={modality!r} is not a code of modality_mapping_json; allowed ({family.upper()}): {listing}."
            )
        name = names[0]
    else:
        raise ValueError(f"modality={modality!r} is not allowed; give a name or an integer code: {listing}.")
    code_family = _modality_family(code)
    if code_family is None:
        raise ValueError(
            f"modality={modality!r} ({name}, code {code}) is not allowed: code 0 is the unconditional "
            f"(classifier-free-guidance) class, not a modality. Allowed ({family.upper()}): {listing}."
        )
    if code_family != family:
        article = "a CT" if code_family == "ct" else "an MR"
        raise ValueError(
            f"modality={modality!r} ({name}, code {code}) is {article} modality, but this is "
            f"{family.upper()} generation (use the {other} bundle for it). Allowed ({family.upper()}): {listing}."
        )
    return code


def check_cfg_guidance_scale(scale: Any) -> float:
    """
    Check ``cfg_guidance_scale``: a finite number >= 0.

    0 turns classifier-free guidance off; 1 gives the conditional prediction alone (no guidance effect
    at twice the cost); values above 1 strengthen the condition.
    """
    if not _is_real(scale) or scale < 0:
        raise ValueError(f"cfg_guidance_scale={scale!r} is not allowed; it must be a finite number >= 0 (0 = off).")
    return float(scale)


def check_num_steps(name: str, value: Any, maximum: int) -> int:
    """Check that ``value`` (the config id ``name``) is an integer in [1, ``maximum``]."""
    if not _is_int(value) or not 1 <= value <= maximum:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer in [1, {maximum}].")
    return int(value)


def check_sliding_window(
    roi_size: Any, overlap: Any, num_splits: Any
) -> tuple[tuple[int, int, int] | None, float, int | None]:
    """
    Check the decoder's memory knobs.

    Parameters
    ----------
    roi_size
        ``autoencoder_sliding_window_infer_size``, the sliding-window ROI in **latent** voxels
        (x4 in image voxels), or ``None`` to decode the whole latent at once.
    overlap
        ``autoencoder_sliding_window_infer_overlap``, in [0, 1).
    num_splits
        ``autoencoder_tp_num_splits``, the autoencoder's spatial split count (an integer
        >= 1), or ``None`` for the network config's default.

    Returns
    -------
    tuple[tuple[int, int, int] | None, float, int | None]
        ``(roi_size, overlap, num_splits)`` normalised.
    """
    roi = None if roi_size is None else _int_triple("autoencoder_sliding_window_infer_size", roi_size)
    if not _is_real(overlap) or not 0.0 <= overlap < 1.0:
        raise ValueError(
            f"autoencoder_sliding_window_infer_overlap={overlap!r} is not allowed; it must be a number in [0, 1)."
        )
    if num_splits is not None and (not _is_int(num_splits) or num_splits < 1):
        raise ValueError(
            f"autoencoder_tp_num_splits={num_splits!r} is not allowed; it must be an integer >= 1 "
            "(or unset for the network default)."
        )
    return roi, float(overlap), None if num_splits is None else int(num_splits)


def _backend_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_output_ext(name: str, ext: Any) -> str:
    """
    Check that MONAI's ``SaveImage`` can write a 3D volume with the extension ``ext``.

    ``.nii.gz`` and ``.nii`` need nibabel (or itk); ``.nrrd`` and ``.mha`` need itk
    (``OUTPUT_EXT_BACKENDS``). ``.dcm`` is refused with its reason (``REFUSED_OUTPUT_EXTS``). The leading
    dot is optional and case is ignored, as in ``SaveImage``.

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
    if key in REFUSED_OUTPUT_EXTS:
        raise ValueError(
            f"{name}={ext!r} is not allowed: {REFUSED_OUTPUT_EXTS[key]}; allowed: {list(OUTPUT_EXT_BACKENDS)}."
        )
    if key not in OUTPUT_EXT_BACKENDS:
        allowed = {e: " or ".join(m) for e, m in OUTPUT_EXT_BACKENDS.items()}
        raise ValueError(
            f"{name}={ext!r} is not allowed; allowed 3D image extensions (with the package each needs): {allowed}."
        )
    backends = OUTPUT_EXT_BACKENDS[key]
    if not any(_backend_available(module) for module in backends):
        usable = [e for e, modules in OUTPUT_EXT_BACKENDS.items() if any(_backend_available(m) for m in modules)]
        raise ValueError(
            f"{name}={ext!r} needs the {' or '.join(repr(m) for m in backends)} package, which is not installed; "
            f"install it (pip install {backends[0]}) or use one of {usable}."
        )
    return key


# ---------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTGenerationInputs:
    """
    The normalised inputs of one CT generation run (``validate_ct_generation_inputs``).

    Attributes
    ----------
    version
        ``"rflow-ct"`` or ``"ddpm-ct"``.
    output_size
        (x, y, z) voxels.
    spacing
        (x, y, z) mm.
    region_indices
        body-region indices the candidate mask must span (empty with mask generation).
    anatomy_ids
        label ids required in the mask and kept in the output label file, in order.
    controllable_anatomy_size
        ``(name, size)`` pairs; non-empty means the mask is generated.
    modality
        modality code fed to the UNet, ``None`` for ddpm-ct (no modality input).
    num_inference_steps
        image diffusion steps.
    mask_generation_num_inference_steps
        mask diffusion steps.
    cfg_guidance_scale
        classifier-free guidance scale (0 = off).
    autoencoder_sliding_window_infer_size
        latent ROI of the decoder, ``None`` for one pass.
    autoencoder_sliding_window_infer_overlap
        sliding-window overlap.
    autoencoder_tp_num_splits
        autoencoder split count, ``None`` for the network default.
    image_output_ext
        image file extension.
    label_output_ext
        label file extension.
    """

    version: str
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    region_indices: tuple[int, ...]
    anatomy_ids: tuple[int, ...]
    controllable_anatomy_size: tuple[tuple[str, float], ...]
    modality: int | None
    num_inference_steps: int
    mask_generation_num_inference_steps: int
    cfg_guidance_scale: float
    autoencoder_sliding_window_infer_size: tuple[int, int, int] | None
    autoencoder_sliding_window_infer_overlap: float
    autoencoder_tp_num_splits: int | None
    image_output_ext: str
    label_output_ext: str

    @property
    def generates_mask(self) -> bool:
        """Whether the mask comes from the mask generator (``controllable_anatomy_size`` given)."""
        return bool(self.controllable_anatomy_size)


@dataclass(frozen=True)
class MRGenerationInputs:
    """
    The normalised inputs of one MR generation run (``validate_mr_generation_inputs``).

    Attributes
    ----------
    version
        ``"rflow-mr"`` or ``"rflow-mr-brain"``.
    output_size
        (x, y, z) voxels.
    spacing
        (x, y, z) mm.
    modality
        MR modality code (>= 8).
    num_inference_steps
        diffusion steps.
    cfg_guidance_scale
        classifier-free guidance scale (0 = off).
    autoencoder_sliding_window_infer_size
        latent ROI of the decoder, ``None`` for one pass.
    autoencoder_sliding_window_infer_overlap
        sliding-window overlap.
    autoencoder_tp_num_splits
        autoencoder split count, ``None`` for the network default.
    image_output_ext
        image file extension.
    """

    version: str
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    modality: int
    num_inference_steps: int
    cfg_guidance_scale: float
    autoencoder_sliding_window_infer_size: tuple[int, int, int] | None
    autoencoder_sliding_window_infer_overlap: float
    autoencoder_tp_num_splits: int | None
    image_output_ext: str


def validate_ct_generation_inputs(
    *,
    version: str,
    output_size: Any,
    spacing: Any,
    label_dict_json: str | os.PathLike,
    body_region: Any = (),
    anatomy_list: Any = (),
    controllable_anatomy_size: Any = (),
    modality: Any = None,
    modality_mapping_json: str | os.PathLike | None = None,
    num_inference_steps: Any = None,
    mask_generation_num_inference_steps: Any = None,
    cfg_guidance_scale: Any = None,
    autoencoder_sliding_window_infer_size: Any = None,
    autoencoder_sliding_window_infer_overlap: Any = 0.25,
    autoencoder_tp_num_splits: Any = None,
    image_output_ext: Any = ".nii.gz",
    label_output_ext: Any = ".nii.gz",
    candidate_masks: Sequence[Mapping[str, Any]] | None = None,
) -> CTGenerationInputs:
    """
    Run every check of CT generation (paired image + mask) and return the normalised inputs.

    Two mask paths exist:

    - ``controllable_anatomy_size`` non-empty: the mask is generated. The anatomy list is **replaced**
      by the organs of ``controllable_anatomy_size`` (all of them, also those sized -1), and
      ``body_region`` and ``anatomy_list`` are ignored (not validated).
    - otherwise the mask is retrieved from the candidate-mask database: ``body_region`` and
      ``anatomy_list`` are validated and, when ``candidate_masks`` (the database entries) is given,
      checked against it (``check_anatomy_matches_regions``).

    Parameters
    ----------
    version
        ``"rflow-ct"`` or ``"ddpm-ct"``.
    output_size, spacing
        see ``check_output_size_ct`` and ``check_spacing_ct``.
    label_dict_json
        path of ``label_dict.json``.
    body_region, anatomy_list, controllable_anatomy_size
        see the matching ``check_*`` functions.
    modality
        CT modality name or code; ``None`` means ``"ct"`` (1). ddpm-ct has no modality
        input, so only ``None`` or a CT modality is accepted and the result's modality is ``None``.
    modality_mapping_json
        path of ``modality_mapping.json``, required when ``modality`` is given.
    num_inference_steps
        image diffusion steps in [1, 1000]; ``None`` for the version default
        (rflow-ct 30, ddpm-ct 1000).
    mask_generation_num_inference_steps
        mask diffusion steps in [1, 1000]; ``None`` for 1000.
    cfg_guidance_scale
        tumour classifier-free guidance scale, >= 0 (0 = off); ``None`` for 0.
    autoencoder_sliding_window_infer_size, autoencoder_sliding_window_infer_overlap, autoencoder_tp_num_splits
        see ``check_sliding_window``.
    image_output_ext, label_output_ext
        see ``check_output_ext``.
    candidate_masks
        the entries of the candidate-mask database JSON, or ``None`` to skip that check.

    Raises
    ------
    ValueError
        the first input that fails; the message names its config id.
    """
    version = _check_version(version, CT_VERSIONS, "CT")
    size = check_output_size_ct(output_size)
    spacing_mm = check_spacing_ct(spacing, size)
    label_dict = load_label_dict(label_dict_json)
    sizes = check_controllable_anatomy_size(controllable_anatomy_size)
    if sizes:
        regions: list[int] = []
        anatomy_ids = check_anatomy_list([name for name, _ in sizes], label_dict)
    else:
        regions = check_body_region(body_region)
        anatomy_ids = check_anatomy_list(anatomy_list, label_dict)
        if candidate_masks is not None:
            names = {label: name for name, label in label_dict.items()}
            check_anatomy_matches_regions(anatomy_ids, regions, candidate_masks, label_names=names)
    code: int | None = _DEFAULT_CT_MODALITY
    if modality is not None:
        if modality_mapping_json is None:
            raise ValueError(f"modality={modality!r} is given but modality_mapping_json is not; set both.")
        code = resolve_modality(modality, load_modality_mapping(modality_mapping_json), "ct")
    if version == "ddpm-ct":
        code = None  # no modality input; a CT modality was accepted above and is implied
    steps = _DEFAULT_STEPS[version] if num_inference_steps is None else num_inference_steps
    mask_steps = mask_generation_num_inference_steps
    mask_steps = MAX_INFERENCE_STEPS if mask_steps is None else mask_steps
    roi, overlap, splits = check_sliding_window(
        autoencoder_sliding_window_infer_size, autoencoder_sliding_window_infer_overlap, autoencoder_tp_num_splits
    )
    return CTGenerationInputs(
        version=version,
        output_size=size,
        spacing=spacing_mm,
        region_indices=tuple(regions),
        anatomy_ids=tuple(anatomy_ids),
        controllable_anatomy_size=tuple(sizes),
        modality=code,
        num_inference_steps=check_num_steps("num_inference_steps", steps, MAX_INFERENCE_STEPS),
        mask_generation_num_inference_steps=check_num_steps(
            "mask_generation_num_inference_steps", mask_steps, MAX_INFERENCE_STEPS
        ),
        cfg_guidance_scale=check_cfg_guidance_scale(
            _DEFAULT_CFG_SCALE[version] if cfg_guidance_scale is None else cfg_guidance_scale
        ),
        autoencoder_sliding_window_infer_size=roi,
        autoencoder_sliding_window_infer_overlap=overlap,
        autoencoder_tp_num_splits=splits,
        image_output_ext=check_output_ext("image_output_ext", image_output_ext),
        label_output_ext=check_output_ext("label_output_ext", label_output_ext),
    )


def validate_mr_generation_inputs(
    *,
    version: str,
    output_size: Any,
    spacing: Any,
    modality: Any,
    modality_mapping_json: str | os.PathLike,
    num_inference_steps: Any = None,
    cfg_guidance_scale: Any = None,
    autoencoder_sliding_window_infer_size: Any = None,
    autoencoder_sliding_window_infer_overlap: Any = 0.25,
    autoencoder_tp_num_splits: Any = None,
    image_output_ext: Any = ".nii.gz",
    body_region: Any = (),
    anatomy_list: Any = (),
    controllable_anatomy_size: Any = (),
) -> MRGenerationInputs:
    """
    Run every check of MR generation (image only) and return the normalised inputs.

    MR generation has no mask database and no mask generator (an MR mask comes from the user, see
    ``maisi_mr_generative``'s ``mask_path``), so ``body_region``, ``anatomy_list`` and
    ``controllable_anatomy_size`` must be empty (they exist to refuse a CT-style request clearly).

    Parameters
    ----------
    version
        ``"rflow-mr"`` or ``"rflow-mr-brain"``.
    output_size, spacing
        see ``check_output_size_mr``, ``check_spacing_mr`` and ``check_field_of_view_mr``.
    modality
        MR modality name (e.g. ``"mri_t1"``) or code (>= 8); required, it selects the contrast.
    modality_mapping_json
        path of ``modality_mapping.json``.
    num_inference_steps
        diffusion steps in [1, 1000]; ``None`` for 30.
    cfg_guidance_scale
        modality classifier-free guidance scale, >= 0; ``None`` for the version
        default (rflow-mr 15, rflow-mr-brain 2).
    autoencoder_sliding_window_infer_size, autoencoder_sliding_window_infer_overlap, autoencoder_tp_num_splits
        see ``check_sliding_window``.
    image_output_ext
        see ``check_output_ext``.
    body_region, anatomy_list, controllable_anatomy_size
        must be empty.

    Raises
    ------
    ValueError
        the first input that fails; the message names its config id.
    """
    version = _check_version(version, MR_VERSIONS, "MR")
    reason = "MR generation is image-only or from a user label map (mask_path); it has no mask database or mask generator"
    _require_empty("body_region", body_region, reason)
    _require_empty("anatomy_list", anatomy_list, reason)
    _require_empty("controllable_anatomy_size", controllable_anatomy_size, reason)
    size = check_output_size_mr(output_size)
    spacing_mm = check_spacing_mr(spacing)
    check_field_of_view_mr(size, spacing_mm)
    if modality is None:
        raise ValueError(
            "modality=None is not allowed: MR generation needs an MR modality name or code, e.g. 'mri_t1' (9)."
        )
    code = resolve_modality(modality, load_modality_mapping(modality_mapping_json), "mr")
    steps = _DEFAULT_STEPS[version] if num_inference_steps is None else num_inference_steps
    scale = _DEFAULT_CFG_SCALE[version] if cfg_guidance_scale is None else cfg_guidance_scale
    roi, overlap, splits = check_sliding_window(
        autoencoder_sliding_window_infer_size, autoencoder_sliding_window_infer_overlap, autoencoder_tp_num_splits
    )
    return MRGenerationInputs(
        version=version,
        output_size=size,
        spacing=spacing_mm,
        modality=code,
        num_inference_steps=check_num_steps("num_inference_steps", steps, MAX_INFERENCE_STEPS),
        cfg_guidance_scale=check_cfg_guidance_scale(scale),
        autoencoder_sliding_window_infer_size=roi,
        autoencoder_sliding_window_infer_overlap=overlap,
        autoencoder_tp_num_splits=splits,
        image_output_ext=check_output_ext("image_output_ext", image_output_ext),
    )
