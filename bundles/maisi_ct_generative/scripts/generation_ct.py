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
CT image + mask pair generation (and CT image-only generation) as a ``monai.engines.Workflow``.

Per sample: mask (database, user or generator) -> ControlNet-conditioned sampling -> planned decode -> HU
(background -1000, int16) -> quality check, regenerating a failing sample with a new seed and a new mask draw
up to ``quality_check_max_attempts`` times. Image-only requests skip the mask, the ControlNet and the quality
check. The handlers of the config write the volumes, the preview, the sample record and the run report.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .constants import CT_HU_MAX, CT_HU_MIN
from .generation import GenerationEngine, GenerationNetworks, entry_of, latent_shape_of, timed
from .labels import binarize_labels, body_region_indices_from_mask, region_condition, remove_tumors, spacing_condition
from .mask_sources import MaskSources
from .output_intensity import finalize_ct, to_ct_hu
from .quality import CTQualityCheck, generate_with_quality_check
from .sample_store import SampleStore
from .sampler import LatentSampler, SamplingConditions
from .settings import SampleTask, sample_seed
from .settings_ct import NO_MASK, CTGenerationSettings, CTRequest

logger = logging.getLogger(__name__)

__all__ = ["CTPairGenerator", "ct_conditions"]

IMAGE_ONLY_SOURCE = "none (image only)"


def ct_conditions(
    labels: torch.Tensor | None, request: CTRequest, settings: CTGenerationSettings, device: torch.device, dtype: torch.dtype
) -> SamplingConditions:
    """
    All conditioning tensors of one CT sample, built once before the denoising loop.

    Spacing always; the modality code for rflow-ct; the top/bottom body regions of the mask for ddpm-ct; the
    bit-plane mask for the ControlNet; and, with classifier-free guidance, the tumour-free mask as the
    unconditional ControlNet input.
    """
    controlnet_cond = unconditional = top = bottom = None
    if labels is not None:
        labels = labels.reshape(1, 1, *labels.shape[-3:]).to(device)
        controlnet_cond = binarize_labels(labels, dtype=dtype)
        if settings.version == "ddpm-ct":
            top_one_hot, bottom_one_hot = body_region_indices_from_mask(labels)
            top, bottom = region_condition(top_one_hot), region_condition(bottom_one_hot)
        if settings.cfg_guidance_scale > 0:
            unconditional = binarize_labels(torch.as_tensor(remove_tumors(labels.cpu())).to(device), dtype=dtype)
    return SamplingConditions(
        spacing=spacing_condition(request.spacing),
        class_labels=None if settings.modality is None else torch.tensor([settings.modality]),
        top_region=top,
        bottom_region=bottom,
        controlnet_cond=controlnet_cond,
        unconditional_controlnet_cond=unconditional,
    ).to(device, dtype)


class CTPairGenerator(GenerationEngine):
    """
    Generate the CT samples of a run (``generator`` in ``configs/inference.json``).

    Parameters
    ----------
    settings
        the checked CT settings.
    networks
        the loaded VAE, UNet and (except image-only runs) ControlNet.
    sampler
        the denoising loop.
    decoder
        the planned latent decoder.
    mask_source
        the mask sources (database, user, generator).
    quality_check
        the CT quality check and its attempt budget.
    store
        the output folder.
    handlers
        writers, previews, records and report, progress.
    """

    def __init__(
        self,
        settings: CTGenerationSettings,
        networks: GenerationNetworks,
        sampler: LatentSampler,
        decoder: Any,
        mask_source: MaskSources,
        quality_check: CTQualityCheck,
        store: SampleStore,
        handlers: list[Any] | None = None,
    ) -> None:
        super().__init__(settings, networks, sampler, decoder, store, handlers)
        self.mask_source = mask_source
        self.quality_check = quality_check

    def generate(self, task: SampleTask, request: CTRequest) -> dict[str, Any]:
        timings: dict[str, float] = {}
        plan = self.decoder.plan(latent_shape_of(request.output_size)).describe()
        if request.mask_source == NO_MASK:
            image = self._image(None, request, task.seed, timings)
            entry = entry_of(task, task.seed, IMAGE_ONLY_SOURCE, timings, quality_check=None, decode_plan=plan)
            return {"image": image, "labels": None, "entry": entry}
        sources: dict[int, str] = {}

        def attempt(number: int) -> tuple[np.ndarray, np.ndarray]:
            seed = sample_seed(task.seed, number)
            with timed(timings, "mask_s"):
                mask, sources[number] = self.mask_source.mask_for(request, task.index, seed)
            labels = np.asarray(mask.cpu()).reshape(request.output_size)
            return self._image(mask, request, seed, timings), labels

        image, labels, report, attempts = generate_with_quality_check(attempt, self.quality_check.max_attempts, self.quality_check)
        if not report.passed:
            logger.warning("sample %s failed the quality check after %d attempt(s): %s", task.stem, attempts, report.summary())
        seed = sample_seed(task.seed, attempts - 1)
        entry = entry_of(task, seed, sources[attempts - 1], timings, quality_check=report, decode_plan=plan)
        return {"image": image, "labels": labels, "entry": entry}

    def _image(self, mask: torch.Tensor | None, request: CTRequest, seed: int, timings: dict[str, float]) -> np.ndarray:
        """The CT (HU, int16) of one attempt: background -1000 where the mask is 0 (no mask: clipped HU only)."""
        device = self.networks.device
        controlnet = None if mask is None else self.networks.controlnet
        latent = self.denoise(seed, request, lambda dtype: ct_conditions(mask, request, self.settings, device, dtype), controlnet, timings)
        image_hu = to_ct_hu(self.decode(latent, timings))
        if mask is None:
            return np.round(np.clip(image_hu, CT_HU_MIN, CT_HU_MAX)).astype(np.int16)
        return np.asarray(finalize_ct(image_hu, np.asarray(mask.cpu()).reshape(image_hu.shape)))
