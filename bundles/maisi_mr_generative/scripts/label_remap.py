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
Map another tool's label ids to MAISI ids (``label_dict.json``).

A mapping is either shipped with the bundle (``configs/label_mapping_<name>.json``, e.g.
``totalsegmentator_v2``; each names its source tool, version and file) or a user JSON. A user JSON is
``{"<source id>": <MAISI id or MAISI name>, ...}`` (e.g. ``{"1": "liver", "2": 3}``), or a copy of a
shipped file (``{"mapping": {"<source id>": {"maisi_id": ..., "source_name": ...}}}``) edited by hand.

Source ids without a MAISI counterpart (a shipped entry with ``maisi_id: null``, or an id the mapping does
not list) take the ``unmapped`` value, ``constants.BODY_LABEL`` (200) by default: MAISI labels every body
voxel without an organ label as body, which is what such a class is. Every such id is reported by name and
voxel count. Background (0) stays 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .constants import BACKGROUND_LABEL, BODY_LABEL

__all__ = [
    "MAPPING_FILE_PREFIX",
    "LabelMapping",
    "RemapResult",
    "as_label_ids",
    "load_mapping",
    "remap_labels",
    "shipped_mappings",
]

MAPPING_FILE_PREFIX = "label_mapping_"
_MAX_OUTPUT_ID = 255  # MAISI ids fit in uint8 (the ControlNet condition is 8 bit planes)


@dataclass(frozen=True)
class MappedClass:
    """One source class: its name in the source tool (if known) and its MAISI id (``None``: no counterpart)."""

    source_name: str | None
    maisi_id: int | None
    maisi_name: str | None
    note: str | None = None


@dataclass(frozen=True)
class LabelMapping:
    """
    A source-id -> MAISI-id mapping.

    Attributes
    ----------
    name
        the shipped name or the user file's path.
    classes
        source id -> :class:`MappedClass`.
    source
        where the source ids come from (tool, version, file), as the mapping file states it.
    """

    name: str
    classes: Mapping[int, MappedClass]
    source: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RemapResult:
    """
    A remapped label map and what happened to every source id found.

    Attributes
    ----------
    labels
        the MAISI label map (``uint8``).
    mapped
        source id -> ``{"source_name", "maisi_id", "maisi_name", "voxels"}``.
    unmapped
        source id -> ``{"source_name", "reason", "voxels", "set_to"}``.
    """

    labels: np.ndarray
    mapped: dict[int, dict[str, Any]]
    unmapped: dict[int, dict[str, Any]]


def as_label_ids(labels: Any, where: str) -> np.ndarray:
    """
    ``labels`` as an integer array of label ids (whole numbers stored as floats become ``int32``).

    Raises
    ------
    ValueError
        naming ``where``, for non-integer, non-finite or negative values.
    """
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{where} holds non-integer values; a label map holds integer label ids.")
        if array.size and float(np.abs(array).max()) > np.iinfo(np.int32).max:
            raise ValueError(f"{where} holds ids beyond the int32 range; label ids are small integers.")
        array = array.astype(np.int32)
    if array.size and int(array.min()) < 0:
        raise ValueError(f"{where} holds negative values (min {int(array.min())}); label ids are >= 0.")
    return array


def shipped_mappings() -> dict[str, Path]:
    """The mappings shipped with the bundle (next to ``label_dict.json``): name -> ``label_mapping_<name>.json``."""
    from .labels import default_data_path

    folder = default_data_path("label_dict.json").parent
    return {path.name[len(MAPPING_FILE_PREFIX) : -len(".json")]: path for path in sorted(folder.glob(f"{MAPPING_FILE_PREFIX}*.json"))}


def _source_id(key: Any, where: str) -> int:
    text = str(key).strip()
    if not text.isdigit():
        raise ValueError(f"{where}: source id {key!r} is not a non-negative integer.")
    return int(text)


def _maisi_target(value: Any, label_dict: Mapping[str, int], where: str) -> tuple[int, str | None]:
    """A MAISI id or name -> (id, name); 0 (background) is allowed and means "erase this class"."""
    names = {name.lower(): name for name in label_dict}
    by_id = {int(i): name for name, i in label_dict.items()}
    if isinstance(value, str) and not value.strip().isdigit():
        name = names.get(value.strip().lower())
        if name is None:
            from difflib import get_close_matches

            close = get_close_matches(value.strip().lower(), list(names), n=3)
            hint = f" Did you mean {[names[c] for c in close]}?" if close else ""
            raise ValueError(f"{where}: {value!r} is not a MAISI label name of label_dict.json.{hint}")
        return int(label_dict[name]), name
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: {value!r} is neither a MAISI label id nor a name.")
    target = int(value)
    if target != BACKGROUND_LABEL and target not in by_id:
        raise ValueError(f"{where}: {target} is not a MAISI label id; allowed: 0 (background) or an id of label_dict.json ({min(by_id)}..{max(by_id)}).")
    return target, by_id.get(target)


