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
A synthetic trunk CT/MR with a scanner table and its segmentation, for the mask tools' tests, previews and benchmark.

Geometry is defined in mm (RAS+: +x towards the patient's right, +y anterior, +z superior) and rasterised on any
grid, so tests use a coarse grid and the previews a finer one. The body is an elliptic cylinder through the
whole field of view; inside it two lungs (air), a liver, a spleen, two kidneys and a vertebral column; under
it a scanner table (a 8 mm plate touching the back, with two 30 mm rails), and a small object (a cable clip)
in the air beside the body. The segmentation is given in MAISI ids and in TotalSegmentator v2 ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ORGANS", "Phantom", "make_phantom"]

# name: (MAISI id, TotalSegmentator v2 id, centre mm, semi-axes mm, CT HU, MR intensity)
ORGANS = {
    "right lung lower lobe": (32, 14, (75.0, 15.0, 60.0), (50.0, 60.0, 70.0), -850.0, 30.0),
    "left lung lower lobe": (29, 11, (-75.0, 15.0, 60.0), (50.0, 60.0, 70.0), -850.0, 30.0),
    "liver": (1, 5, (65.0, 15.0, -40.0), (70.0, 55.0, 45.0), 60.0, 450.0),
    "spleen": (3, 1, (-85.0, -10.0, -30.0), (30.0, 25.0, 35.0), 50.0, 500.0),
    "right kidney": (5, 2, (55.0, -40.0, -75.0), (22.0, 25.0, 40.0), 35.0, 550.0),
    "left kidney": (14, 3, (-55.0, -40.0, -75.0), (22.0, 25.0, 40.0), 35.0, 550.0),
}
VERTEBRA = ("vertebrae L1", 37, 31, (0.0, -60.0), 18.0, 400.0, 150.0)  # name, MAISI, TS, centre (x, y), radius, HU, MR
BODY_SEMI_AXES = (160.0, 105.0)  # x, y in mm
BODY_CENTRE = (0.0, 5.0)
BODY_HU, BODY_MR = 20.0, 350.0
TABLE_TOP_MM = BODY_CENTRE[1] - BODY_SEMI_AXES[1]  # the plate touches the body's back
TABLE_PLATE_MM, TABLE_RAIL_MM, TABLE_HU = 8.0, 30.0, 300.0


@dataclass(frozen=True)
class Phantom:
    """
    A synthetic case.

    Attributes
    ----------
    ct, mr
        the image in HU (``int16``) and an MR-like image (``float32``, no table: MR tables give no signal).
    body
        the true body envelope (boolean).
    table
        the table and the object beside the body (boolean), which an envelope must leave out.
    maisi_labels, totalseg_labels
        the organs in MAISI ids and in TotalSegmentator v2 ids (``uint8``, no body label).
    affine
        the RAS voxel-to-world affine.
    """

    ct: np.ndarray
    mr: np.ndarray
    body: np.ndarray
    table: np.ndarray
    maisi_labels: np.ndarray
    totalseg_labels: np.ndarray
    affine: np.ndarray


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).reshape([-1 if a == axis else 1 for a in range(3)])
        for axis, (n, s) in enumerate(zip(shape, spacing))
    )  # type: ignore[return-value]


def make_phantom(shape: Sequence[int] = (96, 96, 48), spacing: Sequence[float] = (4.0, 4.0, 5.0), seed: int = 0) -> Phantom:
    """
    Rasterise the phantom on a grid centred on the origin.

    Parameters
    ----------
    shape
        voxels (x, y, z); the x/y field of view should exceed 400 mm to hold the table rails.
    spacing
        mm per voxel.
    seed
        noise seed; the same seed gives identical volumes.
    """
    x, y, z = _grid(shape, spacing)
    full = tuple(int(n) for n in shape)
    body_xy = ((x - BODY_CENTRE[0]) / BODY_SEMI_AXES[0]) ** 2 + ((y - BODY_CENTRE[1]) / BODY_SEMI_AXES[1]) ** 2 <= 1.0
    body = np.broadcast_to(body_xy, full).copy()
    plate = (y < TABLE_TOP_MM) & (y >= TABLE_TOP_MM - TABLE_PLATE_MM) & (np.abs(x) <= 190.0)
    rails = (y < TABLE_TOP_MM) & (y >= TABLE_TOP_MM - TABLE_RAIL_MM) & (np.abs(x) >= 165.0) & (np.abs(x) <= 195.0)
    clip = ((x + 185.0) ** 2 + (y - 60.0) ** 2 <= 8.0**2) & (np.abs(z) <= 20.0)
    table = np.broadcast_to((plate | rails) & ~body_xy, full) | np.broadcast_to(clip, full)
    rng = np.random.default_rng(seed)
    ct = np.full(full, -1000.0, dtype=np.float32)
    mr = np.zeros(full, dtype=np.float32)
    ct[body], mr[body] = BODY_HU, BODY_MR
    maisi = np.zeros(full, dtype=np.uint8)
    totalseg = np.zeros(full, dtype=np.uint8)
    for maisi_id, ts_id, centre, axes, hu, intensity in ORGANS.values():
        inside = sum(((g - c) / a) ** 2 for g, c, a in zip((x, y, z), centre, axes)) <= 1.0
        inside = np.broadcast_to(inside, full) & body
        ct[inside], mr[inside] = hu, intensity
        maisi[inside], totalseg[inside] = maisi_id, ts_id
    _, maisi_id, ts_id, (cx, cy), radius, hu, intensity = VERTEBRA
    column = np.broadcast_to((x - cx) ** 2 + (y - cy) ** 2 <= radius**2, full) & body
    ct[column], mr[column] = hu, intensity
    maisi[column], totalseg[column] = maisi_id, ts_id
    ct[table] = TABLE_HU
    ct += 10.0 * rng.standard_normal(size=full, dtype=np.float32)
    mr = np.abs(mr + 12.0 * rng.standard_normal(size=full, dtype=np.float32))  # Rician-like background
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return Phantom(
        ct=np.clip(np.round(ct), -1024, 3071).astype(np.int16),
        mr=mr,
        body=body,
        table=table,
        maisi_labels=maisi,
        totalseg_labels=totalseg,
        affine=affine,
    )
