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
Seconds per iteration of the MAISI autoencoder and ControlNet trainers at a fixed small workload.

Both trainers are built exactly as a user runs them, from ``configs/inference.json`` plus
``configs/train_autoencoder.json`` / ``configs/train_controlnet.json`` of ``maisi_ct_generative``, with the
full-size networks (random weights) and synthetic data written to a temporary folder:

1. autoencoder (``VAEGANTrainer``): batch 1, one ``--vae-patch`` CT patch per iteration, L1 + KL +
   adversarial (PatchDiscriminator) + perceptual (2.5D ResNet50, ``fake_3d_ratio`` 0.2, random local
   weights written to the temporary folder) terms, generator and discriminator updates;
2. ControlNet (``SupervisedTrainer`` with ``ControlNetPrepareBatch``/``Inferer``/``Loss``): batch 1, a
   ``--latent`` latent with its 4x mask, frozen diffusion UNet, rectified flow, weighted L1 loss;
   ``--region-contrastive`` adds the second ControlNet pass.

Each trainer runs one epoch of ``--warmup + --iterations`` iterations; the time between
``ITERATION_STARTED`` and ``ITERATION_COMPLETED`` of the timed iterations is reported (mean / median /
min), with the CPU seconds per wall second of the whole run.

Example::

    python bench/bench_maisi_train_vae_controlnet.py --vae-patch 32 32 32 --latent 16 16 16 --iterations 3 --warmup 1
    python bench/bench_maisi_train_vae_controlnet.py --tiny --iterations 1 --warmup 0 --json-out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import monai  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

logger = logging.getLogger("bench_maisi_train_vae_controlnet")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundles" / "maisi_ct_generative"
SPACING = (1.5, 1.5, 2.0)
UPSAMPLE = 4

TINY_NETWORKS: dict[str, Any] = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
    "discriminator_def#channels": 8,
    "discriminator_def#num_layers_d": 2,
    **{
        f"{net}#{key}": value
        for net in ("diffusion_unet_def", "controlnet_def")
        for key, value in {
            "num_channels": [8, 16, 16],
            "attention_levels": [False, False, False],
            "num_head_channels": [0, 0, 8],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
        }.items()
    },
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
}


def _write_vae_data(root: Path, shape: Sequence[int], count: int) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for index in range(count):
        volume = rng.uniform(-1000, 1000, size=tuple(shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), str(root / f"ct{index}.nii.gz"))
        entries.append({"image": f"ct{index}.nii.gz", "fold": 0 if index == 0 else 1})
    (root / "datalist_vae.json").write_text(json.dumps({"training": entries}))
    return root / "datalist_vae.json"


def _write_controlnet_data(root: Path, latent: Sequence[int], count: int, embeddings: Any) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    image_shape = [UPSAMPLE * s for s in latent]
    for index in range(count):
        mask = rng.choice(np.array([0, 1, 3, 5, 23, 28, 129, 200], dtype=np.uint8), size=image_shape)
        nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), str(root / f"mask{index}.nii.gz"))
        sidecar = embeddings.make_sidecar(image_shape, SPACING, 1)
        values = torch.from_numpy(rng.normal(size=(4, *latent)).astype(np.float32))
        embeddings.write_latent(root / f"case{index}_emb.nii.gz", values, SPACING, sidecar)
        entries.append({"image": f"case{index}_emb.nii.gz", "label": f"mask{index}.nii.gz", "fold": 1})
    (root / "datalist_controlnet.json").write_text(json.dumps({"training": entries}))
    return root / "datalist_controlnet.json"


def _parser(config: str, overrides: Mapping[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_DIR / "configs" / "inference.json"), str(BUNDLE_DIR / "configs" / config)])
    for key, value in overrides.items():
        if parser.get(key.split("#")[0]) is not None or "#" not in key:  # tiny overrides of networks this config has
            parser[key] = value
    return parser


def _time_iterations(trainer: Any, warmup: int) -> tuple[list[float], float, float]:
    """Run ``trainer`` and return the timed iterations' seconds, the wall and the CPU seconds of the run."""
    starts: dict[int, float] = {}
    durations: list[float] = []

    def started(engine: Any) -> None:
        starts[engine.state.iteration] = time.perf_counter()

    def completed(engine: Any) -> None:
        if engine.state.iteration > warmup:
            durations.append(time.perf_counter() - starts[engine.state.iteration])

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.run()
    return durations, time.perf_counter() - wall, time.process_time() - cpu


def _summary(durations: Sequence[float], wall: float, cpu: float) -> dict[str, Any]:
    return {
        "repetitions": len(durations),
        "mean_s": statistics.fmean(durations),
        "median_s": statistics.median(durations),
        "min_s": min(durations),
        "max_s": max(durations),
        "samples_s": list(durations),
        "cpu_s_per_wall_s": cpu / wall if wall > 0 else float("nan"),
    }


