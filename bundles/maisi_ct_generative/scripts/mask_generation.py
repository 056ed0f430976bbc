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
Label masks from the MAISI mask generator ("Path A" of paired generation, ``controllable_anatomy_size``).

The pipeline of :func:`generate_mask`:

1. Size condition: the user's ``[name, size]`` pairs fill slots of the 10-slot vector
   (``constants.CONTROLLABLE_ANATOMIES``); the closest row of the size database
   (``all_anatomy_size_conditions.json``, L1 distance over the given slots) supplies the other slots
   (:func:`match_size_condition`).
2. Latent: DDPM sampling of a ``DiffusionModelUNet`` with the (1, 1, 10) vector as cross-attention
   context (:func:`generate_mask_latent`).
3. Decode: the mask autoencoder gives one logit per channel (125 in the published model); ``argmax``
   over channels and the channel table (``label_dict_124_to_132.json``) give raw MAISI ids
   (:func:`decode_mask`).
4. Post-processing (:func:`postprocess_generated_mask`): body envelope, tumours, single-component
   organs, bowel continuity and small-hole closing, each a small function of its own.
5. Resampling from the generator's grid (4x the latent, 1.5 mm in the published model) to
   ``output_size``/``spacing`` (``label_io.resample_mask``), then a check that every requested anatomy
   survived; a lost anatomy raises ``ValueError`` so the caller can retry with another seed.

Every random draw comes from one ``torch.Generator`` seeded with ``seed``: the same seed, networks
and inputs give the same mask.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.networks.schedulers import DDPMScheduler, Scheduler
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from .constants import BACKGROUND_LABEL, BODY_LABEL, CONTROLLABLE_ANATOMIES, TUMOR_LABELS
from .decode import (
    DEFAULT_DIM_SPLIT,
    DEFAULT_OVERLAP,
    LatentDecoder,
    decode_latent,
    decoder_out_channels,
    get_autoencoder_splits,
    plan_decode,
)
from .label_io import MASK_DTYPE, mask_spacing, resample_mask
from .labels import body_region_indices_from_mask, label_id_of, load_json, load_label_dict, remove_tumors
from .mask_augmentation import close_labels
from .mask_channels import load_channel_table, mask_logits_to_labels
from .sampler import SamplingConditions, sample_latent
from .value_checks import as_list, did_you_mean, is_real

logger = logging.getLogger(__name__)

__all__ = [
    "check_controllable_anatomy_size",
    "BOWEL_ORGANS",
    "MASK_GENERATION_LATENT_SHAPE",
    "MASK_GENERATION_SPACING",
    "MULTIFOCAL_TUMORS",
    "MaskGenerationNetworks",
    "SINGLE_COMPONENT_ORGANS",
    "SIZE_DATABASE_ID",
    "SizeConditionDatabase",
    "SizeConditionMatch",
    "close_organs",
    "connect_bowel",
    "decode_mask",
    "fill_tumor",
    "generate_mask",
    "generate_mask_latent",
    "hepatic_vessel_to_liver",
    "keep_body",
    "keep_largest_components",
    "largest_component",
    "load_size_condition_database",
    "match_size_condition",
    "postprocess_generated_mask",
    "remove_organs",
    "replace_unrequested_tumors",
    "requested_label_sizes",
    "single_component_label_ids",
    "size_condition_vector",
]

SIZE_DATABASE_ID = "all_anatomy_size_conditions_json"  # config id of the size database (error messages)
SIZE_KEYS = ("organ_size", "anatomy_size")  # entry keys holding the 10 sizes; "organ_size" is the published one
NUM_SIZE_SLOTS = len(CONTROLLABLE_ANATOMIES)
REMOVE_SIZE = -1.0  # controllable_anatomy_size value that removes the anatomy

MASK_GENERATION_LATENT_SHAPE = (4, 64, 64, 64)  # published mask_generation_latent_shape (C, X, Y, Z)
MASK_GENERATION_SPACING = 1.5  # mm; the published generator's grid (256^3 voxels from a 64^3 latent)
CLOSING_SIZE = 3  # edge of the cube of every closing (the reference's 3x3x3 dilate/erode)

# Organs that are one connected structure: every component but the largest becomes body (BODY_LABEL).
# The published post-processing lists these ids (plus vertebrae 33-56, trachea 57 and iliac arteries 58-59,
# taken as the id range 33-59). Here the list is by name, the vertebrae are every "vertebrae *" label
# (which adds S1, 127, a single bone the id range missed) and the lobes every "... lung ... lobe" label.
SINGLE_COMPONENT_ORGANS = (
    "liver",
    "spleen",
    "pancreas",
    "right kidney",
    "left kidney",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "stomach",
    "duodenum",
    "trachea",
    "left iliac artery",
    "right iliac artery",
)
_VERTEBRA_PREFIX = "vertebrae "
# Tumours kept with all their components (several lesions are plausible); other tumours keep the largest.
MULTIFOCAL_TUMORS = ("hepatic tumor", "bone lesion")
# The intestinal tract must be one connected structure; small-bowel and colon voxels outside its largest
# component become body.
BOWEL_ORGANS = MappingProxyType(
    {"connected": ("stomach", "duodenum", "small bowel", "colon"), "pruned": ("small bowel", "colon")}
)
_TUMOR_IDS = frozenset(TUMOR_LABELS.values())


