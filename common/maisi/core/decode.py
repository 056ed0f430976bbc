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
Memory-aware decoding of MAISI latents with ``AutoencoderKlMaisi``.

The decoder is the peak-memory step of MAISI inference. Two knobs bound its memory:

- ``autoencoder_tp_num_splits``: ``MaisiConvolution`` splits each convolution input into chunks along
  spatial axis ``dim_split`` (with a 3-voxel halo) and concatenates the results. The result is exact;
  on CUDA it keeps every chunk within the 2**31-element limit of cuDNN's 32-bit indexing.
- ``autoencoder_sliding_window_infer_size`` / ``_overlap``: decode the latent in tiles with
  ``monai.inferers.SlidingWindowInferer`` (gaussian blending), optionally stitching on the CPU.

:func:`plan_decode` picks both knobs from a memory budget with the peak-memory model
:class:`DecoderMemoryModel` (calibration in ``common/maisi/DECODE_MEMORY.md``); values the user sets
are kept. :func:`decode_latent` carries out a :class:`DecodePlan`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_DECODER_MEMORY",
    "CUDA_DECODER_MEMORY",
    "DecodePlan",
    "DecoderMemoryModel",
    "LatentDecoder",
    "available_memory_bytes",
    "clamp_roi",
    "count_sliding_windows",
    "decode_latent",
    "get_autoencoder_splits",
    "plan_decode",
    "set_autoencoder_splits",
    "splits_compatible",
]

UPSAMPLE_FACTOR = 4  # image voxels per latent voxel, per axis
SPLIT_CHOICES = (1, 2, 4, 8, 16)  # split counts tried by the planner, in this order
SPLIT_HALO = 3  # halo (voxels) MaisiConvolution adds on each side of an inner chunk
MIN_VOXELS_PER_SPLIT = 3  # a chunk shorter than its halo makes MaisiConvolution slice wrongly
MIN_ROI_SIZE = 16  # smallest automatic sliding-window roi, latent voxels per axis
ROI_STEP = 4  # automatic rois are multiples of this
DEFAULT_OVERLAP = 0.4
DEFAULT_DIM_SPLIT = 1  # MAISI network configs use dim_split 1 (second spatial axis)
BUDGET_FRACTION = 0.85  # share of the memory budget a plan may use
STITCH_FRACTION = 0.25  # stitch on the device only while the image is at most this share of the budget
GB = 1e9
INT32_MAX = 2**31 - 1
OUTPUT_BYTES_PER_LATENT_VOXEL = 4 * UPSAMPLE_FACTOR**3  # 1 channel, float32

# ids of the user-facing settings, used in error messages
ROI_ID = "autoencoder_sliding_window_infer_size"
OVERLAP_ID = "autoencoder_sliding_window_infer_overlap"
SPLITS_ID = "autoencoder_tp_num_splits"
BUDGET_ID = "memory_budget_gb"


