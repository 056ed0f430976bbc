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
"""Latent caching for diffusion training: encode every axial slice once, then sample latents per iteration."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor
from tqdm import tqdm

from .checkpoint import LAST_CHECKPOINT_NAME, unwrap_module

logger = logging.getLogger(__name__)

Z_MU = "z_mu"
Z_SIGMA = "z_sigma"


@torch.no_grad()
def encode_volume_slices(
    autoencoder: torch.nn.Module,
    volumes: Iterable[Mapping[str, Any]],
    device: torch.device | str,
    batch_size: int,
    image_key: str = "image",
) -> list[dict[str, torch.Tensor]]:
    """
    Encode every axial slice of every volume once and keep the latent distribution of each slice.

    Training then draws ``z = z_mu + z_sigma * eps`` per iteration (``SampleLatentd``), which is the
    distribution the autoencoder's ``encode_stage_2_inputs`` samples from, without running the encoder
    in the training loop.

    Parameters
    ----------
    autoencoder
        a ``monai.networks.nets.AutoencoderKL`` (DDP wrappers are unwrapped).
    volumes
        items (or batches) with ``image_key`` holding tensors of shape (C, H, W, D) or (B, C, H, W, D).
    device
        device the encoder runs on.
    batch_size
        number of slices encoded at once.
    image_key
        key of the image in each item.

    Returns
    -------
    list[dict[str, torch.Tensor]]
        One ``{"z_mu": (C, h, w), "z_sigma": (C, h, w)}`` dict per slice, on the CPU.
    """
    encoder = unwrap_module(autoencoder).eval()
    cache: list[dict[str, torch.Tensor]] = []
    for item in tqdm(volumes, desc="encoding slices", unit="volume", disable=None):
        volume = convert_to_tensor(item[image_key], track_meta=False)
        volume = volume if volume.ndim == 5 else volume[None]
        slices = volume.permute(0, 4, 1, 2, 3).flatten(0, 1)  # (B*D, C, H, W)
        for start in range(0, slices.shape[0], batch_size):
            z_mu, z_sigma = encoder.encode(slices[start : start + batch_size].to(device).float())
            cache.extend({Z_MU: mu.cpu(), Z_SIGMA: sigma.cpu()} for mu, sigma in zip(z_mu, z_sigma))
    if not cache:
        raise ValueError("no slices to encode: the training data loader yielded no volumes.")
    logger.info("cached the latent distributions of %d slices", len(cache))
    return cache


def compute_scale_factor(latent_cache: list[Mapping[str, torch.Tensor]], seed: int = 0) -> float:
    """
    Return ``1 / std(z)`` over latents drawn once from every cached slice (deterministic for a given ``seed``).

    Multiplying latents by this factor gives them unit variance, as in Rombach et al. (2022).
    """
    generator = torch.Generator().manual_seed(seed)
    samples = [item[Z_MU] + item[Z_SIGMA] * torch.randn(item[Z_MU].shape, generator=generator) for item in latent_cache]
    std = torch.stack(samples).float().std().item()
    if not std > 0:
        raise ValueError(f"cannot compute the latent scale factor: the latents have standard deviation {std}.")
    return 1.0 / std


def resolve_scale_factor(
    latent_cache: list[Mapping[str, torch.Tensor]], ckpt_dir: str | os.PathLike, pretrained_scale_factor: float | None = None
) -> float:
    """
    Compute the latent scale factor once per model.

    The factor stored in ``<ckpt_dir>/checkpoint_last.pt`` wins when resuming; then the factor of the
    checkpoint being fine-tuned (``pretrained_scale_factor``); only a fresh training computes it from
    ``latent_cache``.
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
    scale_factor = compute_scale_factor(latent_cache)
    logger.info("latent scale factor %.6f (computed from %d slices)", scale_factor, len(latent_cache))
    return scale_factor


class SampleLatentd(MapTransform, RandomizableTransform):
    """
    Draw ``scale_factor * (z_mu + z_sigma * eps)`` from a cached slice and store it under ``output_key``.

    Parameters
    ----------
    scale_factor
        the latent scale factor.
    output_key
        key of the sampled latent (the trainer reads ``image``).
    """

    def __init__(self, scale_factor: float, output_key: Hashable = "image") -> None:
        MapTransform.__init__(self, keys=[Z_MU, Z_SIGMA])
        RandomizableTransform.__init__(self, prob=1.0)
        self.scale_factor = float(scale_factor)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        generator = torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))
        z_mu, z_sigma = data[Z_MU], data[Z_SIGMA]
        eps = torch.randn(z_mu.shape, generator=generator, dtype=z_mu.dtype)
        return {self.output_key: (z_mu + z_sigma * eps) * self.scale_factor}
