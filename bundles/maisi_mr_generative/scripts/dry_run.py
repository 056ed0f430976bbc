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
The dry run (``configs/dry_run.json``): what a generation run would do, without loading any weight.

It prints, as JSON: the normalised settings, every file the run needs with its size and whether it is present,
the samples it would make, and per latent shape the decode plan and the estimated peak memory and time.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .generation import latent_shape_of
from .report import jsonable
from .resources import estimate_generation_resources
from .settings import GenerationSettings

logger = logging.getLogger(__name__)

__all__ = ["describe_run", "print_dry_run"]


def describe_run(settings: GenerationSettings, decoder: Any) -> dict[str, Any]:
    """
    What the run would do.

    Parameters
    ----------
    settings
        the checked settings (built from the ids; no weight is loaded).
    decoder
        the planned decoder (``decode.PlannedDecoder``): it plans, it does not decode.

    Returns
    -------
    dict[str, Any]
        ``{"settings", "files", "missing_files", "samples", "decode_plans", "resource_estimates"}``; the
        estimates (``resources.estimate_generation_resources``: peak memory and time per network, from
        measured per-voxel costs) are per latent shape, for one sample.
    """
    plans, estimates = {}, {}
    for request in settings.requests:
        shape = latent_shape_of(request.output_size)
        key = "x".join(str(s) for s in shape[1:])
        plans[key] = decoder.plan(shape)
        uses_controlnet = settings.uses_controlnet(request)
        estimate_key = f"{key} with ControlNet" if uses_controlnet else key
        if estimate_key not in estimates:
            estimate = estimate_generation_resources(
                shape, decoder.device, settings.num_inference_steps, uses_controlnet, settings.cfg_guidance_scale > 0, plans[key]
            )
            estimates[estimate_key] = estimate.describe().splitlines()
    tasks = settings.tasks()
    files = settings.files.describe()
    return jsonable(
        {
            "settings": settings.to_dict(),
            "files": files,
            "missing_files": [f["id"] for f in files if not f["present"]],
            "samples": {"count": len(tasks), "first": [t.stem for t in tasks[:10]]},
            "decode_plans": {shape: plan.describe() for shape, plan in plans.items()},
            "resource_estimates": estimates,
        }
    )


def print_dry_run(settings: GenerationSettings, decoder: Any) -> dict[str, Any]:
    """Print :func:`describe_run` as JSON (and log a one-line summary); returns it."""
    description = describe_run(settings, decoder)
    print(json.dumps(description, indent=2))
    missing = description["missing_files"]
    logger.info(
        "dry run: %d samples, %d needed files (%s), no weights loaded.",
        description["samples"]["count"],
        len(description["files"]),
        f"missing: {', '.join(missing)}; run `python -m scripts.download` to fetch them" if missing else "all present",
    )
    return description
