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
Benchmark of the ``brats_ldm2d`` bundle against a re-creation of the model-zoo bundle, in one run.

On a fixed synthetic workload (random images and weights, fixed seeds) it measures, side by side and
alternating (A B A B ...):

1. the autoencoder (VAE-GAN) training step: this bundle's ``scripts.trainers.VAEGANTrainer._iteration``
   against the iteration of the model-zoo ``brats_mri_axial_slices_generative_diffusion`` v1.1.2
   ``VaeGanTrainer`` (``ZooStyleVAEGANStep``), plus where this bundle's step spends its time (phases
   timed on MONAI's ``IterationEvents``);
2. the diffusion training step: this bundle's ``SupervisedTrainer`` iteration with the latent memo
   (``scripts.latents``) against the zoo's ``LDMTrainer`` iteration, which encodes the batch every time
   (``ZooStyleLDMStep``); then one epoch of the zoo's workload on both sides, from an empty memo;
3. sampling (DDIM): this bundle's ``LatentSampler`` against the zoo's ``LDMSampler`` loop
   (``ZooStyleSampler``), and the whole ``python -m monai.bundle run`` process on both sides.

The bundle side is built from the bundle configs with ``monai.bundle.ConfigParser``. The reference side is
built from the same configs with the published settings (``use_flash_attention`` off, plain Adam; see
``REFERENCE_OVERRIDES``) and gets the bundle side's initial weights, so both start from the same state.
The reference iterations are re-implemented here from the documented behaviour of the model-zoo code; the
tests check that ``ZooStyleVAEGANStep`` and the bundle's iteration give equal losses and gradients.

Example::

    python bench/bench_brats_ldm2d.py --batch-size 4 --iterations 3 --warmup 1 --steps 50
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
import subprocess
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
from monai.data import DataLoader, Dataset, MetaTensor  # noqa: E402
from monai.inferers import LatentDiffusionInferer  # noqa: E402
from monai.losses import PatchAdversarialLoss  # noqa: E402
from monai.utils import AdversarialIterationEvents  # noqa: E402

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

# what the published model-zoo bundle runs where this bundle's configs differ in speed settings only
REFERENCE_OVERRIDES = {
    "autoencoder_def#use_flash_attention": False,
    "network_def#use_flash_attention": False,
    "optimizer_g#fused": None,
    "optimizer_d#fused": None,
    "optimizer#fused": None,
}

FULL_AE_IMAGE_SIZE = 240
FULL_DIFFUSION_IMAGE_SIZE = 256
TINY_IMAGE_SIZE = 32

ROW_AE = "ae_train_step"
ROW_AE_PHASES = "ae_train_step_phases"
ROW_DIFFUSION = "diffusion_train_step"
ROW_ENCODING = "latent_encoding_per_slice"
ROW_EPOCH = "diffusion_first_epoch"
ROW_SAMPLING = "sampling_loop"
ROW_PROCESS = "sampling_whole_process"
ROW_IMPORT = "import_torch_monai"


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
        unit: what one figure is per (``iteration``, ``slice``, ``epoch``, ``image``, ``process``).
        peak_memory_mb: peak memory in MiB, the largest of the timed calls (CUDA: ``max_memory_allocated``;
            CPU: the process' resident-set high-water mark over the call, so it includes what the process
            already held: the networks of both sides, the data).
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


CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """
    Start a new peak-memory window: CUDA's allocator statistics, or on Linux the process' resident-set
    high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        try:
            CLEAR_REFS.write_text("5")
        except OSError:  # not permitted: the high-water mark stays cumulative
            pass


def peak_memory_mb(device: torch.device) -> float:
    """
    Peak memory in MiB since the last ``reset_peak_memory``: allocated CUDA memory, or on the CPU the
    process' resident-set high-water mark (``VmHWM`` on Linux; elsewhere ``ru_maxrss``, cumulative).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if PROC_STATUS.exists():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
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
    unit: str = "iteration",
) -> Comparison:
    """Time this bundle's step against the reference step, alternating, in seconds per ``unit``."""
    timings = measure_alternating({"bundle": bundle_step, "reference": reference_step}, device, warmup, repetitions, unit)
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