@dataclass(frozen=True)
class DecoderMemoryModel:
    """
    Peak memory of one decoder forward pass: ``fixed_bytes + bytes_per_latent_voxel(num_splits) * voxels``.

    ``voxels`` is the number of latent voxels decoded at once (the whole latent or one tile). The
    per-voxel cost is dominated by the widest full-resolution feature map (128 channels at 4x the
    latent size per axis) and the copies ``MaisiGroupNorm3D``, the residual path and the split
    concatenation make of it. Splitting does not reduce it (measured on CPU, consistent with the
    published A100 table); on CUDA a chunk must stay within 32-bit indexing (``max_chunk_elements``),
    otherwise PyTorch leaves cuDNN for a fallback convolution that needs far more memory
    (pytorch/pytorch#95024, #31383).

    Parameters
    ----------
    name
        Short name for logs.
    per_split_bytes
        ``(num_splits, bytes per latent voxel)`` pairs, ascending in ``num_splits``. A split count
        missing from the table uses the entry of the largest tabulated count below it.
    fixed_bytes
        Bytes independent of the tile size (weights, kernel workspaces, allocator slack).
    widest_channels
        Channels of the widest feature map at full resolution (128 for the MAISI image autoencoder).
    max_chunk_elements
        Largest element count of one convolution chunk, or ``None`` for no limit.
    """

    name: str
    per_split_bytes: tuple[tuple[int, float], ...]
    fixed_bytes: float
    widest_channels: int = 128
    max_chunk_elements: int | None = None

    def bytes_per_latent_voxel(self, num_splits: int) -> float:
        """
        Peak bytes per decoded latent voxel for ``num_splits`` splits.

        Parameters
        ----------
        num_splits
            Split count of the autoencoder.

        Returns
        -------
        float
            Bytes per latent voxel.
        """
        value = self.per_split_bytes[0][1]
        for splits, per_voxel in self.per_split_bytes:
            if splits <= num_splits:
                value = per_voxel
        return value

    def decoder_peak_bytes(self, tile_shape: Sequence[int], num_splits: int) -> float:
        """
        Estimated peak bytes of decoding one latent tile of ``tile_shape`` (spatial, latent voxels).

        Parameters
        ----------
        tile_shape
            Spatial shape of the latent decoded at once.
        num_splits
            Split count of the autoencoder.

        Returns
        -------
        float
            Estimated peak bytes, including the decoded tile.
        """
        return self.fixed_bytes + self.bytes_per_latent_voxel(num_splits) * math.prod(tile_shape)

    def chunk_elements(self, tile_shape: Sequence[int], num_splits: int, dim_split: int) -> int:
        """
        Elements of the largest convolution chunk (widest full-resolution map, halo included).

        Parameters
        ----------
        tile_shape
            Spatial shape of the latent decoded at once.
        num_splits
            Split count of the autoencoder.
        dim_split
            Spatial axis ``MaisiConvolution`` splits along.

        Returns
        -------
        int
            Element count.
        """
        full = [UPSAMPLE_FACTOR * int(s) for s in tile_shape]
        if num_splits > 1:
            halo = SPLIT_HALO * (2 if num_splits > 2 else 1)
            full[dim_split] = full[dim_split] // num_splits + halo
        return self.widest_channels * math.prod(full)

    def within_index_limit(self, tile_shape: Sequence[int], num_splits: int, dim_split: int) -> bool:
        """
        Whether every convolution chunk stays within ``max_chunk_elements``.

        Parameters
        ----------
        tile_shape
            Spatial shape of the latent decoded at once.
        num_splits
            Split count of the autoencoder.
        dim_split
            Spatial axis ``MaisiConvolution`` splits along.

        Returns
        -------
        bool
            ``True`` when there is no limit or the largest chunk is within it.
        """
        if self.max_chunk_elements is None:
            return True
        return self.chunk_elements(tile_shape, num_splits, dim_split) <= self.max_chunk_elements


# CPU, float32 (norm_float16 false): measured peak RSS 136-149 kB per latent voxel at 16^3 and 24^3
# latents for 1, 2 and 4 splits (DECODE_MEMORY.md); 160 kB is the rounded-up envelope.
CPU_DECODER_MEMORY = DecoderMemoryModel(
    name="cpu-float32", per_split_bytes=((1, 160e3),), fixed_bytes=0.25 * GB, max_chunk_elements=None
)
# CUDA, autocast float16 with norm_float16 true (the MAISI network configs): slope of the published
# A100 peaks against latent voxels per tile is 74-78 kB (2 and 4 splits); 80 kB is the rounded-up slope.
CUDA_DECODER_MEMORY = DecoderMemoryModel(
    name="cuda-float16", per_split_bytes=((1, 80e3),), fixed_bytes=1.5 * GB, max_chunk_elements=INT32_MAX
)


