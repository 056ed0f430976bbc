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
The checks every bundle runs on its config ids before anything is built or loaded.

Each check raises with a message that names the config id, the bad value and what is allowed, so a
user can fix the command line without reading code. They import nothing from the bundles' other
modules, and every bundle's ``scripts/`` holds the same copy (``ci/sync_shared_code.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "check_amp",
    "check_bool",
    "check_export_path",
    "check_files_exist",
    "check_non_negative",
    "check_positive_int",
    "check_positive_number",
]


def check_bool(name: str, value: Any) -> bool:
    """
    Return ``value`` if it is ``true`` or ``false`` (not 0/1, not a string).

    Raises
    ------
    ValueError
        naming the config id ``name`` and the value.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed; it must be true or false.")
    return value


def check_int_at_least(name: str, value: Any, minimum: int) -> int:
    """
    Return ``value`` if it is an integer >= ``minimum`` (``bool`` is refused).

    Raises
    ------
    ValueError
        naming the config id ``name``, the value and the minimum.
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}.")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer >= 1 (see :func:`check_int_at_least`)."""
    return check_int_at_least(name, value, 1)


def check_positive_number(name: str, value: Any) -> float:
    """
    Return ``value`` as a float if it is a finite number > 0 (``bool`` is refused).

    Raises
    ------
    ValueError
        naming the config id ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < float(value) < float("inf"):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number > 0.")
    return float(value)


def check_non_negative(values: Mapping[str, Any]) -> None:
    """
    Check ``{config id: value}`` entries (e.g. loss weights): each must be a finite number >= 0.

    Raises
    ------
    ValueError
        naming the first bad id and its value.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= float(value) < float("inf"):
            raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number >= 0.")


def check_amp(amp: Any, device: torch.device | str) -> bool:
    """
    Return ``amp`` if mixed precision can run on ``device``: it must be ``true``/``false``, and ``true`` needs CUDA.

    Raises
    ------
    ValueError
        naming ``amp``, its value and the device.
    """
    check_bool("amp", amp)
    if amp and torch.device(device).type != "cuda":
        raise ValueError(f"amp=True is not allowed on device={device}; mixed precision needs a CUDA device (set --amp false).")
    return amp


def check_export_path(name: str, path: Any, protected: Mapping[str, Any]) -> Path:
    """
    Refuse an export path that would overwrite a file the run reads (e.g. the downloaded weights).

    Parameters
    ----------
    name
        the export id, e.g. ``exported_controlnet_path``.
    path
        its value.
    protected
        ``{id: path}`` of the files that must not be overwritten (``None`` entries are skipped).

    Returns
    -------
    Path
        the export path, resolved.

    Raises
    ------
    ValueError
        ``path`` is not a path, or it is one of the ``protected`` files (the message names both ids).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{name}={path!r} is not allowed; it must be a file path.")
    exported = Path(path).resolve()
    for other, other_path in protected.items():
        if other_path is not None and exported == Path(other_path).resolve():
            raise ValueError(
                f"{name}={path} is not allowed: it is {other}; choose another file (the default is under runs/) "
                f"so that {other}, which training reads, stays intact, and point generation at the new file."
            )
    return exported


def check_files_exist(
    paths: Mapping[str, str | os.PathLike | None], bundle_root: str | os.PathLike, download_command: str | None = None
) -> None:
    """
    Check that every file (or folder) a run needs exists, before anything loads.

    Parameters
    ----------
    paths
        config id -> path; ``None`` entries are not needed by this run and are skipped.
    bundle_root
        the bundle folder, for the download command in the message.
    download_command
        the command that fetches the published files; default: MONAI's ``download_large_files`` of the bundle.

    Raises
    ------
    FileNotFoundError
        listing every missing path with its config id, the download command of the published files and
        where their URLs are listed.
    """
    missing = [f"{name}={path}" for name, path in paths.items() if path is not None and not Path(path).exists()]
    if missing:
        raise FileNotFoundError(
            "missing file(s): "
            + ", ".join(missing)
            + f". Download the published files with `{download_command or f'python -m monai.bundle download_large_files --bundle_path {bundle_root}'}`"
            + f" (URLs are in {Path(bundle_root) / 'large_files.yml'}), or point these ids at your own files"
            + " (e.g. checkpoints written by this bundle's training configs)."
        )