# ----------------------------------------------------------------------------------------------------------
# 1. The size condition
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeConditionDatabase:
    """
    The anatomy-size database of the mask generator (``all_anatomy_size_conditions.json``).

    Attributes
    ----------
    sizes
        (N, 10) float64 array, one row per entry, slots in ``CONTROLLABLE_ANATOMIES`` order.
    entries
        the other keys of each entry (empty mappings when the file holds plain lists).
    source
        where the database came from (for messages).
    """

    sizes: np.ndarray
    entries: tuple[Mapping[str, Any], ...]
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.sizes.shape[0])


@dataclass(frozen=True)
class SizeConditionMatch:
    """
    The size condition of one request.

    Attributes
    ----------
    vector
        the 10 sizes fed to the generator: the matched row with the user's slots overwritten.
    index
        row of the database that matched (the first one on ties).
    distance
        L1 distance of that row to the user's sizes over the user's slots.
    """

    vector: np.ndarray
    index: int
    distance: float


def _size_row(entry: Any, position: int, source: str, config_id: str) -> tuple[list[float], Mapping[str, Any]]:
    """The 10 sizes and the remaining metadata of one database entry."""
    where = f"{config_id}={source!r}, entry {position}"
    if isinstance(entry, Mapping):
        key = next((k for k in SIZE_KEYS if k in entry), None)
        if key is None:
            raise ValueError(
                f"{where}: no size list; expected one of the keys {list(SIZE_KEYS)} holding "
                f"{NUM_SIZE_SLOTS} numbers, got keys {sorted(entry)}."
            )
        values, metadata = entry[key], {k: v for k, v in entry.items() if k != key}
    else:
        values, metadata = entry, {}
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != NUM_SIZE_SLOTS:
        raise ValueError(
            f"{where}: the sizes must be a list of {NUM_SIZE_SLOTS} numbers "
            f"({', '.join(CONTROLLABLE_ANATOMIES)}), got {values!r}."
        )
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{where}: every size must be a finite number, got {list(values)!r}.")
    return [float(v) for v in values], metadata


def load_size_condition_database(
    path: str | os.PathLike, config_id: str = SIZE_DATABASE_ID
) -> SizeConditionDatabase:
    """
    Read the anatomy-size database of the mask generator.

    Supported formats (a JSON list, one element per training mask):

    - the published one: objects holding the 10 sizes under ``"organ_size"`` (``"anatomy_size"`` is
      accepted too); the other keys are kept as metadata;
    - plain lists of 10 numbers.

    The slots follow ``constants.CONTROLLABLE_ANATOMIES``.

    Parameters
    ----------
    path
        the JSON file.
    config_id
        the config id that named the file, for error messages.

    Returns
    -------
    SizeConditionDatabase
        The database.

    Raises
    ------
    FileNotFoundError
        the file does not exist (the message names ``config_id``).
    ValueError
        the file is not JSON or not in a supported format (the message names ``config_id``).
    """
    source = str(path)
    try:
        data = load_json(path)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"{config_id}: {error}") from error
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence) or not data:
        raise ValueError(
            f"{config_id}={source!r}: expected a non-empty JSON list of entries, each an object with "
            f"'organ_size' ({NUM_SIZE_SLOTS} numbers) or a list of {NUM_SIZE_SLOTS} numbers; got "
            f"{type(data).__name__}{' (empty)' if not data else ''}."
        )
    rows, entries = zip(*(_size_row(entry, i, source, config_id) for i, entry in enumerate(data)))
    sizes = np.asarray(rows, dtype=np.float64)
    sizes.setflags(write=False)
    logger.info("size database %s: %d entries", source, sizes.shape[0])
    return SizeConditionDatabase(sizes=sizes, entries=tuple(entries), source=source)


def check_controllable_anatomy_size(controllable_anatomy_size: Any) -> list[tuple[str, float]]:
    """
    Check ``controllable_anatomy_size``, the ``[name, size]`` pairs of the mask generator.

    At most ``NUM_SIZE_SLOTS`` pairs; names from ``CONTROLLABLE_ANATOMIES``
    (case-insensitive), each at most once, with at most one tumour (``TUMOR_LABELS``); sizes in
    [0, 1] (relative size) or exactly -1 (remove the anatomy). An empty list disables mask generation.

    Returns
    -------
    list[tuple[str, float]]
        The ``(name, size)`` pairs, names lower-case.
    """
    pairs = as_list("controllable_anatomy_size", controllable_anatomy_size)
    if len(pairs) > NUM_SIZE_SLOTS:
        raise ValueError(
            f"controllable_anatomy_size has {len(pairs)} entries; at most {NUM_SIZE_SLOTS} are allowed "
            f"(one per controllable anatomy: {list(CONTROLLABLE_ANATOMIES)})."
        )
    result: list[tuple[str, float]] = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: {pair!r} must be a "
                "[name, size] pair, e.g. ['liver', 0.5]."
            )
        name, size = pair
        key = name.strip().lower() if isinstance(name, str) else None
        if key not in CONTROLLABLE_ANATOMIES:
            hint = did_you_mean(name, CONTROLLABLE_ANATOMIES) if isinstance(name, str) else ""
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: {name!r} is not a "
                f"controllable anatomy.{hint} Allowed: {list(CONTROLLABLE_ANATOMIES)}."
            )
        if not is_real(size) or not (0.0 <= size <= 1.0 or size == REMOVE_SIZE):
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: size {size!r} of {key!r} "
                "must be in [0, 1] or exactly -1 (remove the anatomy)."
            )
        if any(key == seen for seen, _ in result):
            raise ValueError(
                f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: {key!r} is given twice."
            )
        result.append((key, float(size)))
    tumors = [name for name, _ in result if name in TUMOR_LABELS]
    if len(tumors) > 1:
        raise ValueError(
            f"controllable_anatomy_size={controllable_anatomy_size!r} is not allowed: it has {len(tumors)} tumours "
            f"{tumors}; at most one of {list(TUMOR_LABELS)} is allowed."
        )
    return result


