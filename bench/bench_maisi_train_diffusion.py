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
Benchmark of MAISI diffusion training and latent-embedding creation through the bundle's own configs.

1. ``train_diffusion``: seconds per iteration of the config's ``SupervisedTrainer`` (data loading,
   ``LatentDiffusionPrepareBatch``, UNet forward, L1 loss, backward, Adam step, LR schedule, stats) on
   synthetic latents of ``--latent`` shape, batch 1. The first ``--warmup`` iterations are dropped.
   On CUDA the peak memory (``torch.cuda.max_memory_allocated``) of the training run is reported too.
2. ``create_embeddings``: seconds per image of ``scripts.embeddings.create_embeddings`` (load, intensity,
   encode to the posterior mean, write latent + sidecar) on synthetic CT volumes of ``--image`` shape.

The networks are the full-size ones of ``configs/inference.json`` (random weights) unless ``--tiny``.

Example::

    python bench/bench_maisi_train_diffusion.py --latent 32 32 32 --iterations 3 --image 128 128 128 --images 2
    python bench/bench_maisi_train_diffusion.py --tiny --latent 8 8 8 --iterations 2 --image 32 32 32 --images 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import monai  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "maisi_ct_generative"
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BUNDLE))

from demo.maisi_presets import MAISI_TINY  # noqa: E402
from scripts.embeddings import write_latent  # noqa: E402

logger = logging.getLogger("bench_maisi_train_diffusion")


def _parser(config_files: list[str], overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in config_files])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "repetitions": len(samples),
        "median_s": float(np.median(samples)),
        "mean_s": float(np.mean(samples)),
        "min_s": float(np.min(samples)),
        "max_s": float(np.max(samples)),
        "samples_s": [float(s) for s in samples],
    }


def bench_training(work: Path, latent: list[int], iterations: int, warmup: int, device: str, tiny: bool) -> dict[str, Any]:
    """Seconds per training iteration of configs/train_diffusion.json on synthetic latents."""
    rng = np.random.default_rng(0)
    items = []
    for index in range(iterations + warmup):
        path = work / f"latents/case{index}_emb.nii.gz"
        sidecar = {"dim": [4 * s for s in latent], "spacing": [1.5, 1.5, 2.0], "modality": 1}
        write_latent(path, rng.normal(size=(4, *latent)).astype(np.float32), (1.5, 1.5, 2.0), sidecar)
        items.append({"image": str(path), "fold": 0})
    (work / "latents.json").write_text(json.dumps({"training": items}))
    overrides = {
        "latent_datalist_file": str(work / "latents.json"),
        "train_output_dir": str(work / "train"),
        "device": f"$torch.device('{device}')",
        "max_epochs": 1,
        "num_workers": 0,
        "progress": False,
        "save_interval": 1,
        **(MAISI_TINY if tiny else {}),
    }
    parser = _parser(["inference.json", "train_diffusion.json"], overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    stamps: list[float] = []

    def stamp(_engine: Any) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_STARTED, stamp)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    per_iteration = [stamps[i + 1] - stamps[i] for i in range(0, len(stamps), 2)][warmup:]
    parameters = sum(p.numel() for p in parser.get_parsed_content("diffusion_unet").parameters())
    result = {"latent_shape": [4, *latent], "batch_size": 1, "unet_parameters": parameters, "per_iteration": _summary(per_iteration)}
    if device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def bench_embeddings(work: Path, image: list[int], images: int, device: str, tiny: bool) -> dict[str, Any]:
    """Seconds per image of configs/create_embeddings.json on synthetic CT volumes."""
    rng = np.random.default_rng(0)
    (work / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(images + 1):  # the first one warms up
        hu = np.clip(rng.normal(0.0, 400.0, size=image), -1000, 1000).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 2.0, 1.0])), str(work / f"images/case{index}.nii.gz"))
        items.append({"image": f"images/case{index}.nii.gz", "fold": 0})
    (work / "datalist.json").write_text(json.dumps({"training": items}))
    overrides = {
        "datalist_file": str(work / "datalist.json"),
        "embedding_output_dir": str(work / "embeddings"),
        "device": f"$torch.device('{device}')",
        "progress": False,
        **(MAISI_TINY if tiny else {}),
    }
    parser = _parser(["inference.json", "create_embeddings.json"], overrides)
    autoencoder = parser.get_parsed_content("embedding_autoencoder")
    from scripts.embeddings import create_embeddings, load_datalist

    loaded = load_datalist(work / "datalist.json")
    transform = parser.get_parsed_content("embedding_transform")
    window = parser.get_parsed_content("embedding_sliding_window_size")
    samples = []
    for index, item in enumerate(loaded):
        start = time.perf_counter()
        create_embeddings(autoencoder, [item], transform, work / "embeddings", work / f"latents{index}.json", 1, device, window, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in autoencoder.parameters())
    return {"image_shape": image, "sliding_window": window, "autoencoder_parameters": parameters, "per_image": _summary(samples[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, nargs=3, default=[32, 32, 32], help="training latent shape (X Y Z)")
    parser.add_argument("--iterations", type=int, default=3, help="measured training iterations")
    parser.add_argument("--warmup", type=int, default=1, help="training iterations not measured")
    parser.add_argument("--image", type=int, nargs=3, default=[128, 128, 128], help="image shape for embedding creation")
    parser.add_argument("--images", type=int, default=2, help="measured images (one more warms up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (smoke run)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            },
            "versions": {"torch": torch.__version__, "monai": monai.__version__},
            "tiny": args.tiny,
            "train_diffusion": bench_training(work / "train", list(args.latent), args.iterations, args.warmup, args.device, args.tiny),
            "create_embeddings": bench_embeddings(work / "embed", list(args.image), args.images, args.device, args.tiny),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
