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
"""Unconditional sampling and reconstruction inference: weight loading, seeded generation, NIfTI and PNG output."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer, LatentDiffusionInferer
from monai.networks.schedulers import Scheduler
from PIL import Image

from .checkpoint import atomic_write, is_main_process, load_network_weights, unwrap_module
from .data import check_choice

logger = logging.getLogger(__name__)

DIFFUSION_STATE_DICT_KEY = "unet_state_dict"
SCHEDULERS = ("ddim", "ddpm")


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


def to_display(image: np.ndarray) -> np.ndarray:
    """Turn a (H, W) slice in RAS array order into a radiological-view uint8 picture (anterior up, patient left on the right)."""
    clipped = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return np.round(np.flipud(clipped.T)[:, ::-1] * 255).astype(np.uint8)


def write_slice(image: np.ndarray, output_dir: str | os.PathLike, stem: str, pixdim: float = 1.0) -> tuple[Path, Path]:
    """
    Write a 2D slice as ``<stem>.nii.gz`` (float32, values as given, ``pixdim`` mm pixels) and ``<stem>.png``.

    Both files are written atomically. The NIfTI affine is ``diag(pixdim, pixdim, 1, 1)``, with array axes
    in RAS order as the training data (``Orientationd(axcodes="RAS")``).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {data.shape}.")
    affine = np.diag([pixdim, pixdim, 1.0, 1.0])
    nii_path, png_path = output_dir / f"{stem}.nii.gz", output_dir / f"{stem}.png"
    atomic_write(nii_path, lambda tmp: nib.save(nib.Nifti1Image(data[..., None], affine), tmp))
    atomic_write(png_path, lambda tmp: Image.fromarray(to_display(data)).save(tmp, format="PNG"))
    return nii_path, png_path


@torch.no_grad()
def generate_samples(
    inferer: LatentDiffusionInferer,
    autoencoder: torch.nn.Module,
    diffusion: torch.nn.Module,
    scheduler: Scheduler,
    latent_shape: Sequence[int],
    num_output_samples: int,
    random_seed: int,
    device: torch.device | str,
    output_dir: str | os.PathLike,
    output_prefix: str = "sample",
    settings: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """
    Sample ``num_output_samples`` slices, write each as NIfTI and PNG, and write ``inference_report.json``.

    Sample ``i`` starts from noise drawn with seed ``random_seed + i``, so a sample does not depend on how
    many others are generated with it, and the same seed always gives the same image. Values are clipped
    to [0, 1], the intensity range of the training data.

    Parameters
    ----------
    settings
        the run's settings, copied into the report.

    Returns
    -------
    list[dict[str, Any]]
        One record per sample: file paths, seed, shape and value range.
    """
    autoencoder, diffusion = unwrap_module(autoencoder).eval(), unwrap_module(diffusion).eval()
    records = []
    for index in range(num_output_samples):
        seed = random_seed + index
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
        image = inferer.sample(
            input_noise=noise, autoencoder_model=autoencoder, diffusion_model=diffusion, scheduler=scheduler, verbose=True
        )
        array = image[0, 0].float().clamp(0.0, 1.0).cpu().numpy()
        nii_path, png_path = write_slice(array, output_dir, f"{output_prefix}_{index:04d}_seed{seed}")
        records.append(
            {
                "nifti": str(nii_path),
                "png": str(png_path),
                "seed": seed,
                "shape": list(array.shape),
                "min": float(array.min()),
                "max": float(array.max()),
            }
        )
        logger.info("wrote %s", nii_path)
    write_report(Path(output_dir) / "inference_report.json", {"settings": dict(settings or {}), "samples": records})
    return records


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Write ``report`` as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=str)))
    return path


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