def _checked_pairs(controllable_anatomy_size: Any) -> list[tuple[str, float]]:
    """The validated ``(name, size)`` pairs; a mapping ``{name: size}`` is accepted too. Empty is an error."""
    if isinstance(controllable_anatomy_size, Mapping):
        controllable_anatomy_size = [list(item) for item in controllable_anatomy_size.items()]
    pairs = check_controllable_anatomy_size(controllable_anatomy_size)
    if not pairs:
        raise ValueError(
            "controllable_anatomy_size=[] is not allowed for mask generation: give at least one [name, size] "
            f"pair, names from {list(CONTROLLABLE_ANATOMIES)}."
        )
    return pairs


def _database_sizes(database: SizeConditionDatabase | NdarrayOrTensor | Sequence[Sequence[float]]) -> np.ndarray:
    sizes = database.sizes if isinstance(database, SizeConditionDatabase) else convert_to_numpy(database, wrap_sequence=True)
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape[0] == 0 or sizes.shape[1] != NUM_SIZE_SLOTS:
        raise ValueError(f"the size database must be an (N, {NUM_SIZE_SLOTS}) array with N >= 1, got shape {sizes.shape}.")
    return sizes


def match_size_condition(
    controllable_anatomy_size: Any, database: SizeConditionDatabase | NdarrayOrTensor | Sequence[Sequence[float]]
) -> SizeConditionMatch:
    """
    Find the database row closest to the user's sizes and overwrite the user's slots.

    The distance is the L1 distance over the slots the user gave (a size of -1 is a given value like any
    other); the first row of smallest distance wins, so ties go to the earlier database entry.

    Parameters
    ----------
    controllable_anatomy_size
        ``[name, size]`` pairs (or a ``{name: size}`` mapping), checked with
        ``check_controllable_anatomy_size``; at least one pair.
    database
        the database, or an (N, 10) array of sizes.

    Returns
    -------
    SizeConditionMatch
        The 10-slot condition, the matched row index and its distance.
    """
    pairs = _checked_pairs(controllable_anatomy_size)
    sizes = _database_sizes(database)
    slots = np.array([CONTROLLABLE_ANATOMIES.index(name) for name, _ in pairs])
    values = np.array([size for _, size in pairs], dtype=np.float64)
    distances = np.abs(sizes[:, slots] - values).sum(axis=1)
    index = int(np.argmin(distances))  # argmin returns the first minimum: deterministic tie-break
    vector = sizes[index].copy()
    vector[slots] = values
    return SizeConditionMatch(vector=vector, index=index, distance=float(distances[index]))


def size_condition_vector(
    controllable_anatomy_size: Any, database: SizeConditionDatabase | NdarrayOrTensor | Sequence[Sequence[float]]
) -> torch.Tensor:
    """
    The generator's cross-attention context for a request (see :func:`match_size_condition`).

    Parameters
    ----------
    controllable_anatomy_size
        ``[name, size]`` pairs (or a ``{name: size}`` mapping).
    database
        the size database, or an (N, 10) array of sizes.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape (1, 1, 10).
    """
    match = match_size_condition(controllable_anatomy_size, database)
    return torch.as_tensor(match.vector, dtype=torch.float32).reshape(1, 1, NUM_SIZE_SLOTS)


def requested_label_sizes(controllable_anatomy_size: Any, label_dict: Mapping[str, int] | None = None) -> dict[int, float]:
    """
    The user's sizes keyed by MAISI label id.

    Parameters
    ----------
    controllable_anatomy_size
        ``[name, size]`` pairs (or a ``{name: size}`` mapping).
    label_dict
        name -> id dictionary; ``None`` reads the packaged ``label_dict.json``.

    Returns
    -------
    dict[int, float]
        ``{label_id: size}`` in the order given.
    """
    label_dict = load_label_dict() if label_dict is None else label_dict
    return {label_id_of(name, label_dict): size for name, size in _checked_pairs(controllable_anatomy_size)}


# ----------------------------------------------------------------------------------------------------------
# 2. The latent
# ----------------------------------------------------------------------------------------------------------


