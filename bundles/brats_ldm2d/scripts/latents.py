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
Latents for diffusion training, encoded on demand and kept: each slice passes the encoder once per run.

The data pipeline draws slices from the volumes as the model-zoo training does (``RandSliceSamplesd`` names
each drawn slice), and the trainer's ``MemoLatentPrepareBatch`` looks the slices up in a ``LatentMemo``:
slices seen before are not encoded again; new ones are encoded in one batch and kept (their latent mean
and standard deviation, on the CPU). A training run thus encodes each slice at most once, and the first
epoch encodes only the slices it draws, as the zoo's does; later epochs skip the encoder for every slice
seen before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.engines import DiffusionPrepareBatch
from monai.transforms import MapTransform, Randomizable
from monai.utils import first

from .checkpoint import LAST_CHECKPOINT_NAME, unwrap_module

logger = logging.getLogger(__name__)

SLICE_ID = "slice_id"


class RandSliceSamplesd(Randomizable, MapTransform):
    """
    Draw ``num_samples`` axial slices of a (C, H, W, D) volume: one ``{key: (C, H, W), "slice_id": ...}`` per slice.

    The slices of one draw are distinct when the volume has enough of them (otherwise drawn with replacement).
    ``slice_id`` is ``"<source file>:<index>"``, which names the slice for ``LatentMemo``; it needs the
    volume's ``filename_or_obj`` metadata (``LoadImaged`` sets it).

    Parameters
    ----------
    keys
        key of the volume (one key).
    num_samples
        slices drawn per volume (config id ``train_batch_size_slice``).
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], num_samples: int) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"RandSliceSamplesd takes one key, got {list(self.keys)}.")
        if num_samples < 1:
            raise ValueError(f"train_batch_size_slice={num_samples} is not allowed; it must be an integer >= 1.")
        self.num_samples = num_samples

    def randomize(self, num_slices: int) -> np.ndarray:
        """Pick the slice indices of one draw."""
        replace = num_slices < self.num_samples
        return self.R.choice(num_slices, size=self.num_samples, replace=replace)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        key = self.keys[0]
        volume = data[key]
        source = getattr(volume, "meta", {}).get("filename_or_obj")
        if not source:
            raise ValueError(f"the '{key}' volume has no 'filename_or_obj' metadata to name its slices by.")
        return [{key: volume[..., int(z)], SLICE_ID: f"{source}:{int(z)}"} for z in self.randomize(volume.shape[-1])]


class LatentMemo:
    """
    The latent distributions of the slices encoded so far, by slice id; encodes only the slices it lacks.

    Parameters
    ----------
    autoencoder
        the frozen ``AutoencoderKL`` (a DDP wrapper is unwrapped).
    device
        device the encoder runs on.
    batch_size
        slices encoded per forward pass (config id ``encode_batch_size``).
    """

    def __init__(self, autoencoder: torch.nn.Module, device: torch.device | str, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"encode_batch_size={batch_size} is not allowed; it must be an integer >= 1.")
        self.autoencoder = autoencoder
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()  # not inference_mode: the kept latents become UNet inputs that autograd must be able to save
    def _encode(self, images: torch.Tensor, keys: Sequence[str]) -> None:
        encoder = unwrap_module(self.autoencoder).eval()
        for start in range(0, len(keys), self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device).float()
            z_mu, z_sigma = encoder.encode(chunk)
            for key, mu, sigma in zip(keys[start : start + self.batch_size], z_mu.cpu(), z_sigma.cpu()):
                self.entries[key] = (mu, sigma)
        self.encoded += len(keys)

    def __call__(self, images: torch.Tensor, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Return ``(z_mu, z_sigma)`` of a batch of slices (B, C, H, W) named by ``keys``, on the CPU.

        Slices not seen before are encoded (each once, also when a key repeats within the batch).
        """
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} slice ids for {images.shape[0]} slices.")
        missing: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key not in self.entries:
                missing.setdefault(key, index)
        if missing:
            self._encode(images[list(missing.values())], list(missing))
        return torch.stack([self.entries[key][0] for key in keys]), torch.stack([self.entries[key][1] for key in keys])


class MemoLatentPrepareBatch(DiffusionPrepareBatch):
    """
    ``DiffusionPrepareBatch`` on latents: the batch's slices are replaced by ``scale_factor * (z_mu + z_sigma * eps)``.

    ``(z_mu, z_sigma)`` come from ``memo`` (encoded on first sight), so the draw is the distribution that
    ``AutoencoderKL.encode_stage_2_inputs`` samples from, without running the encoder for slices seen before.

    Parameters
    ----------
    memo
        the run's ``LatentMemo``.
    scale_factor
        the latent scale factor.
    num_train_timesteps
        timesteps are drawn from ``[0, num_train_timesteps)``.
    """

    def __init__(self, memo: LatentMemo, scale_factor: float, num_train_timesteps: int) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps)
        self.memo = memo
        self.scale_factor = float(scale_factor)

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> Any:
        z_mu, z_sigma = self.memo(torch.as_tensor(batchdata["image"]), list(batchdata[SLICE_ID]))
        latents = (z_mu + z_sigma * torch.randn_like(z_mu)) * self.scale_factor
        return super().__call__({"image": latents}, device, non_blocking, **kwargs)


def compute_scale_factor(z_mu: torch.Tensor, z_sigma: torch.Tensor, seed: int = 0) -> float:
    """
    Return ``1 / std(z)`` of latents drawn once from ``N(z_mu, z_sigma^2)`` (deterministic for a given ``seed``).

    Multiplying latents by this factor gives them unit variance, as in Rombach et al. (2022).
    """
    generator = torch.Generator().manual_seed(seed)
    samples = z_mu + z_sigma * torch.randn(z_mu.shape, generator=generator, dtype=z_mu.dtype)
    std = samples.float().std().item()
    if not std > 0:
        raise ValueError(f"cannot compute the latent scale factor: the latents have standard deviation {std}.")
    return 1.0 / std


def resolve_scale_factor(
    ckpt_dir: str | os.PathLike,
    pretrained_scale_factor: float | None,
    memo: LatentMemo,
    loader: Any,
) -> float:
    """
    Fix the latent scale factor once per model.

    The factor stored in ``<ckpt_dir>/checkpoint_last.pt`` wins when resuming; then the factor of the
    checkpoint being fine-tuned (``pretrained_scale_factor``); only a fresh training computes it, from the
    first batch of ``loader`` (encoded into ``memo``, so those slices are not encoded again), as the
    model-zoo training does. Under ``torch.distributed`` rank 0's factor is used by every rank.
    """
    checkpoint_file = Path(ckpt_dir) / LAST_CHECKPOINT_NAME
    if checkpoint_file.is_file():
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        if "scale_factor" in checkpoint:
            scale_factor = float(checkpoint["scale_factor"])
            logger.info("latent scale factor %.6f (from %s)", scale_factor, checkpoint_file)
            return scale_factor
    if pretrained_scale_factor is not None:
        logger.info("latent scale factor %.6f (from the fine-tuned checkpoint)", pretrained_scale_factor)
        return float(pretrained_scale_factor)
    batch = first(loader)
    scale_factor = compute_scale_factor(*memo(torch.as_tensor(batch["image"]), list(batch[SLICE_ID])))
    if dist.is_available() and dist.is_initialized():
        shared = [scale_factor]
        dist.broadcast_object_list(shared, src=0)
        scale_factor = float(shared[0])
    logger.info("latent scale factor %.6f (computed from %d slices)", scale_factor, len(batch[SLICE_ID]))
    return scale_factor
