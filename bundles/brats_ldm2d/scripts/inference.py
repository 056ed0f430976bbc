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
Unconditional sampling and reconstruction inference.

``configs/inference.json`` wires these components: ``SamplingSettings`` (the sampling ids, checked before any
weight loads), ``OutputFolder`` (where the files go; refuses to overwrite an earlier run), ``NetworkWeights``
(weight files, checked, then loaded), ``LatentSampler`` (seed -> slice), and ``SampleGenerator``, a
``monai.engines.Workflow`` that iterates over the sample requests, with ``SliceWriter`` (NIfTI + PNG) and
``SamplingReport`` (the run report) as its handlers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import NibabelWriter
from monai.engines import Workflow
from monai.inferers import Inferer, LatentDiffusionInferer
from monai.networks.schedulers import Scheduler
from PIL import Image

from .checkpoint import atomic_write, is_main_process, load_network_weights, unwrap_module
from .data import check_choice, check_positive_int, check_weights_file

logger = logging.getLogger(__name__)

DIFFUSION_STATE_DICT_KEY = "unet_state_dict"
SCHEDULERS = ("ddim", "ddpm")
SAMPLING_REPORT = "inference_report.json"
RECONSTRUCTION_REPORT = "reconstruction_report.json"


def load_diffusion_checkpoint(network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> float:
    """
    Load diffusion UNet weights and return the latent scale factor stored with them.

    This bundle's training writes ``{"unet_state_dict": ..., "scale_factor": ...}``. The published
    ``models/model.pt`` is a plain state dict without a scale factor; its training used a factor of
    about 1 and its sampler decoded latents unscaled, so 1.0 reproduces the published behaviour.
    """
    extras = load_network_weights(network, path, state_dict_key=DIFFUSION_STATE_DICT_KEY, map_location=map_location)
    if "scale_factor" not in extras:
        logger.warning("%s holds no scale_factor (published format); using 1.0", path)
        return 1.0
    return float(extras["scale_factor"])


def select_scheduler(scheduler: str, schedulers: Mapping[str, Scheduler], num_inference_steps: int) -> Scheduler:
    """
    Return the scheduler named by the config id ``scheduler``, set to ``num_inference_steps`` steps.

    Raises
    ------
    ValueError
        ``scheduler`` is not one of ``ddim``/``ddpm``, or the step count is out of range.
    """
    check_choice("scheduler", scheduler, SCHEDULERS)
    selected = schedulers[scheduler]
    if not 1 <= num_inference_steps <= selected.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is not allowed; it must be between 1 and "
            f"{selected.num_train_timesteps} (the number of training timesteps)."
        )
    selected.set_timesteps(num_inference_steps=num_inference_steps)
    return selected


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """
    The sampling ids of ``inference.json``, checked when built (before any weight loads).

    Sample ``i`` starts from noise drawn with seed ``random_seed + i``, so a sample does not depend on how
    many others are generated with it, nor on how the samples are spread over processes.

    Parameters
    ----------
    num_output_samples
        number of slices to generate (integer >= 1).
    num_inference_steps
        denoising steps (integer >= 1; the upper bound is checked by ``select_scheduler``).
    scheduler
        ``ddim`` or ``ddpm``.
    random_seed
        seed of sample 0 (an integer).
    latent_shape
        ``(channels, height, width)`` of one latent.

    Raises
    ------
    ValueError
        naming the id, the value and what is allowed.
    """

    num_output_samples: int
    num_inference_steps: int
    scheduler: str
    random_seed: int
    latent_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check_positive_int("num_output_samples", self.num_output_samples)
        check_positive_int("num_inference_steps", self.num_inference_steps)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int) or self.random_seed < 0:
            raise ValueError(f"random_seed={self.random_seed!r} is not allowed; it must be an integer >= 0.")
        shape = tuple(self.latent_shape) if isinstance(self.latent_shape, (list, tuple)) else ()
        if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            raise ValueError(
                f"latent_shape={self.latent_shape!r} is not allowed; it must be 3 integers >= 1 (channels, height, width)."
            )
        object.__setattr__(self, "latent_shape", shape)

    def requests(self) -> list[dict[str, int]]:
        """One ``{"index": i, "seed": random_seed + i}`` per sample."""
        return [{"index": index, "seed": self.random_seed + index} for index in range(self.num_output_samples)]

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the report."""
        return {**dataclasses.asdict(self), "latent_shape": list(self.latent_shape)}


class OutputFolder:
    """
    The folder a run writes into, and the rule that an earlier run there is never overwritten silently.

    Parameters
    ----------
    output_dir
        the config id ``output_dir``.
    prefix
        file-name prefix of the images (config id ``output_prefix``).
    overwrite
        the config id ``overwrite``: ``False`` refuses a folder that holds an earlier run's report or images
        with this prefix; ``True`` writes over them.
    report_name
        file name of the run report.
    """

    def __init__(
        self, output_dir: str | os.PathLike, prefix: str = "sample", overwrite: bool = False, report_name: str = SAMPLING_REPORT
    ) -> None:
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite={overwrite!r} is not allowed; it must be true or false.")
        if not isinstance(prefix, str) or not prefix or os.sep in prefix:
            raise ValueError(f"output_prefix={prefix!r} is not allowed; it must be a non-empty file-name prefix.")
        self.path = Path(output_dir)
        self.prefix = prefix
        self.overwrite = overwrite
        self.report_path = self.path / report_name

    def earlier_run(self) -> list[Path]:
        """The files of an earlier run in the folder: the report and images named with the prefix."""
        if not self.path.is_dir():
            return []
        images = [p for p in self.path.glob(f"{self.prefix}_*") if p.name.endswith((".nii.gz", ".png"))]
        return sorted(images) + ([self.report_path] if self.report_path.is_file() else [])

    def check(self) -> OutputFolder:
        """
        Refuse to write into a folder that holds an earlier run, unless ``overwrite`` is true.

        Raises
        ------
        FileExistsError
            naming ``output_dir``, a few of the files found, and the two ways out.
        """
        found = self.earlier_run()
        if found and not self.overwrite:
            shown = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise FileExistsError(
                f"output_dir={self.path} already holds an earlier run ({shown}); nothing is overwritten silently. "
                "Choose another --output_dir, or pass --overwrite true to write over it."
            )
        if found:
            logger.warning("overwrite=true: writing over the earlier run in %s", self.path)
        return self

    def stem(self, index: int, seed: int) -> str:
        """File stem of sample ``index`` drawn with ``seed``."""
        return f"{self.prefix}_{index:04d}_seed{seed}"

    def to_dict(self) -> dict[str, Any]:
        """The output settings, for the report."""
        return {"output_dir": str(self.path), "output_prefix": self.prefix, "overwrite": self.overwrite}


class NetworkWeights:
    """
    The autoencoder and UNet weight files of a sampling run: checked first, loaded when needed.

    Parameters
    ----------
    autoencoder_path
        the config id ``load_autoencoder_path``.
    diffusion_path
        the config id ``load_diffusion_path`` (plain published state dict, or this bundle's training output
        ``{"unet_state_dict", "scale_factor"}``).
    bundle_root
        bundle folder, named in the download hint of a missing file.
    device
        device the weights are mapped to.
    """

    def __init__(
        self,
        autoencoder_path: str | os.PathLike,
        diffusion_path: str | os.PathLike,
        bundle_root: str | os.PathLike,
        device: torch.device | str,
    ) -> None:
        self.autoencoder_path = Path(autoencoder_path)
        self.diffusion_path = Path(diffusion_path)
        self.bundle_root = bundle_root
        self.device = torch.device(device)

    def check(self) -> NetworkWeights:
        """Raise ``FileNotFoundError`` naming the id and the download command if a weights file is missing."""
        check_weights_file("load_autoencoder_path", self.autoencoder_path, self.bundle_root)
        check_weights_file("load_diffusion_path", self.diffusion_path, self.bundle_root)
        return self

    def load(self, autoencoder: torch.nn.Module, diffusion: torch.nn.Module) -> float:
        """Load both networks strictly and return the latent scale factor stored with the UNet (1.0 if none)."""
        load_network_weights(autoencoder, self.autoencoder_path, map_location=self.device)
        return load_diffusion_checkpoint(diffusion, self.diffusion_path, self.device)

    def to_dict(self) -> dict[str, Any]:
        """The weight files and device, for the report."""
        return {
            "load_autoencoder_path": str(self.autoencoder_path),
            "load_diffusion_path": str(self.diffusion_path),
            "device": str(self.device),
        }


class LatentSampler:
    """
    Turn a seed into a generated slice: seeded noise, denoising with ``inferer``'s scheduler, decoding.

    The noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` and then moved to the device,
    so a seed gives the same starting point on every device and in every process.

    Parameters
    ----------
    inferer
        a ``LatentDiffusionInferer`` holding the scheduler and the scale factor.
    autoencoder
        the first-stage autoencoder (its ``decode_stage_2_outputs`` decodes the latent).
    diffusion
        the diffusion UNet.
    latent_shape
        ``(channels, height, width)`` of one latent.
    device
        device the networks run on.
    """

    def __init__(
        self,
        inferer: LatentDiffusionInferer,
        autoencoder: torch.nn.Module,
        diffusion: torch.nn.Module,
        latent_shape: Sequence[int],
        device: torch.device | str,
    ) -> None:
        self.inferer = inferer
        self.autoencoder = autoencoder
        self.diffusion = diffusion
        self.latent_shape = tuple(latent_shape)
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, seed: int) -> torch.Tensor:
        """Return the slice of ``seed`` as a (H, W) float32 CPU tensor clipped to [0, 1] (the training range)."""
        noise = torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(int(seed)))
        image = self.inferer.sample(
            input_noise=noise.to(self.device),
            autoencoder_model=self.autoencoder.eval(),
            diffusion_model=self.diffusion.eval(),
            verbose=False,
        )
        return image[0, 0].float().clamp(0.0, 1.0).cpu()


class CompiledDecoder(torch.nn.Module):
    """
    An autoencoder whose ``decode_stage_2_outputs`` runs through ``torch.compile`` (``inference_compile.json``).

    ``torch.compile(autoencoder)`` would only compile ``forward``; the sampler calls the decoder.
    """

    def __init__(self, autoencoder: torch.nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.decode_stage_2_outputs = torch.compile(autoencoder.decode_stage_2_outputs, **compile_kwargs)


class SampleGenerator(Workflow):
    """
    A ``monai.engines.Workflow`` that generates one slice per sample request, one request per iteration.

    ``engine.state.output`` of an iteration is ``{"index", "seed", "image" (H, W), "seconds"}``; the handlers
    (``SliceWriter``, ``SamplingReport``, a progress bar, ...) write and report it.

    Parameters
    ----------
    device
        device the networks run on.
    samples
        the requests (``SamplingSettings.requests()``), or a ``DataLoader`` over them (batch size 1; the
        multi-GPU overlay gives it a ``DistributedSampler``).
    sampler
        seed -> image (``LatentSampler``).
    handlers
        ignite handlers with an ``attach`` method.
    """

    def __init__(
        self,
        device: torch.device | str,
        samples: Iterable[Mapping[str, Any]],
        sampler: LatentSampler,
        handlers: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=1,
            data_loader=samples,
            epoch_length=len(samples) if isinstance(samples, Sequence) else None,
            handlers=handlers,
            decollate=False,
        )
        self.sampler = sampler

    def _iteration(self, engine: SampleGenerator, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        index, seed = int(_first(batchdata["index"])), int(_first(batchdata["seed"]))
        start = time.perf_counter()
        image = engine.sampler(seed)
        return {"index": index, "seed": seed, "image": image, "seconds": time.perf_counter() - start}


def _first(value: Any) -> Any:
    """The single element of a collated batch of size 1 (or the value itself)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    return value[0] if isinstance(value, (list, tuple)) else value


def to_display(image: np.ndarray) -> np.ndarray:
    """Turn a (H, W) slice in RAS array order into a radiological-view uint8 picture (anterior up, patient left on the right)."""
    clipped = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return np.round(np.flipud(clipped.T)[:, ::-1] * 255).astype(np.uint8)


def write_slice(image: Any, output_dir: str | os.PathLike, stem: str, pixdim: float = 1.0) -> tuple[Path, Path]:
    """
    Write a 2D slice as ``<stem>.nii.gz`` (float32, values as given, ``pixdim`` mm pixels) and ``<stem>.png``.

    The NIfTI file is written by ``monai.data.NibabelWriter``; both files are written atomically. The
    affine is ``diag(pixdim, pixdim, 1, 1)``, with array axes in RAS order as the training data
    (``Orientationd(axcodes="RAS")``); the file is 3D, (H, W, 1).
    """
    output_dir = Path(output_dir)
    data = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {data.shape}.")
    nii_path, png_path = output_dir / f"{stem}.nii.gz", output_dir / f"{stem}.png"

    def write_nifti(tmp_name: str) -> None:
        writer = NibabelWriter(output_dtype=np.float32)
        writer.set_data_array(data[..., None], channel_dim=None, squeeze_end_dims=True)
        writer.data_obj = np.reshape(writer.data_obj, (*data.shape, 1))  # keep the singleton axis: (H, W, 1)
        writer.affine = np.diag([pixdim, pixdim, 1.0, 1.0])  # set directly: set_metadata would resample
        writer.write(tmp_name, verbose=False)

    atomic_write(nii_path, write_nifti)
    atomic_write(png_path, lambda tmp: Image.fromarray(to_display(data)).save(tmp, format="PNG"))
    return nii_path, png_path


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Write ``report`` as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=str)))
    return path


class SliceWriter:
    """
    Handler of a ``SampleGenerator``: writes each generated slice as NIfTI and PNG into ``output``.

    The file paths are added to the iteration's output (``"nifti"``, ``"png"``) for the report. Each
    process writes its own samples (file names carry the sample index and seed).

    Parameters
    ----------
    output
        the run's ``OutputFolder``.
    """

    def __init__(self, output: OutputFolder) -> None:
        self.output = output

    def attach(self, engine: Engine) -> None:
        """Write after every iteration."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        nii_path, png_path = write_slice(output["image"], self.output.path, self.output.stem(output["index"], output["seed"]))
        output.update({"nifti": str(nii_path), "png": str(png_path)})
        logger.info("wrote %s", nii_path)


class SamplingReport:
    """
    Handler of a ``SampleGenerator``: writes the run report ``inference_report.json`` when the run completes.

    The report holds ``settings`` (the ``to_dict()`` of each settings component, merged, plus ``extra``) and
    one record per sample (index, seed, files, shape, value range, seconds), sorted by index. Under
    ``torch.distributed`` every rank's records are gathered and rank 0 writes the one report.

    Parameters
    ----------
    output
        the run's ``OutputFolder`` (the report goes to its ``report_path``).
    settings
        components with a ``to_dict()`` (``SamplingSettings``, ``OutputFolder``, ``NetworkWeights``).
    extra
        further plain values for ``settings`` (e.g. the scale factor).
    """

    def __init__(self, output: OutputFolder, settings: Sequence[Any], extra: Mapping[str, Any] | None = None) -> None:
        self.output = output
        self.settings = list(settings)
        self.extra = dict(extra or {})
        self.records: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Collect after every iteration, write at the end."""
        engine.add_event_handler(Events.STARTED, lambda _: self.records.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        """Record the current sample (after the writer has added its files)."""
        output = engine.state.output
        image = output["image"]
        self.records.append(
            {
                "index": output["index"],
                "seed": output["seed"],
                "nifti": output.get("nifti"),
                "png": output.get("png"),
                "shape": list(image.shape),
                "min": float(image.min()),
                "max": float(image.max()),
                "seconds": round(float(output["seconds"]), 3),
            }
        )

    def write(self, engine: Engine | None = None) -> Path | None:
        """Gather every rank's records; rank 0 writes the report and returns its path."""
        records, world_size = self.records, 1
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, self.records)
            records = [record for rank_records in gathered for record in rank_records]
        if not is_main_process():
            return None
        settings: dict[str, Any] = {}
        for component in self.settings:
            settings.update(component.to_dict())
        settings.update({**self.extra, "world_size": world_size})
        report = {"settings": settings, "samples": sorted(records, key=lambda record: record["index"])}
        return write_report(self.output.report_path, report)


class ReconstructionInferer(Inferer):
    """Deterministic autoencoder reconstruction: decode the latent mean (``AutoencoderKL.reconstruct``)."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return unwrap_module(network).reconstruct(inputs)


class ReconstructionWriter:
    """
    Ignite handler for an evaluator: writes each input slice and its reconstruction as NIfTI + PNG, and
    at the end a JSON report with per-slice and mean PSNR/SSIM (from ``engine.state.metrics`` and the
    metric details). Rank 0 only.

    Parameters
    ----------
    output_dir
        output folder.
    metric_names
        names of the evaluator's metrics to report.
    """

    def __init__(self, output_dir: str | os.PathLike, metric_names: Sequence[str] = ("psnr", "ssim")) -> None:
        self.output_dir = Path(output_dir)
        self.metric_names = list(metric_names)
        self.written: list[dict[str, str]] = []

    def attach(self, engine: Engine) -> None:
        """Register the writer on the evaluator."""
        engine.add_event_handler(Events.STARTED, lambda _: self.written.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_batch)
        engine.add_event_handler(Events.COMPLETED, self.write_summary)

    def write_batch(self, engine: Engine) -> None:
        """Write the images of the current batch."""
        if not is_main_process():
            return
        for item in engine.state.output:
            index = len(self.written)
            original = item["image"][0].float().cpu().numpy()
            reconstruction = item["pred"][0].float().cpu().numpy()
            orig_nii, _ = write_slice(original, self.output_dir, f"case_{index:04d}_original")
            recon_nii, _ = write_slice(reconstruction, self.output_dir, f"case_{index:04d}_reconstruction")
            self.written.append({"original": str(orig_nii), "reconstruction": str(recon_nii)})

    def write_summary(self, engine: Engine) -> None:
        """Write ``reconstruction_report.json``."""
        if not is_main_process():
            return
        details = getattr(engine.state, "metric_details", {}) or {}
        cases = []
        for index, files in enumerate(self.written):
            per_case = {
                name: float(torch.as_tensor(details[name])[index].mean()) for name in self.metric_names if name in details
            }
            cases.append({**files, **per_case})
        report = {"mean": {n: float(engine.state.metrics[n]) for n in self.metric_names}, "cases": cases}
        write_report(self.output_dir / "reconstruction_report.json", report)
