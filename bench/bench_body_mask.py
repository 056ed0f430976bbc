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
Speed of the body-envelope building blocks (``scripts.body_mask``) against the alternatives, on a CT-sized volume.

On the synthetic trunk CT of ``demo/mask_phantom.py`` (default 512 x 512 x 300 voxels at 0.8 x 0.8 x 1.5 mm) it
times, interleaved (A B A B ...) over ``--repeats`` rounds, with medians:

- hole filling: ``scipy.ndimage.binary_fill_holes`` with an in-plane structure (ours: slice by slice in one call),
  the same per slice in a Python loop, and MONAI ``FillHoles`` (3D holes only, on a channel-first array);
- largest connected component: ``scipy.ndimage.label`` + ``bincount`` (ours) and MONAI
  ``KeepLargestConnectedComponent`` (on CPU it needs scikit-image; reported as unavailable without it);
- erosion by 10 mm in-plane: ``scipy.ndimage.minimum_filter`` with a square footprint (ours), a Euclidean
  distance transform per axial slice (a round footprint), and a 3D distance transform (``--edt3d``; slow);
- the whole ``image_envelope`` (CT), with its Dice against the phantom's true body.

Only figures are kept between candidates (the arrays are dropped), so the peak memory is that of the largest
single candidate plus the phantom; ``--edt3d`` needs about 1.6 GB more at the default size (float64 distances
and the transform's index arrays).

Example::

    python bench/bench_body_mask.py --repeats 3 --json-out /tmp/body_mask.json
    python bench/bench_body_mask.py --shape 64 64 32 --spacing 6 6 8 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bundles" / "maisi_ct_generative"))

from demo.mask_phantom import make_phantom  # noqa: E402
from scripts import body_mask  # noqa: E402

logger = logging.getLogger("bench_body_mask")


def _monai_fill_holes(mask: np.ndarray) -> np.ndarray:
    from monai.transforms import FillHoles

    return np.asarray(FillHoles()(mask[None].astype(np.uint8)))[0] > 0


def _monai_largest_component(mask: np.ndarray) -> np.ndarray:
    from monai.transforms import KeepLargestConnectedComponent

    return np.asarray(KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)(mask[None].astype(np.uint8)))[0] > 0


def _edt_per_slice_erosion(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...], axis: int) -> np.ndarray:
    in_plane = [s for a, s in enumerate(spacing) if a != axis]
    out = np.empty_like(mask)
    for index in range(mask.shape[axis]):
        plane = [slice(None)] * 3
        plane[axis] = index
        out[tuple(plane)] = ndimage.distance_transform_edt(mask[tuple(plane)], sampling=in_plane) > radius_mm
    return out


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def run(shape: tuple[int, int, int], spacing: tuple[float, float, float], repeats: int, edt3d: bool, monai: bool = True) -> dict[str, Any]:
    """Build the phantom, time every candidate ``repeats`` times (interleaved) and return the figures."""
    if monai:
        import monai.transforms  # noqa: F401  (imported before timing: the first import of torch/MONAI takes seconds)

    start = time.perf_counter()
    phantom = make_phantom(shape, spacing)
    build_s = time.perf_counter() - start
    axis = body_mask.axial_axis(phantom.affine)
    foreground = phantom.ct > body_mask.CT_THRESHOLD_HU
    filled = body_mask.fill_holes_per_slice(foreground, axis)
    radius = body_mask.OPENING_MM
    candidates: dict[str, Callable[[], Any]] = {
        "fill_holes/scipy_in_plane_structure (ours)": lambda: body_mask.fill_holes_per_slice(foreground, axis),
        "fill_holes/scipy_per_slice_loop": lambda: np.stack([ndimage.binary_fill_holes(foreground[:, :, k]) for k in range(shape[2])], axis=2),
        "fill_holes/monai_FillHoles_3d": lambda: _monai_fill_holes(foreground),
        "largest_component/scipy_label_bincount (ours)": lambda: body_mask.largest_component(filled),
        "largest_component/monai_KeepLargestConnectedComponent": lambda: _monai_largest_component(filled),
        "erode_10mm/scipy_minimum_filter_square (ours)": lambda: body_mask._erode(filled, radius, spacing, axis),
        "erode_10mm/edt_per_slice_round": lambda: _edt_per_slice_erosion(filled, radius, spacing, axis),
        "image_envelope/ct (ours)": lambda: body_mask.image_envelope(phantom.ct, phantom.affine, "ct"),
    }
    if not monai:
        candidates = {name: f for name, f in candidates.items() if "/monai_" not in name}
    if edt3d:
        candidates["erode_10mm/edt_3d_round"] = lambda: ndimage.distance_transform_edt(filled, sampling=spacing) > radius
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    unavailable: dict[str, str] = {}
    filled_voxels: dict[str, int] = {}  # per hole-filling candidate: voxels it adds to the thresholded body
    envelope_figures: dict[str, float] = {}
    for round_index in range(repeats):
        for name, function in candidates.items():
            if name in unavailable or (name.endswith("edt_3d_round") and round_index > 0):
                continue
            try:
                seconds, result = _timed(function)
            except (RuntimeError, ImportError) as error:  # e.g. MONAI's CPU connected components need scikit-image
                unavailable[name] = str(error)
                continue
            samples[name].append(seconds)
            if name.startswith("fill_holes/"):
                filled_voxels[name] = int(np.count_nonzero(result & ~foreground))
            elif name.startswith("image_envelope/"):
                envelope = result.mask
                body = np.count_nonzero(phantom.body)
                envelope_figures["dice_vs_true_body"] = round(2.0 * np.count_nonzero(envelope & phantom.body) / (np.count_nonzero(envelope) + body), 4)
                envelope_figures["table_voxels_left_in_envelope_fraction"] = round(np.count_nonzero(envelope & phantom.table) / np.count_nonzero(phantom.table), 4)
            del result
            logger.info("round %d %s: %.2f s", round_index, name, seconds)
    return {
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "voxels": int(np.prod(shape)),
        "phantom_build_s": round(build_s, 2),
        "repeats": repeats,
        "median_s": {name: round(float(np.median(v)), 3) for name, v in samples.items() if v},
        "samples_s": {name: [round(s, 3) for s in v] for name, v in samples.items() if v},
        "unavailable": unavailable,
        "envelope": envelope_figures,
        "voxels_filled_by_hole_filling": filled_voxels,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--edt3d", action="store_true", help="also time a 3D Euclidean distance transform (once; about a minute at the default size)")
    parser.add_argument("--skip-monai", action="store_true", help="leave the MONAI transforms out (no torch import; for the smoke test)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = run(tuple(args.shape), tuple(args.spacing), args.repeats, args.edt3d, monai=not args.skip_monai)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
