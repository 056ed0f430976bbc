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
The generation engine shared by CT and MR: loaded networks, a ``monai.engines.Workflow`` that iterates over the
samples of a run, and the handlers that write each sample's volumes, preview and record and the run report.

A bundle's generator (``generation_ct.CTPairGenerator``, ``generation_mr.MRImageGenerator``) subclasses
:class:`GenerationEngine` and implements :meth:`GenerationEngine.generate` for one sample. The engine splits the
samples over ``torch.distributed`` ranks (sample ``k`` goes to rank ``k % world_size``; seeds do not depend on
the split), skips samples an earlier run with the same settings finished, and fires
``GenerationEvents.RUN_FINISHED`` on every rank at the end, when the report is merged on rank 0.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, EventEnum, Events
from monai.engines import Workflow
from tqdm import tqdm

from .checkpoint import load_network_weights
from .decode import LatentDecoder
from .distributed import barrier, rank_and_world_size
from .labels import label_output_dtype
from .preview import preview_png
from .sample_store import SampleStore
from .settings import GenerationSettings, RequiredFiles, SampleTask
from .dicom import write_dicom_segmentation, write_dicom_series
from .writers import DICOM_EXT, write_volume

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationEngine",
    "GenerationEvents",
    "GenerationNetworks",
    "PreviewWriter",
    "SampleProgress",
    "SampleRecordWriter",
    "SampleWriter",
    "latent_shape_of",
    "load_generation_networks",
    "timed",
]

LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 4  # the autoencoder compresses each spatial axis by 4


