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
The JSON run report of a generation run: settings, one entry per sample, phase timings, versions, device.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch

from .checkpoint import atomic_write

__all__ = ["REPORT_FORMAT_VERSION", "RunReport", "jsonable", "load_run_report", "software_versions", "write_run_report"]

REPORT_FORMAT_VERSION = 1


def jsonable(value: Any) -> Any:
    """
    Plain JSON data from settings, samples and timings.

    NaN and infinities become ``None`` (JSON ``null``); numpy and torch scalars and arrays become numbers and
    lists; paths, devices and dtypes become strings; mapping keys become strings; sets become sorted lists;
    objects with a ``to_dict()`` method (e.g. quality reports, findings) are written as what it returns, other
    dataclasses through their fields; anything else is written as ``str(value)``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist() if value.ndim else value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (Path, torch.device, torch.dtype, np.dtype)):
        return str(value)
    if callable(getattr(value, "to_dict", None)) and not isinstance(value, type):
        return jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=lambda v: (str(type(v)), str(v)))
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def software_versions() -> dict[str, str | None]:
    """Versions of Python, torch (and its CUDA), MONAI, numpy, nibabel and Pillow."""
    import PIL

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "nibabel": nib.__version__,
        "pillow": PIL.__version__,
    }


def _device_description(device: Any) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device)
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError):
        return text
    if parsed.type == "cuda" and torch.cuda.is_available():
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        return f"{text} ({torch.cuda.get_device_name(index)})"
    if parsed.type == "cpu":
        return f"{text} ({platform.machine() or 'unknown machine'}, {os.cpu_count()} logical cores)"
    return text


@dataclasses.dataclass
class RunReport:
    """
    The JSON report of one generation run.

    Attributes
    ----------
    settings
        Every public config id the run used (id -> value).
    samples
        One entry per sample, with at least ``seed`` and ``mask_source`` (``"database:<file> (...)"``,
        ``"generated"`` or ``"user:<path>"``); generation adds ``index``, the output files ``image``,
        ``label``, ``preview`` and ``quality_check`` (a ``QualityReport`` or ``None``).
    timings
        Seconds per phase (e.g. ``mask_s``, ``diffusion_s``, ``decode_s``).
    versions
        :func:`software_versions`.
    device
        The device the run used, with its name.
    created
        UTC time the report was made (ISO 8601).
    format_version
        ``REPORT_FORMAT_VERSION``.
    """

    settings: dict[str, Any]
    samples: list[dict[str, Any]]
    timings: dict[str, float | None]
    versions: dict[str, str | None] = dataclasses.field(default_factory=software_versions)
    device: str = dataclasses.field(default_factory=lambda: _device_description(None))
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    format_version: int = REPORT_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data (non-finite numbers as ``None``)."""
        return {
            "format_version": self.format_version,
            "created": self.created,
            "device": self.device,
            "versions": jsonable(self.versions),
            "settings": jsonable(self.settings),
            "timings": jsonable(self.timings),
            "samples": jsonable(self.samples),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a loaded JSON file)."""
        missing = [key for key in ("settings", "samples", "timings", "versions", "device") if key not in data]
        if missing:
            raise ValueError(f"not a run report: missing {', '.join(missing)}.")
        return cls(
            settings=dict(data["settings"]),
            samples=[dict(s) for s in data["samples"]],
            timings=dict(data["timings"]),
            versions=dict(data["versions"]),
            device=str(data["device"]),
            created=str(data.get("created", "")),
            format_version=int(data.get("format_version", REPORT_FORMAT_VERSION)),
        )

    def to_json(self) -> str:
        """Indented JSON text; strict (no NaN or Infinity literals)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _check_samples(samples: Any) -> list[dict[str, Any]]:
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"samples must be a list of dicts, got {type(samples).__name__}.")
    checked = []
    for position, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise ValueError(f"samples[{position}] must be a dict, got {type(sample).__name__}.")
        missing = [key for key in ("seed", "mask_source") if key not in sample]
        if missing:
            raise ValueError(
                f"samples[{position}] lacks {', '.join(missing)} (every sample records its seed and mask source)."
            )
        checked.append(dict(sample))
    return checked


def write_run_report(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    timings: Mapping[str, float],
    *,
    device: Any = None,
    versions: Mapping[str, str | None] | None = None,
) -> Path:
    """
    Write the run's JSON report atomically (see :class:`RunReport`).

    Parameters
    ----------
    path
        Destination, e.g. ``<output_dir>/generation_report.json``.
    settings
        Every public config id used (id -> value).
    samples
        One dict per sample; each needs ``seed`` and ``mask_source``. Values with a ``to_dict()`` method
        (``QualityReport``) are serialised with it.
    timings
        Seconds per phase.
    device
        The run's device; ``None`` takes ``settings["device"]`` if present, else CUDA if available, else CPU.
    versions
        Overrides :func:`software_versions` (tests).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``settings``/``timings`` are not mappings or a sample lacks its seed or mask source.
    """
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}.")
    if not isinstance(timings, Mapping):
        raise ValueError(f"timings must be a dict of seconds per phase, got {type(timings).__name__}.")
    if device is None:
        device = settings.get("device")
    report = RunReport(
        settings=dict(settings),
        samples=_check_samples(samples),
        timings={str(k): v for k, v in timings.items()},
        versions=dict(versions) if versions is not None else software_versions(),
        device=_device_description(device),
    )
    text = report.to_json()
    path = Path(path)

    def write(tmp_name: str) -> None:
        with open(tmp_name, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write, suffix=path.suffix)


def load_run_report(path: str | os.PathLike) -> RunReport:
    """Read a report written by :func:`write_run_report`."""
    with open(path, encoding="utf-8") as handle:
        return RunReport.from_dict(json.load(handle))