class _ContextConditionedUNet(torch.nn.Module):
    """Feeds a fixed cross-attention ``context`` to a ``DiffusionModelUNet`` (the sampler passes only x and t)."""

    def __init__(self, unet: torch.nn.Module, context: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.context = context

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        context = self.context.expand(x.shape[0], -1, -1)
        return self.unet(x=x, timesteps=timesteps, context=context, **kwargs)


def _latent_shape(latent_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(latent_shape)
    if len(shape) != 4 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(
            f"mask_generation_latent_shape={list(shape)!r} is not allowed; it must be 4 integers >= 1 "
            f"(channels, x, y, z), e.g. {list(MASK_GENERATION_LATENT_SHAPE)}."
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_condition(condition: torch.Tensor) -> torch.Tensor:
    condition = torch.as_tensor(condition, dtype=torch.float32)
    if condition.shape != (1, 1, NUM_SIZE_SLOTS) or not bool(torch.isfinite(condition).all()):
        raise ValueError(
            f"the size condition must be a finite (1, 1, {NUM_SIZE_SLOTS}) tensor (size_condition_vector), "
            f"got shape {tuple(condition.shape)}."
        )
    return condition


@torch.no_grad()
def generate_mask_latent(
    unet: torch.nn.Module,
    scheduler: Scheduler,
    condition: torch.Tensor,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    device: torch.device | str,
    num_inference_steps: int = 1000,
    progress: bool = False,
) -> torch.Tensor:
    """
    Sample a mask latent with the size condition as cross-attention context.

    The loop is ``sampler.sample_latent`` (any MONAI scheduler; DDPM draws its step noise from
    ``generator``). On CUDA the UNet runs under float16 autocast; elsewhere in float32.

    Parameters
    ----------
    unet
        ``DiffusionModelUNet`` with ``with_conditioning`` and ``cross_attention_dim`` 10.
    scheduler
        the scheduler (the published mask generator uses ``DDPMScheduler``, 1000 steps).
    condition
        (1, 1, 10) size condition (:func:`size_condition_vector`).
    latent_shape
        (channels, x, y, z) of the latent, e.g. ``mask_generation_latent_shape``.
    generator
        random generator on ``device``; it draws the start noise and every step's noise.
    device
        where to sample.
    num_inference_steps
        denoising steps; a DDPM scheduler was trained for ``num_train_timesteps``
        and fewer steps are logged as a warning.
    progress
        show a progress bar.

    Returns
    -------
    torch.Tensor
        float32 latent of shape (1, *latent_shape) on ``device``.

    Raises
    ------
    ValueError
        invalid shape, condition or step count, or ``generator`` on another device.
    """
    device = torch.device(device)
    shape = _latent_shape(latent_shape)
    if generator.device.type != device.type:
        raise ValueError(
            f"the random generator is on '{generator.device}' but sampling runs on '{device}'; create it with "
            "torch.Generator(device=device) so that the scheduler's noise can be drawn from it."
        )
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"mask_generation_num_inference_steps={steps!r} is not allowed; it must be an integer >= 1.")
    if isinstance(scheduler, DDPMScheduler) and num_inference_steps < scheduler.num_train_timesteps:
        logger.warning(
            "mask_generation_num_inference_steps=%d is below the %d steps the DDPM mask generator was trained "
            "with; mask quality is not guaranteed.",
            num_inference_steps,
            scheduler.num_train_timesteps,
        )
    context = _check_condition(condition).to(device)
    noise = torch.randn((1, *shape), generator=generator, device=device, dtype=torch.float32)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        latent = sample_latent(
            _ContextConditionedUNet(unet, context),
            scheduler,
            noise,
            SamplingConditions(),
            int(num_inference_steps),
            generator=generator,
            progress=progress,
        )
    return latent.float()


# ----------------------------------------------------------------------------------------------------------
# 3. Decoding
# ----------------------------------------------------------------------------------------------------------


def _decode_logits(
    autoencoder: torch.nn.Module,
    latent: torch.Tensor,
    scale_factor: float,
    roi_size: Sequence[int] | int | None,
    overlap: float,
    num_splits: int | None,
    memory_budget_gb: float | None,
    progress: bool,
) -> torch.Tensor:
    """The one call into ``decode.py``: plan the split/sliding-window decode within memory, then decode."""
    splits = get_autoencoder_splits(autoencoder)
    plan = plan_decode(
        latent.shape,
        latent.device,
        roi_size=roi_size,
        overlap=overlap,
        num_splits=num_splits,
        memory_budget_gb=memory_budget_gb,
        dim_split=DEFAULT_DIM_SPLIT if splits is None else splits[1],
        out_channels=decoder_out_channels(autoencoder),
    )
    return decode_latent(LatentDecoder(autoencoder, scale_factor), latent, plan, progress=progress)


def decode_mask(
    autoencoder: torch.nn.Module,
    latent: torch.Tensor,
    scale_factor: float,
    channel_to_label: Mapping[Any, Any],
    *,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    num_splits: int | None = None,
    memory_budget_gb: float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """
    Decode a mask latent into a MAISI label map.

    The decoder gives one logit per channel; the label is the ``argmax`` over channels (a softmax would
    not change it), mapped to MAISI ids with the channel table (``mask_channels.mask_logits_to_labels``).
    Large latents are decoded in split/sliding-window mode planned within the memory budget
    (``decode.plan_decode``; explicit values win).

    Parameters
    ----------
    autoencoder
        the mask autoencoder (``AutoencoderKlMaisi``, out_channels = channel-table size).
    latent
        (1, C, x, y, z) latent, as sampled (scaled by ``scale_factor``).
    scale_factor
        ``mask_generation_scale_factor``.
    channel_to_label
        ``label_dict_124_to_132.json`` content or ``{channel: label_id}``.
    roi_size
        ``autoencoder_sliding_window_infer_size`` (latent voxels), ``None`` for automatic.
    overlap
        ``autoencoder_sliding_window_infer_overlap``.
    num_splits
        ``autoencoder_tp_num_splits``, ``None`` for automatic.
    memory_budget_gb
        memory for the decode, ``None`` for what the device has free.
    progress
        show the sliding-window progress bar.

    Returns
    -------
    torch.Tensor
        int64 label map of shape (1, 1, 4x, 4y, 4z) on the CPU.

    Raises
    ------
    ValueError
        the channel table does not match the decoder's output channels.

    Notes
    -----
    Blending tiles needs the logits, so the stitched output holds every channel: 125 x 256^3 float32
    (8.4 GB) on the stitching device for the published model; only the label map is kept afterwards.
    """
    logits = _decode_logits(autoencoder, latent, scale_factor, roi_size, overlap, num_splits, memory_budget_gb, progress)
    return mask_logits_to_labels(logits, channel_to_label).cpu()


# ----------------------------------------------------------------------------------------------------------
# 4. Post-processing, one step per function (3D numpy label maps; each returns a new array)
# ----------------------------------------------------------------------------------------------------------


def single_component_label_ids(label_dict: Mapping[str, int], include_vertebrae: bool = True) -> list[int]:
    """
    Ids of the anatomies that must be one connected structure.

    ``SINGLE_COMPONENT_ORGANS``, every lung lobe (names with "lung" ending in "lobe") and, when
    ``include_vertebrae``, every vertebra (names starting with "vertebrae "). Names missing from
    ``label_dict`` are skipped.

    Parameters
    ----------
    label_dict
        name -> id dictionary.
    include_vertebrae
        include the vertebrae (left out when a bone lesion is kept: a lesion can split one).

    Returns
    -------
    list[int]
        Sorted ids.
    """
    ids = {label_dict[name] for name in SINGLE_COMPONENT_ORGANS if name in label_dict}
    ids |= {i for name, i in label_dict.items() if "lung" in name and name.endswith(" lobe")}
    if include_vertebrae:
        ids |= {i for name, i in label_dict.items() if name.startswith(_VERTEBRA_PREFIX)}
    return sorted(int(i) for i in ids)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """
    The largest 26-connected component of a boolean mask (the first in scan order on ties).

    Parameters
    ----------
    mask
        boolean array.

    Returns
    -------
    np.ndarray
        Boolean array, empty when ``mask`` is.
    """
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return components > 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _boxes(labels: np.ndarray, label_ids: Iterable[int], margin: int = 0) -> dict[int, tuple[slice, ...]]:
    """Bounding box (grown by ``margin``, clipped to the volume) of every id of ``label_ids`` present, in one pass."""
    wanted = sorted({int(i) for i in label_ids if 0 < int(i) <= int(labels.max(initial=0))})
    if not wanted:
        return {}
    objects = ndimage.find_objects(labels, max_label=wanted[-1])
    boxes = {}
    for label_id in wanted:
        box = objects[label_id - 1]
        if box is not None:
            boxes[label_id] = tuple(
                slice(max(s.start - margin, 0), min(s.stop + margin, size)) for s, size in zip(box, labels.shape)
            )
    return boxes


def hepatic_vessel_to_liver(labels: np.ndarray, label_dict: Mapping[str, int]) -> np.ndarray:
    """
    Relabel hepatic vessel as liver: the generator cannot size vessels, and the published
    post-processing folds them into the liver.

    Parameters
    ----------
    labels
        3D label map.
    label_dict
        name -> id dictionary ("hepatic vessel", "liver").

    Returns
    -------
    np.ndarray
        The new label map.
    """
    out = labels.copy()
    out[labels == label_id_of("hepatic vessel", label_dict)] = label_id_of("liver", label_dict)
    return out


def keep_body(labels: np.ndarray, size: int = CLOSING_SIZE) -> np.ndarray:
    """
    Keep the body: the largest connected component of the foreground, opened with a ``size``^3 cube.

    The foreground is eroded (thin bridges to floating fragments break), its largest component is dilated
    back, and every voxel outside becomes background. When the erosion leaves nothing, the largest
    component of the foreground itself is kept (the reference would erase the whole mask).

    Parameters
    ----------
    labels
        3D label map.
    size
        edge of the cube.

    Returns
    -------
    np.ndarray
        The new label map.
    """
    foreground = labels != BACKGROUND_LABEL
    element = np.ones((size,) * labels.ndim, dtype=bool)
    core = ndimage.binary_erosion(foreground, element, border_value=0)
    body = ndimage.binary_dilation(largest_component(core), element) if core.any() else largest_component(foreground)
    out = labels.copy()
    out[~body] = BACKGROUND_LABEL
    return out


def replace_unrequested_tumors(
    labels: np.ndarray, keep: Iterable[int], label_dict: Mapping[str, int] | None = None
) -> np.ndarray:
    """
    Replace the controllable tumours (``constants.TUMOR_LABELS``) not in ``keep`` by their host anatomy.

    The replacement is ``labels.remove_tumors`` (shared with classifier-free guidance): hepatic ->
    liver, pancreatic -> pancreas, colon cancer primaries -> colon, lung tumour -> the majority lung lobe
    around it, bone lesion -> the majority bone around it. (The published post-processing used a fixed
    lobe, 28, and body, 200, for the last two.) Other labels are untouched.

    Parameters
    ----------
    labels
        3D label map.
    keep
        tumour ids to keep (the requested ones).
    label_dict
        name -> id dictionary; ``None`` reads the packaged ``label_dict.json``.

    Returns
    -------
    np.ndarray
        The new label map.
    """
    drop = sorted(_TUMOR_IDS - {int(t) for t in keep})
    dropped = np.isin(labels, drop)
    if not dropped.any():
        return labels.copy()
    return np.where(dropped, remove_tumors(labels, label_dict), labels)


def fill_tumor(labels: np.ndarray, tumor_id: int, size: int = CLOSING_SIZE) -> np.ndarray:
    """
    Fill a tumour: close it with a ``size``^3 cube, then fill the cavities it encloses.

    Closing-gap and cavity voxels become tumour whatever they held (as in the published code).

    Parameters
    ----------
    labels
        3D label map.
    tumor_id
        the tumour's id.
    size
        edge of the closing cube.

    Returns
    -------
    np.ndarray
        The new label map.
    """
    boxes = _boxes(labels, [tumor_id], margin=size // 2 + 1)
    out = labels.copy()
    if tumor_id not in boxes:
        return out
    box = boxes[tumor_id]
    region = close_labels(out[box], [tumor_id], size)
    region[ndimage.binary_fill_holes(region == tumor_id)] = tumor_id
    out[box] = region
    return out


def keep_largest_components(labels: np.ndarray, label_ids: Iterable[int], fill: int = BODY_LABEL) -> np.ndarray:
    """
    Keep only the largest 26-connected component of each label; the other components become ``fill``.

    One ``ndimage.label`` per label, on its bounding box.

    Parameters
    ----------
    labels
        3D label map.
    label_ids
        the labels to process (absent ones are skipped).
    fill
        label of the removed voxels (the body envelope, as in the published code).

    Returns
    -------
    np.ndarray
        The new label map.
    """
    out = labels.copy()
    for label_id, box in _boxes(labels, label_ids).items():
        region = out[box]  # a view: writes reach ``out``
        mask = region == label_id
        region[mask & ~largest_component(mask)] = fill
    return out


def remove_organs(labels: np.ndarray, label_ids: Iterable[int], fill: int = BODY_LABEL) -> np.ndarray:
    """
    Remove anatomies (requested with size -1): their voxels become ``fill``.

    Parameters
    ----------
    labels
        3D label map.
    label_ids
        ids to remove.
    fill
        the label that replaces them (the body envelope).

    Returns
    -------
    np.ndarray
        The new label map.
    """
    out = labels.copy()
    out[np.isin(labels, list(label_ids))] = fill
    return out


def connect_bowel(labels: np.ndarray, label_dict: Mapping[str, int], fill: int = BODY_LABEL) -> np.ndarray:
    """
    Keep the intestinal tract connected: small-bowel and colon voxels outside the largest connected
    component of stomach + duodenum + small bowel + colon (``BOWEL_ORGANS``) become ``fill``.

    Parameters
    ----------
    labels
        3D label map.
    label_dict
        name -> id dictionary.
    fill
        the label of removed voxels.

    Returns
    -------
    np.ndarray
        The new label map.
    """
    connected = [label_dict[n] for n in BOWEL_ORGANS["connected"] if n in label_dict]
    pruned = [label_dict[n] for n in BOWEL_ORGANS["pruned"] if n in label_dict]
    bowel = np.isin(labels, connected)
    out = labels.copy()
    if bowel.any():
        out[np.isin(labels, pruned) & ~largest_component(bowel)] = fill
    return out


def close_organs(labels: np.ndarray, label_ids: Iterable[int], size: int = CLOSING_SIZE) -> np.ndarray:
    """
    Close each organ with a ``size``^3 cube, one after another (later organs win shared gap voxels).

    This refills the small holes left where other structures' fragments were removed.

    Parameters
    ----------
    labels
        3D label map.
    label_ids
        the organs, in processing order.
    size
        edge of the closing cube.

    Returns
    -------
    np.ndarray
        The new label map.
    """
    out = labels.copy()
    boxes = _boxes(labels, label_ids, margin=size // 2 + 1)  # an organ only shrinks before its own turn
    for label_id in label_ids:
        if label_id in boxes:
            box = boxes[label_id]
            out[box] = close_labels(out[box], [label_id], size)
    return out


def _as_volume(labels: NdarrayOrTensor) -> np.ndarray:
    array = convert_to_numpy(labels)
    if array.ndim < 3 or any(s != 1 for s in array.shape[:-3]):
        raise ValueError(f"expected a single 3D label map, (X, Y, Z) with optional leading 1s; got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError("labels must hold whole-number ids; got fractional values.")
        array = array.astype(np.int32)
    if array.size and array.min() < 0:
        raise ValueError(f"label ids must be non-negative; got {int(array.min())}.")
    return array.reshape(array.shape[-3:])


def postprocess_generated_mask(
    labels: NdarrayOrTensor, requested: Mapping[int, float], label_dict: Mapping[str, int] | None = None
) -> NdarrayOrTensor:
    """
    Clean a generated mask (a re-implementation of the published ``general_mask_generation_post_process``).

    Steps, in order:

    1. :func:`hepatic_vessel_to_liver`.
    2. :func:`keep_body` (voxels outside the body become background); airway voxels are noted.
    3. :func:`replace_unrequested_tumors`: tumours not requested, or requested with size -1, become host anatomy.
    4. Each requested tumour: :func:`fill_tumor`, then :func:`keep_largest_components` unless it is in
       ``MULTIFOCAL_TUMORS``; its voxels are noted.
    5. :func:`remove_organs` requested with size -1 (they become body).
    6. :func:`keep_largest_components` of :func:`single_component_label_ids` (vertebrae left out when a
       bone lesion is requested); fragments become body.
    7. :func:`connect_bowel`.
    8. :func:`close_organs` of the same ids.
    9. The noted airway and tumour voxels are restored (closings may have covered them).

    Not carried over: the published tumour-specific repairs (lung-lobe refill around a lung tumour,
    liver/spleen refill near a hepatic tumour, tumour refill in removed regions, the kidney-mass branch),
    which are heuristic, partly inert (the liver+vessel+tumour union test never holds) or for ids the
    generator is not controlled with.

    Parameters
    ----------
    labels
        generated label map, (X, Y, Z) or with leading singleton axes (numpy or torch).
    requested
        ``{label_id: size}`` of the request (:func:`requested_label_sizes`).
    label_dict
        name -> id dictionary; ``None`` reads the packaged ``label_dict.json``.

    Returns
    -------
    NdarrayOrTensor
        The cleaned label map, same type, shape and dtype as ``labels``.
    """
    label_dict = load_label_dict() if label_dict is None else label_dict
    volume = _as_volume(labels)
    sizes = {int(k): float(v) for k, v in requested.items()}
    kept_tumors = sorted(t for t, s in sizes.items() if t in _TUMOR_IDS and s != REMOVE_SIZE)
    removed = sorted(o for o, s in sizes.items() if o not in _TUMOR_IDS and s == REMOVE_SIZE)
    multifocal = {label_id_of(n, label_dict) for n in MULTIFOCAL_TUMORS}

    volume = keep_body(hepatic_vessel_to_liver(volume, label_dict))
    airway = volume == label_id_of("airway", label_dict) if "airway" in label_dict else np.zeros(volume.shape, bool)
    volume = replace_unrequested_tumors(volume, kept_tumors, label_dict)
    for tumor in kept_tumors:
        volume = fill_tumor(volume, tumor)
        if tumor not in multifocal:
            volume = keep_largest_components(volume, [tumor])
    tumor_voxels = np.isin(volume, kept_tumors)
    tumor_values = volume[tumor_voxels]
    volume = remove_organs(volume, removed)
    single = single_component_label_ids(label_dict, include_vertebrae=TUMOR_LABELS["bone lesion"] not in kept_tumors)
    volume = keep_largest_components(volume, single)
    volume = connect_bowel(volume, label_dict)
    volume = close_organs(volume, single)
    if airway.any():
        volume[airway] = label_id_of("airway", label_dict)
    volume[tumor_voxels] = tumor_values
    out, *_ = convert_to_dst_type(volume.reshape(tuple(labels.shape)), labels, dtype=labels.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. The whole path
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskGenerationNetworks:
    """
    The mask generator.

    Attributes
    ----------
    autoencoder
        the mask autoencoder (``mask_generation_autoencoder_def``), weights loaded, eval mode.
    diffusion_unet
        the mask ``DiffusionModelUNet`` (``mask_generation_diffusion_def``).
    noise_scheduler
        ``mask_generation_noise_scheduler`` (DDPM in the published model).
    scale_factor
        ``mask_generation_scale_factor``.
    """

    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    noise_scheduler: Scheduler
    scale_factor: float


def _triple(name: str, value: Any, kind: type) -> tuple:
    values = (value,) * 3 if isinstance(value, numbers.Real) and not isinstance(value, bool) else tuple(value)
    ok = len(values) == 3 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in values)
    if kind is int:
        ok = ok and all(isinstance(v, numbers.Integral) for v in values)
    if not ok or not all(math.isfinite(float(v)) for v in values):
        raise ValueError(f"{name}={value!r} is not allowed; it must be 3 {'integers' if kind is int else 'numbers'} > 0.")
    return tuple(kind(v) for v in values)


def _missing(mask: NdarrayOrTensor, label_ids: Iterable[int]) -> list[int]:
    present = set(np.unique(convert_to_numpy(mask)).tolist())
    return [i for i in label_ids if i not in present]


def _lost_anatomy_error(
    pairs: list[tuple[str, float]], missing: list[int], label_names: Mapping[int, str], where: str, seed: int
) -> ValueError:
    """The error for requested anatomies missing from the mask: names the request, the anatomies and what to try."""
    lost = ", ".join(f"'{label_names.get(i, str(i))}' (id {i})" for i in missing)
    return ValueError(
        f"controllable_anatomy_size={[list(p) for p in pairs]}: {lost} {where}. Nothing was saved for this "
        f"mask; retry with another seed (random_seed, now {seed}), a larger size, or an output_size/spacing "
        "whose field of view keeps the anatomy."
    )


def generate_mask(
    networks: MaskGenerationNetworks,
    controllable_anatomy_size: Any,
    size_database: SizeConditionDatabase | NdarrayOrTensor | Sequence[Sequence[float]],
    output_size: Sequence[int],
    spacing: Sequence[float],
    seed: int,
    device: torch.device | str,
    *,
    channel_to_label: Mapping[Any, Any] | None = None,
    label_dict: Mapping[str, int] | None = None,
    latent_shape: Sequence[int] = MASK_GENERATION_LATENT_SHAPE,
    mask_generation_spacing: float | Sequence[float] = MASK_GENERATION_SPACING,
    num_inference_steps: int = 1000,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    num_splits: int | None = None,
    memory_budget_gb: float | None = None,
    progress: bool = False,
) -> tuple[MetaTensor, dict[str, Any]]:
    """
    Generate one label mask from anatomy sizes (MAISI "Path A").

    Size condition -> DDPM latent -> decode (4x the latent, on a ``mask_generation_spacing`` grid) ->
    post-processing -> resampling to ``output_size``/``spacing`` (nearest neighbour, then pad/crop) ->
    check that every anatomy requested with a size other than -1 is present.

    Parameters
    ----------
    networks
        the mask generator.
    controllable_anatomy_size
        ``[name, size]`` pairs (size in [0, 1] or -1 to remove), at least one.
    size_database
        :func:`load_size_condition_database` result (or an (N, 10) array).
    output_size
        (x, y, z) voxels of the returned mask.
    spacing
        (x, y, z) mm of the returned mask.
    seed
        seed of the generator's noise; the same seed gives the same mask.
    device
        where the networks run (they must already be there).
    channel_to_label
        the channel table; ``None`` reads the packaged ``label_dict_124_to_132.json``.
    label_dict
        name -> id dictionary; ``None`` reads the packaged ``label_dict.json``.
    latent_shape
        ``mask_generation_latent_shape``, (channels, x, y, z).
    mask_generation_spacing
        spacing (mm, one number or three) of the generator's grid.
    num_inference_steps
        ``mask_generation_num_inference_steps``.
    roi_size, overlap, num_splits, memory_budget_gb
        decode knobs (see :func:`decode_mask`).
    progress
        show progress bars.

    Returns
    -------
    tuple[MetaTensor, dict[str, Any]]
        ``(mask, info)``: ``mask`` is an int16 ``MetaTensor`` of shape (1, *output_size) on the CPU whose
        affine carries ``spacing`` (diagonal, as the published generator's); ``info`` holds
        ``size_condition`` (the 10 sizes fed to the generator), ``database_index``, ``database_distance``,
        ``requested`` (``{label_id: size}``), ``seed``, ``generated_shape``, ``generated_spacing``,
        ``label_ids`` (ids in the mask) and ``top_region_index``/``bottom_region_index`` (unscaled
        one-hots, ``None`` when the mask has no region label).

    Raises
    ------
    ValueError
        invalid inputs, or a requested anatomy absent after post-processing or resampling
        (the message names ``controllable_anatomy_size`` and the anatomy).
    """
    device = torch.device(device)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"random_seed={seed!r} is not allowed; it must be an integer >= 0.")
    size = _triple("output_size", output_size, int)
    target_spacing = _triple("spacing", spacing, float)
    grid_spacing = _triple("mask_generation_spacing", mask_generation_spacing, float)
    label_dict = load_label_dict() if label_dict is None else label_dict
    table = load_channel_table() if channel_to_label is None else channel_to_label
    pairs = _checked_pairs(controllable_anatomy_size)
    match = match_size_condition(pairs, size_database)
    requested = requested_label_sizes(pairs, label_dict)
    required = [i for i, s in requested.items() if s != REMOVE_SIZE]
    names = {i: n for n, i in {**label_dict, **TUMOR_LABELS}.items()}
    logger.info(
        "mask generation: condition %s (database entry %d, distance %.4f), seed %d",
        match.vector.tolist(),
        match.index,
        match.distance,
        seed,
    )

    generator = torch.Generator(device=device).manual_seed(int(seed))
    condition = torch.as_tensor(match.vector, dtype=torch.float32).reshape(1, 1, NUM_SIZE_SLOTS)
    latent = generate_mask_latent(
        networks.diffusion_unet,
        networks.noise_scheduler,
        condition,
        latent_shape,
        generator,
        device,
        num_inference_steps=num_inference_steps,
        progress=progress,
    )
    raw = decode_mask(
        networks.autoencoder,
        latent,
        networks.scale_factor,
        table,
        roi_size=roi_size,
        overlap=overlap,
        num_splits=num_splits,
        memory_budget_gb=memory_budget_gb,
        progress=progress,
    )
    volume = postprocess_generated_mask(raw[0, 0].numpy(), requested, label_dict)
    missing = _missing(volume, required)
    if missing:
        raise _lost_anatomy_error(pairs, missing, names, "is absent from the generated mask", int(seed))

    affine = torch.diag(torch.tensor([*grid_spacing, 1.0], dtype=torch.float64))
    mask = MetaTensor(torch.from_numpy(volume.astype(np.int16))[None], affine=affine)
    same_grid = tuple(mask.shape[1:]) == size and np.allclose(mask_spacing(mask), target_spacing, rtol=0, atol=1e-6)
    if not same_grid:
        mask = resample_mask(mask, target_spacing, size)
        missing = _missing(mask, required)
        if missing:
            where = (
                f"was lost when resampling the generated mask ({list(volume.shape)} voxels at "
                f"{list(grid_spacing)} mm) to output_size={list(size)}, spacing={list(target_spacing)}"
            )
            raise _lost_anatomy_error(pairs, missing, names, where, int(seed))
    mask = mask.to(MASK_DTYPE)

    try:
        top, bottom = body_region_indices_from_mask(mask)
    except ValueError:
        logger.warning("the generated mask holds no body-region label; top/bottom region indices are unknown.")
        top = bottom = None
    info = {
        "size_condition": match.vector.tolist(),
        "database_index": match.index,
        "database_distance": match.distance,
        "requested": dict(requested),
        "seed": int(seed),
        "generated_shape": tuple(volume.shape),
        "generated_spacing": grid_spacing,
        "label_ids": sorted(int(i) for i in torch.unique(mask.as_tensor()).tolist()),
        "top_region_index": top,
        "bottom_region_index": bottom,
    }
    return mask, info
