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
Evaluation reports shared by every bundle: the reconstruction report format, JSON writing, a bar chart.

A reconstruction report (``reconstruction_report.json``, written by the 2D and the 3D autoencoder
evaluations alike) is::

    {
      "settings": {...},                      # what was evaluated, and how
      "units": {"psnr": "dB", "ssim": "1", "mae": "HU"},
      "num_cases": 2,
      "mean": {"psnr": 31.2, "ssim": 0.91, "mae": 24.0},
      "worst_metric": "psnr",
      "worst_cases": [{"index": 1, "image": "...", "psnr": 28.0, ..., "preview": "worst_01_case_0001.png"}],
      "cases": [{"index": 0, "image": "...", "psnr": 34.4, "ssim": 0.93, "mae": 20.1}, ...]
    }

Non-finite numbers (e.g. the PSNR of a perfect reconstruction) are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .checkpoint import atomic_write

__all__ = [
    "HIGHER_IS_BETTER",
    "bar_chart_png",
    "json_ready",
    "reconstruction_report",
    "worst_case_indices",
    "write_json_report",
]

# direction of each reconstruction metric, for picking the worst cases
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "ms_ssim": True, "mae": False, "mse": False}


def json_ready(value: Any) -> Any:
    """Plain JSON data: numpy/torch numbers become Python numbers, non-finite floats ``None``, paths strings."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_ready(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def write_json_report(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Write ``report`` as indented strict JSON (see :func:`json_ready`), atomically."""
    text = json.dumps(json_ready(report), indent=2, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"), suffix=".json")


def worst_case_indices(cases: Sequence[Mapping[str, Any]], metric: str, count: int) -> list[int]:
    """
    Indices of the ``count`` worst cases by ``metric`` (lowest PSNR/SSIM, highest MAE), worst first.

    Cases whose value is missing or not finite come first (e.g. a NaN SSIM), then ties by index.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"worst-case metric {metric!r} is not one of {sorted(HIGHER_IS_BETTER)}.")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"num_worst_cases={count!r} is not allowed; it must be an integer >= 0.")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0

    def badness(index: int) -> tuple[int, float, int]:
        value = cases[index].get(metric)
        finite = value is not None and math.isfinite(float(value))
        return (0 if not finite else 1, sign * float(value) if finite else 0.0, index)

    return sorted(range(len(cases)), key=badness)[:count]


def reconstruction_report(
    cases: Sequence[Mapping[str, Any]],
    metric_names: Sequence[str],
    units: Mapping[str, str],
    settings: Mapping[str, Any],
    worst_metric: str = "psnr",
    worst_indices: Sequence[int] = (),
) -> dict[str, Any]:
    """
    The reconstruction report (module docstring) from per-case results.

    Parameters
    ----------
    cases
        one mapping per case with at least ``metric_names``; an ``index`` is added.
    metric_names
        the metrics averaged into ``mean``.
    units
        unit of each metric.
    settings
        copied into the report.
    worst_metric
        the metric the worst cases were chosen by.
    worst_indices
        the worst cases (:func:`worst_case_indices`), worst first.
    """
    entries = [{"index": i, **dict(case)} for i, case in enumerate(cases)]
    mean = {}
    for name in metric_names:
        values = np.asarray([float(case[name]) for case in cases], dtype=np.float64)
        mean[name] = float(values.mean()) if values.size else None
    return {
        "settings": dict(settings),
        "units": {name: units.get(name, "") for name in metric_names},
        "num_cases": len(entries),
        "mean": mean,
        "worst_metric": worst_metric,
        "worst_cases": [entries[i] for i in worst_indices],
        "cases": entries,
    }


def bar_chart_png(values: Mapping[str, float], path: str | os.PathLike, title: str, size: tuple[int, int] = (480, 320)) -> Path:
    """
    A PNG bar chart of named values (e.g. the per-plane FIDs), each bar labelled with its value.

    Written atomically; the same values give the same bytes.
    """
    width, height = size
    margin, top, bottom = 30, 40, 40
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    draw.text((margin, 12), title, fill="black")
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    scale = max([v for v in finite.values() if v > 0], default=1.0)
    slot = (width - 2 * margin) / max(len(values), 1)
    for index, (name, value) in enumerate(values.items()):
        left = margin + index * slot + slot * 0.2
        right = margin + (index + 1) * slot - slot * 0.2
        baseline = height - bottom
        if name in finite:
            bar_top = baseline - max(finite[name], 0.0) / scale * (height - top - bottom)
            draw.rectangle([left, bar_top, right, baseline], fill=(70, 110, 170))
            draw.text((left, bar_top - 14), f"{finite[name]:.4g}", fill="black")
        draw.text((left, baseline + 8), name, fill="black")
    draw.line([margin, height - bottom, width - margin, height - bottom], fill="black")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=".png")