class LatentDecoder(torch.nn.Module):
    """
    Decode scaled latents: ``autoencoder.decode_stage_2_outputs(z / scale_factor)``.

    A module, so that ``monai.inferers.SlidingWindowInferer`` can call it on latent tiles.

    Parameters
    ----------
    autoencoder
        The autoencoder (``AutoencoderKlMaisi`` or any module with ``decode_stage_2_outputs``).
    scale_factor
        The latent scale factor the diffusion model was trained with (latents were multiplied by it).

    Raises
    ------
    ValueError
        When ``scale_factor`` is zero or not finite.
    """

    def __init__(self, autoencoder: torch.nn.Module, scale_factor: float | torch.Tensor = 1.0) -> None:
        super().__init__()
        value = float(scale_factor)
        if value == 0.0 or not math.isfinite(value):
            raise ValueError(f"scale_factor must be finite and non-zero, got {value}.")
        self.autoencoder = autoencoder
        self.scale_factor = value

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """
        Decode a batch of latents.

        Parameters
        ----------
        z
            Latents, shape ``(B, C, D, H, W)``, scaled by ``scale_factor``.

        Returns
        -------
        torch.Tensor
            Images, 4x the latent size per spatial axis.
        """
        return self.autoencoder.decode_stage_2_outputs(z / self.scale_factor)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_num_splits(num_splits: object) -> int:
    if not _is_int(num_splits) or int(num_splits) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{SPLITS_ID} must be an integer >= 1, got {num_splits!r}.")
    return int(num_splits)  # type: ignore[call-overload]


def set_autoencoder_splits(autoencoder: torch.nn.Module, num_splits: int) -> int:
    """
    Set the tensor-split count of an ``AutoencoderKlMaisi`` (encoder and decoder).

    ``AutoencoderKlMaisi`` has no network-wide setting: every ``MaisiConvolution`` keeps its own
    ``num_splits`` (``MaisiGroupNorm3D`` has none; it normalises the whole tensor). This sets it on
    every submodule that has the attribute.

    Parameters
    ----------
    autoencoder
        The autoencoder.
    num_splits
        Split count, >= 1 (1 = no splitting).

    Returns
    -------
    int
        Number of submodules updated.

    Raises
    ------
    ValueError
        When ``num_splits`` is not an integer >= 1.
    """
    num_splits = _check_num_splits(num_splits)
    updated = 0
    for module in autoencoder.modules():
        if hasattr(module, "num_splits"):
            module.num_splits = num_splits
            updated += 1
    if updated == 0 and num_splits > 1:
        name = type(autoencoder).__name__
        logger.warning("%s has no split-capable modules; %s=%d has no effect.", name, SPLITS_ID, num_splits)
    return updated


def get_autoencoder_splits(autoencoder: torch.nn.Module) -> tuple[int, int] | None:
    """
    Return the ``(num_splits, dim_split)`` of an autoencoder's split-capable modules.

    Parameters
    ----------
    autoencoder
        The autoencoder.

    Returns
    -------
    tuple of int or None
        ``(num_splits, dim_split)`` (the largest split count when modules differ), or ``None`` when no
        submodule splits.
    """
    found = [
        (int(m.num_splits), int(m.dim_split))
        for m in autoencoder.modules()
        if hasattr(m, "num_splits") and hasattr(m, "dim_split")
    ]
    return max(found) if found else None


def splits_compatible(length: int, num_splits: int) -> bool:
    """
    Whether ``MaisiConvolution`` splits a latent extent of ``length`` voxels exactly.

    Upstream ``MaisiConvolution`` is only correct when the extent along ``dim_split`` is divisible by
    ``num_splits`` and each chunk is at least as long as its halo: otherwise it drops voxels
    (e.g. 7 latent voxels with 2 splits decode to 24 instead of 28 image voxels) or fails. The upsampled
    extents (2x, 4x) inherit the property from the latent extent.

    Parameters
    ----------
    length
        Latent extent along the split axis.
    num_splits
        Split count.

    Returns
    -------
    bool
        ``True`` when the split is exact.
    """
    if num_splits == 1:
        return True
    return length % num_splits == 0 and length // num_splits >= MIN_VOXELS_PER_SPLIT


def _check_split_axis(length: int, num_splits: int) -> None:
    if not splits_compatible(length, num_splits):
        raise ValueError(
            f"{SPLITS_ID}={num_splits} cannot split a latent extent of {length} voxels along the split axis: "
            f"the extent must be divisible by the split count and give at least {MIN_VOXELS_PER_SPLIT} voxels "
            "per split. Use fewer splits or a sliding-window size that is a multiple of the split count."
        )