def load_parser(config_names: Sequence[str], overrides: Mapping[str, Any], reference: bool = False) -> ConfigParser:
    """
    Read (and merge, in order) bundle config files and apply ``overrides``.

    All overrides are set before anything is parsed: setting a value resets the parser's resolved objects.

    Args:
        config_names: file names under ``bundles/brats_ldm2d/configs``.
        overrides: config id to value; values may be Python objects (a device, a dataset, a data loader).
        reference: also apply ``REFERENCE_OVERRIDES`` (the published settings) where the configs have the id.
    """
    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / name) for name in config_names])
    for config_id, value in overrides.items():
        parser[config_id] = value
    if reference:
        for config_id, value in REFERENCE_OVERRIDES.items():
            if config_id.split("#")[0] in parser.get():
                parser[config_id] = value
    return parser


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """Give ``target`` the weights of ``source`` (same architecture): both sides start from the same state."""
    target.load_state_dict(source.state_dict(), strict=True)
    return target


def random_images(batch_size: int, image_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of single-channel images with values in [0, 1), shape (batch_size, 1, image_size, image_size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch_size, 1, image_size, image_size), generator=generator).to(device)


def random_volumes(num_volumes: int, num_slices: int, image_size: int, seed: int) -> list[dict[str, MetaTensor]]:
    """Synthetic (C=1, H, W, D) volumes in [0, 1), named as ``LoadImaged`` names them (``filename_or_obj``)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": MetaTensor(torch.rand((1, image_size, image_size, num_slices), generator=generator), meta={"filename_or_obj": f"volume_{index}.nii.gz"})}
        for index in range(num_volumes)
    ]


def volume_slices(volume: MetaTensor) -> tuple[torch.Tensor, list[str]]:
    """All axial slices of a volume as a batch (D, C, H, W), with the slice ids ``RandSliceSamplesd`` gives them."""
    source = volume.meta["filename_or_obj"]
    return volume.as_tensor().permute(3, 0, 1, 2).contiguous(), [f"{source}:{z}" for z in range(volume.shape[-1])]


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


class ZooStyleSampler:
    """
    The model-zoo ``LDMSampler``: a ``no_grad`` loop over the scheduler's timesteps (UNet, ``scheduler.step``),
    then ``decode_stage_2_outputs`` of the latent, unscaled.

    Args:
        autoencoder: the first-stage ``AutoencoderKL``.
        diffusion: the ``DiffusionModelUNet``.
        scheduler: the DDIM scheduler, its timesteps set.
        latent_shape: shape of one latent, (C, h, w).
        device: device of the networks.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        diffusion: torch.nn.Module,
        scheduler: Any,
        latent_shape: Sequence[int],
        device: torch.device,
    ) -> None:
        self.autoencoder = autoencoder.eval()
        self.diffusion = diffusion.eval()
        self.scheduler = scheduler
        self.latent_shape = tuple(latent_shape)
        self.device = device

    @torch.no_grad()
    def __call__(self, seed: int) -> torch.Tensor:
        """Generate one image from the noise of ``seed``."""
        image = torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        for t in self.scheduler.timesteps:
            model_output = self.diffusion(image, timesteps=torch.Tensor((t,)).to(self.device).long())
            image, _ = self.scheduler.step(model_output, t, image)
        return self.autoencoder.decode_stage_2_outputs(image)


# ----------------------------------------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------------------------------------

AE_PHASES = (
    ("autoencoder forward", monai.engines.IterationEvents.FORWARD_COMPLETED),
    ("generator loss terms (perceptual ResNet50 on reconstruction and target, discriminator on the reconstruction)", monai.engines.IterationEvents.LOSS_COMPLETED),
    ("generator backward (autoencoder, perceptual, discriminator input gradients)", monai.engines.IterationEvents.BACKWARD_COMPLETED),
    ("generator optimizer step", AdversarialIterationEvents.GENERATOR_MODEL_COMPLETED),
    ("discriminator forward on fake and real, loss", AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED),
    ("discriminator backward", AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED),
    ("discriminator optimizer step", AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED),
)


class PhaseTimer:
    """
    Times the phases of a ``VAEGANTrainer`` iteration between the events it fires (``AE_PHASES``).

    Call ``start()`` right before the iteration; every phase's durations are collected in ``seconds``.
    """

    def __init__(self, engine: Any) -> None:
        self.seconds: dict[str, list[float]] = {name: [] for name, _ in AE_PHASES}
        self.last = time.perf_counter()
        for name, event in AE_PHASES:
            engine.add_event_handler(event, self._closer(name))

    def _closer(self, name: str) -> Callable[[Any], None]:
        def close(engine: Any) -> None:
            now = time.perf_counter()
            self.seconds[name].append(now - self.last)
            self.last = now

        return close

    def start(self) -> None:
        """Mark the start of an iteration."""
        self.last = time.perf_counter()


