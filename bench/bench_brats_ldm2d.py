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
Micro-benchmark of the ``brats_ldm2d`` bundle against a model-zoo-style reference iteration.

On a fixed synthetic workload (random images, fixed seeds) it measures:

1. the autoencoder (VAE-GAN) training step: this bundle's ``scripts.trainers.VAEGANTrainer._iteration``
   against the iteration of the model-zoo ``brats_mri_axial_slices_generative_diffusion`` v1.1.2
   ``VaeGanTrainer`` (discriminator gradients left enabled during the generator step);
2. the diffusion training step: this bundle's ``SupervisedTrainer`` iteration on cached latents (including
   drawing the latents from the cache) against the model-zoo ``LDMTrainer`` iteration, which encodes the
   image batch with the autoencoder every iteration (``LatentDiffusionInferer``); the bundle's one-off
   encoding (``scripts.latents.encode_volume_slices``) is reported separately, per slice;
3. unconditional sampling through this bundle's ``scripts.inference.generate_samples`` (DDIM).

The networks, losses, optimizers and schedulers are built from the bundle configs with
``monai.bundle.ConfigParser``, so both sides of each comparison run the same modules on the same batch.
The reference iterations are re-implemented here from the documented behaviour of the model-zoo
trainers (see ``ZooStyleVAEGANStep`` and ``ZooStyleLDMStep``).

Example::

    python bench/bench_brats_ldm2d.py --batch-size 2 --iterations 3 --warmup 1 --steps 10
    python bench/bench_brats_ldm2d.py --tiny --iterations 1 --warmup 0 --steps 2 --json-out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the samplers' per-step progress bars would drown the log

import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.inferers import LatentDiffusionInferer  # noqa: E402
from monai.losses import PatchAdversarialLoss  # noqa: E402

logger = logging.getLogger("bench_brats_ldm2d")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from demo.brats_presets import TINY_AUTOENCODER, TINY_DIFFUSION, TINY_DISCRIMINATOR  # noqa: E402

BUNDLE_DIR = REPO_ROOT / "bundles" / "brats_ldm2d"
CONFIG_DIR = BUNDLE_DIR / "configs"

AUTOENCODER_CONFIGS = ("train_autoencoder.json",)
DIFFUSION_CONFIGS = ("train_autoencoder.json", "train_diffusion.json")
INFERENCE_CONFIGS = ("inference.json",)

FULL_AE_IMAGE_SIZE = 240
FULL_DIFFUSION_IMAGE_SIZE = 256
TINY_IMAGE_SIZE = 32

ROW_AE = "ae_train_step"
ROW_DIFFUSION = "diffusion_train_step"
ROW_ENCODING = "latent_encoding_per_slice"
ROW_SAMPLING = "sampling_per_image"


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """
    Wall-clock statistics of one measured operation.

    Attributes:
        mean_s: mean seconds per unit over the timed repetitions.
        median_s: median seconds per unit (robust to a repetition slowed down by other processes).
        min_s: fastest repetition, seconds per unit.
        max_s: slowest repetition, seconds per unit.
        samples_s: every timed repetition, seconds per unit, in order.
        repetitions: number of timed repetitions.
        unit: what one figure is per (``iteration``, ``slice`` or ``image``).
        peak_memory_mb: peak memory in MiB (CUDA: the largest ``max_memory_allocated`` of one timed call;
            CPU: the process' maximum resident set size so far, a cumulative high-water mark).
        cpu_per_wall: process CPU seconds per wall-clock second over the timed calls. On the CPU device it
            approaches the number of torch threads when the machine is otherwise idle; a much lower value
            means other processes were competing for the cores.
    """

    mean_s: float
    median_s: float
    min_s: float
    max_s: float
    samples_s: list[float]
    repetitions: int
    unit: str
    peak_memory_mb: float
    cpu_per_wall: float