def _spatial_shape(latent_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) not in (3, 4, 5) or any(s < 1 for s in shape):
        raise ValueError(
            f"latent_shape must be (D, H, W), (C, D, H, W) or (B, C, D, H, W) with positive sizes, got {shape}."
        )
    return shape[-3], shape[-2], shape[-1]


def _check_overlap(overlap: object) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"{OVERLAP_ID} must be a number in [0, 1), got {overlap!r}.")
    return float(overlap)


def _check_roi(roi_size: object) -> tuple[int, int, int]:
    values = (roi_size,) * 3 if _is_int(roi_size) else roi_size
    if not isinstance(values, Sequence) or len(values) != 3 or any(not _is_int(v) or v < 1 for v in values):
        raise ValueError(f"{ROI_ID} must be an integer or 3 integers >= 1 (latent voxels), got {roi_size!r}.")
    return int(values[0]), int(values[1]), int(values[2])


def clamp_roi(roi_size: Sequence[int], spatial_shape: Sequence[int]) -> tuple[int, int, int]:
    """
    Clamp a sliding-window roi to the latent size, per axis.

    Parameters
    ----------
    roi_size
        Roi, latent voxels per axis.
    spatial_shape
        Spatial shape of the latent.

    Returns
    -------
    tuple of int
        ``min(roi, size)`` per axis.
    """
    return tuple(min(int(r), int(s)) for r, s in zip(roi_size, spatial_shape))  # type: ignore[return-value]


