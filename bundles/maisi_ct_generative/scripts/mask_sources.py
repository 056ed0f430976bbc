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
Where the label mask of a CT sample comes from: the candidate-mask database, a user file or the mask generator.

Each source gives ``mask_for(request, index, seed) -> (mask, description)``: a ``(1, X, Y, Z)`` int16 label map at
the request's geometry and a description for the report. :class:`MaskSources` routes each request to the source
its ``mask_source`` names, so one run (one manifest) can mix them. Nothing is loaded before it is needed: the
database pool of a request is retrieved on its first sample, a user mask once per request, and the mask
networks (about 200M parameters) only when a request generates masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.schedulers import Scheduler

from .checkpoint import load_network_weights
from .label_io import load_label_file, resample_mask
from .mask_augmentation import augment_mask
from .mask_channels import load_channel_table
from .mask_database import RetrievedMask, retrieve_masks
from .mask_generation import MaskGenerationNetworks, generate_mask, load_size_condition_database
from .settings_ct import DATABASE_MASK, GENERATED_MASK, USER_MASK, CTGenerationSettings, CTRequest

logger = logging.getLogger(__name__)

__all__ = ["DatabaseMaskSource", "MaskGenerator", "MaskSources", "UserMaskSource"]


class DatabaseMaskSource:
    """
    Masks retrieved from the candidate-mask database (exact geometry first, else the closest ones resampled),
    each augmented per sample with a seeded, bounded augmentation (``augment_masks``).

    The pool of a request (``num_samples`` masks, shuffled with the request's seed) is the same in every process,
    so sample ``k`` gets the same mask whatever the number of processes.

    Parameters
    ----------
    settings
        the checked settings (the parsed database, ``augment_masks``).
    device
        where masks are loaded and augmented.
    """

    def __init__(self, settings: CTGenerationSettings, device: torch.device | str) -> None:
        self.settings = settings
        self.device = torch.device(device)
        self._pools: dict[str, list[RetrievedMask]] = {}

    def mask_for(self, request: CTRequest, index: int, seed: int) -> tuple[MetaTensor, str]:
        if request.request_id not in self._pools:
            self._pools[request.request_id] = retrieve_masks(
                self.settings.candidates,
                request.anatomy_ids,
                request.region_indices,
                request.output_size,
                request.spacing,
                request.num_samples,
                np.random.default_rng(request.seed),
                device=self.device,
            )
        retrieved = self._pools[request.request_id][index % request.num_samples]
        mask = retrieved.mask.clone()
        if self.settings.augment_masks:
            mask, _ = augment_mask(mask, np.random.default_rng(seed), self.device)
        origin = "resampled" if retrieved.resampled else "exact"
        return mask, f"database:{retrieved.source} ({origin})"


class UserMaskSource:
    """
    A user label map (``mask_path`` of the request), oriented to RAS and resampled (nearest) to the request's
    geometry once per request (the settings checked it already).

    Parameters
    ----------
    device
        where the mask goes.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cached: tuple[str, MetaTensor] | None = None

    def mask_for(self, request: CTRequest, index: int, seed: int) -> tuple[MetaTensor, str]:
        if self._cached is None or self._cached[0] != request.request_id:
            mask = resample_mask(load_label_file(request.mask_path, "cpu", strict=True), request.spacing, request.output_size)
            self._cached = (request.request_id, mask.to(self.device))
        return self._cached[1].clone(), f"user:{request.mask_path}"


class MaskGenerator:
    """
    The mask generator (``controllable_anatomy_size``): a mask drawn from anatomy sizes for each sample.

    The networks are built from their definitions (``"_mode_": "callable"`` in the config) and loaded on the first
    mask, so runs without generated masks never build them.

    Parameters
    ----------
    autoencoder
        ``mask_generation_autoencoder_def`` (a factory or a network).
    diffusion_unet
        ``mask_generation_diffusion_def`` (a factory or a network).
    noise_scheduler
        ``mask_generation_noise_scheduler``.
    latent_shape
        ``mask_generation_latent_shape``.
    settings
        the checked settings (files, steps, decode knobs, label dictionary, progress).
    device
        where the networks run.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module | Callable[[], torch.nn.Module],
        diffusion_unet: torch.nn.Module | Callable[[], torch.nn.Module],
        noise_scheduler: Scheduler,
        latent_shape: Sequence[int],
        settings: CTGenerationSettings,
        device: torch.device | str,
    ) -> None:
        self.autoencoder = autoencoder
        self.diffusion_unet = diffusion_unet
        self.noise_scheduler = noise_scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.settings = settings
        self.device = torch.device(device)
        self._loaded: tuple[MaskGenerationNetworks, Any, dict[int, int]] | None = None

    def _load(self) -> tuple[MaskGenerationNetworks, Any, dict[int, int]]:
        if self._loaded is None:
            files = self.settings.files
            files.require()
            autoencoder = self.autoencoder if isinstance(self.autoencoder, torch.nn.Module) else self.autoencoder()
            unet = self.diffusion_unet if isinstance(self.diffusion_unet, torch.nn.Module) else self.diffusion_unet()
            load_network_weights(autoencoder, files["trained_mask_generation_autoencoder_path"], map_location=self.device)
            extras = load_network_weights(
                unet, files["trained_mask_generation_diffusion_path"], state_dict_key="unet_state_dict", map_location=self.device
            )
            networks = MaskGenerationNetworks(
                autoencoder=autoencoder.to(self.device).eval(),
                diffusion_unet=unet.to(self.device).eval(),
                noise_scheduler=self.noise_scheduler,
                scale_factor=float(extras.get("scale_factor", 1.0)),
            )
            database = load_size_condition_database(files["all_anatomy_size_condtions_json"], config_id="all_anatomy_size_condtions_json")
            self._loaded = (networks, database, load_channel_table(files["label_dict_remap_json"]))
        return self._loaded

    def mask_for(self, request: CTRequest, index: int, seed: int) -> tuple[MetaTensor, str]:
        networks, database, channel_to_label = self._load()
        decode = self.settings.decode
        mask, _ = generate_mask(
            networks,
            [list(pair) for pair in request.controllable_anatomy_size],
            database,
            request.output_size,
            request.spacing,
            seed,
            self.device,
            channel_to_label=channel_to_label,
            label_dict=self.settings.label_dict,
            latent_shape=self.latent_shape,
            num_inference_steps=self.settings.mask_generation_num_inference_steps,
            roi_size=decode.roi_size,
            overlap=decode.overlap,
            num_splits=decode.num_splits,
            memory_budget_gb=decode.memory_budget_gb,
            progress=self.settings.progress,
        )
        return mask.to(self.device), "generated"


class MaskSources:
    """
    Route each request to its mask source (``request.mask_source``).

    Parameters
    ----------
    database
        the candidate-mask database source.
    user
        the user-mask source.
    generator
        the mask generator.
    """

    def __init__(self, database: DatabaseMaskSource, user: UserMaskSource, generator: MaskGenerator) -> None:
        self.by_kind = {DATABASE_MASK: database, USER_MASK: user, GENERATED_MASK: generator}

    def mask_for(self, request: CTRequest, index: int, seed: int) -> tuple[MetaTensor, str]:
        """The mask of sample ``index`` of ``request`` for the attempt seeded with ``seed``."""
        return self.by_kind[request.mask_source].mask_for(request, index, seed)