def latent_shape_of(output_size: tuple[int, ...]) -> tuple[int, ...]:
    """The ``(C, X, Y, Z)`` latent shape of an image of ``output_size`` voxels (each a multiple of 4)."""
    return (LATENT_CHANNELS, *(s // LATENT_DOWNSAMPLE for s in output_size))


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall-clock seconds of the ``with`` block to ``timings[phase]``."""
    start = time.perf_counter()
    yield
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GenerationNetworks:
    """
    The networks of a generation run, weights loaded, in eval mode on ``device``.

    Attributes
    ----------
    autoencoder
        the MAISI VAE (its decoder turns latents into images).
    diffusion_unet
        the latent diffusion UNet.
    controlnet
        the ControlNet conditioning the UNet on a mask, ``None`` for image-only runs.
    scale_factor
        the latent scale factor stored with the UNet weights.
    device
        where the networks run.
    """

    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    controlnet: torch.nn.Module | None
    scale_factor: float
    device: torch.device

    @property
    def latent_decoder(self) -> LatentDecoder:
        """``autoencoder.decode_stage_2_outputs(z / scale_factor)`` as a module."""
        return LatentDecoder(self.autoencoder, self.scale_factor)


def load_generation_networks(
    autoencoder: torch.nn.Module,
    diffusion_unet: torch.nn.Module,
    controlnet: torch.nn.Module | Callable[[], torch.nn.Module] | None,
    files: RequiredFiles,
    device: torch.device | str,
) -> GenerationNetworks:
    """
    Load the published (or fine-tuned) weights strictly and return the networks in eval mode.

    The files come from the checked settings (``settings.files``), so this runs only after every check passed:
    ``trained_autoencoder_path`` (a plain state dict, or one under ``"unet_state_dict"``; both are published),
    ``trained_diffusion_path`` (``{"unet_state_dict", "scale_factor", ...}``) and, when the run uses a
    ControlNet, ``trained_controlnet_path`` (``{"controlnet_state_dict", ...}``). ``controlnet`` may be a
    factory (a ``"_mode_": "callable"`` definition): it is built only when the run needs it.

    Raises
    ------
    FileNotFoundError
        a needed file is missing (listed with the download command).
    KeyError
        the UNet file has no ``scale_factor``.
    """
    files.require()
    device = torch.device(device)
    load_network_weights(autoencoder, files["trained_autoencoder_path"], state_dict_key="unet_state_dict", map_location=device)
    extras = load_network_weights(
        diffusion_unet, files["trained_diffusion_path"], state_dict_key="unet_state_dict", map_location=device
    )
    if "scale_factor" not in extras:
        raise KeyError(f"trained_diffusion_path={str(files['trained_diffusion_path'])!r} has no 'scale_factor' entry.")
    loaded_controlnet = None
    if "trained_controlnet_path" in files and controlnet is not None:
        loaded_controlnet = controlnet if isinstance(controlnet, torch.nn.Module) else controlnet()
        load_network_weights(
            loaded_controlnet, files["trained_controlnet_path"], state_dict_key="controlnet_state_dict", map_location=device
        )
        loaded_controlnet = loaded_controlnet.to(device).eval()
    return GenerationNetworks(
        autoencoder=autoencoder.to(device).eval(),
        diffusion_unet=diffusion_unet.to(device).eval(),
        controlnet=loaded_controlnet,
        scale_factor=float(extras["scale_factor"]),
        device=device,
    )


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


class GenerationEvents(EventEnum):
    """Fired by :class:`GenerationEngine`: ``RUN_FINISHED`` once per process, also when nothing was left to do."""

    RUN_FINISHED = "generation_run_finished"


class GenerationEngine(Workflow):
    """
    Iterate over this process's unfinished samples; ``engine.state.output`` is what :meth:`generate` returns.

    Parameters
    ----------
    settings
        the checked run settings (requests, seeds, fingerprints).
    networks
        the loaded networks.
    sampler
        the denoising loop (``sampler.LatentSampler``).
    decoder
        the memory-planned latent decoder (``decode.PlannedDecoder``).
    store
        the output folder (names, records, resume).
    handlers
        ignite handlers: writers, previews, the record and report writer, progress.
    """

    def __init__(
        self,
        settings: GenerationSettings,
        networks: GenerationNetworks,
        sampler: Any,
        decoder: Any,
        store: SampleStore,
        handlers: list[Any] | None = None,
    ) -> None:
        super().__init__(
            device=networks.device,
            max_epochs=1,
            data_loader=[],
            epoch_length=0,
            decollate=False,
            event_names=[GenerationEvents],
            handlers=handlers,
        )
        self.settings = settings
        self.networks = networks
        self.sampler = sampler
        self.decoder = decoder
        self.store = store
        self.tasks = settings.tasks()
        self.fingerprints = {task.stem: settings.fingerprint(settings.requests[task.request_index]) for task in self.tasks}
        rank, world_size = rank_and_world_size()
        self.assigned = self.tasks[rank::world_size]
        self.pending: list[SampleTask] = []

    def run(self) -> None:  # type: ignore[override]
        """Generate every unfinished sample of this rank, then fire ``RUN_FINISHED``."""
        rank, _ = rank_and_world_size()
        if rank == 0:
            self.store.output_dir.mkdir(parents=True, exist_ok=True)
            if self.store.overwrite:
                self.store.remove_conflicts(self.fingerprints)
        barrier()
        self.pending = [t for t in self.assigned if not self.store.is_complete(t, self.fingerprints[t.stem])]
        done = len(self.assigned) - len(self.pending)
        if done:
            logger.info("rank %d: %d of its %d samples are already complete in %s; skipping them.", rank, done, len(self.assigned), self.store.output_dir)
        if self.pending:
            self.data_loader = self.pending
            self.state.epoch_length = len(self.pending)
            super().run()
        self.fire_event(GenerationEvents.RUN_FINISHED)

    def _iteration(self, engine: Engine, task: SampleTask) -> dict[str, Any]:
        start = time.perf_counter()
        request = self.settings.requests[task.request_index]
        output = self.generate(task, request)
        output["entry"].setdefault("timings", {})["total_s"] = time.perf_counter() - start
        return {"task": task, "request": request, "fingerprint": self.fingerprints[task.stem], **output}

    def generate(self, task: SampleTask, request: Any) -> dict[str, Any]:
        """
        Generate one sample.

        Returns
        -------
        dict[str, Any]
            ``{"image": (X, Y, Z) int16 array, "labels": (X, Y, Z) ids or None, "entry": report fields}``; the
            entry holds at least ``seed`` and ``mask_source`` and gets ``timings``.
        """
        raise NotImplementedError

    def denoise(
        self, seed: int, request: Any, conditions: Callable[[torch.dtype], Any], controlnet: torch.nn.Module | None, timings: dict[str, float]
    ) -> torch.Tensor:
        """
        Denoise the seeded noise of one sample (fp16 autocast only on CUDA); adds ``diffusion_s`` to ``timings``.

        The start noise is drawn on the CPU, so a seed gives the same sample on any device type.
        """
        device = self.networks.device
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        shape = (1, *latent_shape_of(request.output_size))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
        with timed(timings, "diffusion_s"), torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            return self.sampler(
                self.networks.diffusion_unet,
                noise,
                conditions(dtype),
                controlnet=controlnet,
                generator=torch.Generator(device=device).manual_seed(seed),
            )

    def decode(self, latent: torch.Tensor, timings: dict[str, float]) -> np.ndarray:
        """Decode a latent with the planned decoder; adds ``decode_s`` to ``timings``; returns (X, Y, Z) float32."""
        with timed(timings, "decode_s"):
            image = self.decoder(self.networks.latent_decoder, latent)
        return image[0, 0].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------------


class SampleWriter:
    """
    Write each sample's image (int16) and label map (raw ids, smallest integer dtype) with its spacing.

    With ``.dcm`` the image is a DICOM series and the label map a DICOM Segmentation (``dicom.py``).

    Parameters
    ----------
    store
        the output folder.
    modality
        ``"CT"`` or ``"MR"``: the DICOM modality and pixel convention.
    label_dict
        label name -> id, naming the DICOM segments (``settings.label_dict``); ``None``: ``label <id>``.
    """

    def __init__(self, store: SampleStore, modality: str = "CT", label_dict: Mapping[str, int] | None = None) -> None:
        self.store = store
        self.modality = modality
        self.label_names = {int(v): k for k, v in (label_dict or {}).items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        task = output["task"]
        paths = self.store.paths(task)
        spacing = output["request"].spacing
        identity = f"{task.stem}-{output['fingerprint']}"
        if self.store.image_ext == DICOM_EXT:
            write_dicom_series(output["image"], paths["image"], spacing, self.modality, identity)
        else:
            write_volume(output["image"], paths["image"], spacing, np.int16, config_id="image_output_ext")
        output["entry"]["image"] = str(paths["image"])
        labels = output.get("labels")
        if labels is not None and "label" in paths:
            if self.store.label_ext == DICOM_EXT:
                write_dicom_segmentation(labels, paths["label"], paths["image"], self.label_names, identity)
            else:
                dtype = label_output_dtype(int(labels.max()) if labels.size else 0)
                write_volume(labels.astype(dtype), paths["label"], spacing, dtype, config_id="label_output_ext")
            output["entry"]["label"] = str(paths["label"])


class PreviewWriter:
    """
    Write each sample's PNG preview (axial, coronal, sagittal views with the label overlay).

    Parameters
    ----------
    store
        the output folder.
    window
        the intensity window, e.g. ``[-1000, 1000]`` HU for CT; ``None`` for percentiles (MR).
    """

    def __init__(self, store: SampleStore, window: tuple[float, float] | list[float] | None = None) -> None:
        self.store = store
        self.window = None if window is None else tuple(float(w) for w in window)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        path = self.store.paths(output["task"])["preview"]
        preview_png(output["image"], output.get("labels"), path, window=self.window, spacing=output["request"].spacing)
        output["entry"]["preview"] = str(path)


class SampleRecordWriter:
    """
    Record each finished sample (after its files) and merge the run report on rank 0 when the run finishes.

    Attach it after the writers: a record marks its sample complete.

    Parameters
    ----------
    store
        the output folder.
    settings
        the run settings; the report serialises them (``settings.to_dict()``).
    """

    def __init__(self, store: SampleStore, settings: GenerationSettings) -> None:
        self.store = store
        self.settings = settings
        self.report: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(GenerationEvents.RUN_FINISHED, self.merge)

    def record(self, engine: Engine) -> None:
        output = engine.state.output
        if "image" not in output["entry"]:
            raise RuntimeError("SampleRecordWriter must be attached after SampleWriter (a record marks a sample complete).")
        self.store.write_record(output["task"], output["fingerprint"], output["entry"])

    def merge(self, engine: GenerationEngine) -> None:
        barrier()
        if rank_and_world_size()[0] == 0:
            self.report = self.store.merge_report(engine.tasks, self.settings.to_dict(), device=engine.state.device)
            missing = self.report["settings"]["missing_samples"]
            if missing:
                logger.warning("%d samples are not finished: %s", len(missing), missing[:5])
            logger.info("wrote %s (%d samples).", self.store.report_path, len(self.report["samples"]))


class SampleProgress:
    """
    One progress bar per process: samples done out of the process's share (finished earlier runs included).

    Parameters
    ----------
    enabled
        show the bar (the ``progress`` id).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def attach(self, engine: GenerationEngine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.step)
        engine.add_event_handler(GenerationEvents.RUN_FINISHED, self.close)

    def start(self, engine: GenerationEngine) -> None:
        rank, world_size = rank_and_world_size()
        desc = "samples" if world_size == 1 else f"rank {rank} samples"
        done = len(engine.assigned) - len(engine.pending)
        self.bar = tqdm(total=len(engine.assigned), initial=done, desc=desc, unit="sample", disable=not self.enabled, position=rank)

    def step(self, engine: GenerationEngine) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self, engine: GenerationEngine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def entry_of(task: SampleTask, seed: int, mask_source: str, timings: Mapping[str, float], **fields: Any) -> dict[str, Any]:
    """The report entry of a sample: request, index, seed, mask source, timings and any further fields."""
    return {"request_id": task.request_id, "index": task.index, "seed": seed, "mask_source": mask_source, "timings": dict(timings), **fields}


def environment_rank() -> int:
    """``LOCAL_RANK`` of a ``torchrun`` process (0 otherwise), e.g. to pick ``cuda:<rank>``."""
    return int(os.environ.get("LOCAL_RANK", "0"))
