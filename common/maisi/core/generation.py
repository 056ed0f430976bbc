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
CT image + mask pair generation: mask source -> ControlNet-conditioned sampling -> decode -> HU -> quality
check -> NIfTI (or any MONAI writer) + PNG preview + JSON report.

MR generation (``generate_mr_images``): image-only, or image-from-mask with a ControlNet when the user
gives a label map; modality-conditioned sampling -> decode -> MR units -> int16 NIfTI + preview + report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.schedulers import Scheduler

from .decode import DecodePlan, LatentDecoder, decode_latent, plan_decode
from .labels import (
    binarize_labels,
    body_region_indices_from_mask,
    label_output_dtype,
    region_condition,
    remap_mr_labels_for_controlnet,
    remove_tumors,
    spacing_condition,
)
from .masks import Candidate, augment_mask, load_label_file, resample_mask, retrieve_masks
from .outputs import preview_png, sample_filenames, write_run_report, write_volume
from .quality import QualityReport, check_ct_quality, finalize_ct, finalize_mr, generate_with_quality_check, to_ct_hu, to_mr_intensity
from .sampler import SamplingConditions, sample_latent
from .validation import CTGenerationInputs, MRGenerationInputs, check_controlnet_label_mapping

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 4  # the autoencoder compresses each spatial axis by 4
ATTEMPT_SEED_STRIDE = 100_003  # seed of attempt a of sample i: random_seed + i + a * ATTEMPT_SEED_STRIDE


def sample_seed(random_seed: int, index: int, attempt: int = 0) -> int:
    """Seed of sample ``index`` at quality-check ``attempt``: independent of how many samples are generated."""
    return random_seed + index + attempt * ATTEMPT_SEED_STRIDE


