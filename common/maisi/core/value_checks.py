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
Small, domain-free checks of user-facing values; every error names the config id, the value and what is allowed.

The settings components (``settings``, ``settings_ct``, ``settings_mr``) and the domain modules use them; they
know nothing about MAISI beyond the messages' wording.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

__all__ = [
    "as_list",
    "as_list_or_none",
    "check_cfg_guidance_scale",
    "check_controlnet_label_mapping",
    "check_num_steps",
    "check_version",
    "did_you_mean",
    "float_triple",
    "int_triple",
    "is_int",
    "is_real",
    "load_json_file",
    "require_empty",
]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest of ``choices`` (case-insensitive), or ``""``."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" Did you mean {by_lower[match[0]]!r}?" if match else ""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``bool`` excluded)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (``bool`` excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def as_list_or_none(value: Any) -> list[Any] | None:
    """``value`` as a list when it is a list, tuple or array-like (not a string or a mapping), else ``None``."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        return None
    return list(value)


def as_list(name: str, value: Any) -> list[Any]:
    """``value`` as a list, else a ``ValueError`` naming the config id ``name``."""
    items = as_list_or_none(value)
    if items is None:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a list.")
    return items


def int_triple(name: str, value: Any) -> tuple[int, int, int]:
    """Three integers >= 1, else a ``ValueError`` naming ``name``."""
    items = as_list_or_none(value)
    if items is None or len(items) != 3 or not all(is_int(v) and v >= 1 for v in items):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a list of 3 integers >= 1 (x, y, z).")
    return int(items[0]), int(items[1]), int(items[2])


def float_triple(name: str, value: Any) -> tuple[float, float, float]:
    """Three finite numbers > 0, else a ``ValueError`` naming ``name``."""
    items = as_list_or_none(value)
    if items is None or len(items) != 3 or not all(is_real(v) and v > 0 for v in items):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a list of 3 finite numbers > 0 (x, y, z in mm).")
    return float(items[0]), float(items[1]), float(items[2])


def check_version(version: Any, allowed: Sequence[str], kind: str) -> str:
    """The ``version`` id, lower-case, when it is one of ``allowed`` (``kind`` is "CT" or "MR" for the message)."""
    if not isinstance(version, str) or version.strip().lower() not in allowed:
        hint = did_you_mean(version, allowed) if isinstance(version, str) else ""
        article = "an" if kind == "MR" else "a"
        raise ValueError(f"version={version!r} is not {article} {kind} version.{hint} Allowed: {list(allowed)}.")
    return version.strip().lower()


def require_empty(name: str, value: Any, reason: str) -> None:
    """Refuse a non-empty list for the id ``name``, giving ``reason``."""
    if value is not None and len(as_list(name, value)) > 0:
        raise ValueError(f"{name}={value!r} is not allowed: {reason}; leave it empty ([]).")


def load_json_file(name: str, path: str | os.PathLike) -> Any:
    """The JSON document at ``path`` (the config id ``name``); a missing or unreadable file names the id."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{name}={str(path)!r} does not exist or is not a file.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name}={str(path)!r} is not a readable JSON file ({error}).") from error


def check_cfg_guidance_scale(scale: Any) -> float:
    """
    Check ``cfg_guidance_scale``: a finite number >= 0.

    0 turns classifier-free guidance off; 1 gives the conditional prediction alone (no guidance effect
    at twice the cost); values above 1 strengthen the condition.
    """
    if not is_real(scale) or scale < 0:
        raise ValueError(f"cfg_guidance_scale={scale!r} is not allowed; it must be a finite number >= 0 (0 = off).")
    return float(scale)


def check_num_steps(name: str, value: Any, maximum: int) -> int:
    """Check that ``value`` (the config id ``name``) is an integer in [1, ``maximum``]."""
    if not is_int(value) or not 1 <= value <= maximum:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer in [1, {maximum}].")
    return int(value)


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
        if not (is_int(source_id) and source_id > 255 and is_int(target) and 0 <= target <= 255):
            raise ValueError(f"{message} Bad entry: {source!r}: {target!r}.")
        checked[int(source_id)] = int(target)
    return checked
