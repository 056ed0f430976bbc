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

The decoder is the peak-memory step of MAISI inference. A :class:`DecodePlan` says how to run it:

- **whole**: one decoder call on the whole latent;
- **halo**: the latent is cut into cores, each decoded with a margin of ``halo`` latent voxels and only
  its centre kept (``halo_decode.py``). With a halo that covers the decoder's receptive field the
  result is the whole-volume decode up to the group-norm statistics, at the memory of one tile;
- **sliding-window**: ``monai.inferers.SlidingWindowInferer`` with gaussian blending, optionally
  stitching on the CPU (the published MAISI pipeline; its tiles have seams).

Two user settings bound the memory, and a third picks the tiling:

- ``autoencoder_tp_num_splits``: ``MaisiConvolution`` splits each convolution input into chunks along
  spatial axis ``dim_split`` (with a 3-voxel halo) and concatenates the results. The result is exact;
  on CUDA it keeps every chunk within the 2**31-element limit of cuDNN's 32-bit indexing. An explicit
  value is honoured; ``null`` means *planned*: :func:`plan_decode` chooses it, and the
  ``num_splits`` of the network definition (``autoencoder_def#num_splits``) is then not used for
  decoding (it still applies where the autoencoder runs outside the planner, e.g. embeddings).
- ``autoencoder_sliding_window_infer_size`` / ``_overlap``: an explicit window asks for the
  sliding-window decode; ``null`` lets the planner choose between a whole and a halo-tiled decode.

:func:`plan_decode` picks what is left unset from a memory budget with the peak-memory model
:class:`DecoderMemoryModel` (calibration in ``common/maisi/DECODE_MEMORY.md``); :func:`decode_latent`
carries the plan out. :func:`check_decode_settings` is the one check of the three user settings.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.inferers import SlidingWindowInferer

from .halo_decode import GROUP_NORM_MODES, decode_with_halo, decoder_stages, halo_tiles

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_DECODER_MEMORY",
    "CUDA_DECODER_MEMORY",
    "DEFAULT_HALO",
    "DecodePlan",
    "DecoderMemoryModel",
    "LatentDecoder",
    "available_memory_bytes",
    "check_decode_settings",
    "clamp_roi",
    "count_sliding_windows",
    "decode_latent",
    "decoder_out_channels",
    "get_autoencoder_splits",
    "plan_decode",
    "resident_memory_bytes",
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
OUTPUT_BYTES_PER_LATENT_VOXEL = 4 * UPSAMPLE_FACTOR**3  # per output channel, float32
DEFAULT_HALO = 2  # latent voxels per side: the receptive field of the MAISI decoders' full-resolution stage
MIN_HALO_CORE = 4  # smallest automatic halo-tile core, latent voxels per axis
DEFAULT_GROUP_NORM = "tile"  # group-norm statistics of halo tiles (DECODE_MEMORY.md)

# plan kinds (DecodePlan.kind)
WHOLE = "whole"
HALO = "halo"
SLIDING = "sliding-window"
PLANNED = "planned"  # DecodePlan.num_splits_source when the planner chose the split count

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
    halo_bytes_per_latent_voxel
        Bytes per latent voxel of a halo-tile window of the full-resolution stage, which runs a leaner
        group norm (``halo_decode.py``); ``None``: the same as ``bytes_per_latent_voxel``.
    stage_store_bytes_per_latent_voxel
        Bytes per latent voxel of the whole-volume map a halo-tiled decode keeps between its last two
        stages (128 channels at half resolution, float32, for the MAISI image decoder).

    Notes
    -----
    The calibrations are for a 1-channel decoder. A decoder with ``out_channels`` outputs adds
    ``(out_channels - 1) * OUTPUT_BYTES_PER_LATENT_VOXEL`` per decoded voxel for its output tile
    (:meth:`output_tile_bytes`); the stitch buffers are counted by the planner.
    """

    name: str
    per_split_bytes: tuple[tuple[int, float], ...]
    fixed_bytes: float
    widest_channels: int = 128
    max_chunk_elements: int | None = None
    halo_bytes_per_latent_voxel: float | None = None
    stage_store_bytes_per_latent_voxel: float = 128 * 8 * 4

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

    def halo_tile_peak_bytes(self, tile_shape: Sequence[int], num_splits: int) -> float:
        """
        Estimated peak bytes of decoding one halo-tile window of ``tile_shape`` (lean group norm).

        Parameters
        ----------
        tile_shape
            Spatial shape of the decoded window (core plus halo).
        num_splits
            Split count of the autoencoder.

        Returns
        -------
        float
            Estimated peak bytes, including the decoded window.
        """
        per_voxel = self.halo_bytes_per_latent_voxel
        if per_voxel is None:
            return self.decoder_peak_bytes(tile_shape, num_splits)
        return self.fixed_bytes + per_voxel * math.prod(tile_shape)

    @staticmethod
    def output_tile_bytes(tile_shape: Sequence[int], out_channels: int) -> float:
        """
        Bytes of the output channels of a decoded tile beyond the first (the calibration's one).

        Parameters
        ----------
        tile_shape
            Spatial shape of the latent decoded at once.
        out_channels
            Output channels of the decoder.

        Returns
        -------
        float
            ``(out_channels - 1) * OUTPUT_BYTES_PER_LATENT_VOXEL * voxels``.
        """
        return float((out_channels - 1) * OUTPUT_BYTES_PER_LATENT_VOXEL * math.prod(tile_shape))

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


# CPU, float32 (norm_float16 false), measured peak RSS increase (DECODE_MEMORY.md): MONAI's decoder forward
# 132-146 kB per latent voxel (16^3, 24^3, 32x32x16; 1, 2 and 4 splits), the staged halo path with its lean
# group norm 128-131 kB (12^3, 16^3, 20^3); the fixed part is below 0.05 GB. Rounded up: 150 kB, 135 kB, 0.1 GB.
CPU_DECODER_MEMORY = DecoderMemoryModel(
    name="cpu-float32",
    per_split_bytes=((1, 150e3),),
    fixed_bytes=0.1 * GB,
    max_chunk_elements=None,
    halo_bytes_per_latent_voxel=135e3,
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


def _as_sequence(value: object) -> object:
    """Arrays and tensors as lists (``tolist``); anything else unchanged."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()  # type: ignore[union-attr]
    return value


def _check_num_splits(num_splits: object) -> int:
    if not _is_int(num_splits) or int(num_splits) < 1:  # type: ignore[call-overload]
        raise ValueError(
            f"{SPLITS_ID}={num_splits!r} is not allowed; it must be an integer >= 1, or null to let the planner choose."
        )
    return int(num_splits)  # type: ignore[call-overload]


def _check_overlap(overlap: object) -> float:
    value = _as_sequence(overlap)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not 0.0 <= float(value) < 1.0
    ):
        raise ValueError(f"{OVERLAP_ID}={overlap!r} is not allowed; it must be a number in [0, 1).")
    return float(value)


def _check_roi(roi_size: object) -> tuple[int, int, int]:
    value = _as_sequence(roi_size)
    values = (value,) * 3 if _is_int(value) else value
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or len(values) != 3
        or any(not _is_int(v) or v < 1 for v in values)
    ):
        raise ValueError(
            f"{ROI_ID}={roi_size!r} is not allowed; it must be an integer or a list of 3 integers >= 1 "
            "(latent voxels), or null to let the planner choose."
        )
    return int(values[0]), int(values[1]), int(values[2])


