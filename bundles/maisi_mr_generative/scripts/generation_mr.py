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
MR generation as a ``monai.engines.Workflow``: image-only, or image-from-mask with a (user-trained) ControlNet.

Per sample: modality- and spacing-conditioned sampling (classifier-free guidance contrasts the modality with the
null class 0; the mask, if any, is the same in both branches) -> planned decode -> MR units (int16, 1000 ~ the
99.5th percentile, no negative values). The handlers of the config write the image (and the raw-id label map of
image-from-mask requests), the preview, the sample record and the run report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .generation import GenerationEngine, GenerationNetworks, entry_of, latent_shape_of
from .labels import binarize_labels, spacing_condition
from .output_intensity import finalize_mr, to_mr_intensity
from .sample_store import SampleStore
from .sampler import LatentSampler, SamplingConditions
from .settings import SampleTask
from .settings_mr import MRGenerationSettings, MRMask, MRRequest

__all__ = ["MRImageGenerator", "mr_conditions"]

IMAGE_ONLY_SOURCE = "none (image only)"
MR_REFERENCE_PERCENTILE = 99.5  # the training normalisation maps this percentile to 1, i.e. to MR_SCALE units


def mr_conditions(request: MRRequest, mask: MRMask | None, device: torch.device, dtype: torch.dtype) -> SamplingConditions:
    """Spacing and modality conditions of an MR sample, plus the bit-plane mask when generating from a mask."""
    controlnet_cond = None
    if mask is not None:
        ids = mask.controlnet_ids.reshape(1, 1, *mask.controlnet_ids.shape[-3:]).to(device)
        controlnet_cond = binarize_labels(ids, dtype=dtype)
    return SamplingConditions(
        spacing=spacing_condition(request.spacing), class_labels=torch.tensor([request.modality]), controlnet_cond=controlnet_cond
    ).to(device, dtype)


class MRImageGenerator(GenerationEngine):
    """
    Generate the MR samples of a run (``generator`` in ``configs/inference.json``).

    Parameters
    ----------
    settings
        the checked MR settings.
    networks
        the loaded VAE and UNet, and the ControlNet when a request generates from a mask.
    sampler
        the denoising loop.
    decoder
        the planned latent decoder.
    store
        the output folder.
    handlers
        writers, previews, records and report, progress.
    """

    def __init__(
        self,
        settings: MRGenerationSettings,
        networks: GenerationNetworks,
        sampler: LatentSampler,
        decoder: Any,
        store: SampleStore,
        handlers: list[Any] | None = None,
    ) -> None:
        super().__init__(settings, networks, sampler, decoder, store, handlers)
        self._mask: tuple[str, MRMask | None] | None = None

    def _mask_of(self, request: MRRequest) -> MRMask | None:
        if self._mask is None or self._mask[0] != request.request_id:
            self._mask = (request.request_id, self.settings.load_mask(request))
        return self._mask[1]

    def generate(self, task: SampleTask, request: MRRequest) -> dict[str, Any]:
        timings: dict[str, float] = {}
        mask = self._mask_of(request)
        device = self.networks.device
        controlnet = None if mask is None else self.networks.controlnet
        latent = self.denoise(task.seed, request, lambda dtype: mr_conditions(request, mask, device, dtype), controlnet, timings)
        image = to_mr_intensity(self.decode(latent, timings))
        labels = None if mask is None else mask.labels.reshape(request.output_size).numpy()
        if labels is not None and self.settings.zero_outside_mask:
            image = np.asarray(finalize_mr(image, labels))
        else:
            image = np.round(image).astype(np.int16)  # to_mr_intensity already clipped to [0, int16 max]
        entry = entry_of(
            task,
            task.seed,
            IMAGE_ONLY_SOURCE if mask is None else mask.source,
            timings,
            intensity_percentile_99_5=float(np.percentile(image, MR_REFERENCE_PERCENTILE)),
            decode_plan=self.decoder.plan(latent_shape_of(request.output_size)).describe(),
        )
        return {"image": image, "labels": labels, "entry": entry}