@dataclass
class Comparison:
    """A bundle timing and the matching zoo-style reference timing; speed-ups are reference / bundle."""

    bundle: Timing
    reference: Timing

    @property
    def speedup(self) -> float:
        """Reference mean time over bundle mean time (> 1 means the bundle is faster)."""
        return self.reference.mean_s / self.bundle.mean_s

    @property
    def speedup_median(self) -> float:
        """Reference median time over bundle median time."""
        return self.reference.median_s / self.bundle.median_s

    @property
    def speedup_min(self) -> float:
        """Reference fastest time over bundle fastest time."""
        return self.reference.min_s / self.bundle.min_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, speed-ups included."""
        return {
            "bundle": asdict(self.bundle),
            "reference": asdict(self.reference),
            "speedup": self.speedup,
            "speedup_median": self.speedup_median,
            "speedup_min": self.speedup_min,
        }


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that a timer read covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (the CPU high-water mark cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """
    Peak memory in MiB: allocated CUDA memory since the last reset, or the process' maximum RSS on the CPU.

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10


def measure_alternating(
    steps: Mapping[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repetitions: int,
    unit: str,
    units_per_call: int = 1,
) -> dict[str, Timing]:
    """
    Time several operations, alternating between them in every repetition (A B A B ...).

    Alternating spreads slow drifts and background load on a shared machine evenly over the operations
    being compared, instead of charging them to whichever runs second.

    Args:
        steps: name to operation; each is called ``warmup + repetitions`` times.
        device: device the work runs on (CUDA is synchronised before every timer read).
        warmup: untimed rounds first.
        repetitions: timed rounds, at least 1.
        unit: what one reported figure is per.
        units_per_call: each call's time is divided by this (e.g. slices encoded per call).

    Returns:
        Name to the statistics of its timed calls.
    """
    if repetitions < 1:
        raise ValueError(f"repetitions={repetitions} is not allowed; it must be an integer >= 1.")
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu = dict.fromkeys(steps, 0.0)
    peaks = dict.fromkeys(steps, 0.0)
    for _ in range(repetitions):
        for name, step in steps.items():
            synchronize(device)
            reset_peak_memory(device)
            cpu_start, start = time.process_time(), time.perf_counter()
            step()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
            peaks[name] = max(peaks[name], peak_memory_mb(device))
    timings = {}
    for name, seconds in wall.items():
        per_unit = [value / units_per_call for value in seconds]
        timings[name] = Timing(
            mean_s=float(np.mean(per_unit)),
            median_s=float(np.median(per_unit)),
            min_s=float(np.min(per_unit)),
            max_s=float(np.max(per_unit)),
            samples_s=per_unit,
            repetitions=repetitions,
            unit=unit,
            peak_memory_mb=peaks[name],
            cpu_per_wall=cpu[name] / sum(seconds),
        )
    return timings


def measure(
    step: Callable[[], Any], device: torch.device, warmup: int, repetitions: int, unit: str, units_per_call: int = 1
) -> Timing:
    """Time one operation after ``warmup`` untimed calls (see ``measure_alternating``)."""
    return measure_alternating({"step": step}, device, warmup, repetitions, unit, units_per_call)["step"]


def compare(
    bundle_step: Callable[[], Any],
    reference_step: Callable[[], Any],
    device: torch.device,
    warmup: int,
    repetitions: int,
) -> Comparison:
    """Time this bundle's step against the reference step, alternating, in seconds per iteration."""
    timings = measure_alternating(
        {"bundle": bundle_step, "reference": reference_step}, device, warmup, repetitions, "iteration"
    )
    return Comparison(bundle=timings["bundle"], reference=timings["reference"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy; cuDNN settings are left alone so that timings stay representative."""
    torch.manual_seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------------------------------------
# configs and synthetic data
# ----------------------------------------------------------------------------------------------------------


def import_bundle_scripts() -> ModuleType:
    """Put ``bundles/brats_ldm2d`` on ``sys.path`` and import its ``scripts`` package (the configs need it)."""
    if str(BUNDLE_DIR) not in sys.path:
        sys.path.insert(0, str(BUNDLE_DIR))
    import scripts

    return scripts


def load_parser(config_names: Sequence[str], overrides: Mapping[str, Any]) -> ConfigParser:
    """
    Read (and merge, in order) bundle config files and apply ``overrides``.

    All overrides are set before anything is parsed: setting a value resets the parser's resolved objects.

    Args:
        config_names: file names under ``bundles/brats_ldm2d/configs``.
        overrides: config id to value; values may be Python objects (a device, a dataset, a data loader).
    """
    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / name) for name in config_names])
    for config_id, value in overrides.items():
        parser[config_id] = value
    return parser


def random_images(batch_size: int, image_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of single-channel images with values in [0, 1), shape (batch_size, 1, image_size, image_size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch_size, 1, image_size, image_size), generator=generator).to(device)


def random_volume(num_slices: int, image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A synthetic (C=1, H, W, D) volume item in [0, 1), as the bundle's volume loader yields them."""
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand((1, image_size, image_size, num_slices), generator=generator)}


def repeat_forever(loader: DataLoader) -> Iterator[Any]:
    """Yield the batches of ``loader`` epoch after epoch (re-shuffling as a trainer would)."""
    while True:
        yield from loader


def latent_shape_of(parser: ConfigParser, image_size: int) -> list[int]:
    """
    Latent shape (C, h, w) that the ``AutoencoderKL`` of ``autoencoder_def`` gives for square ``image_size`` images.

    The encoder halves the resolution once per channel level after the first; read from the raw config, so
    nothing is instantiated.
    """
    factor = 2 ** (len(parser["autoencoder_def#channels"]) - 1)
    if image_size % factor:
        raise ValueError(f"image size {image_size} is not divisible by the autoencoder's downsampling {factor}.")
    latent_size = image_size // factor
    return [int(parser["autoencoder_def#latent_channels"]), latent_size, latent_size]


# ----------------------------------------------------------------------------------------------------------
# zoo-style reference iterations (re-implemented from the documented model-zoo v1.1.2 behaviour)
# ----------------------------------------------------------------------------------------------------------


def gaussian_kl(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(z_mu, z_sigma^2) || N(0, 1)), summed over the non-batch dimensions and averaged over the batch."""
    z_var = z_sigma.pow(2)
    return (0.5 * (z_mu.pow(2) + z_var - torch.log(z_var) - 1)).flatten(1).sum(dim=1).mean()


class ZooStyleVAEGANStep:
    """
    One iteration of the model-zoo ``VaeGanTrainer``.

    Generator step: ``L1 + kl_weight * KL + perceptual_weight * perceptual + adv_weight * LS-adversarial``,
    where the discriminator is evaluated on the reconstruction **with its parameter gradients enabled**
    (so the backward pass also computes discriminator weight gradients, discarded by the next
    ``zero_grad``); then one discriminator step on the detached reconstruction and the real batch.

    Args:
        generator: the autoencoder; its forward returns ``(reconstruction, z_mu, z_sigma)``.
        discriminator: a ``PatchDiscriminator`` (last output = logits).
        g_optimizer: optimizer of the generator.
        d_optimizer: optimizer of the discriminator.
        perceptual_loss: frozen perceptual loss module.
        kl_weight: weight of the KL term.
        perceptual_weight: weight of the perceptual term.
        adv_weight: weight of both adversarial terms.
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        discriminator: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        perceptual_loss: torch.nn.Module,
        kl_weight: float,
        perceptual_weight: float,
        adv_weight: float,
    ) -> None:
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.perceptual_loss = perceptual_loss
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.adv_weight = adv_weight
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the generator and discriminator updates on ``images``; return the two (detached) losses."""
        self.generator.train()
        self.discriminator.train()

        self.g_optimizer.zero_grad(set_to_none=True)
        reconstruction, z_mu, z_sigma = self.generator(images)
        fake_logits = self.discriminator(reconstruction.contiguous().float())[-1]
        g_loss = (
            F.l1_loss(reconstruction.float(), images.float())
            + self.kl_weight * gaussian_kl(z_mu, z_sigma)
            + self.perceptual_weight * self.perceptual_loss(reconstruction.float(), images.float())
            + self.adv_weight * self.adversarial(fake_logits, target_is_real=True, for_discriminator=False)
        )
        g_loss.backward()
        self.g_optimizer.step()

        self.d_optimizer.zero_grad(set_to_none=True)
        fake_logits = self.discriminator(reconstruction.contiguous().detach())[-1]
        real_logits = self.discriminator(images.contiguous().detach())[-1]
        fake_term = self.adversarial(fake_logits, target_is_real=False, for_discriminator=True)
        real_term = self.adversarial(real_logits, target_is_real=True, for_discriminator=True)
        d_loss = self.adv_weight * 0.5 * (fake_term + real_term)
        d_loss.backward()
        self.d_optimizer.step()
        return g_loss.detach(), d_loss.detach()


class ZooStyleLDMStep:
    """
    One iteration of the model-zoo ``LDMTrainer``: encode the image batch with the (frozen) autoencoder,
    noise the latents at random timesteps and regress the noise with the UNet (MSE), all through
    ``LatentDiffusionInferer.__call__``, i.e. the encoder runs in every iteration.

    Args:
        autoencoder: the frozen first-stage ``AutoencoderKL``.
        diffusion: the ``DiffusionModelUNet``.
        optimizer: optimizer of the UNet.
        inferer: ``LatentDiffusionInferer`` holding the training scheduler and scale factor.
        num_train_timesteps: timesteps are drawn uniformly from ``[0, num_train_timesteps)``.
        latent_shape: shape of one latent, (C, h, w).
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        diffusion: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inferer: LatentDiffusionInferer,
        num_train_timesteps: int,
        latent_shape: Sequence[int],
    ) -> None:
        self.autoencoder = autoencoder
        self.diffusion = diffusion
        self.optimizer = optimizer
        self.inferer = inferer
        self.num_train_timesteps = num_train_timesteps
        self.latent_shape = tuple(latent_shape)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Run one UNet update on ``images``; return the (detached) loss."""
        self.autoencoder.eval()
        self.diffusion.train()
        batch_size = images.shape[0]
        noise = torch.randn((batch_size, *self.latent_shape), device=images.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), device=images.device).long()
        self.optimizer.zero_grad(set_to_none=True)
        prediction = self.inferer(
            inputs=images,
            autoencoder_model=self.autoencoder,
            diffusion_model=self.diffusion,
            noise=noise,
            timesteps=timesteps,
        )
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# ----------------------------------------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------------------------------------


def bench_autoencoder(args: argparse.Namespace, device: torch.device, work_dir: Path) -> Comparison:
    """
    Time ``VAEGANTrainer._iteration`` (built from ``train#trainer`` of train_autoencoder.json) and the zoo-style
    VAE-GAN iteration on the same networks, optimizers, perceptual loss and batch.
    """
    seed_everything(args.seed)
    images = random_images(args.batch_size, args.image_size, args.seed, device)
    loader = DataLoader(Dataset([{"image": image} for image in images]), batch_size=args.batch_size)
    overrides = {
        "device": device,
        "bundle_root": str(work_dir),
        "random_seed": args.seed,
        "train#trainer#train_data_loader": loader,
        "train#trainer#train_handlers": [],
        **(TINY_AUTOENCODER | TINY_DISCRIMINATOR if args.tiny else {}),
    }
    parser = load_parser(AUTOENCODER_CONFIGS, overrides)
    latent_shape_of(parser, args.image_size)  # fail early on an image size the autoencoder cannot reconstruct
    trainer = parser.get_parsed_content("train#trainer")
    batch = {"image": images}

    reference_step = ZooStyleVAEGANStep(
        generator=parser.get_parsed_content("gnetwork"),
        discriminator=parser.get_parsed_content("dnetwork"),
        g_optimizer=parser.get_parsed_content("optimizer_g"),
        d_optimizer=parser.get_parsed_content("optimizer_d"),
        perceptual_loss=parser.get_parsed_content("perceptual_loss"),
        kl_weight=parser.get_parsed_content("kl_weight"),
        perceptual_weight=parser.get_parsed_content("perceptual_weight"),
        adv_weight=parser.get_parsed_content("adv_weight"),
    )
    logger.info("AE train step: VAEGANTrainer._iteration vs zoo-style reference, batch %s", tuple(images.shape))
    return compare(
        lambda: trainer._iteration(trainer, batch), lambda: reference_step(images), device, args.warmup, args.iterations
    )


def bench_diffusion(args: argparse.Namespace, device: torch.device, work_dir: Path) -> tuple[Comparison, Timing]:
    """
    Time the diffusion training step of this bundle (``train#trainer`` of train_autoencoder.json +
    train_diffusion.json, on cached latents) and of the zoo-style reference (encoding every iteration),
    plus the bundle's one-off slice encoding per slice.

    The bundle's per-iteration figure includes fetching the batch from the config's latent data loader
    (``SampleLatentd`` draws the latents from the cached distributions); the reference gets its image batch
    ready-made on the device (its image loading and augmentation are not counted). Both steps are called
    directly, so neither includes ignite's per-iteration event handling.
    """
    seed_everything(args.seed)
    num_slices = args.encode_slices or 2 * args.batch_size
    if num_slices < args.batch_size:
        raise ValueError(f"--encode-slices {num_slices} must be at least the batch size {args.batch_size}.")
    volume_dataset = Dataset([random_volume(num_slices, args.diffusion_image_size, args.seed)])
    overrides = {
        "device": device,
        "bundle_root": str(work_dir),  # no checkpoint there, so the scale factor is computed from the cache
        "random_seed": args.seed,
        "num_workers": 0,
        "train_batch_size_img": 1,
        "train_batch_size_slice": args.batch_size,
        "train#dataloader#drop_last": True,  # every timed batch is a full one
        "train#volume_dataset": volume_dataset,
        "train#trainer#train_handlers": [],
        **(TINY_AUTOENCODER | TINY_DIFFUSION if args.tiny else {}),
    }
    if args.encode_batch_size is not None:
        overrides["encode_batch_size"] = args.encode_batch_size
    parser = load_parser(DIFFUSION_CONFIGS, overrides)
    scripts = import_bundle_scripts()

    autoencoder = parser.get_parsed_content("gnetwork")
    volume_loader = parser.get_parsed_content("train#volume_loader")
    encode_batch_size = parser.get_parsed_content("encode_batch_size")
    logger.info("one-off latent encoding: %d slices of %d^2", num_slices, args.diffusion_image_size)
    encoding = measure(
        lambda: scripts.latents.encode_volume_slices(autoencoder, volume_loader, device, encode_batch_size),
        device,
        args.warmup,
        args.iterations,
        "slice",
        units_per_call=num_slices,
    )

    trainer = parser.get_parsed_content("train#trainer")  # resolves latent_cache and scale_factor (untimed)
    batches = repeat_forever(parser.get_parsed_content("train#dataloader"))

    def bundle_step() -> Any:
        return trainer._iteration(trainer, next(batches))

    images = random_images(args.batch_size, args.diffusion_image_size, args.seed, device)
    reference_step = ZooStyleLDMStep(
        autoencoder=autoencoder,
        diffusion=parser.get_parsed_content("diffusion"),
        optimizer=parser.get_parsed_content("optimizer"),
        inferer=LatentDiffusionInferer(
            scheduler=parser.get_parsed_content("noise_scheduler"),
            scale_factor=parser.get_parsed_content("scale_factor"),
        ),
        num_train_timesteps=parser.get_parsed_content("num_train_timesteps"),
        latent_shape=latent_shape_of(parser, args.diffusion_image_size),
    )
    logger.info(
        "diffusion train step: SupervisedTrainer on cached latents vs zoo-style reference (encodes every iteration), "
        "batch %d",
        args.batch_size,
    )
    comparison = compare(bundle_step, lambda: reference_step(images), device, args.warmup, args.iterations)
    return comparison, encoding


def bench_sampling(args: argparse.Namespace, device: torch.device, work_dir: Path) -> Timing:
    """
    Time ``scripts.inference.generate_samples`` (inference.json, DDIM, ``args.steps`` steps), one sample per
    call, including the writing of its NIfTI, PNG and report. Weights are random: no checkpoint is loaded.
    """
    seed_everything(args.seed)
    scripts = import_bundle_scripts()
    overrides: dict[str, Any] = {
        "device": device,
        "bundle_root": str(work_dir),
        "output_dir": str(work_dir / "samples"),
        "num_inference_steps": args.steps,
        "scheduler": "ddim",
        "scale_factor": 1.0,  # instead of loading it from a checkpoint
        **(TINY_AUTOENCODER | TINY_DIFFUSION if args.tiny else {}),
    }
    parser = load_parser(INFERENCE_CONFIGS, overrides)
    parser["latent_shape"] = latent_shape_of(parser, args.diffusion_image_size)  # nothing is instantiated yet
    inferer = parser.get_parsed_content("inferer")
    autoencoder = parser.get_parsed_content("autoencoder")
    diffusion = parser.get_parsed_content("diffusion")
    scheduler = parser.get_parsed_content("noise_scheduler")
    latent_shape = parser.get_parsed_content("latent_shape")
    settings = parser.get_parsed_content("report_settings")
    seeds = iter(range(args.seed, args.seed + args.warmup + args.iterations))

    def sample_once() -> Any:
        return scripts.inference.generate_samples(
            inferer=inferer,
            autoencoder=autoencoder,
            diffusion=diffusion,
            scheduler=scheduler,
            latent_shape=latent_shape,
            num_output_samples=1,
            random_seed=next(seeds),
            device=device,
            output_dir=work_dir / "samples",
            settings=settings,
        )

    logger.info("sampling: DDIM %d steps, latent %s", args.steps, latent_shape)
    return measure(sample_once, device, args.warmup, args.iterations, "image")


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Machine and software description recorded with the results."""
    description = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return description


def _seconds(timing: Timing) -> str:
    return f"{timing.mean_s:.3g} / {timing.median_s:.3g} / {timing.min_s:.3g}"


def _speedups(comparison: Comparison) -> str:
    return f"{comparison.speedup:.2f}x / {comparison.speedup_median:.2f}x / {comparison.speedup_min:.2f}x"


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _memory(*timings: Timing) -> str:
    return " / ".join(f"{timing.peak_memory_mb:.0f}" for timing in timings)


def _cpu(*timings: Timing) -> str:
    return " / ".join(f"{timing.cpu_per_wall:.2f}" for timing in timings)


def _row(name: str, bundle: Timing, reference: Timing | None, speedup: str, reference_text: str = "n/a") -> str:
    timings = (bundle,) if reference is None else (bundle, reference)
    reference_cell = reference_text if reference is None else _seconds(reference)
    return f"| {name} | {_seconds(bundle)} | {reference_cell} | {speedup} | {_memory(*timings)} | {_cpu(*timings)} |"


def format_table(results: Mapping[str, Any], machine: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """
    Render the results as a markdown table preceded by the machine and workload description.

    Times are mean / median / min seconds per unit over the timed repetitions; speed-ups are reference / bundle
    of the mean, the median and the min.
    """
    ae, diffusion = results[ROW_AE], results[ROW_DIFFUSION]
    gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
    memory_kind = "CUDA max allocated" if machine["gpu"] else "process max RSS, cumulative"
    lines = [
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), monai {machine['monai']}, device {machine['device']}{gpu}; "
        f"1-min load average {_load(machine.get('load_average_1m'))} at start, "
        f"{_load(machine.get('load_average_1m_end'))} at end",
        f"workload: {'tiny' if settings['tiny'] else 'full-size'} networks, batch {settings['batch_size']}, "
        f"AE images {settings['image_size']}^2, diffusion images {settings['diffusion_image_size']}^2, "
        f"{settings['iterations']} timed + {settings['warmup']} warm-up repetitions, DDIM {settings['steps']} steps",
        "",
        "| measurement | this bundle, s (mean / median / min) | zoo-style reference, s (mean / median / min) "
        f"| speed-up (mean / median / min) | peak memory MiB ({memory_kind}) | CPU s per wall s |",
        "|---|---|---|---|---|---|",
        _row("AE train step, per iteration", ae.bundle, ae.reference, _speedups(ae)),
        _row("diffusion train step, per iteration", diffusion.bundle, diffusion.reference, _speedups(diffusion)),
        _row("one-off latent encoding, per slice", results[ROW_ENCODING], None, "n/a", "n/a (encodes every iteration)"),
        _row(f"sampling (DDIM {settings['steps']} steps), per image", results[ROW_SAMPLING], None, "n/a"),
    ]
    return "\n".join(lines)


def results_to_json(results: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready form of the result rows."""
    return {name: row.to_dict() if isinstance(row, Comparison) else asdict(row) for name, row in results.items()}


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be an integer >= 1.")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be an integer >= 0.")
    return number


def build_arg_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    cli.add_argument("--tiny", action="store_true", help="shrink the networks and images for a smoke run")
    cli.add_argument("--batch-size", type=positive_int, default=8, help="slices per batch (default 8)")
    cli.add_argument(
        "--image-size", type=positive_int, default=None, help=f"AE training image size (default {FULL_AE_IMAGE_SIZE})"
    )
    cli.add_argument(
        "--diffusion-image-size",
        type=positive_int,
        default=None,
        help=f"diffusion image size; latent = size / 4 (default {FULL_DIFFUSION_IMAGE_SIZE})",
    )
    cli.add_argument("--iterations", type=positive_int, default=5, help="timed repetitions per row (default 5)")
    cli.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repetitions first (default 1)")
    cli.add_argument("--steps", type=positive_int, default=50, help="DDIM inference steps (default 50)")
    cli.add_argument(
        "--encode-slices", type=positive_int, default=None, help="slices in the latent cache (default 2 x batch size)"
    )
    cli.add_argument(
        "--encode-batch-size", type=positive_int, default=None, help="slices encoded at once (default: the config's)"
    )
    cli.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    cli.add_argument("--threads", type=positive_int, default=None, help="torch intra-op CPU threads")
    cli.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of torch (default 0)")
    cli.add_argument("--json-out", type=Path, default=None, help="also write the results to this JSON file")
    return cli


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the size defaults that depend on ``--tiny`` and pick the device."""
    if args.image_size is None:
        args.image_size = TINY_IMAGE_SIZE if args.tiny else FULL_AE_IMAGE_SIZE
    if args.diffusion_image_size is None:
        args.diffusion_image_size = TINY_IMAGE_SIZE if args.tiny else FULL_DIFFUSION_IMAGE_SIZE
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run all benchmarks; return ``{"machine", "settings", "results"}`` (JSON-ready) and print the table."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import_bundle_scripts()
    machine = describe_machine(device)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    logger.info("machine: %s", machine)
    load = machine["load_average_1m"]
    if load is not None and load > 0.75 * (os.cpu_count() or 1):
        logger.warning(
            "1-min load average %.2f on %s cores before starting: other processes compete for the CPU, "
            "so timings will be noisy (see cpu_per_wall and the medians).",
            load,
            os.cpu_count(),
        )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_brats_ldm2d_") as tmp:
        work_dir = Path(tmp)
        start = time.perf_counter()
        results[ROW_AE] = bench_autoencoder(args, device, work_dir / "ae")
        results[ROW_DIFFUSION], results[ROW_ENCODING] = bench_diffusion(args, device, work_dir / "diffusion")
        results[ROW_SAMPLING] = bench_sampling(args, device, work_dir / "inference")
        logger.info("benchmark finished in %.1f s", time.perf_counter() - start)
    machine["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(format_table(results, machine, settings))
    report = {"machine": machine, "settings": settings, "results": results_to_json(results)}
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        logger.info("wrote %s", args.json_out)
    return report


def row_seconds(row: Mapping[str, Any]) -> list[float]:
    """All mean and min figures of one JSON result row (a comparison or a single timing)."""
    timings = [row["bundle"], row["reference"]] if "bundle" in row else [row]
    return [timing[key] for timing in timings for key in ("mean_s", "min_s")]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python bench/bench_brats_ldm2d.py``; exits with 1 if a timing is not positive and finite."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = resolve_defaults(build_arg_parser().parse_args(argv))
    report = run(args)
    seconds = [value for row in report["results"].values() for value in row_seconds(row)]
    if not all(math.isfinite(value) and value > 0 for value in seconds):
        logger.error("non-positive or non-finite timing in %s", report["results"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