def timing_of(samples: Sequence[float], unit: str) -> Timing:
    """A ``Timing`` of already measured seconds (no memory or CPU figures)."""
    return Timing(
        mean_s=float(np.mean(samples)),
        median_s=float(np.median(samples)),
        min_s=float(np.min(samples)),
        max_s=float(np.max(samples)),
        samples_s=[float(s) for s in samples],
        repetitions=len(samples),
        unit=unit,
        peak_memory_mb=float("nan"),
        cpu_per_wall=float("nan"),
    )


def bench_autoencoder(args: argparse.Namespace, device: torch.device, work_dir: Path) -> tuple[Comparison, dict[str, Timing]]:
    """
    Time ``VAEGANTrainer._iteration`` (``train#trainer`` of train_autoencoder.json) and the zoo-style VAE-GAN
    iteration (published settings, same initial weights, same perceptual loss, same batch); and the phases of
    the bundle's iteration, plus the perceptual loss alone (forward; forward and backward to its input).
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
    perceptual = parser.get_parsed_content("perceptual_loss")
    phases = PhaseTimer(trainer)
    batch = {"image": images}

    reference_parser = load_parser(AUTOENCODER_CONFIGS, {**overrides, "perceptual_loss": perceptual}, reference=True)
    reference_step = ZooStyleVAEGANStep(
        generator=copy_weights(parser.get_parsed_content("gnetwork"), reference_parser.get_parsed_content("gnetwork")),
        discriminator=copy_weights(parser.get_parsed_content("dnetwork"), reference_parser.get_parsed_content("dnetwork")),
        g_optimizer=reference_parser.get_parsed_content("optimizer_g"),
        d_optimizer=reference_parser.get_parsed_content("optimizer_d"),
        perceptual_loss=perceptual,
        kl_weight=parser.get_parsed_content("kl_weight"),
        perceptual_weight=parser.get_parsed_content("perceptual_weight"),
        adv_weight=parser.get_parsed_content("adv_weight"),
    )

    def bundle_step() -> Any:
        phases.start()
        return trainer._iteration(trainer, batch)

    logger.info("AE train step: VAEGANTrainer._iteration vs zoo-style reference, batch %s", tuple(images.shape))
    comparison = compare(bundle_step, lambda: reference_step(images), device, args.warmup, args.iterations)
    skip = args.warmup  # the warm-up iterations fired the events too
    breakdown = {name: timing_of(seconds[skip:], "iteration") for name, seconds in phases.seconds.items()}

    reconstruction = images.flip(-1).detach()

    def perceptual_forward() -> Any:
        return perceptual(reconstruction.clone().requires_grad_(True), images)

    def perceptual_forward_backward() -> Any:
        perceptual(reconstruction.clone().requires_grad_(True), images).backward()

    logger.info("perceptual loss alone: forward, forward + backward to its input")
    alone = measure_alternating(
        {"perceptual loss alone: forward": perceptual_forward, "perceptual loss alone: forward + backward": perceptual_forward_backward},
        device,
        args.warmup,
        args.iterations,
        "iteration",
    )
    return comparison, {**breakdown, **alone}


def bench_diffusion(args: argparse.Namespace, device: torch.device, work_dir: Path) -> dict[str, Comparison]:
    """
    Diffusion training: this bundle (train_autoencoder.json + train_diffusion.json, ``SupervisedTrainer`` with
    ``MemoLatentPrepareBatch``) against the zoo-style ``LDMTrainer`` step (published settings, same weights).

    Rows:

    - per iteration, with every slice already in the memo (the steady state after the first epochs), against
      the zoo step, which encodes its batch every iteration;
    - latent encoding per slice: the memo's on-demand encoding (``encode_batch_size`` slices per pass) against
      the zoo's (its whole batch per pass);
    - one epoch of the zoo's workload from an empty memo (``--epoch-volumes`` volumes of ``--encode-slices``
      slices, ``--batch-size`` slices drawn from one volume per iteration): what the first epoch of a run
      costs on both sides. Neither side's one-off scale-factor pass is counted.

    Both sides draw their batches through the same kind of loader (``RandSliceSamplesd`` on in-memory volumes).
    """
    seed_everything(args.seed)
    num_slices = args.encode_slices or 2 * args.batch_size  # the published proportion: 100 kept, 50 drawn
    if num_slices < args.batch_size:
        raise ValueError(f"--encode-slices {num_slices} must be at least the batch size {args.batch_size}.")
    scripts = import_bundle_scripts()
    volumes = random_volumes(args.epoch_volumes, num_slices, args.diffusion_image_size, args.seed)
    draw = scripts.latents.RandSliceSamplesd(keys="image", num_samples=args.batch_size)
    overrides = {
        "device": device,
        "bundle_root": str(work_dir),  # no checkpoint there, so the scale factor is computed from the first batch
        "random_seed": args.seed,
        "num_workers": 0,
        "train_batch_size_img": 1,
        "train_batch_size_slice": args.batch_size,
        "train#dataset": Dataset(volumes, transform=draw),
        "train#trainer#train_handlers": [],
        **(TINY_AUTOENCODER | TINY_DIFFUSION if args.tiny else {}),
    }
    if args.encode_batch_size is not None:
        overrides["encode_batch_size"] = args.encode_batch_size
    parser = load_parser(DIFFUSION_CONFIGS, overrides)
    autoencoder = parser.get_parsed_content("gnetwork").eval()
    trainer = parser.get_parsed_content("train#trainer")  # resolves the memo and the scale factor (untimed)
    prepare = trainer.prepare_batch
    encode_batch_size = parser.get_parsed_content("encode_batch_size")

    reference_parser = load_parser(DIFFUSION_CONFIGS, overrides, reference=True)
    reference_autoencoder = copy_weights(autoencoder, reference_parser.get_parsed_content("gnetwork")).eval()
    reference_diffusion = copy_weights(parser.get_parsed_content("diffusion"), reference_parser.get_parsed_content("diffusion"))
    reference_step = ZooStyleLDMStep(
        autoencoder=reference_autoencoder,
        diffusion=reference_diffusion,
        optimizer=reference_parser.get_parsed_content("optimizer"),
        inferer=LatentDiffusionInferer(scheduler=parser.get_parsed_content("noise_scheduler"), scale_factor=prepare.scale_factor),
        num_train_timesteps=parser.get_parsed_content("num_train_timesteps"),
        latent_shape=latent_shape_of(parser, args.diffusion_image_size),
    )
    reference_loader = DataLoader(Dataset(volumes, transform=draw), batch_size=1, shuffle=True, num_workers=0)

    def fresh_memo() -> Any:
        return scripts.latents.LatentMemo(autoencoder, device, encode_batch_size)

    rows: dict[str, Comparison] = {}
    prepare.memo = fresh_memo()
    for volume in volumes:  # the steady state: every slice already encoded
        slices, keys = volume_slices(volume["image"])
        prepare.memo(slices, keys)
    batches = repeat_forever(parser.get_parsed_content("train#dataloader"))
    reference_batches = repeat_forever(reference_loader)
    logger.info("diffusion train step (memo full) vs zoo-style step (encodes every iteration), batch %d", args.batch_size)
    rows[ROW_DIFFUSION] = compare(
        lambda: trainer._iteration(trainer, next(batches)),
        lambda: reference_step(next(reference_batches)["image"].to(device)),
        device,
        args.warmup,
        args.iterations,
    )

    slices, keys = volume_slices(volumes[0]["image"])

    @torch.no_grad()
    def reference_encoding() -> None:
        for start in range(0, len(keys), args.batch_size):
            reference_autoencoder.encode_stage_2_inputs(slices[start : start + args.batch_size].to(device))

    logger.info("latent encoding of %d slices of %d^2: memo (%d per pass) vs zoo (%d per pass)", len(keys), args.diffusion_image_size, encode_batch_size, args.batch_size)
    encoding = measure_alternating(
        {"bundle": lambda: fresh_memo()(slices, keys), "reference": reference_encoding},
        device,
        args.warmup,
        args.iterations,
        "slice",
        units_per_call=len(keys),
    )
    rows[ROW_ENCODING] = Comparison(bundle=encoding["bundle"], reference=encoding["reference"])

    loader = parser.get_parsed_content("train#dataloader")

    def bundle_epoch() -> None:
        prepare.memo = fresh_memo()
        for batch in loader:
            trainer._iteration(trainer, batch)

    def reference_epoch() -> None:
        for batch in reference_loader:
            reference_step(batch["image"].to(device))

    logger.info("first epoch of the zoo workload: %d volumes, %d slices drawn per volume", len(volumes), args.batch_size)
    epoch = measure_alternating({"bundle": bundle_epoch, "reference": reference_epoch}, device, 0, args.epoch_repetitions, "epoch")
    rows[ROW_EPOCH] = Comparison(bundle=epoch["bundle"], reference=epoch["reference"])
    return rows


def sampling_overrides(args: argparse.Namespace, device: torch.device | str, work_dir: Path) -> dict[str, Any]:
    """inference.json overrides of the sampling benchmark (``--steps`` DDIM steps, the image size, tiny networks)."""
    latent_size = args.diffusion_image_size // 4  # both the published and the tiny autoencoder downsample by 4
    return {
        "device": device,
        "bundle_root": str(work_dir),
        "output_dir": str(work_dir / "samples"),
        "overwrite": True,
        "num_inference_steps": args.steps,
        "scheduler": "ddim",
        "latent_shape": [1, latent_size, latent_size],
        **(TINY_AUTOENCODER | TINY_DIFFUSION if args.tiny else {}),
    }


def bench_sampling(args: argparse.Namespace, device: torch.device, work_dir: Path) -> tuple[Comparison, float]:
    """
    Time this bundle's ``LatentSampler`` (inference.json, DDIM ``--steps``, one image per call: denoising loop and
    decode) against the zoo's ``LDMSampler`` loop (published settings, same weights, same seeds); also return
    the largest absolute difference between the two sides' images (clipped to [0, 1]).
    """
    seed_everything(args.seed)
    overrides = sampling_overrides(args, device, work_dir)
    parser = load_parser(INFERENCE_CONFIGS, {**overrides, "scale_factor": 1.0})  # no weights file is loaded
    sampler = parser.get_parsed_content("sampler")
    reference_parser = load_parser(INFERENCE_CONFIGS, {**overrides, "scale_factor": 1.0}, reference=True)
    reference = ZooStyleSampler(
        autoencoder=copy_weights(sampler.autoencoder, reference_parser.get_parsed_content("autoencoder")),
        diffusion=copy_weights(sampler.diffusion, reference_parser.get_parsed_content("diffusion")),
        scheduler=reference_parser.get_parsed_content("noise_scheduler"),
        latent_shape=parser.get_parsed_content("latent_shape"),
        device=device,
    )
    difference = float((sampler(args.seed) - reference(args.seed)[0, 0].clamp(0, 1).cpu()).abs().max())
    seeds = iter(range(args.seed + 1, args.seed + 1 + 2 * (args.warmup + args.iterations)))
    logger.info("sampling loop: DDIM %d steps, latent %s", args.steps, parser["latent_shape"])
    comparison = compare(lambda: sampler(next(seeds)), lambda: reference(next(seeds)), device, args.warmup, args.iterations, "image")
    return comparison, difference


def zoo_inference_config(parser: ConfigParser, steps: int) -> dict[str, Any]:
    """
    The model-zoo ``configs/inference.json`` (v1.1.2) re-created for ``python -m monai.bundle run``: the published
    networks, ``load_old_state_dict(torch.load(...))``, DDIM with ``set_timesteps``, one noise draw, the
    sampling loop (MONAI's ``LatentDiffusionInferer.sample``, which the zoo's ``LDMSampler`` duplicates) and
    an 8-bit PNG scaled by its maximum. Its ``scripts`` package is not available here, so nothing of it is imported.
    """
    return {
        "imports": ["$import torch", "$import monai", "$import numpy as np", "$from datetime import datetime", "$from PIL import Image"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "output_postfix": "$datetime.now().strftime('sample_%Y%m%d_%H%M%S')",
        "output_filename": "$'synimg_' + @output_postfix + '.png'",
        "load_autoencoder_path": "$@bundle_root + '/models/model_autoencoder.pt'",
        "load_diffusion_path": "$@bundle_root + '/models/model.pt'",
        "latent_shape": list(parser["latent_shape"]),
        "num_train_timesteps": parser["num_train_timesteps"],
        "autoencoder_def": {**parser["autoencoder_def"], "use_flash_attention": False},
        "network_def": {**parser["network_def"], "use_flash_attention": False},
        "load_autoencoder": "$@autoencoder_def.load_old_state_dict(torch.load(@load_autoencoder_path))",
        "autoencoder": "$@autoencoder_def.to(@device)",
        "load_diffusion": "$@network_def.load_old_state_dict(torch.load(@load_diffusion_path))",
        "diffusion": "$@network_def.to(@device)",
        "noise_scheduler": parser["ddim_scheduler"],
        "noise": "$torch.randn([1] + @latent_shape).to(@device)",
        "set_timesteps": f"$@noise_scheduler.set_timesteps(num_inference_steps={steps})",
        "inferer": "$monai.inferers.LatentDiffusionInferer(@noise_scheduler)",
        "sample": "$@inferer.sample(@noise, @autoencoder.eval(), @diffusion.eval(), @noise_scheduler)[0, 0].cpu().numpy()",
        "picture": "$np.clip(@sample, 0, None) / max(float(@sample.max()), 1e-8) * 255",
        "run": [
            "$import os",
            "$os.makedirs(@output_dir, exist_ok=True)",
            "$@load_autoencoder",
            "$@load_diffusion",
            "$@set_timesteps",
            "$Image.fromarray(np.flipud(@picture.T)[:, ::-1].astype(np.uint8)).save(@output_dir + '/' + @output_filename)",
        ],
    }


def run_process(command: Sequence[str], cwd: Path) -> float:
    """Run ``command`` to completion; return its wall-clock seconds (raises with the log's end if it fails)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}")
    return seconds


def bench_whole_process(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """
    Whole-process sampling on the CPU: ``python -m monai.bundle run`` of this bundle's inference.json (one image,
    DDIM ``--steps``) and of the zoo's re-created inference config, alternating, with the same weights files
    (random, in the published plain-state-dict format); and the cost of ``import torch, monai`` alone.

    Returns the two ``Timing``s (unit ``process``), the import timing, and the last bundle run's per-sample
    seconds from its report (denoising loop and decode inside the process).
    """
    from demo.runner import bundle_command

    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = sampling_overrides(args, "cpu", work_dir)
    overrides.pop("device")
    parser = load_parser(INFERENCE_CONFIGS, {k: v for k, v in overrides.items()})
    torch.manual_seed(args.seed)
    (work_dir / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), work_dir / "models" / "model_autoencoder.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), work_dir / "models" / "model.pt")
    zoo_config = work_dir / "zoo_inference.json"
    zoo_config.write_text(json.dumps(zoo_inference_config(parser, args.steps), indent=2))

    python = sys.executable
    bundle = bundle_command(INFERENCE_CONFIGS, overrides)
    zoo = [python, "-m", "monai.bundle", "run", "--config_file", str(zoo_config), "--bundle_root", str(work_dir)]
    imports = [python, "-c", "import torch, monai, monai.bundle, ignite"]
    runs: dict[str, list[float]] = {"bundle": [], "reference": [], "import": []}
    for _ in range(args.process_repetitions):
        runs["bundle"].append(run_process(bundle, BUNDLE_DIR))
        runs["reference"].append(run_process(zoo, work_dir))
        runs["import"].append(run_process(imports, work_dir))
    report = json.loads((work_dir / "samples" / "inference_report.json").read_text())
    return {
        ROW_PROCESS: Comparison(bundle=timing_of(runs["bundle"], "process"), reference=timing_of(runs["reference"], "process")),
        ROW_IMPORT: timing_of(runs["import"], "process"),
        "bundle_sample_seconds_in_process": float(report["samples"][0]["seconds"]),
    }


def bench_compile(args: argparse.Namespace, device: torch.device, work_dir: Path) -> dict[str, Any]:
    """
    inference_compile.json against eager inference.json (same weights, same seeds): the first compiled call
    (compilation included), the steady state of both, and the largest absolute difference of their images.
    """
    seed_everything(args.seed)
    overrides = {**sampling_overrides(args, device, work_dir), "scale_factor": 1.0}
    eager = load_parser(INFERENCE_CONFIGS, overrides).get_parsed_content("sampler")
    compiled = load_parser((*INFERENCE_CONFIGS, "inference_compile.json"), overrides).get_parsed_content("sampler")
    copy_weights(eager.autoencoder, compiled.autoencoder.autoencoder)
    copy_weights(eager.diffusion, compiled.diffusion._orig_mod)
    start = time.perf_counter()
    first_image = compiled(args.seed)
    first_call = time.perf_counter() - start
    difference = float((first_image - eager(args.seed)).abs().max())
    seeds = iter(range(args.seed + 1, args.seed + 1 + 2 * (args.warmup + args.iterations)))
    logger.info("compiled sampling: first call %.1f s; steady state vs eager", first_call)
    steady = compare(lambda: compiled(next(seeds)), lambda: eager(next(seeds)), device, args.warmup, args.iterations, "image")
    return {"first_call_s": first_call, "steady_state": steady, "max_abs_difference": difference}


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
    return {
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


def _seconds(timing: Timing) -> str:
    return f"{timing.mean_s:.3g} / {timing.median_s:.3g} / {timing.min_s:.3g}"


def _speedups(comparison: Comparison) -> str:
    return f"{comparison.speedup:.2f}x / {comparison.speedup_median:.2f}x / {comparison.speedup_min:.2f}x"


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _figures(*values: float, pattern: str = "{:.0f}") -> str:
    return " / ".join("n/a" if not math.isfinite(value) else pattern.format(value) for value in values)


def _comparison_row(name: str, comparison: Comparison) -> str:
    bundle, reference = comparison.bundle, comparison.reference
    memory = _figures(bundle.peak_memory_mb, reference.peak_memory_mb)
    cpu = _figures(bundle.cpu_per_wall, reference.cpu_per_wall, pattern="{:.2f}")
    return f"| {name} | {_seconds(bundle)} | {_seconds(reference)} | {_speedups(comparison)} | {memory} | {cpu} |"


def format_table(results: Mapping[str, Any], machine: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """
    Render the results as markdown tables preceded by the machine and workload description.

    Times are mean / median / min seconds per unit over the timed repetitions; speed-ups are reference / bundle
    of the mean, the median and the min.
    """
    gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
    memory_kind = "CUDA max allocated" if machine["gpu"] else "process peak RSS over the call"
    steps = settings["steps"]
    lines = [
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), monai {machine['monai']}, device {machine['device']}{gpu}; "
        f"1-min load average {_load(machine.get('load_average_1m'))} at start, "
        f"{_load(machine.get('load_average_1m_end'))} at end",
        f"workload: {'tiny' if settings['tiny'] else 'full-size'} networks, batch {settings['batch_size']}, "
        f"AE images {settings['image_size']}^2, diffusion images {settings['diffusion_image_size']}^2, "
        f"{settings['iterations']} timed + {settings['warmup']} warm-up repetitions, DDIM {steps} steps",
        "",
        "| measurement | this bundle, s (mean / median / min) | zoo-style reference, s (mean / median / min) "
        f"| speed-up (mean / median / min) | peak memory MiB, bundle / reference ({memory_kind}) | CPU s per wall s |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        ROW_AE: "AE train step, per iteration",
        ROW_DIFFUSION: "diffusion train step, per iteration (every slice in the memo)",
        ROW_ENCODING: "latent encoding, per slice",
        ROW_EPOCH: "first epoch of the zoo workload, from an empty memo",
        ROW_SAMPLING: f"sampling loop + decode (DDIM {steps}), per image",
        ROW_PROCESS: f"whole process `monai.bundle run` (DDIM {steps}, 1 image), per process",
    }
    lines += [_comparison_row(name, results[row]) for row, name in names.items() if row in results]
    if ROW_AE_PHASES in results:
        phases = results[ROW_AE_PHASES]
        step = sum(timing.median_s for name, timing in phases.items() if not name.startswith("perceptual loss alone"))
        lines += ["", "| AE train step of this bundle, phase | median s | share of the step |", "|---|---|---|"]
        for name, timing in phases.items():
            share = "" if name.startswith("perceptual loss alone") else f"{100 * timing.median_s / step:.0f}%"
            lines.append(f"| {name} | {timing.median_s:.3g} | {share} |")
    extra = results.get("extra", {})
    if extra:
        lines += [""] + [f"- {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines)


def results_to_json(results: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready form of the result rows."""

    def convert(value: Any) -> Any:
        if isinstance(value, Comparison):
            return value.to_dict()
        if isinstance(value, Timing):
            return asdict(value)
        if isinstance(value, Mapping):
            return {key: convert(item) for key, item in value.items()}
        return value

    return {name: convert(row) for name, row in results.items()}


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


SECTIONS = ("ae", "diffusion", "sampling", "process", "compile")


def build_arg_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    cli.add_argument("--tiny", action="store_true", help="shrink the networks and images for a smoke run")
    cli.add_argument("--batch-size", type=positive_int, default=4, help="slices per batch (default 4)")
    cli.add_argument(
        "--image-size", type=positive_int, default=None, help=f"AE training image size (default {FULL_AE_IMAGE_SIZE})"
    )
    cli.add_argument(
        "--diffusion-image-size",
        type=positive_int,
        default=None,
        help=f"diffusion and sampling image size; latent = size / 4 (default {FULL_DIFFUSION_IMAGE_SIZE})",
    )
    cli.add_argument("--iterations", type=positive_int, default=3, help="timed repetitions per row (default 3)")
    cli.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repetitions first (default 1)")
    cli.add_argument("--steps", type=positive_int, default=50, help="DDIM inference steps (default 50)")
    cli.add_argument(
        "--encode-slices", type=positive_int, default=None, help="slices per synthetic volume (default 2 x batch size)"
    )
    cli.add_argument("--epoch-volumes", type=positive_int, default=2, help="volumes of the epoch row (default 2)")
    cli.add_argument("--epoch-repetitions", type=positive_int, default=2, help="timed epochs per side (default 2)")
    cli.add_argument(
        "--process-repetitions", type=positive_int, default=2, help="whole-process runs per side (default 2)"
    )
    cli.add_argument(
        "--encode-batch-size", type=positive_int, default=None, help="slices encoded at once (default: the config's)"
    )
    cli.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=["ae", "diffusion", "sampling", "process"],
        help="what to measure (default: all but compile; compile takes minutes on a CPU)",
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
    """Run the chosen sections; return ``{"machine", "settings", "results"}`` (JSON-ready) and print the tables."""
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
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_brats_ldm2d_") as tmp:
        work_dir = Path(tmp)
        start = time.perf_counter()
        if "ae" in args.sections:
            results[ROW_AE], results[ROW_AE_PHASES] = bench_autoencoder(args, device, work_dir / "ae")
        if "diffusion" in args.sections:
            results.update(bench_diffusion(args, device, work_dir / "diffusion"))
        if "sampling" in args.sections:
            results[ROW_SAMPLING], difference = bench_sampling(args, device, work_dir / "inference")
            extra["sampling: max abs difference bundle vs reference image (clipped to [0, 1])"] = f"{difference:.2e}"
        if "process" in args.sections:
            process = bench_whole_process(args, work_dir / "process")
            results[ROW_PROCESS], results[ROW_IMPORT] = process[ROW_PROCESS], process[ROW_IMPORT]
            extra["whole process: `import torch, monai, monai.bundle, ignite` alone, s (mean / median / min)"] = _seconds(process[ROW_IMPORT])
            extra["whole process: the bundle's sample inside its process (loop + decode, from its report), s"] = f"{process['bundle_sample_seconds_in_process']:.3g}"
        if "compile" in args.sections:
            compiled = bench_compile(args, device, work_dir / "compile")
            results["compile_steady_state"] = compiled["steady_state"]
            extra["inference_compile.json: first call (compilation + 1 image), s"] = f"{compiled['first_call_s']:.1f}"
            extra["inference_compile.json: steady state compiled / eager, s (median)"] = (
                f"{compiled['steady_state'].bundle.median_s:.3g} / {compiled['steady_state'].reference.median_s:.3g} "
                f"(speed-up {compiled['steady_state'].speedup_median:.2f}x)"
            )
            extra["inference_compile.json: max abs difference compiled vs eager image"] = f"{compiled['max_abs_difference']:.2e}"
        logger.info("benchmark finished in %.1f s", time.perf_counter() - start)
    if extra:
        results["extra"] = extra
    machine["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(format_table(results, machine, settings))
    report = {"machine": machine, "settings": settings, "results": results_to_json(results)}
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        logger.info("wrote %s", args.json_out)
    return report


def row_seconds(row: Mapping[str, Any]) -> list[float]:
    """All mean and min figures of one JSON result row (a comparison, a single timing, or a table of timings)."""
    if "bundle" in row:
        timings = [row["bundle"], row["reference"]]
    elif "mean_s" in row:
        timings = [row]
    else:
        timings = [timing for timing in row.values() if isinstance(timing, Mapping) and "mean_s" in timing]
    return [timing[key] for timing in timings for key in ("mean_s", "min_s")]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python bench/bench_brats_ldm2d.py``; exits with 1 if a timing is not positive and finite."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = resolve_defaults(build_arg_parser().parse_args(argv))
    report = run(args)
    rows = {name: row for name, row in report["results"].items() if name != "extra"}
    seconds = [value for row in rows.values() for value in row_seconds(row)]
    if not all(math.isfinite(value) and value > 0 for value in seconds):
        logger.error("non-positive or non-finite timing in %s", rows)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