def _window_count(spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Tiles of a sliding window, per axis ``ceil((size - roi) / interval) + 1`` (as MONAI enumerates them)."""
    count = 1
    for size, roi in zip(spatial_shape, clamp_roi(roi_size, spatial_shape)):
        if roi < size:
            count *= math.ceil((size - roi) / max(int(roi * (1.0 - overlap)), 1)) + 1
    return count


def count_sliding_windows(spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """
    Number of tiles ``SlidingWindowInferer`` decodes for a latent of ``spatial_shape``.

    Uses MONAI's scan interval (``int(roi * (1 - overlap))``, or the roi when it spans the axis) and
    ``monai.data.utils.dense_patch_slices``.

    Parameters
    ----------
    spatial_shape
        Spatial shape of the latent.
    roi_size
        Roi, latent voxels per axis (clamped to the latent here).
    overlap
        Overlap ratio in [0, 1).

    Returns
    -------
    int
        Number of tiles (1 when the roi covers the latent).
    """
    roi = clamp_roi(roi_size, spatial_shape)
    interval = [r if r == s else max(int(r * (1.0 - overlap)), 1) for r, s in zip(roi, spatial_shape)]
    return len(dense_patch_slices(tuple(spatial_shape), roi, interval))


@dataclass(frozen=True)
class DecodePlan:
    """
    How to decode one latent: whole or in sliding-window tiles, split count and stitching device.

    Parameters
    ----------
    roi_size
        Sliding-window roi in latent voxels, or ``None`` to decode the whole latent at once.
    overlap
        Sliding-window overlap ratio in [0, 1).
    num_splits
        ``autoencoder_tp_num_splits`` applied to the autoencoder.
    stitch_device
        Device that receives the decoded image (and holds the sliding-window accumulators).
    num_tiles
        Number of decoder calls (1 for a whole-volume decode).
    estimated_peak_gb
        Estimated peak memory on the decoding device, when the plan was made from a memory model.
    budget_gb
        Memory budget the plan was made for, when known.
    """

    roi_size: tuple[int, int, int] | None
    overlap: float
    num_splits: int
    stitch_device: torch.device
    num_tiles: int
    estimated_peak_gb: float | None = None
    budget_gb: float | None = None

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", _check_roi(self.roi_size))
        object.__setattr__(self, "overlap", _check_overlap(self.overlap))
        _check_num_splits(self.num_splits)
        object.__setattr__(self, "stitch_device", torch.device(self.stitch_device))
        if self.num_tiles < 1:
            raise ValueError(f"num_tiles must be >= 1, got {self.num_tiles}.")

    def describe(self) -> str:
        """
        One line for logs and reports.

        Returns
        -------
        str
            E.g. ``sliding-window decode: roi (80, 80, 80), overlap 0.4, 8 tiles, 4 splits, stitch on cpu``.
        """
        if self.roi_size is None:
            text = "whole-volume decode"
        else:
            text = f"sliding-window decode: roi {self.roi_size}, overlap {self.overlap:g}, {self.num_tiles} tiles"
        text += f", {self.num_splits} split{'s' if self.num_splits > 1 else ''}, stitch on {self.stitch_device}"
        if self.estimated_peak_gb is not None:
            text += f", estimated peak {self.estimated_peak_gb:.2f} GB"
            if self.budget_gb is not None:
                text += f" of {self.budget_gb:.2f} GB budget"
        return text


def _cgroup_available_bytes() -> int | None:
    """Bytes left under a cgroup-v2 memory limit, or ``None`` when there is no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((root / "memory.current").read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def _host_available_bytes() -> int:
    """Available host RAM: ``MemAvailable`` of /proc/meminfo, else ``os.sysconf``, capped by cgroup."""
    available: int | None = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        available = None
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_available_bytes()
    return available if limit is None else min(available, limit)


def available_memory_bytes(device: torch.device | str) -> int:
    """
    Memory a decode on ``device`` can use now.

    CUDA: free device memory (``torch.cuda.mem_get_info``) plus memory PyTorch's caching allocator has
    reserved but not allocated. Other devices: available host RAM.

    Parameters
    ----------
    device
        The decoding device.

    Returns
    -------
    int
        Bytes.

    Raises
    ------
    RuntimeError
        For a CUDA device when CUDA is not available.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"CUDA is not available to query {device}; pass {BUDGET_ID} to plan for it.")
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    return _host_available_bytes()


def _default_memory_model(device: torch.device) -> DecoderMemoryModel:
    return CUDA_DECODER_MEMORY if device.type == "cuda" else CPU_DECODER_MEMORY


@dataclass(frozen=True)
class _Candidate:
    """A way to decode: ``tile`` (spatial, latent voxels) decoded at once; ``tiled`` = sliding window."""

    tile: tuple[int, int, int]
    tiled: bool


def _auto_roi_candidates(spatial: tuple[int, int, int]) -> list[_Candidate]:
    """Cubic rois, multiples of ``ROI_STEP``, largest first, down to ``MIN_ROI_SIZE``, clamped to the latent."""
    candidates: list[_Candidate] = []
    largest = max(spatial) - 1  # a roi covering every axis is the whole-volume candidate
    for size in range(largest - largest % ROI_STEP, MIN_ROI_SIZE - 1, -ROI_STEP):
        tile = clamp_roi((size,) * 3, spatial)
        if tile != spatial and (not candidates or tile != candidates[-1].tile):
            candidates.append(_Candidate(tile, True))
    return candidates


@dataclass(frozen=True)
class _Planner:
    """The fixed inputs of one :func:`plan_decode` call and the searches over its candidates."""

    spatial: tuple[int, int, int]
    overlap: float
    split_options: tuple[int, ...]
    dim_split: int
    model: DecoderMemoryModel
    usable_bytes: float

    @property
    def output_bytes(self) -> int:
        return OUTPUT_BYTES_PER_LATENT_VOXEL * math.prod(self.spatial)

    def compatible_splits(self, candidate: _Candidate) -> list[int]:
        return [s for s in self.split_options if splits_compatible(candidate.tile[self.dim_split], s)]

    def estimate(self, candidate: _Candidate, num_splits: int, stitch_on_device: bool) -> float:
        peak = self.model.decoder_peak_bytes(candidate.tile, num_splits)
        if candidate.tiled and stitch_on_device:
            peak += 2 * self.output_bytes  # SlidingWindowInferer's image and weight-count accumulators
        return peak

    def cost(self, candidate: _Candidate) -> tuple[int, int]:
        """(tiles, decoded latent voxels): fewest seams first, then the least recomputed overlap."""
        if not candidate.tiled:
            return 1, math.prod(self.spatial)
        tiles = _window_count(self.spatial, candidate.tile, self.overlap)
        return tiles, tiles * math.prod(candidate.tile)

    def fitting_splits(self, candidate: _Candidate, stitch_on_device: bool) -> int | None:
        """The first split count that decodes ``candidate`` exactly, within 32-bit indexing and the budget."""
        for splits in self.compatible_splits(candidate):
            if self.model.within_index_limit(candidate.tile, splits, self.dim_split) and (
                self.estimate(candidate, splits, stitch_on_device) <= self.usable_bytes
            ):
                return splits
        return None

    def best_fit(self, candidates: Sequence[_Candidate], stitch_on_device: bool) -> tuple[_Candidate, int] | None:
        """The cheapest candidate (see ``cost``) that fits, with its split count."""
        best: tuple[_Candidate, int] | None = None
        for candidate in candidates:
            splits = self.fitting_splits(candidate, stitch_on_device)
            if splits is not None and (best is None or self.cost(candidate) < self.cost(best[0])):
                best = (candidate, splits)
        return best

    def fallback(self, candidates: Sequence[_Candidate]) -> tuple[_Candidate, int]:
        """The most memory-saving candidate that decodes exactly, for when nothing fits."""
        for candidate in reversed(candidates):
            options = self.compatible_splits(candidate)
            if options:
                indexable = [s for s in options if self.model.within_index_limit(candidate.tile, s, self.dim_split)]
                return candidate, indexable[0] if indexable else options[-1]
        # only an explicit split count can be incompatible with every candidate
        _check_split_axis(candidates[0].tile[self.dim_split], self.split_options[0])
        raise ValueError(f"{SPLITS_ID}={self.split_options[0]} cannot split any tile of the latent {self.spatial}.")


def _check_budget(memory_budget_gb: object) -> float | None:
    if memory_budget_gb is None:
        return None
    if (
        isinstance(memory_budget_gb, bool)
        or not isinstance(memory_budget_gb, (int, float))
        or not math.isfinite(memory_budget_gb)
        or memory_budget_gb <= 0
    ):
        raise ValueError(f"{BUDGET_ID} must be a positive number of GB, got {memory_budget_gb!r}.")
    return float(memory_budget_gb) * GB


def plan_decode(
    latent_shape: Sequence[int],
    device: torch.device | str,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    num_splits: int | None = None,
    memory_budget_gb: float | None = None,
    *,
    dim_split: int = DEFAULT_DIM_SPLIT,
    memory_model: DecoderMemoryModel | None = None,
) -> DecodePlan:
    """
    Choose how to decode a latent within a memory budget.

    Explicit values win: ``roi_size`` (``autoencoder_sliding_window_infer_size``), ``overlap``
    (``autoencoder_sliding_window_infer_overlap``) and ``num_splits`` (``autoencoder_tp_num_splits``)
    are used as given. What is left unset is chosen with ``memory_model`` (default:
    :data:`CUDA_DECODER_MEMORY` on CUDA, :data:`CPU_DECODER_MEMORY` otherwise; calibration in
    ``common/maisi/DECODE_MEMORY.md``) so that the estimated peak stays within ``BUDGET_FRACTION`` of
    the budget:

    1. Decode the whole latent if it fits, with the first split count of 1, 2, 4, 8, 16 that splits
       it exactly (:func:`splits_compatible`), keeps every convolution chunk within 32-bit indexing
       (CUDA) and fits the budget.
    2. Otherwise decode in sliding-window tiles. The rois are cubes clamped to the latent, multiples
       of 4, from the latent size down to 16. Each roi gets the same split search. The roi chosen is
       the one that fits with the fewest tiles, then the fewest decoded voxels (the least recomputed
       overlap), so the roi shrinks as the budget shrinks.

    When nothing fits, the smallest roi is returned with a warning. The image is stitched on the CPU
    unless three things hold: the decoding device is not the CPU, the full-resolution image (4x the
    latent per axis, 1 channel, float32) is at most ``STITCH_FRACTION`` of the budget, and stitching
    on the device does not force a smaller tile. In the shipped models the cost per voxel does not
    depend on the split count (measured), so splits only rise where 32-bit indexing needs them.

    Parameters
    ----------
    latent_shape
        Latent shape: ``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)``; the last 3 are spatial.
    device
        Device the decoder runs on.
    roi_size
        Sliding-window roi in latent voxels (an int means a cube), clamped to the latent; a roi covering
        the whole latent means a whole-volume decode. ``None``: automatic.
    overlap
        Sliding-window overlap ratio in [0, 1).
    num_splits
        Split count; ``None``: automatic.
    memory_budget_gb
        Memory available for the decode, in GB (1e9 bytes). ``None``: what
        :func:`available_memory_bytes` reports for ``device``.
    dim_split
        Spatial axis the autoencoder splits along (``dim_split`` of the network config).
    memory_model
        Peak-memory model; ``None``: the default for ``device``.

    Returns
    -------
    DecodePlan
        The plan; its ``describe()`` is logged.

    Raises
    ------
    ValueError
        For an invalid latent shape, ``autoencoder_sliding_window_infer_size``,
        ``autoencoder_sliding_window_infer_overlap``, ``autoencoder_tp_num_splits`` (including a split
        count that cannot split the tile exactly), ``dim_split`` or ``memory_budget_gb``.
    """
    spatial = _spatial_shape(latent_shape)
    device = torch.device(device)
    overlap = _check_overlap(overlap)
    roi = None if roi_size is None else clamp_roi(_check_roi(roi_size), spatial)
    split_options = SPLIT_CHOICES if num_splits is None else (_check_num_splits(num_splits),)
    if dim_split not in (0, 1, 2):
        raise ValueError(f"dim_split must be 0, 1 or 2, got {dim_split!r}.")
    budget = _check_budget(memory_budget_gb)
    if budget is None:
        budget = float(available_memory_bytes(device))
    model = memory_model or _default_memory_model(device)
    planner = _Planner(spatial, overlap, split_options, dim_split, model, BUDGET_FRACTION * budget)
    if roi is not None:
        candidates = [_Candidate(roi, roi != spatial)]
    else:
        candidates = [_Candidate(spatial, False), *_auto_roi_candidates(spatial)]

    stitch_on_device = device.type == "cpu"  # on the CPU the accumulators share the decoder's memory
    choice = planner.best_fit(candidates, stitch_on_device)
    if not stitch_on_device and planner.output_bytes <= STITCH_FRACTION * budget:
        on_device = planner.best_fit(candidates, True)
        if on_device is not None and (choice is None or on_device[0] == choice[0]):
            choice, stitch_on_device = on_device, True
    if choice is None:
        choice = planner.fallback(candidates)
        logger.warning(
            "decoding a latent of %s: estimated peak %.2f GB (%s, %s=%d) exceeds %.0f%% of the %.2f GB budget "
            "or 32-bit indexing; set %s / %s or free memory.",
            spatial,
            planner.estimate(*choice, stitch_on_device) / GB,
            model.name,
            SPLITS_ID,
            choice[1],
            100 * BUDGET_FRACTION,
            budget / GB,
            ROI_ID,
            SPLITS_ID,
        )
    candidate, splits = choice
    plan = DecodePlan(
        roi_size=candidate.tile if candidate.tiled else None,
        overlap=overlap,
        num_splits=splits,
        stitch_device=device if stitch_on_device else torch.device("cpu"),
        num_tiles=count_sliding_windows(spatial, candidate.tile, overlap) if candidate.tiled else 1,
        estimated_peak_gb=planner.estimate(candidate, splits, stitch_on_device) / GB,
        budget_gb=budget / GB,
    )
    logger.info("latent %s on %s: %s", spatial, device, plan.describe())
    return plan


def decode_latent(
    decoder: LatentDecoder, latent: torch.Tensor, plan: DecodePlan, progress: bool = True
) -> torch.Tensor:
    """
    Decode a latent as planned.

    Applies ``plan.num_splits`` to the autoencoder, then decodes the whole latent or tiles it with
    ``SlidingWindowInferer(roi_size, sw_batch_size=1, overlap, mode="gaussian", sw_device=latent.device,
    device=plan.stitch_device)``. The roi is clamped to the latent per axis; a roi covering the latent
    means a whole-volume decode. Runs under ``torch.no_grad()``, with float16 autocast only on CUDA.

    Parameters
    ----------
    decoder
        The latent decoder.
    latent
        Scaled latent, ``(B, C, D, H, W)``, on the decoding device.
    plan
        The plan (see :func:`plan_decode`).
    progress
        Show the sliding-window progress bar.

    Returns
    -------
    torch.Tensor
        The image, 4x the latent size per spatial axis, on ``plan.stitch_device``, in the latent's dtype.

    Raises
    ------
    ValueError
        When the latent is not 5-D or the plan's split count cannot split the tile exactly.
    """
    if latent.ndim != 5:
        raise ValueError(f"latent must be (B, C, D, H, W), got shape {tuple(latent.shape)}.")
    spatial = tuple(int(s) for s in latent.shape[2:])
    roi = None if plan.roi_size is None else clamp_roi(plan.roi_size, spatial)
    tiled = roi is not None and roi != spatial
    tile = roi if tiled else spatial

    split_info = get_autoencoder_splits(decoder.autoencoder)
    if split_info is not None:
        _check_split_axis(tile[split_info[1]], plan.num_splits)
    set_autoencoder_splits(decoder.autoencoder, plan.num_splits)

    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if latent.device.type == "cuda"
        else contextlib.nullcontext()
    )
    logger.info("decoding latent %s: %s", tuple(latent.shape), plan.describe())
    with torch.no_grad(), autocast:
        if not tiled:
            image = decoder(latent)
        else:
            inferer = SlidingWindowInferer(
                roi_size=tile,
                sw_batch_size=1,
                overlap=plan.overlap,
                mode="gaussian",
                sw_device=latent.device,
                device=plan.stitch_device,
                progress=progress,
            )
            image = inferer(latent, decoder)
    return image.to(device=plan.stitch_device, dtype=latent.dtype)


class PlannedDecoder:
    """
    Decode latents within a memory budget, planning once per latent shape (a config component).

    Parameters
    ----------
    roi_size
        ``autoencoder_sliding_window_infer_size`` (latent voxels), ``None`` = planned.
    overlap
        ``autoencoder_sliding_window_infer_overlap``.
    num_splits
        ``autoencoder_tp_num_splits``: honoured when given, ``None`` = planned.
    memory_budget_gb
        ``memory_budget_gb``, ``None`` = the device's free memory.
    device
        where the decoder runs.
    progress
        show the sliding-window progress bar.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | None,
        overlap: float,
        num_splits: int | None,
        memory_budget_gb: float | None,
        device: torch.device | str,
        progress: bool = True,
    ) -> None:
        self.roi_size = roi_size
        self.overlap = overlap
        self.num_splits = num_splits
        self.memory_budget_gb = memory_budget_gb
        self.device = torch.device(device)
        self.progress = progress
        self._plans: dict[tuple[int, ...], DecodePlan] = {}

    def plan(self, latent_shape: Sequence[int]) -> DecodePlan:
        """The decode plan of a latent shape (``(C, X, Y, Z)`` or spatial only), planned once."""
        key = _spatial_shape(latent_shape)
        if key not in self._plans:
            self._plans[key] = plan_decode(
                key, self.device, self.roi_size, self.overlap, self.num_splits, self.memory_budget_gb
            )
        return self._plans[key]

    def __call__(self, decoder: LatentDecoder, latent: torch.Tensor) -> torch.Tensor:
        """Decode ``latent`` ``(B, C, X, Y, Z)`` as planned for its shape."""
        return decode_latent(decoder, latent, self.plan(latent.shape), progress=self.progress)