def check_decode_settings(
    roi_size: object, overlap: object, num_splits: object
) -> tuple[tuple[int, int, int] | None, float, int | None]:
    """
    Check and normalise the three decode settings; the one check of them (the settings layer calls it).

    Parameters
    ----------
    roi_size
        ``autoencoder_sliding_window_infer_size``: the sliding-window roi in **latent** voxels (x4 in
        image voxels), an integer (a cube) or 3 integers >= 1; ``None``: the planner chooses a whole or a
        halo-tiled decode.
    overlap
        ``autoencoder_sliding_window_infer_overlap``: a number in [0, 1) (used by sliding windows).
    num_splits
        ``autoencoder_tp_num_splits``: an integer >= 1, honoured as given; ``None``: planned (the planner
        chooses it, and the network definition's ``num_splits`` is not used for decoding).

    Returns
    -------
    tuple
        ``(roi_size, overlap, num_splits)``: a 3-tuple of int or ``None``, a float, an int or ``None``.

    Raises
    ------
    ValueError
        Naming the config id, the value and what is allowed.
    """
    roi = None if roi_size is None else _check_roi(roi_size)
    return roi, _check_overlap(overlap), None if num_splits is None else _check_num_splits(num_splits)


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


def decoder_out_channels(autoencoder: torch.nn.Module) -> int:
    """
    Output channels of an autoencoder's decoder: those of the last convolution of ``autoencoder.decoder``.

    Parameters
    ----------
    autoencoder
        The autoencoder (``AutoencoderKlMaisi``).

    Returns
    -------
    int
        The channel count (1 for the MAISI image autoencoder, 125 for the mask generator's); 1 when the
        module has no ``decoder`` with convolutions.
    """
    decoder = getattr(autoencoder, "decoder", None)
    convolutions = [] if decoder is None else [m for m in decoder.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return int(convolutions[-1].out_channels) if convolutions else 1


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


def count_sliding_windows(spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """
    Number of tiles ``SlidingWindowInferer`` decodes for a latent of ``spatial_shape``.

    Uses MONAI's scan interval (``int(roi * (1 - overlap))``, or the roi when it spans the axis) and counts
    the window positions of ``monai.data.utils.dense_patch_slices`` per axis, ``ceil((size - roi) / interval) + 1``,
    without listing them (a 512^3 latent has over a million small windows, and the planner counts many rois).

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
    count = 1
    for r, size in zip(roi, spatial_shape):
        interval = r if r == size else max(int(r * (1.0 - overlap)), 1)
        count *= -(-(int(size) - r) // interval) + 1
    return count


@dataclass(frozen=True)
class DecodePlan:
    """
    How to decode one latent: whole, halo-tiled or sliding-window; split count and stitching device.

    Parameters
    ----------
    roi_size
        Sliding-window roi in latent voxels, or ``None`` for a whole or halo-tiled decode.
    overlap
        Sliding-window overlap ratio in [0, 1).
    num_splits
        ``autoencoder_tp_num_splits`` applied to the autoencoder.
    stitch_device
        Device that receives the decoded image (and holds the stitch buffers of a tiled decode).
    num_tiles
        Number of decoder calls (1 for a whole-volume decode; per pass for a halo-tiled one).
    estimated_peak_gb
        Estimated peak memory on the decoding device (``resident_gb`` included), when the plan was
        made from a memory model.
    budget_gb
        Memory budget the plan was made for, when known.
    halo_core
        Halo-tiled decode: the core size in latent voxels (the part of each tile kept); ``None``
        otherwise.
    halo
        Halo-tiled decode: latent voxels decoded around each core, per axis and side.
    group_norm
        Halo-tiled decode: ``"tile"`` (tile statistics, one pass) or ``"exact"`` (whole-volume
        statistics, one norm at a time: the whole-volume decode at several times the work); see
        ``halo_decode.py``.
    num_splits_source
        ``"planned"`` when the planner chose ``num_splits``, ``"autoencoder_tp_num_splits"`` when it was
        given.
    out_channels
        Output channels of the decoder the plan was made for.
    resident_gb
        Memory already in use that the budget also holds (e.g. the process), counted in the estimate.
    stitch_gb
        Planned size of the stitch buffers on ``stitch_device`` (the output image, and a sliding
        window's weight map), when planned.
    decoded_voxels
        Latent voxels decoded in all (per pass), when planned: the latent's size for a whole decode,
        more for tiles (their overlap or halos are decoded more than once).
    """

    roi_size: tuple[int, int, int] | None
    overlap: float
    num_splits: int
    stitch_device: torch.device
    num_tiles: int
    estimated_peak_gb: float | None = None
    budget_gb: float | None = None
    halo_core: tuple[int, int, int] | None = None
    halo: tuple[int, int, int] | None = None
    group_norm: str = "tile"
    num_splits_source: str = PLANNED
    out_channels: int = 1
    resident_gb: float = 0.0
    stitch_gb: float | None = None
    decoded_voxels: int | None = None

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", _check_roi(self.roi_size))
        object.__setattr__(self, "overlap", _check_overlap(self.overlap))
        _check_num_splits(self.num_splits)
        object.__setattr__(self, "stitch_device", torch.device(self.stitch_device))
        if self.num_tiles < 1:
            raise ValueError(f"num_tiles must be >= 1, got {self.num_tiles}.")
        if (self.halo_core is None) != (self.halo is None):
            raise ValueError("a halo-tiled plan needs both halo_core and halo.")
        if self.halo_core is not None:
            if self.roi_size is not None:
                raise ValueError("a plan is either sliding-window (roi_size) or halo-tiled (halo_core), not both.")
            object.__setattr__(self, "halo_core", _check_roi(self.halo_core))
            object.__setattr__(self, "halo", _check_halo(self.halo))
        if self.group_norm not in GROUP_NORM_MODES:
            raise ValueError(f"group_norm must be one of {GROUP_NORM_MODES}, got {self.group_norm!r}.")
        if self.num_splits_source not in (PLANNED, SPLITS_ID):
            raise ValueError(f"num_splits_source must be {PLANNED!r} or {SPLITS_ID!r}, got {self.num_splits_source!r}.")
        if not _is_int(self.out_channels) or self.out_channels < 1:
            raise ValueError(f"out_channels must be an integer >= 1, got {self.out_channels!r}.")

    @property
    def kind(self) -> str:
        """``"whole"``, ``"halo"`` or ``"sliding-window"``."""
        if self.halo_core is not None:
            return HALO
        return WHOLE if self.roi_size is None else SLIDING

    def describe(self) -> str:
        """
        One line for logs and reports.

        Returns
        -------
        str
            E.g. ``sliding-window decode: roi (80, 80, 80), overlap 0.4, 8 tiles, 4 splits
            (autoencoder_tp_num_splits), stitch on cpu`` or ``halo-tiled decode: core (16, 16, 16),
            halo (4, 4, 4), 4 tiles, tile group-norm statistics, 1 split (planned), stitch on cpu``.
        """
        if self.kind == WHOLE:
            text = "whole-volume decode"
        elif self.kind == HALO:
            text = (
                f"halo-tiled decode: core {self.halo_core}, halo {self.halo}, {self.num_tiles} tiles, "
                f"{self.group_norm} group-norm statistics"
            )
        else:
            text = f"sliding-window decode: roi {self.roi_size}, overlap {self.overlap:g}, {self.num_tiles} tiles"
        text += f", {self.num_splits} split{'s' if self.num_splits > 1 else ''} ({self.num_splits_source})"
        if self.out_channels > 1:
            text += f", {self.out_channels} output channels"
        text += f", stitch on {self.stitch_device}"
        if self.stitch_gb is not None and self.kind != WHOLE:
            text += f" ({self.stitch_gb:.3g} GB)"
        if self.estimated_peak_gb is not None:
            text += f", estimated peak {self.estimated_peak_gb:.2f} GB"
            if self.resident_gb > 0:
                decode_gb = self.estimated_peak_gb - self.resident_gb
                text += f" ({self.resident_gb:.2f} GB resident + {decode_gb:.2f} GB decode)"
            if self.budget_gb is not None:
                text += f" of {self.budget_gb:.2f} GB budget"
        return text


def _check_halo(halo: object) -> tuple[int, int, int]:
    value = _as_sequence(halo)
    values = (value,) * 3 if _is_int(value) else value
    if not isinstance(values, Sequence) or len(values) != 3 or any(not _is_int(v) or v < 0 for v in values):
        raise ValueError(f"halo={halo!r} is not allowed; it must be an integer or 3 integers >= 0 (latent voxels).")
    return int(values[0]), int(values[1]), int(values[2])


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


def resident_memory_bytes(device: torch.device | str) -> int:
    """
    Memory this process holds now on ``device``: its resident set (``VmRSS``) on the host, or the memory
    PyTorch has allocated on a CUDA device. Pass it as ``resident_gb`` to count the whole process against
    a budget.

    Parameters
    ----------
    device
        The decoding device.

    Returns
    -------
    int
        Bytes (0 where the host does not report them).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device)) if torch.cuda.is_available() else 0
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _default_memory_model(device: torch.device) -> DecoderMemoryModel:
    return CUDA_DECODER_MEMORY if device.type == "cuda" else CPU_DECODER_MEMORY


@dataclass(frozen=True)
class _Candidate:
    """
    A way to decode. ``tile`` is the largest latent block decoded at once; ``decoded`` the latent voxels
    decoded in all; ``split_extents`` the window extents along the split axis (every one must split
    exactly); ``core``/``halo`` are set for a halo-tiled decode.
    """

    kind: str
    tile: tuple[int, int, int]
    tiles: int
    decoded: int
    split_extents: tuple[int, ...]
    core: tuple[int, int, int] | None = None
    halo: tuple[int, int, int] | None = None


def _whole_candidate(spatial: tuple[int, int, int], dim_split: int) -> _Candidate:
    return _Candidate(WHOLE, spatial, 1, math.prod(spatial), (spatial[dim_split],))


def _sliding_candidate(spatial: tuple[int, int, int], roi: tuple[int, int, int], overlap: float, dim_split: int) -> _Candidate:
    if roi == spatial:
        return _whole_candidate(spatial, dim_split)
    tiles = count_sliding_windows(spatial, roi, overlap)
    return _Candidate(SLIDING, roi, tiles, tiles * math.prod(roi), (roi[dim_split],))


def _auto_roi_candidates(spatial: tuple[int, int, int], overlap: float, dim_split: int) -> list[_Candidate]:
    """Cubic rois, multiples of ``ROI_STEP``, largest first, down to ``MIN_ROI_SIZE``, clamped to the latent."""
    candidates: list[_Candidate] = []
    largest = max(spatial) - 1  # a roi covering every axis is the whole-volume candidate
    for size in range(largest - largest % ROI_STEP, MIN_ROI_SIZE - 1, -ROI_STEP):
        tile = clamp_roi((size,) * 3, spatial)
        if tile != spatial and (not candidates or tile != candidates[-1].tile):
            candidates.append(_sliding_candidate(spatial, tile, overlap, dim_split))
    return candidates


def _axis_options(size: int, halo: int) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """Per core size of one axis: ``(core, largest window, sum of windows, distinct window extents)``."""
    options, seen = [], set()
    for count in range(1, size + 1):
        core = -(-size // count)
        if core in seen or core < min(MIN_HALO_CORE, size):
            continue
        seen.add(core)
        extents = [min(start + core + halo, size) - max(start - halo, 0) for start in range(0, size, core)]
        options.append((core, max(extents), sum(extents), tuple(sorted(set(extents)))))
    return options


def _halo_candidates(spatial: tuple[int, int, int], halo: tuple[int, int, int], dim_split: int) -> list[_Candidate]:
    """Every grid of cores (at least ``MIN_HALO_CORE`` per axis), cheapest first (decoded voxels, then tiles)."""
    per_axis = [_axis_options(size, h) for size, h in zip(spatial, halo)]
    candidates = []
    for combo in itertools.product(*per_axis):
        core = tuple(option[0] for option in combo)
        if core == spatial:
            continue  # one tile: the whole-volume candidate
        tiles = math.prod(-(-size // c) for size, c in zip(spatial, core))
        candidates.append(
            _Candidate(
                HALO,
                tile=tuple(option[1] for option in combo),  # type: ignore[arg-type]
                tiles=tiles,
                decoded=math.prod(option[2] for option in combo),
                split_extents=combo[dim_split][3],
                core=core,  # type: ignore[arg-type]
                halo=halo,
            )
        )
    return sorted(candidates, key=lambda c: (c.decoded, c.tiles))


@dataclass(frozen=True)
class _Planner:
    """The fixed inputs of one :func:`plan_decode` call and the searches over its candidates."""

    spatial: tuple[int, int, int]
    split_options: tuple[int, ...]
    dim_split: int
    model: DecoderMemoryModel
    usable_bytes: float
    out_channels: int

    def stitch_bytes(self, candidate: _Candidate) -> int:
        """Buffers on the stitching device: the output image, and a sliding window's weight map."""
        if candidate.kind == WHOLE:
            return 0  # the decoder's own output, counted in its peak
        channels = self.out_channels + (1 if candidate.kind == SLIDING else 0)
        return channels * OUTPUT_BYTES_PER_LATENT_VOXEL * math.prod(self.spatial)

    def compatible_splits(self, candidate: _Candidate) -> list[int]:
        return [s for s in self.split_options if all(splits_compatible(e, s) for e in candidate.split_extents)]

    def estimate(self, candidate: _Candidate, num_splits: int, stitch_on_device: bool) -> float:
        if candidate.kind == HALO:
            peak = self.model.halo_tile_peak_bytes(candidate.tile, num_splits)
            peak += self.model.stage_store_bytes_per_latent_voxel * math.prod(self.spatial)
        else:
            peak = self.model.decoder_peak_bytes(candidate.tile, num_splits)
        peak += self.model.output_tile_bytes(candidate.tile, self.out_channels)
        if stitch_on_device:
            peak += self.stitch_bytes(candidate)
        return peak

    def fitting_splits(self, candidate: _Candidate, stitch_on_device: bool) -> int | None:
        """The first split count that decodes ``candidate`` exactly, within 32-bit indexing and the budget."""
        for splits in self.compatible_splits(candidate):
            if self.model.within_index_limit(candidate.tile, splits, self.dim_split) and (
                self.estimate(candidate, splits, stitch_on_device) <= self.usable_bytes
            ):
                return splits
        return None

    def best_fit(self, candidates: Sequence[_Candidate], stitch_on_device: bool) -> tuple[_Candidate, int] | None:
        """
        The cheapest candidate that fits, with its split count: for halo tiles the fewest decoded voxels
        (they are ordered so), otherwise the fewest tiles (seams), then the fewest decoded voxels.
        """
        best: tuple[_Candidate, int] | None = None
        for candidate in candidates:
            if best is not None and candidate.kind == HALO and best[0].kind in (WHOLE, HALO):
                break  # halo candidates come cheapest first, and none is cheaper than a whole decode
            splits = self.fitting_splits(candidate, stitch_on_device)
            if splits is not None and (best is None or self.cost(candidate) < self.cost(best[0])):
                best = (candidate, splits)
        return best

    @staticmethod
    def cost(candidate: _Candidate) -> tuple[int, int]:
        if candidate.kind == SLIDING:
            return candidate.tiles, candidate.decoded
        return 0, candidate.decoded  # whole and halo decodes have no seams

    def fallback(self, candidates: Sequence[_Candidate]) -> tuple[_Candidate, int]:
        """The most memory-saving candidate that decodes exactly, for when nothing fits."""
        for candidate in sorted(candidates, key=lambda c: math.prod(c.tile)):
            options = self.compatible_splits(candidate)
            if options:
                indexable = [s for s in options if self.model.within_index_limit(candidate.tile, s, self.dim_split)]
                return candidate, indexable[0] if indexable else options[-1]
        # only an explicit split count can be incompatible with every candidate
        _check_split_axis(candidates[0].split_extents[0], self.split_options[0])
        raise ValueError(f"{SPLITS_ID}={self.split_options[0]} cannot split any tile of the latent {self.spatial}.")


def _best_choice(
    planner: _Planner, candidates: Sequence[_Candidate], device: torch.device, budget: float
) -> tuple[tuple[_Candidate, int], bool] | None:
    """
    The cheapest fitting candidate and whether it stitches on the decoding device: on the CPU always; on
    another device when the stitch buffers are at most ``STITCH_FRACTION`` of the budget and keeping them
    there does not force another candidate.
    """
    if device.type == "cpu":
        choice = planner.best_fit(candidates, True)
        return None if choice is None else (choice, True)
    choice = planner.best_fit(candidates, False)
    on_device = planner.best_fit(candidates, True)
    small = on_device is not None and planner.stitch_bytes(on_device[0]) <= STITCH_FRACTION * budget
    if small and (choice is None or on_device[0] == choice[0]):  # type: ignore[index]
        return on_device, True  # type: ignore[return-value]
    return None if choice is None else (choice, False)


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
    out_channels: int = 1,
    resident_gb: float = 0.0,
    halo: int | Sequence[int] | None = DEFAULT_HALO,
    group_norm: str = DEFAULT_GROUP_NORM,
) -> DecodePlan:
    """
    Choose how to decode a latent within a memory budget.

    Explicit values win: ``roi_size`` (``autoencoder_sliding_window_infer_size``) asks for a
    sliding-window decode with that roi, ``overlap`` (``autoencoder_sliding_window_infer_overlap``) is
    its overlap, and an explicit ``num_splits`` (``autoencoder_tp_num_splits``) is honoured as given.
    ``num_splits=None`` means *planned*: the planner chooses the split count (the network definition's
    own ``num_splits`` is not used), and :meth:`DecodePlan.describe` says which happened. What is left
    unset is chosen with ``memory_model`` (default: :data:`CUDA_DECODER_MEMORY` on CUDA,
    :data:`CPU_DECODER_MEMORY` otherwise; calibration in ``common/maisi/DECODE_MEMORY.md``) so that
    the estimated peak stays within ``BUDGET_FRACTION`` of the budget left after ``resident_gb``:

    1. Decode the whole latent if it fits, with the first split count of 1, 2, 4, 8, 16 that splits
       it exactly (:func:`splits_compatible`), keeps every convolution chunk within 32-bit indexing
       (CUDA) and fits the budget.
    2. Otherwise, without an explicit roi, decode in halo tiles (``halo_decode.py``): cores of at
       least 4 latent voxels per axis, each decoded with ``halo`` latent voxels around it in the
       full-resolution stage; the grid chosen is the one that fits with the fewest decoded voxels. A
       halo-tiled decode keeps one half-resolution map of the whole volume
       (``stage_store_bytes_per_latent_voxel``), so very large latents on small budgets do not fit.
    3. Otherwise (or with ``halo=None``, or with an explicit roi) decode in sliding windows: cubic rois,
       multiples of 4, from the latent size down to 16, the one that fits with the fewest tiles, then the
       fewest decoded voxels.

    When nothing fits, the most memory-saving candidate is returned with a warning. The image is
    stitched on the CPU unless three things hold: the decoding device is not the CPU, the stitch
    buffers (``out_channels`` + 1 for a sliding window, ``out_channels`` for halo tiles, times the
    full-resolution image in float32) are at most ``STITCH_FRACTION`` of the budget, and stitching on
    the device does not force a smaller tile. On the CPU the buffers share the decoder's memory and are
    always counted.

    Parameters
    ----------
    latent_shape
        Latent shape: ``(D, H, W)``, ``(C, D, H, W)`` or ``(B, C, D, H, W)``; the last 3 are spatial.
    device
        Device the decoder runs on.
    roi_size
        Sliding-window roi in latent voxels (an int means a cube), clamped to the latent; a roi covering
        the whole latent means a whole-volume decode. ``None``: automatic (whole or halo tiles).
    overlap
        Sliding-window overlap ratio in [0, 1).
    num_splits
        Split count, honoured; ``None``: planned.
    memory_budget_gb
        Memory budget in GB (1e9 bytes), ``resident_gb`` included. ``None``: what
        :func:`available_memory_bytes` reports for ``device`` plus ``resident_gb``.
    dim_split
        Spatial axis the autoencoder splits along (``dim_split`` of the network config).
    memory_model
        Peak-memory model; ``None``: the default for ``device``.
    out_channels
        Output channels of the decoder (1 for the image autoencoder, 125 for the mask generator's).
    resident_gb
        Memory already held that the budget must also hold, e.g. the whole process
        (:func:`resident_memory_bytes`); 0 budgets the decode alone.
    halo
        Latent voxels decoded around each halo-tile core (an int for every axis); ``None`` disables halo
        tiling. The default is the measured halo of the MAISI image decoder.
    group_norm
        Group-norm statistics of a halo-tiled decode: ``"tile"`` or ``"exact"`` (see :class:`DecodePlan`).

    Returns
    -------
    DecodePlan
        The plan; its ``describe()`` is logged.

    Raises
    ------
    ValueError
        For an invalid latent shape, ``autoencoder_sliding_window_infer_size``,
        ``autoencoder_sliding_window_infer_overlap``, ``autoencoder_tp_num_splits`` (including a split
        count that cannot split the tile exactly), ``dim_split``, ``memory_budget_gb``, ``out_channels``,
        ``resident_gb``, ``halo`` or ``group_norm``.
    """
    spatial = _spatial_shape(latent_shape)
    device = torch.device(device)
    roi, overlap, explicit_splits = check_decode_settings(roi_size, overlap, num_splits)
    split_options = SPLIT_CHOICES if explicit_splits is None else (explicit_splits,)
    if dim_split not in (0, 1, 2):
        raise ValueError(f"dim_split must be 0, 1 or 2, got {dim_split!r}.")
    if not _is_int(out_channels) or out_channels < 1:
        raise ValueError(f"out_channels must be an integer >= 1, got {out_channels!r}.")
    if isinstance(resident_gb, bool) or not isinstance(resident_gb, (int, float)) or not 0 <= resident_gb < math.inf:
        raise ValueError(f"resident_gb must be a finite number >= 0, got {resident_gb!r}.")
    halo_size = None if halo is None else _check_halo(halo)
    if group_norm not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm must be one of {GROUP_NORM_MODES}, got {group_norm!r}.")
    resident = float(resident_gb) * GB
    budget = _check_budget(memory_budget_gb)
    if budget is None:
        budget = float(available_memory_bytes(device)) + resident
    model = memory_model or _default_memory_model(device)
    usable = BUDGET_FRACTION * max(budget - resident, 0.0)
    planner = _Planner(spatial, split_options, dim_split, model, usable, out_channels)
    if roi is not None:
        searches = [[_sliding_candidate(spatial, clamp_roi(roi, spatial), overlap, dim_split)]]
    else:
        sliding = [_whole_candidate(spatial, dim_split), *_auto_roi_candidates(spatial, overlap, dim_split)]
        searches = [sliding] if halo_size is None else [_halo_candidates(spatial, halo_size, dim_split), sliding]
        if halo_size is not None:
            searches[0].insert(0, _whole_candidate(spatial, dim_split))
    # halo tiles first (exact up to group-norm statistics); sliding windows when their stored map does not fit
    found = None
    for candidates in searches:
        found = _best_choice(planner, candidates, device, budget)
        if found is not None:
            break
    if found is None:
        candidates = searches[-1]
        stitch_on_device = device.type == "cpu"
        choice = planner.fallback(candidates)
        logger.warning(
            "decoding a latent of %s: estimated peak %.2f GB (%s, %s=%d) exceeds %.0f%% of the %.2f GB budget "
            "left after %.2f GB resident, or 32-bit indexing; set %s / %s or free memory.",
            spatial,
            planner.estimate(*choice, stitch_on_device) / GB,
            model.name,
            SPLITS_ID,
            choice[1],
            100 * BUDGET_FRACTION,
            budget / GB,
            resident / GB,
            ROI_ID,
            SPLITS_ID,
        )
    else:
        choice, stitch_on_device = found
    candidate, splits = choice
    plan = DecodePlan(
        roi_size=candidate.tile if candidate.kind == SLIDING else None,
        overlap=overlap,
        num_splits=splits,
        stitch_device=device if stitch_on_device else torch.device("cpu"),
        num_tiles=candidate.tiles,
        estimated_peak_gb=(resident + planner.estimate(candidate, splits, stitch_on_device)) / GB,
        budget_gb=budget / GB,
        halo_core=candidate.core,
        halo=candidate.halo,
        group_norm=group_norm,
        num_splits_source=PLANNED if explicit_splits is None else SPLITS_ID,
        out_channels=out_channels,
        resident_gb=resident / GB,
        stitch_gb=planner.stitch_bytes(candidate) / GB,
        decoded_voxels=candidate.decoded,
    )
    logger.info("latent %s on %s: %s", spatial, device, plan.describe())
    return plan


def _check_halo_decoder(autoencoder: torch.nn.Module) -> None:
    """Halo tiles call ``autoencoder.decoder``'s blocks one by one: refuse hooks they would skip, say what runs eagerly."""
    inner = autoencoder.decoder
    if inner._forward_hooks or inner._forward_pre_hooks:
        raise ValueError(
            "autoencoder.decoder has forward hooks, which a halo-tiled decode (it calls the decoder's blocks one "
            "by one) would skip; plan with halo=None or set autoencoder_sliding_window_infer_size."
        )
    if getattr(inner, "_compiled_call_impl", None) is not None or hasattr(inner, "_trt_compiler"):
        logger.warning("a halo-tiled decode runs the blocks of the compiled (torch.compile/TensorRT) decoder eagerly.")


def decode_latent(
    decoder: LatentDecoder, latent: torch.Tensor, plan: DecodePlan, progress: bool = True
) -> torch.Tensor:
    """
    Decode a latent as planned.

    Applies ``plan.num_splits`` to the autoencoder, then decodes the whole latent, in halo tiles
    (``halo_decode.decode_with_halo``), or in sliding windows with ``SlidingWindowInferer(roi_size,
    sw_batch_size=1, overlap, mode="gaussian", sw_device=latent.device, device=plan.stitch_device)``.
    A sliding-window roi is clamped to the latent per axis; a roi covering the latent means a
    whole-volume decode. Runs under ``torch.no_grad()``, with float16 autocast only on CUDA.

    Parameters
    ----------
    decoder
        The latent decoder.
    latent
        Scaled latent, ``(B, C, D, H, W)``, on the decoding device.
    plan
        The plan (see :func:`plan_decode`).
    progress
        Show the tile progress bar.

    Returns
    -------
    torch.Tensor
        The image, 4x the latent size per spatial axis, on ``plan.stitch_device``, in the latent's dtype.

    Raises
    ------
    ValueError
        When the latent is not 5-D, the plan's split count cannot split a tile exactly, or a halo-tiled
        plan meets a decoder that is not a MAISI decoder or has attention (a receptive field of the whole
        volume); plan such decoders with ``halo=None``.
    """
    if latent.ndim != 5:
        raise ValueError(f"latent must be (B, C, D, H, W), got shape {tuple(latent.shape)}.")
    spatial = tuple(int(s) for s in latent.shape[2:])
    roi = None if plan.roi_size is None else clamp_roi(plan.roi_size, spatial)
    tiled = roi is not None and roi != spatial
    halo_tiled = plan.kind == HALO
    if halo_tiled:
        stages = decoder_stages(decoder.autoencoder)
        if any(math.isinf(stage.radius) for stage in stages):
            raise ValueError(
                f"{type(decoder.autoencoder).__name__} has attention: its receptive field is the whole volume, so "
                "halo tiles cannot reproduce a whole-volume decode; plan with halo=None."
            )
        _check_halo_decoder(decoder.autoencoder)
        halos = [(stage.halo,) * 3 for stage in stages[:-1]] + [plan.halo]
        extents = {t.window_shape for h in halos for t in halo_tiles(spatial, plan.halo_core, h)}  # type: ignore[arg-type]
    else:
        extents = {roi if tiled else spatial}  # type: ignore[arg-type]

    split_info = get_autoencoder_splits(decoder.autoencoder)
    if split_info is not None:
        for extent in sorted({e[split_info[1]] for e in extents}):
            _check_split_axis(extent, plan.num_splits)
    set_autoencoder_splits(decoder.autoencoder, plan.num_splits)

    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if latent.device.type == "cuda"
        else contextlib.nullcontext()
    )
    logger.info("decoding latent %s: %s", tuple(latent.shape), plan.describe())
    with torch.no_grad(), autocast:
        if halo_tiled:
            image = decode_with_halo(
                decoder.autoencoder,
                latent / decoder.scale_factor,
                plan.halo_core,  # type: ignore[arg-type]
                plan.halo,  # type: ignore[arg-type]
                plan.stitch_device,
                group_norm=plan.group_norm,
                progress=progress,
            )
        elif not tiled:
            image = decoder(latent)
        else:
            inferer = SlidingWindowInferer(
                roi_size=roi,  # type: ignore[arg-type]
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