def bench_autoencoder(root: Path, args: argparse.Namespace, common: Mapping[str, Any]) -> dict[str, Any]:
    """Seconds per ``VAEGANTrainer`` iteration (generator + discriminator update) at ``--vae-patch``."""
    from torchvision.models import resnet50

    weights = root / "resnet50_random.pt"
    torch.save({"state_dict": resnet50().state_dict()}, weights)
    datalist = _write_vae_data(root, [s + 8 for s in args.vae_patch], 2)
    iterations = args.warmup + args.iterations
    overrides = {
        **common,
        "datalist_file": str(datalist),
        "train_output_dir": str(root / "vae_run"),
        "finetune": False,
        "resume": False,
        "max_epochs": 1,
        "val_interval": 10**6,
        "patch_size": list(args.vae_patch),
        "random_aug": False,
        "spacing_type": "original",
        "perceptual_loss_model_weights_path": str(weights),
        "train#dataloader#sampler": {"_target_": "torch.utils.data.RandomSampler", "data_source": "@train#dataset", "replacement": True, "num_samples": iterations},
        "train#dataloader#shuffle": False,
    }
    parser = _parser("train_autoencoder.json", overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    result = _summary(*_time_iterations(trainer, args.warmup))
    result["parameters_m"] = {
        "autoencoder": sum(p.numel() for p in parser.get_parsed_content("gnetwork").parameters()) / 1e6,
        "discriminator": sum(p.numel() for p in parser.get_parsed_content("dnetwork").parameters()) / 1e6,
    }
    result["workload"] = {"patch": list(args.vae_patch), "batch_size": 1, "terms": ["l1", "kl", "perceptual", "adversarial"]}
    return result


def bench_controlnet(root: Path, args: argparse.Namespace, common: Mapping[str, Any]) -> dict[str, Any]:
    """Seconds per ControlNet training iteration at ``--latent`` (frozen UNet, rectified flow)."""
    import scripts.embeddings as embeddings

    datalist = _write_controlnet_data(root, args.latent, 1, embeddings)
    iterations = args.warmup + args.iterations
    overrides = {
        **common,
        "datalist_file": str(datalist),
        "validation_fold": 0,
        "train_output_dir": str(root / "controlnet_run"),
        "resume": False,
        "max_epochs": 1,
        "scale_factor": 1.0,  # random full-size UNet: no checkpoint file to read the scale from
        "trained_diffusion_path": None,
        "controlnet_init_path": None,
        "use_region_contrastive_loss": args.region_contrastive,
        "train#dataloader#sampler": {"_target_": "torch.utils.data.RandomSampler", "data_source": "@train#dataset", "replacement": True, "num_samples": iterations},
        "train#dataloader#shuffle": False,
    }
    parser = _parser("train_controlnet.json", overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    result = _summary(*_time_iterations(trainer, args.warmup))
    result["parameters_m"] = {
        "diffusion_unet_frozen": sum(p.numel() for p in parser.get_parsed_content("diffusion_unet").parameters()) / 1e6,
        "controlnet": sum(p.numel() for p in parser.get_parsed_content("controlnet").parameters()) / 1e6,
    }
    result["workload"] = {"latent": [4, *args.latent], "mask": [UPSAMPLE * s for s in args.latent], "batch_size": 1, "region_contrastive": args.region_contrastive}
    return result


def environment(device: str) -> dict[str, Any]:
    """The machine and library versions the figures belong to."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "monai": monai.__version__,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-patch", type=int, nargs=3, default=[32, 32, 32], help="autoencoder training patch")
    parser.add_argument("--latent", type=int, nargs=3, default=[16, 16, 16], help="ControlNet latent size (mask is 4x)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per trainer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before them")
    parser.add_argument("--region-contrastive", action="store_true", help="add the region-contrastive ControlNet pass")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (smoke test; timings meaningless)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=("autoencoder", "controlnet"), default=None, help="run one trainer only")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(BUNDLE_DIR))  # the configs import the bundle's ``scripts`` package
    common: dict[str, Any] = {
        "bundle_root": str(BUNDLE_DIR),
        "device": f"$torch.device('{args.device}')",
        "num_workers": 0,
        "cache_rate": 1.0,
        "log_every_n_iterations": 10**6,
        **(TINY_NETWORKS if args.tiny else {}),
    }
    report: dict[str, Any] = {"environment": environment(args.device), "tiny": args.tiny, "warmup": args.warmup, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "autoencoder"):
            report["results"]["autoencoder"] = bench_autoencoder(root, args, common)
        if args.only in (None, "controlnet"):
            report["results"]["controlnet"] = bench_controlnet(root, args, common)
    for name, result in report["results"].items():
        print(
            f"{name:12s} s/iteration mean {result['mean_s']:.3f} median {result['median_s']:.3f} min {result['min_s']:.3f} "
            f"({result['repetitions']} timed, CPU s per wall s {result['cpu_s_per_wall_s']:.2f}) "
            f"params(M) {json.dumps({k: round(v, 1) for k, v in result['parameters_m'].items()})} workload {json.dumps(result['workload'])}"
        )
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
