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
Datalists of the MAISI training configs (the id checks they run first are in ``scripts/checks.py``).

A datalist is ``{"training": [{"image": ..., "label": ..., "fold": k}, ...]}``; paths are absolute or
relative to the datalist's folder. Entries whose ``fold`` equals ``validation_fold`` form the
validation split, all others the training split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

__all__ = [
    "SECTIONS",
    "load_datalist",
    "read_datalist",
    "select_folds",
]

SECTIONS = ("training", "validation")


def _resolve(path: Any, base: Path, key: str, index: int, datalist_file: Path) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"datalist_file={datalist_file}: entry {index} has no '{key}' path (got {path!r}).")
    resolved = Path(path) if os.path.isabs(path) else base / path
    if not resolved.is_file():
        raise ValueError(f"datalist_file={datalist_file}: entry {index} '{key}' file '{resolved}' does not exist.")
    return str(resolved)


def _check_fold(fold: Any, index: int, datalist_file: Path) -> int:
    if isinstance(fold, bool) or not isinstance(fold, Integral) or fold < 0:
        raise ValueError(f"datalist_file={datalist_file}: entry {index} fold={fold!r} is not allowed; it must be an integer >= 0.")
    return int(fold)


def load_datalist(
    datalist_file: str | os.PathLike,
    section: str = "training",
    base_dir: str | os.PathLike | None = None,
    *,
    required_keys: Sequence[str] = ("image",),
    optional_keys: Sequence[str] = ("label",),
    default_fold: int | None = 0,
) -> list[dict[str, Any]]:
    """
    Read the ``section`` list of a datalist JSON, with absolute paths, checking that every listed file exists.

    Parameters
    ----------
    datalist_file
        the datalist JSON.
    section
        the list to read, e.g. ``"training"``.
    base_dir
        the folder relative paths are resolved against; ``None`` for the datalist's own folder.
    required_keys
        the path keys every entry must have.
    optional_keys
        path keys resolved and checked when an entry has them (and they are not null).
    default_fold
        the ``fold`` of an entry without one; ``None`` makes ``fold`` required.

    Returns
    -------
    list[dict[str, Any]]
        the entries, paths made absolute and ``fold`` an ``int``; other fields are kept.

    Raises
    ------
    ValueError
        naming the file (and the entry index and key): the file is missing or not JSON, the section is
        missing or empty, an entry is not an object, lacks a required path or a ``fold``, has a ``fold``
        that is not an integer >= 0, or lists a file that does not exist.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise ValueError(f"datalist_file={path} does not exist; build one with `python -m scripts.data_prep datalist`.")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"datalist_file={path} cannot be read as JSON: {error}") from error
    entries = content.get(section) if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"datalist_file={path} has no non-empty '{section}' list; it must hold {{'{section}': [entries]}}.")
    base = Path(base_dir) if base_dir is not None else path.parent
    resolved = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"datalist_file={path}: entry {index} must be an object, got {entry!r}.")
        if default_fold is None and "fold" not in entry:
            raise ValueError(f"datalist_file={path}: entry {index} has no 'fold'; it must be an integer >= 0.")
        item = dict(entry)
        item["fold"] = _check_fold(entry.get("fold", default_fold), index, path)
        for key in required_keys:
            item[key] = _resolve(entry.get(key), base, key, index, path)
        for key in optional_keys:
            if entry.get(key) is not None:
                item[key] = _resolve(entry[key], base, key, index, path)
        resolved.append(item)
    return resolved


def select_folds(items: Sequence[Mapping[str, Any]], validation_fold: int | None, training: bool = True) -> list[dict]:
    """
    The training items (``fold != validation_fold``) or the validation items (``fold == validation_fold``).

    ``validation_fold=None`` keeps every item for training and none for validation.

    Parameters
    ----------
    items
        datalist entries (:func:`load_datalist`); an entry without ``fold`` is in fold 0.
    validation_fold
        the fold held out for validation, or ``None``.
    training
        select the training items, else the validation items.

    Returns
    -------
    list[dict]
        copies of the selected items.

    Raises
    ------
    ValueError
        ``validation_fold`` is not an integer or null, or it leaves no training items (names the folds present).
    """
    if validation_fold is not None and (isinstance(validation_fold, bool) or not isinstance(validation_fold, Integral)):
        raise ValueError(f"validation_fold={validation_fold!r} must be an integer fold number or null.")
    if validation_fold is None:
        selected = [dict(item) for item in items] if training else []
    else:
        selected = [dict(item) for item in items if (item.get("fold", 0) != validation_fold) == training]
    if training and not selected:
        folds = sorted({item.get("fold", 0) for item in items})
        raise ValueError(
            f"validation_fold={validation_fold} leaves no training items (folds present: {folds}); "
            "choose another fold or null to train on every item."
        )
    return selected


def read_datalist(
    datalist_file: str | os.PathLike, validation_fold: Any, section: str, keys: Sequence[str] = ("image",)
) -> list[dict[str, Any]]:
    """
    Read one split of a datalist, with absolute paths, checking that every listed file exists.

    Parameters
    ----------
    datalist_file
        the datalist JSON (config id ``datalist_file``).
    validation_fold
        the fold held out for validation (config id ``validation_fold``), an integer >= 0.
    section
        ``"training"`` (entries with ``fold != validation_fold``) or ``"validation"`` (``fold == validation_fold``).
    keys
        the path keys every entry must have (``image``; ``image`` and ``label`` for the ControlNet).

    Returns
    -------
    list[dict[str, Any]]
        the entries of the split, paths made absolute; other fields are kept.

    Raises
    ------
    ValueError
        the file is missing or malformed, an entry lacks a key, ``fold`` or a file, or the split is empty.
    """
    if section not in SECTIONS:
        raise ValueError(f"section={section!r} is not allowed; choose one of {SECTIONS}.")
    if isinstance(validation_fold, bool) or not isinstance(validation_fold, Integral) or validation_fold < 0:
        raise ValueError(f"validation_fold={validation_fold!r} is not allowed; it must be an integer >= 0.")
    entries = load_datalist(datalist_file, "training", required_keys=keys, optional_keys=(), default_fold=None)
    selected = select_folds(entries, validation_fold, training=section == "training")
    if not selected:
        raise ValueError(
            f"datalist_file={Path(datalist_file)} has no validation entries (fold == validation_fold, "
            f"validation_fold={validation_fold}); assign folds so that both splits are non-empty."
        )
    return selected