def _parse_classes(entries: Mapping[str, Any], label_dict: Mapping[str, int], where: str) -> dict[int, MappedClass]:
    classes = {}
    for key, value in entries.items():
        source = _source_id(key, where)
        entry_where = f"{where}, source id {source}"
        if isinstance(value, Mapping):  # the shipped format
            target = value.get("maisi_id")
            source_name = value.get("source_name")
            note = value.get("note")
            if target is None:
                classes[source] = MappedClass(source_name, None, None, note or "no MAISI counterpart")
                continue
            maisi_id, maisi_name = _maisi_target(target, label_dict, entry_where)
            if value.get("maisi_name") is not None and maisi_name != value["maisi_name"]:
                raise ValueError(f"{entry_where}: maisi_id {maisi_id} is {maisi_name!r} in label_dict.json, not {value['maisi_name']!r}.")
            classes[source] = MappedClass(source_name, maisi_id, maisi_name, note)
        else:
            maisi_id, maisi_name = _maisi_target(value, label_dict, entry_where)
            classes[source] = MappedClass(None, maisi_id, maisi_name)
    if BACKGROUND_LABEL in classes and classes[BACKGROUND_LABEL].maisi_id != BACKGROUND_LABEL:
        raise ValueError(f"{where}: source id 0 is background and always maps to 0.")
    return classes


def load_mapping(name_or_path: str | os.PathLike, label_dict: Mapping[str, int]) -> LabelMapping:
    """
    Load a shipped mapping by name or a user mapping JSON, checking every target against ``label_dict``.

    Parameters
    ----------
    name_or_path
        a shipped name (``shipped_mappings()``, e.g. ``"totalsegmentator_v2"``) or the path of a JSON file.
    label_dict
        MAISI name -> id (``label_dict.json``).

    Returns
    -------
    LabelMapping

    Raises
    ------
    ValueError
        an unknown name (listing the shipped ones), unreadable JSON, a source id that is not an integer, or a
        target that is neither a MAISI id nor a MAISI name (naming the entry).
    """
    shipped = shipped_mappings()
    text = str(name_or_path)
    path = shipped.get(text, Path(text))
    if not path.is_file():
        raise ValueError(f"mapping={text!r} is neither a shipped mapping ({sorted(shipped)}) nor an existing JSON file.")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"mapping={text!r}: {path} is not readable JSON: {error}") from error
    if not isinstance(content, Mapping):
        raise ValueError(f"mapping={text!r}: {path} must hold a JSON object.")
    entries = content.get("mapping", content)
    if not isinstance(entries, Mapping) or not entries:
        raise ValueError(f"mapping={text!r}: {path} holds no source id -> MAISI id entries.")
    name = text if text in shipped else str(path)
    return LabelMapping(name=name, classes=_parse_classes(entries, label_dict, f"mapping {name}"), source=dict(content.get("source", {})))


def remap_labels(labels: np.ndarray, mapping: LabelMapping, unmapped: int = BODY_LABEL) -> RemapResult:
    """
    Map every source id of ``labels`` to its MAISI id.

    Parameters
    ----------
    labels
        integer label map in the source tool's numbering (any shape).
    mapping
        the mapping (:func:`load_mapping`).
    unmapped
        the id given to source ids without a MAISI counterpart or missing from the mapping (default 200,
        body; 0 makes them background).

    Returns
    -------
    RemapResult
        the ``uint8`` MAISI label map, and per source id found: its MAISI id and voxel count, or (unmapped)
        its name, the reason and voxel count.

    Raises
    ------
    ValueError
        ``labels`` holds negative or non-integer values, or ``unmapped`` is outside 0..255.
    """
    if isinstance(unmapped, bool) or not isinstance(unmapped, (int, np.integer)) or not 0 <= int(unmapped) <= _MAX_OUTPUT_ID:
        raise ValueError(f"unmapped={unmapped!r} is not allowed; use a label id in 0..{_MAX_OUTPUT_ID} (200 = body, 0 = background).")
    array = as_label_ids(labels, "the label map")
    counts = np.bincount(array.ravel()) if array.size else np.zeros(1, dtype=np.int64)
    table = np.full(counts.size, int(unmapped), dtype=np.uint8)
    table[BACKGROUND_LABEL] = BACKGROUND_LABEL
    mapped: dict[int, dict[str, Any]] = {}
    missing: dict[int, dict[str, Any]] = {}
    for source in np.nonzero(counts)[0].tolist():
        if source == BACKGROUND_LABEL:
            continue
        known = mapping.classes.get(source)
        voxels = int(counts[source])
        if known is not None and known.maisi_id is not None:
            table[source] = known.maisi_id
            mapped[source] = {"source_name": known.source_name, "maisi_id": known.maisi_id, "maisi_name": known.maisi_name, "voxels": voxels}
        else:
            reason = known.note if known is not None else f"id {source} is not in mapping {mapping.name}"
            missing[source] = {"source_name": None if known is None else known.source_name, "reason": reason, "voxels": voxels, "set_to": int(unmapped)}
    return RemapResult(labels=table[array], mapped=mapped, unmapped=missing)
