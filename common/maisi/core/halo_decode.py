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
Halo-tiled decoding: decode latent tiles with a margin (halo) around them and keep only their centres.

A sliding-window decode (``monai.inferers.SlidingWindowInferer``) blends overlapping tiles, each decoded
as if the tile were the whole volume: convolutions see zero padding at the tile border, so the blend
has seams. Here the latent is cut into non-overlapping *cores*; each core is decoded together with a
halo of its neighbours (clipped at the volume border) and only the core's part is kept. When the halo
covers the receptive field, every kept voxel sees what it sees in a whole-volume decode.

The MAISI decoder's receptive field is wide (about 10 latent voxels, mostly from the convolutions at the
latent resolution), but its memory is spent at the full resolution. So the decoder runs in *stages*,
split before every upsampling layer (:func:`decoder_stages`): each stage is halo-tiled with the halo of
its own receptive field (5, 4 and 2 latent voxels for the image decoder's three resolutions), and its
output is kept whole for the next stage (128 channels at half resolution before the last stage: about
4 kB per latent voxel in float32, 1/16 of one full-resolution 128-channel map). All stages use the same
core grid; the last stage's window (core plus 2 voxels) bounds the memory.

Group norms normalise over the whole tensor, which a tile does not see:

- ``group_norm="tile"``: every ``GroupNorm`` normalises with the statistics of the decoded window (core
  plus halo), as a sliding-window decode does; the only difference to the whole-volume decode (measured:
  up to about 0.2-0.4 on the full-size decoder with random weights, ``common/maisi/DECODE_MEMORY.md``).
- ``group_norm="exact"``: the whole-volume statistics, one ``GroupNorm`` at a time. For the ``j``-th norm
  of a stage every tile is decoded up to that norm with the statistics of the norms before it (already
  whole-volume, so the cores are exact), and its first and second moments are summed over the cores
  (each voxel once); then the stage runs with all of them. The result is the whole-volume decode up to
  float rounding, for the price of the partial passes (about 4-5x the decoder's work).

While tiles are decoded, every ``GroupNorm`` runs a lean implementation (one output tensor, float32
statistics; ``MaisiGroupNorm3D`` also holds a per-group copy and a concatenation). The modules and their
weights are not changed: the override lives only inside :func:`decode_with_halo`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

__all__ = [
    "GROUP_NORM_MODES",
    "DecoderStage",
    "HaloTile",
    "decode_with_halo",
    "decoder_stages",
    "halo_tiles",
    "receptive_radius",
]

GROUP_NORM_MODES = ("tile", "exact")
UPSAMPLE_FACTOR = 4  # image voxels per latent voxel, per axis

Slices = tuple[slice, slice, slice]


@dataclass(frozen=True)
class HaloTile:
    """
    One tile of a halo-tiled decode, in latent voxels.

    Attributes
    ----------
    core
        The part of the latent this tile writes to the output.
    window
        The part of the latent decoded: the core plus the halo, clipped at the volume border.
    """

    core: Slices
    window: Slices

    @property
    def window_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the decoded window."""
        return tuple(s.stop - s.start for s in self.window)  # type: ignore[return-value]

    @property
    def core_in_window(self) -> Slices:
        """The core's position inside the window."""
        return tuple(
            slice(c.start - w.start, c.stop - w.start) for c, w in zip(self.core, self.window)
        )  # type: ignore[return-value]


def _axis_tiles(size: int, core: int, halo: int) -> list[tuple[slice, slice]]:
    return [
        (slice(start, min(start + core, size)), slice(max(start - halo, 0), min(start + core + halo, size)))
        for start in range(0, size, core)
    ]


def halo_tiles(spatial_shape: Sequence[int], core_size: Sequence[int], halo: Sequence[int]) -> list[HaloTile]:
    """
    The tiles of a halo-tiled decode: cores of ``core_size`` from the origin (the last one per axis may
    be shorter), each with ``halo`` latent voxels on both sides, clipped at the volume border.

    Parameters
    ----------
    spatial_shape
        Spatial shape of the latent.
    core_size
        Core size per axis, latent voxels (>= 1).
    halo
        Halo per axis and side, latent voxels (>= 0).

    Returns
    -------
    list of HaloTile
        The tiles in C order; their cores partition the latent.

    Raises
    ------
    ValueError
        When the sizes are not 3 positive core sizes and 3 non-negative halos.
    """
    if len(spatial_shape) != 3 or len(core_size) != 3 or len(halo) != 3:
        raise ValueError(f"spatial_shape, core_size and halo need 3 entries, got {spatial_shape}, {core_size}, {halo}.")
    if any(int(c) < 1 for c in core_size) or any(int(h) < 0 for h in halo):
        raise ValueError(f"core_size must be >= 1 and halo >= 0 per axis, got {core_size} and {halo}.")
    axes = [_axis_tiles(int(s), int(c), int(h)) for s, c, h in zip(spatial_shape, core_size, halo)]
    return [
        HaloTile(core=tuple(a[0] for a in combo), window=tuple(a[1] for a in combo))  # type: ignore[arg-type]
        for combo in itertools.product(*axes)
    ]


def _kernel_radius(conv: torch.nn.modules.conv._ConvNd) -> int:
    return max(int(d) * (int(k) // 2) for k, d in zip(conv.kernel_size, conv.dilation))


@dataclass(frozen=True)
class DecoderStage:
    """
    A run of decoder blocks at one resolution (plus the upsampling layer that opens it).

    Attributes
    ----------
    blocks
        The modules, called in order.
    scale
        Resolution of the stage's input, image voxels per latent voxel per axis.
    out_scale
        Resolution of its output.
    radius
        Receptive-field radius of the stage, in latent voxels (``math.inf`` with attention).
    norm_radii
        Receptive-field radius at the input of each of the stage's group norms, in order.
    """

    blocks: tuple[torch.nn.Module, ...]
    scale: int
    out_scale: int
    radius: float
    norm_radii: tuple[float, ...] = ()

    @property
    def halo(self) -> int:
        """The halo that covers the stage's receptive field, latent voxels (whole voxels)."""
        return math.ceil(self.radius - 1e-9)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _stage_radius(blocks: Sequence[torch.nn.Module], scale: float) -> tuple[float, float, tuple[float, ...]]:
    """
    Receptive-field radius (latent voxels) and output scale of ``blocks`` starting at ``scale``, and the
    radius at the input of each group norm (modules are visited in registration order, which is the
    order the MAISI blocks call them in).
    """
    radius, norm_radii = 0.0, []
    for module in itertools.chain.from_iterable(b.modules() for b in blocks):
        name = type(module).__name__
        if "Attention" in name or "SABlock" in name:
            return math.inf, scale, ()
        if isinstance(module, torch.nn.GroupNorm):
            norm_radii.append(radius)
        if name == "MaisiUpsample" and not getattr(module, "use_convtranspose", False):
            radius += 1.0 / scale  # trilinear interpolation reads the neighbouring input voxels
            scale *= 2.0
        elif isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            radius += 1.0 / scale
            scale *= float(max(module.stride))
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            radius += _kernel_radius(module) / scale
    return radius, scale, tuple(norm_radii)


def decoder_stages(autoencoder: torch.nn.Module) -> list[DecoderStage]:
    """
    ``post_quant_conv`` and ``decoder.blocks`` of an ``AutoencoderKlMaisi``, split before every ``MaisiUpsample``.

    Receptive fields are counted per stage: a convolution of kernel ``k`` adds ``k // 2`` voxels at its
    resolution (a quarter latent voxel at 4x); an upsampling (trilinear or transposed convolution) adds
    one voxel at its input resolution and doubles the resolution. Group norms are global (see the module
    docstring); an attention block makes the radius infinite.

    Parameters
    ----------
    autoencoder
        An ``AutoencoderKlMaisi`` (a module with ``decoder.blocks``).

    Returns
    -------
    list of DecoderStage
        The stages in order.

    Raises
    ------
    ValueError
        When the autoencoder has no ``decoder.blocks``.
    """
    decoder = getattr(autoencoder, "decoder", None)
    if decoder is None or not hasattr(decoder, "blocks"):
        raise ValueError(f"{type(autoencoder).__name__} has no decoder.blocks: halo tiling needs a MAISI decoder.")
    groups: list[list[torch.nn.Module]] = [[]]
    quant = getattr(autoencoder, "post_quant_conv", None)
    if quant is not None:
        groups[0].append(quant)
    for block in decoder.blocks:
        if type(block).__name__ == "MaisiUpsample" and groups[-1]:
            groups.append([])
        groups[-1].append(block)
    stages, scale = [], 1.0
    for blocks in groups:
        radius, out_scale, norm_radii = _stage_radius(blocks, scale)
        stages.append(DecoderStage(tuple(blocks), int(scale), int(out_scale), radius, norm_radii))
        scale = out_scale
    return stages


def receptive_radius(autoencoder: torch.nn.Module) -> float:
    """
    Receptive-field radius of the whole decoder (``post_quant_conv`` and ``decoder``), latent voxels.

    Parameters
    ----------
    autoencoder
        An ``AutoencoderKlMaisi``.

    Returns
    -------
    float
        The sum of the stage radii (:func:`decoder_stages`), or ``math.inf`` with attention or without
        ``decoder.blocks``.
    """
    try:
        return sum(stage.radius for stage in decoder_stages(autoencoder))
    except ValueError:
        return math.inf


def _group_norms(modules: Sequence[torch.nn.Module]) -> list[torch.nn.GroupNorm]:
    return [m for module in modules for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]


class _StageStop(Exception):
    """Ends a partial pass once the norm whose statistics are being collected has been reached."""


class _LeanGroupNorms:
    """
    Overrides ``forward`` of the given ``GroupNorm`` modules (instance attribute, undone on exit).

    ``mode`` is ``"tile"`` (statistics of the current tile) or ``"exact"``: norms whose whole-volume
    statistics are known use them; the norm ``collect`` adds the moments of its input over the current
    tile's core and stops the pass (``_StageStop``).
    """

    def __init__(self, norms: Sequence[torch.nn.GroupNorm]) -> None:
        self.norms = list(norms)
        self.mode = "tile"
        self.collect: int | None = None
        self.tile: HaloTile | None = None
        self._moments: list[torch.Tensor] | None = None
        self._count = 0
        self._statistics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def installed(self) -> Iterator[_LeanGroupNorms]:
        previous = [norm.__dict__.get("forward") for norm in self.norms]
        for index, norm in enumerate(self.norms):
            norm.forward = self._forward_of(index, norm)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            for norm, forward in zip(self.norms, previous):
                if forward is None:
                    del norm.forward
                else:
                    norm.forward = forward  # type: ignore[method-assign]

    def start_collecting(self, index: int) -> None:
        """Collect the whole-volume statistics of norm ``index`` over the next partial passes."""
        self.mode, self.collect, self._moments, self._count = "exact", index, None, 0

    def finish_collecting(self) -> None:
        """Turn the collected moments into the whole-volume statistics of the norm being collected."""
        assert self.collect is not None and self._moments is not None
        first, second = self._moments
        mean = first / self._count
        variance = (second / self._count - mean * mean).clamp_min(0.0)
        self._statistics[self.collect] = (mean.float(), variance.float())
        self.collect = None

    def _record(self, x: torch.Tensor, groups: int) -> None:
        """Add the moments of ``x`` over the current core, per group, in float64 (one group at a time)."""
        assert self.tile is not None
        scale = x.shape[2] // self.tile.window_shape[0]
        core = tuple(slice(s.start * scale, s.stop * scale) for s in self.tile.core_in_window)
        per_group = x.shape[1] // groups
        first = torch.zeros(x.shape[0], groups, dtype=torch.float64, device=x.device)
        second = torch.zeros_like(first)
        for group in range(groups):
            channels = slice(group * per_group, (group + 1) * per_group)
            values = x[(slice(None), channels, *core)].double().reshape(x.shape[0], -1)
            first[:, group] = values.sum(1)
            second[:, group] = values.square().sum(1)
        if self._moments is None:
            self._moments = [first, second]
        else:
            self._moments[0] += first
            self._moments[1] += second
        self._count += per_group * math.prod(s.stop - s.start for s in core)

    def _forward_of(self, index: int, norm: torch.nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            batch, channels = x.shape[:2]
            groups = norm.num_groups
            if self.mode == "exact" and index == self.collect:
                self._record(x, groups)
                raise _StageStop
            if self.mode == "exact":
                if index not in self._statistics:
                    raise RuntimeError(f"group norm {index} ran before the statistics of norm {self.collect} were collected.")
                mean, variance = self._statistics[index]
            else:
                variance, mean = _group_statistics(x, groups)
            scale = (variance + norm.eps).rsqrt().repeat_interleave(channels // groups, dim=1)
            shift = -mean.repeat_interleave(channels // groups, dim=1) * scale
            if norm.affine:
                scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
            view = (batch, channels) + (1,) * (x.ndim - 2)
            out = torch.addcmul(shift.to(x.dtype).reshape(view), x, scale.to(x.dtype).reshape(view))
            return out.to(torch.float16) if getattr(norm, "norm_float16", False) else out.float()

        return forward


def _group_statistics(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(variance, mean)`` per sample and group, float32; lower precisions are widened one group at a time."""
    batch = x.shape[0]
    if x.dtype == torch.float32:
        return torch.var_mean(x.reshape(batch, groups, -1), dim=2, unbiased=False)
    statistics = [
        torch.var_mean(chunk.float().reshape(batch, -1), dim=1, unbiased=False) for chunk in x.chunk(groups, dim=1)
    ]
    return torch.stack([v for v, _ in statistics], 1), torch.stack([m for _, m in statistics], 1)


def _decode_stage(
    stage: DecoderStage,
    x: torch.Tensor,
    core_size: Sequence[int],
    halo: Sequence[int],
    out_device: torch.device,
    out_dtype: torch.dtype | None,
    group_norm: str,
    progress: bool,
) -> torch.Tensor:
    """
    Run one stage tile by tile on ``x`` (at the stage's input resolution) and stitch the cores. With exact
    group norms, the partial pass of each norm uses the (smaller) halo of the receptive field at its input.
    """
    spatial = tuple(int(s) // stage.scale for s in x.shape[2:])
    tiles = halo_tiles(spatial, core_size, halo)
    lean = _LeanGroupNorms(_group_norms(stage.blocks))

    def window(tile: HaloTile) -> torch.Tensor:
        return x[(slice(None), slice(None), *(slice(s.start * stage.scale, s.stop * stage.scale) for s in tile.window))]

    output: torch.Tensor | None = None
    with lean.installed():
        if group_norm == "exact":
            passes = tqdm(range(len(lean.norms)), desc=f"decode statistics, stage x{stage.out_scale}", unit="norm",
                          disable=not progress)
            for index in passes:
                lean.start_collecting(index)
                needed = math.ceil(stage.norm_radii[index] - 1e-9) if index < len(stage.norm_radii) else max(halo)
                for tile in halo_tiles(spatial, core_size, tuple(min(h, needed) for h in halo)):
                    lean.tile = tile
                    try:
                        stage(window(tile))
                    except _StageStop:
                        pass
                lean.finish_collecting()
        for tile in tqdm(tiles, desc=f"decode, stage x{stage.out_scale}", unit="tile", disable=not progress):
            lean.tile = tile
            y = stage(window(tile))
            expected = tuple(stage.out_scale * s for s in tile.window_shape)
            if tuple(y.shape[2:]) != expected:
                raise ValueError(
                    f"a decoder stage maps the latent window {tile.window_shape} to {tuple(y.shape[2:])}, not "
                    f"{expected}: halo tiling needs the MAISI decoder's 2x upsampling stages."
                )
            if output is None:
                spatial = tuple(stage.out_scale * (s.stop) for s in tiles[-1].core)
                output = torch.empty((x.shape[0], y.shape[1], *spatial), dtype=out_dtype or y.dtype, device=out_device)
            kept = tuple(slice(stage.out_scale * s.start, stage.out_scale * s.stop) for s in tile.core_in_window)
            target = tuple(slice(stage.out_scale * s.start, stage.out_scale * s.stop) for s in tile.core)
            output[(slice(None), slice(None), *target)] = y[(slice(None), slice(None), *kept)].to(out_device)
            del y
    assert output is not None  # a latent has at least one tile
    return output


def decode_with_halo(
    autoencoder: torch.nn.Module,
    latent: torch.Tensor,
    core_size: Sequence[int],
    halo: Sequence[int],
    stitch_device: torch.device,
    group_norm: str = "tile",
    progress: bool = True,
) -> torch.Tensor:
    """
    Decode ``latent`` stage by stage, each stage tile by tile with a halo (see the module docstring).

    ``autoencoder.decode_stage_2_outputs(latent)`` is what is reproduced; call under ``torch.no_grad()``
    (and autocast where wanted).

    Parameters
    ----------
    autoencoder
        An ``AutoencoderKlMaisi``.
    latent
        The (unscaled) latent ``(B, C, D, H, W)`` on the decoding device.
    core_size
        Core size per axis, latent voxels; every stage uses the same cores.
    halo
        Halo of the last (full-resolution) stage per axis, latent voxels; the other stages use the halo
        of their own receptive field.
    stitch_device
        Device of the output image; the intermediate stage outputs stay on the latent's device.
    group_norm
        ``"tile"`` or ``"exact"`` (whole-volume) group-norm statistics.
    progress
        Show progress bars over the tiles.

    Returns
    -------
    torch.Tensor
        The image ``(B, C_out, 4D, 4H, 4W)`` on ``stitch_device``, in the latent's dtype.

    Raises
    ------
    ValueError
        For an unknown ``group_norm``, a decoder with attention or without MAISI stages, or a last-stage
        ``halo`` below that stage's receptive field.
    """
    if group_norm not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm must be one of {GROUP_NORM_MODES}, got {group_norm!r}.")
    stages = decoder_stages(autoencoder)
    if any(math.isinf(stage.radius) for stage in stages):
        raise ValueError(
            f"{type(autoencoder).__name__} has attention, so halo tiles cannot reproduce a whole-volume decode."
        )
    last = stages[-1]
    if min(int(h) for h in halo) < last.halo:
        raise ValueError(f"halo={tuple(halo)} is below the {last.halo} latent voxels the last decoder stage needs.")
    x = latent
    for index, stage in enumerate(stages):
        final = index == len(stages) - 1
        x = _decode_stage(
            stage,
            x,
            core_size,
            halo if final else (stage.halo,) * 3,
            stitch_device if final else latent.device,
            latent.dtype if final else None,
            group_norm,
            progress,
        )
    return x