def latent_shape_of(output_size: Sequence[int]) -> tuple[int, ...]:
    """
    The ``(C, X, Y, Z)`` latent shape of an image of ``output_size`` voxels.

    Parameters
    ----------
    output_size
        the image size ``(X, Y, Z)``; each axis is a multiple of ``LATENT_DOWNSAMPLE``.

    Returns
    -------
    tuple[int, ...]
        ``(LATENT_CHANNELS, X // 4, Y // 4, Z // 4)``.
    """
    return (LATENT_CHANNELS, *(s // LATENT_DOWNSAMPLE for s in output_size))


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """
    Add the wall-clock seconds of the ``with`` block to ``timings[phase]``.

    Parameters
    ----------
    timings
        the run's phase timings, updated in place.
    phase
        the key, e.g. ``"diffusion_s"``.
    """
    start = time.perf_counter()
    yield
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


class MaskSource(Protocol):
    """Gives the label mask (1, X, Y, Z) of a sample at the requested geometry, and says where it came from."""

    def mask_for(self, index: int, seed: int) -> tuple[MetaTensor, str]: ...


@dataclass
class DatabaseMaskSource:
    """
    Masks retrieved from the candidate-mask database (exact geometry, else closest match resampled),
    each augmented per sample with a seed-driven, bounded augmentation.
    """

    candidates: Sequence[Candidate]
    inputs: CTGenerationInputs
    num_masks: int
    device: torch.device
    augment: bool = True
    _pool: list = field(default_factory=list, init=False)

    def mask_for(self, index: int, seed: int) -> tuple[MetaTensor, str]:
        if not self._pool:
            self._pool = retrieve_masks(
                self.candidates,
                self.inputs.anatomy_ids,
                self.inputs.region_indices,
                self.inputs.output_size,
                self.inputs.spacing,
                self.num_masks,
                np.random.default_rng(seed),
                device=self.device,
            )
        retrieved = self._pool[index % len(self._pool)]
        mask = retrieved.mask.clone()
        if self.augment:
            mask, _ = augment_mask(mask, np.random.default_rng(seed), self.device)
        origin = "resampled" if retrieved.resampled else "exact"
        return mask, f"database:{retrieved.source} ({origin})"


@dataclass
class UserMaskSource:
    """A user-supplied label file (``mask_path``), oriented to RAS and resampled to the requested geometry."""

    path: str | os.PathLike
    inputs: CTGenerationInputs
    device: torch.device

    def mask_for(self, index: int, seed: int) -> tuple[MetaTensor, str]:
        mask = load_user_mask(self.path, self.device)
        mask = resample_mask(mask, self.inputs.spacing, self.inputs.output_size)
        return mask, f"user:{self.path}"


@dataclass
class GeneratedMaskSource:
    """Masks drawn by the mask-generation model; ``generate(seed)`` returns a mask at the requested geometry."""

    generate: Callable[[int], MetaTensor]

    def mask_for(self, index: int, seed: int) -> tuple[MetaTensor, str]:
        return self.generate(seed), "generated"


def load_user_mask(path: str | os.PathLike, device: torch.device) -> MetaTensor:
    """
    Load and check a user label map (``mask_path``): one channel of non-negative integer ids, with foreground.

    Raises
    ------
    FileNotFoundError
        ``mask_path`` does not exist.
    ValueError
        naming ``mask_path``, when the file is not such a label map.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"mask_path={path} does not exist.")
    try:
        mask = load_label_file(path, device, strict=True)
    except ValueError as error:
        raise ValueError(f"mask_path={path}: {error}") from error
    if not bool((mask > 0).any()):
        raise ValueError(f"mask_path={path} has no foreground label.")
    return mask


@dataclass
class Networks:
    """The networks of generation (already on their device, weights loaded); no ControlNet for MR image-only runs."""

    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    controlnet: torch.nn.Module | None
    scale_factor: float


def build_conditions(mask: torch.Tensor, inputs: CTGenerationInputs, device: torch.device, dtype: torch.dtype) -> SamplingConditions:
    """All conditioning tensors of one sample, built once before the denoising loop."""
    labels = mask.reshape(1, 1, *mask.shape[-3:]).to(device)
    top, bottom = (None, None)
    if inputs.version == "ddpm-ct":
        top_one_hot, bottom_one_hot = body_region_indices_from_mask(labels)
        top, bottom = region_condition(top_one_hot), region_condition(bottom_one_hot)
    unconditional = None
    if inputs.cfg_guidance_scale > 0:
        unconditional = binarize_labels(torch.as_tensor(remove_tumors(labels.cpu())).to(device), dtype=dtype)
    return SamplingConditions(
        spacing=spacing_condition(inputs.spacing),
        class_labels=None if inputs.modality is None else torch.tensor([inputs.modality]),
        top_region=top,
        bottom_region=bottom,
        controlnet_cond=binarize_labels(labels, dtype=dtype),
        unconditional_controlnet_cond=unconditional,
    ).to(device, dtype)


def sample_and_decode(
    inputs: CTGenerationInputs | MRGenerationInputs,
    networks: Networks,
    scheduler: Scheduler,
    conditions: Callable[[torch.dtype], SamplingConditions],
    controlnet: torch.nn.Module | None,
    seed: int,
    device: torch.device,
    decode_plan: DecodePlan,
    timings: dict[str, float],
    progress: bool = True,
) -> np.ndarray:
    """
    Denoise the seeded latent noise of one sample and decode it; accumulates phase timings.

    Parameters
    ----------
    inputs
        the checked run inputs (``output_size``, ``num_inference_steps``, ``cfg_guidance_scale``).
    networks
        the loaded networks; ``networks.autoencoder`` decodes.
    scheduler
        the noise scheduler.
    conditions
        builds the sample's conditioning tensors for the sampling dtype (timed as diffusion).
    controlnet
        the ControlNet conditioning the UNet, or ``None``.
    seed
        the sample seed (noise and sampler generator).
    device
        where the networks run; fp16 autocast only on CUDA.
    decode_plan
        how the latent is decoded (:func:`decode.plan_decode`).
    timings
        ``diffusion_s`` and ``decode_s`` are added to it.
    progress
        show progress bars.

    Returns
    -------
    np.ndarray
        the decoded ``(X, Y, Z)`` float32 image in the autoencoder's intensity range.
    """
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    latent_shape = (1, *latent_shape_of(inputs.output_size))
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    with timed(timings, "diffusion_s"):
        sample_conditions = conditions(dtype)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            latent = sample_latent(
                networks.diffusion_unet,
                scheduler,
                noise,
                sample_conditions,
                inputs.num_inference_steps,
                controlnet=controlnet,
                guidance_scale=inputs.cfg_guidance_scale,
                generator=torch.Generator(device=device).manual_seed(seed),
                progress=progress,
            )
    with timed(timings, "decode_s"):
        decoded = decode_latent(LatentDecoder(networks.autoencoder, networks.scale_factor), latent, decode_plan, progress=progress)
    return decoded[0, 0].float().cpu().numpy()


@dataclass
class GenerationRun:
    """
    What every sample of a generation run shares: device, output folder, decode plan and phase timings.

    Attributes
    ----------
    device
        where the networks run.
    output_dir
        the (created) output folder.
    decode_plan
        the decode plan of the run's latent shape.
    timings
        accumulated phase seconds (``mask_s``, ``diffusion_s``, ``decode_s``).
    """

    device: torch.device
    output_dir: Path
    decode_plan: DecodePlan
    timings: dict[str, float] = field(default_factory=dict)

    def finish(self, settings: Mapping[str, Any] | None, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """
        Write ``<output_dir>/generation_report.json`` and return the run report.

        Parameters
        ----------
        settings
            the user-facing run settings; the decode plan is added.
        samples
            one entry per written sample.

        Returns
        -------
        dict[str, Any]
            ``{"settings", "samples", "timings"}``.
        """
        run_settings = {**dict(settings or {}), "decode_plan": self.decode_plan.describe()}
        write_run_report(self.output_dir / "generation_report.json", run_settings, samples, self.timings)
        return {"settings": run_settings, "samples": samples, "timings": self.timings}


def start_generation_run(
    inputs: CTGenerationInputs | MRGenerationInputs,
    output_dir: str | os.PathLike,
    device: torch.device | str,
    memory_budget_gb: float | None = None,
) -> GenerationRun:
    """
    Create the output folder and plan the decode of the run's latent shape (logged).

    Parameters
    ----------
    inputs
        the checked run inputs (``output_size`` and the ``autoencoder_*`` decode settings).
    output_dir
        where samples and the report go; created if missing.
    device
        where the networks run.
    memory_budget_gb
        the decode memory budget, ``None`` for the device's free memory.

    Returns
    -------
    GenerationRun
        the shared state of the run, with empty timings.
    """
    device = torch.device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    decode_plan = plan_decode(
        latent_shape_of(inputs.output_size),
        device,
        roi_size=inputs.autoencoder_sliding_window_infer_size,
        overlap=inputs.autoencoder_sliding_window_infer_overlap,
        num_splits=inputs.autoencoder_tp_num_splits,
        memory_budget_gb=memory_budget_gb,
    )
    logger.info("%s", decode_plan.describe())
    return GenerationRun(device=device, output_dir=output_dir, decode_plan=decode_plan)


def write_label_volume(labels: np.ndarray, path: Path, spacing: Sequence[float], config_id: str = "output_ext") -> None:
    """
    Write a label map in the smallest integer dtype that holds its largest id.

    Parameters
    ----------
    labels
        the ``(X, Y, Z)`` label ids.
    path
        the output file (its extension picks the writer).
    spacing
        voxel spacing in mm, written into the affine.
    config_id
        the config id named when the extension is not writable.
    """
    label_dtype = label_output_dtype(int(labels.max()))
    write_volume(labels.astype(label_dtype), path, spacing, label_dtype, config_id=config_id)


def generate_ct_image(
    mask: torch.Tensor,
    inputs: CTGenerationInputs,
    networks: Networks,
    scheduler: Scheduler,
    seed: int,
    device: torch.device,
    decode_plan: DecodePlan,
    timings: dict[str, float],
    progress: bool = True,
) -> np.ndarray:
    """Generate the CT (HU, int16, background -1000) for ``mask``; accumulates phase timings."""
    decoded = sample_and_decode(
        inputs,
        networks,
        scheduler,
        lambda dtype: build_conditions(mask, inputs, device, dtype),
        networks.controlnet,
        seed,
        device,
        decode_plan,
        timings,
        progress,
    )
    image = to_ct_hu(decoded)
    return np.asarray(finalize_ct(image, np.asarray(mask).reshape(image.shape)))


def generate_ct_pairs(
    inputs: CTGenerationInputs,
    networks: Networks,
    scheduler: Scheduler,
    mask_source: MaskSource,
    *,
    num_output_samples: int,
    random_seed: int,
    output_dir: str | os.PathLike,
    device: torch.device | str,
    ct_statistics: Mapping[str, Any],
    quality_check_max_attempts: int = 3,
    memory_budget_gb: float | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """
    Generate ``num_output_samples`` CT image + mask pairs and write them with previews and a run report.

    Sample ``i``, attempt ``a`` uses seed ``random_seed + i + a * 100003``. A sample whose organ HU
    medians fail the quality check is regenerated (new seed, new mask draw) up to
    ``quality_check_max_attempts`` times; a sample that still fails is written and flagged
    ``"passed": false`` in the report, never passed off silently.

    Returns
    -------
    dict[str, Any]
        The run report (also written to ``<output_dir>/generation_report.json``).
    """
    run = start_generation_run(inputs, output_dir, device, memory_budget_gb)
    samples = []
    for index in range(num_output_samples):
        sources: dict[int, str] = {}

        def attempt(number: int, index: int = index, sources: dict[int, str] = sources) -> tuple[np.ndarray, np.ndarray]:
            seed = sample_seed(random_seed, index, number)
            with timed(run.timings, "mask_s"):
                mask, sources[number] = mask_source.mask_for(index, seed)
            image = generate_ct_image(mask, inputs, networks, scheduler, seed, run.device, run.decode_plan, run.timings, progress)
            return image, np.asarray(mask).reshape(image.shape)

        image, labels, report, attempts = generate_with_quality_check(
            attempt, quality_check_max_attempts, lambda image, labels: check_ct_quality(image, labels, ct_statistics)
        )
        seed = sample_seed(random_seed, index, attempts - 1)
        samples.append(_write_sample(run.output_dir, index, seed, image, labels, inputs, report, sources[attempts - 1]))
    return run.finish(settings, samples)


def _write_sample(
    output_dir: Path,
    index: int,
    seed: int,
    image: np.ndarray,
    labels: np.ndarray,
    inputs: CTGenerationInputs,
    report: QualityReport,
    source: str,
) -> dict[str, Any]:
    names = sample_filenames(output_dir, index, seed, inputs.image_output_ext, inputs.label_output_ext)
    write_volume(image, names["image"], inputs.spacing, np.int16)
    write_label_volume(labels, names["label"], inputs.spacing)
    preview_png(image, labels, names["preview"], spacing=inputs.spacing)
    if not report.passed:
        logger.warning("sample %d failed the quality check after %d attempt(s): %s", index, report.attempts, report.summary())
    return {
        "index": index,
        "seed": seed,
        "mask_source": source,
        "image": str(names["image"]),
        "label": str(names["label"]),
        "preview": str(names["preview"]),
        "quality_check": report,
    }


def check_weight_files(paths: Mapping[str, str | os.PathLike | None], bundle_root: str | os.PathLike) -> None:
    """
    Check that every needed weights or database file exists, before anything loads.

    Parameters
    ----------
    paths
        config id -> path; ``None`` entries are not needed by this run and are skipped.
    bundle_root
        the bundle folder, for the download command in the message.

    Raises
    ------
    FileNotFoundError
        listing every missing file with its config id and the download command.
    """
    missing = [f"{name}={path}" for name, path in paths.items() if path is not None and not Path(path).exists()]
    if missing:
        raise FileNotFoundError(
            "missing file(s): "
            + ", ".join(missing)
            + f". Download the published files with `python -m monai.bundle download_large_files --bundle_path {bundle_root}`"
            + f" (URLs are in {Path(bundle_root) / 'large_files.yml'}), or point these ids at your own files."
        )


def check_run_settings(num_output_samples: Any, random_seed: Any, quality_check_max_attempts: Any) -> None:
    """Check the run-level ids; each error names the id, the value and what is allowed."""
    for name, value, minimum in (
        ("num_output_samples", num_output_samples, 1),
        ("random_seed", random_seed, 0),
        ("quality_check_max_attempts", quality_check_max_attempts, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}.")


def needed_files(inputs: CTGenerationInputs, mask_path: str | None, files: Mapping[str, str]) -> dict[str, str | None]:
    """The subset of ``files`` (config id -> path) that this run reads, depending on its mask source."""
    needed = {k: files[k] for k in ("trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path")}
    if mask_path is not None:
        needed["mask_path"] = mask_path
    elif inputs.generates_mask:
        for key in ("trained_mask_generation_autoencoder_path", "trained_mask_generation_diffusion_path", "all_anatomy_size_condtions_json"):
            needed[key] = files[key]
    else:
        needed["all_mask_files_json"] = files["all_mask_files_json"]
    return needed


def load_diffusion_unet(diffusion_unet: torch.nn.Module, trained_diffusion_path: str | os.PathLike, device: torch.device | str) -> float:
    """
    Load the diffusion UNet weights strictly from ``{"unet_state_dict", "scale_factor", ...}``.

    Parameters
    ----------
    diffusion_unet
        the UNet, loaded in place.
    trained_diffusion_path
        the checkpoint file (config id ``trained_diffusion_path``).
    device
        the ``map_location`` of the load.

    Returns
    -------
    float
        the latent scale factor stored with the weights.

    Raises
    ------
    KeyError
        the file has no ``scale_factor`` entry.
    """
    from .checkpoint import load_network_weights

    extras = load_network_weights(diffusion_unet, trained_diffusion_path, state_dict_key="unet_state_dict", map_location=device)
    if "scale_factor" not in extras:
        raise KeyError(f"trained_diffusion_path={trained_diffusion_path} has no 'scale_factor' entry.")
    return float(extras["scale_factor"])


def load_pair_networks(
    autoencoder: torch.nn.Module,
    diffusion_unet: torch.nn.Module,
    controlnet: torch.nn.Module,
    trained_autoencoder_path: str | os.PathLike,
    trained_diffusion_path: str | os.PathLike,
    trained_controlnet_path: str | os.PathLike,
    device: torch.device | str,
) -> Networks:
    """
    Load the published (or fine-tuned) weights strictly and return the networks in eval mode.

    Formats: plain state dict (autoencoder), ``{"unet_state_dict", "scale_factor", ...}`` (diffusion
    UNet), ``{"controlnet_state_dict", ...}`` (ControlNet). The scale factor comes from the UNet file.
    """
    from .checkpoint import load_network_weights

    load_network_weights(autoencoder, trained_autoencoder_path, map_location=device)
    scale_factor = load_diffusion_unet(diffusion_unet, trained_diffusion_path, device)
    load_network_weights(controlnet, trained_controlnet_path, state_dict_key="controlnet_state_dict", map_location=device)
    return Networks(
        autoencoder=autoencoder.to(device).eval(),
        diffusion_unet=diffusion_unet.to(device).eval(),
        controlnet=controlnet.to(device).eval(),
        scale_factor=scale_factor,
    )


def build_mask_source(
    inputs: CTGenerationInputs,
    mask_path: str | None,
    all_mask_files_json: str,
    all_mask_files_base_dir: str,
    num_output_samples: int,
    device: torch.device | str,
    augment_masks: bool = True,
    generate_mask: Callable[[int], MetaTensor] | None = None,
) -> MaskSource:
    """
    Choose the mask source: a user file (``mask_path``), the mask generator (``controllable_anatomy_size``)
    or the candidate database (``body_region`` + ``anatomy_list``).
    """
    device = torch.device(device)
    if mask_path is not None:
        return UserMaskSource(mask_path, inputs, device)
    if inputs.generates_mask:
        if generate_mask is None:
            raise ValueError("controllable_anatomy_size needs the mask-generation networks (generate_mask).")
        return GeneratedMaskSource(generate_mask)
    from .masks import load_candidate_database

    candidates = load_candidate_database(all_mask_files_json, all_mask_files_base_dir)
    return DatabaseMaskSource(candidates, inputs, num_output_samples, device, augment=augment_masks)


def build_mask_generator(
    inputs: CTGenerationInputs,
    autoencoder: torch.nn.Module | Callable[[], torch.nn.Module],
    diffusion_unet: torch.nn.Module | Callable[[], torch.nn.Module],
    trained_mask_generation_autoencoder_path: str | os.PathLike,
    trained_mask_generation_diffusion_path: str | os.PathLike,
    all_anatomy_size_condtions_json: str | os.PathLike,
    label_dict_remap_json: str | os.PathLike,
    label_dict_json: str | os.PathLike,
    noise_scheduler: Scheduler,
    latent_shape: Sequence[int],
    device: torch.device | str,
    memory_budget_gb: float | None = None,
    progress: bool = True,
) -> Callable[[int], MetaTensor] | None:
    """
    The mask generator of ``controllable_anatomy_size`` runs as ``seed -> mask``, or ``None`` when the run
    does not generate masks.

    ``autoencoder`` and ``diffusion_unet`` may be networks or factories that build them (the config's
    ``mask_generation_*_def`` use ``"_mode_": "callable"``): a factory is called only when the run generates
    masks, so other runs never build the mask networks (about 200M parameters) nor load their weights.
    """
    if not inputs.generates_mask:
        return None
    from .checkpoint import load_network_weights
    from .labels import channel_to_label_table, load_channel_table, load_label_dict
    from .mask_generation import MaskGenerationNetworks, generate_mask, load_size_condition_database

    device = torch.device(device)
    autoencoder = autoencoder if isinstance(autoencoder, torch.nn.Module) else autoencoder()
    diffusion_unet = diffusion_unet if isinstance(diffusion_unet, torch.nn.Module) else diffusion_unet()
    load_network_weights(autoencoder, trained_mask_generation_autoencoder_path, map_location=device)
    extras = load_network_weights(
        diffusion_unet, trained_mask_generation_diffusion_path, state_dict_key="unet_state_dict", map_location=device
    )
    networks = MaskGenerationNetworks(
        autoencoder=autoencoder.to(device).eval(),
        diffusion_unet=diffusion_unet.to(device).eval(),
        noise_scheduler=noise_scheduler,
        scale_factor=float(extras.get("scale_factor", 1.0)),
    )
    database = load_size_condition_database(all_anatomy_size_condtions_json, config_id="all_anatomy_size_condtions_json")
    channel_to_label = channel_to_label_table(load_channel_table(label_dict_remap_json))
    label_dict = load_label_dict(label_dict_json)

    def generate(seed: int) -> MetaTensor:
        mask, _ = generate_mask(
            networks,
            list(inputs.controllable_anatomy_size),
            database,
            inputs.output_size,
            inputs.spacing,
            seed,
            device,
            channel_to_label=channel_to_label,
            label_dict=label_dict,
            latent_shape=latent_shape,
            num_inference_steps=inputs.mask_generation_num_inference_steps,
            num_splits=inputs.autoencoder_tp_num_splits,
            memory_budget_gb=memory_budget_gb,
            progress=progress,
        )
        return mask

    return generate


# ----------------------------------------------------------------------------------------------------
# MR: image-only, or image-from-mask with a (user-trained) ControlNet
# ----------------------------------------------------------------------------------------------------

MR_MASK_FREE_SOURCE = "none (image only)"
MR_REFERENCE_PERCENTILE = 99.5  # the training normalisation maps this percentile to 1, i.e. to MR_SCALE units


@dataclass
class MRMask:
    """
    A user label map for MR image-from-mask generation, at the requested geometry.

    Attributes
    ----------
    source
        where it came from (``"user:<path>"``).
    labels
        (1, X, Y, Z) raw label ids (e.g. BraTS 401-403), as written next to the image.
    controlnet_ids
        the same map with ids above 255 mapped into the ControlNet range
        (``labels.remap_mr_labels_for_controlnet``).
    """

    source: str
    labels: torch.Tensor
    controlnet_ids: torch.Tensor


def load_mr_mask(
    mask_path: str | os.PathLike | None, inputs: MRGenerationInputs, controlnet_label_mapping: Mapping[Any, Any] | None = None
) -> MRMask | None:
    """
    Load, check, resample (nearest, pad/crop) and encode the MR ``mask_path``; ``None`` for image-only runs.

    Runs before any weights load, so an unusable mask or an unmapped id above 255 fails in seconds.

    Raises
    ------
    FileNotFoundError, ValueError
        naming ``mask_path`` (missing file, not a label map, no foreground at the requested geometry) or
        ``controlnet_label_mapping`` (ids above 255 without a mapping entry).
    """
    mapping = check_controlnet_label_mapping(controlnet_label_mapping)
    if mask_path is None:
        return None
    mask = resample_mask(load_user_mask(mask_path, "cpu"), inputs.spacing, inputs.output_size)
    if not bool((mask > 0).any()):
        raise ValueError(
            f"mask_path={mask_path} has no foreground label left at output_size={list(inputs.output_size)}, "
            f"spacing={list(inputs.spacing)} (the field of view misses the labelled region)."
        )
    try:
        encoded = remap_mr_labels_for_controlnet(mask.as_tensor(), mapping)
    except ValueError as error:
        raise ValueError(f"mask_path={mask_path}: {error} Add the ids to controlnet_label_mapping.") from error
    return MRMask(source=f"user:{mask_path}", labels=mask.as_tensor(), controlnet_ids=encoded)


def mr_needed_files(mask_path: str | None, files: Mapping[str, str]) -> dict[str, str | None]:
    """The files (config id -> path) an MR run reads: the ControlNet and the mask only for image-from-mask."""
    needed = {k: files[k] for k in ("trained_autoencoder_path", "trained_diffusion_path")}
    if mask_path is not None:
        needed["trained_controlnet_path"] = files["trained_controlnet_path"]
        needed["mask_path"] = mask_path
    return needed


def load_mr_networks(
    autoencoder: torch.nn.Module,
    diffusion_unet: torch.nn.Module,
    controlnet: torch.nn.Module,
    trained_autoencoder_path: str | os.PathLike,
    trained_diffusion_path: str | os.PathLike,
    trained_controlnet_path: str | os.PathLike | None,
    device: torch.device | str,
    use_controlnet: bool = False,
) -> Networks:
    """
    Load the MR weights strictly and return the networks in eval mode.

    The autoencoder file may be a plain state dict or hold it under ``"unet_state_dict"`` (both are
    published); the UNet file is ``{"unet_state_dict", "scale_factor", ...}``. The ControlNet
    (``{"controlnet_state_dict", ...}``) is loaded and moved to ``device`` only when ``use_controlnet``
    (an image-from-mask run); otherwise it is dropped.
    """
    from .checkpoint import load_network_weights

    load_network_weights(autoencoder, trained_autoencoder_path, state_dict_key="unet_state_dict", map_location=device)
    scale_factor = load_diffusion_unet(diffusion_unet, trained_diffusion_path, device)
    loaded_controlnet = None
    if use_controlnet:
        if trained_controlnet_path is None:
            raise ValueError("trained_controlnet_path=None: image-from-mask generation (mask_path) needs a trained ControlNet.")
        load_network_weights(controlnet, trained_controlnet_path, state_dict_key="controlnet_state_dict", map_location=device)
        loaded_controlnet = controlnet.to(device).eval()
    return Networks(
        autoencoder=autoencoder.to(device).eval(),
        diffusion_unet=diffusion_unet.to(device).eval(),
        controlnet=loaded_controlnet,
        scale_factor=scale_factor,
    )


def build_mr_conditions(inputs: MRGenerationInputs, mask: MRMask | None, device: torch.device, dtype: torch.dtype) -> SamplingConditions:
    """
    Spacing and modality conditions of an MR sample, plus the bit-plane mask when generating from a mask.

    Classifier-free guidance (``cfg_guidance_scale``) contrasts the modality with the null class 0; the
    mask is the same in both branches.
    """
    controlnet_cond = None
    if mask is not None:
        ids = mask.controlnet_ids.reshape(1, 1, *mask.controlnet_ids.shape[-3:]).to(device)
        controlnet_cond = binarize_labels(ids, dtype=dtype)
    return SamplingConditions(
        spacing=spacing_condition(inputs.spacing),
        class_labels=torch.tensor([inputs.modality]),
        controlnet_cond=controlnet_cond,
    ).to(device, dtype)


def generate_mr_image(
    inputs: MRGenerationInputs,
    networks: Networks,
    scheduler: Scheduler,
    seed: int,
    device: torch.device,
    decode_plan: DecodePlan,
    timings: dict[str, float],
    mask: MRMask | None = None,
    zero_outside_mask: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """
    Generate one MR image (int16, arbitrary units, 1000 ~ the 99.5th percentile, no negative values).

    With ``mask`` the ControlNet conditions the sampling on it; ``zero_outside_mask`` then also sets the
    voxels of label 0 to 0 (use it only for masks that cover the whole body, e.g. with a body label).
    """
    if mask is not None and networks.controlnet is None:
        raise ValueError("a mask was given but no ControlNet is loaded (load_mr_networks(use_controlnet=True)).")
    decoded = sample_and_decode(
        inputs,
        networks,
        scheduler,
        lambda dtype: build_mr_conditions(inputs, mask, device, dtype),
        None if mask is None else networks.controlnet,
        seed,
        device,
        decode_plan,
        timings,
        progress,
    )
    image = to_mr_intensity(decoded)
    if mask is not None and zero_outside_mask:
        return np.asarray(finalize_mr(image, mask.labels.reshape(image.shape).numpy()))
    return np.round(image).astype(np.int16)  # to_mr_intensity already clipped to [0, int16 max]


def generate_mr_images(
    inputs: MRGenerationInputs,
    networks: Networks,
    scheduler: Scheduler,
    mask: MRMask | None = None,
    *,
    num_output_samples: int,
    random_seed: int,
    output_dir: str | os.PathLike,
    device: torch.device | str,
    zero_outside_mask: bool = False,
    memory_budget_gb: float | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """
    Generate ``num_output_samples`` MR images (sample ``i`` uses seed ``random_seed + i``) and write each
    as int16 with the requested spacing in its affine, with a PNG preview (and the resampled raw-id
    label map for image-from-mask runs), plus ``<output_dir>/generation_report.json``.

    Returns
    -------
    dict[str, Any]
        The run report.
    """
    run = start_generation_run(inputs, output_dir, device, memory_budget_gb)
    samples = []
    labels = None if mask is None else mask.labels.reshape(inputs.output_size).numpy()
    for index in range(num_output_samples):
        seed = sample_seed(random_seed, index)
        image = generate_mr_image(
            inputs, networks, scheduler, seed, run.device, run.decode_plan, run.timings, mask, zero_outside_mask, progress
        )
        names = sample_filenames(run.output_dir, index, seed, inputs.image_output_ext, inputs.image_output_ext)
        write_volume(image, names["image"], inputs.spacing, np.int16, config_id="image_output_ext")
        sample: dict[str, Any] = {
            "index": index,
            "seed": seed,
            "mask_source": MR_MASK_FREE_SOURCE if mask is None else mask.source,
            "image": str(names["image"]),
            "preview": str(names["preview"]),
            "intensity_percentile_99_5": float(np.percentile(image, MR_REFERENCE_PERCENTILE)),
        }
        if labels is not None:
            write_label_volume(labels, names["label"], inputs.spacing, config_id="image_output_ext")
            sample["label"] = str(names["label"])
        preview_png(image, labels, names["preview"], window=None, spacing=inputs.spacing)
        samples.append(sample)
    return run.finish(settings, samples)
