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
End-to-end demo on generated data, on the CPU in a few minutes.

brats_ldm2d: write a small BraTS-like dataset, train a small autoencoder and a small latent diffusion
model with the bundle's own configs, sample new slices (NIfTI + PNG) and check reconstructions.

maisi_ct_generative: the MAISI diffusion-training flow on a simulated CT dataset with tiny networks:
check the images and build the datalist (``scripts.data_prep``), encode them into latent embeddings,
train the diffusion UNet (rectified flow) and generate a CT from a mask with the trained UNet.

Usage: ``python -m demo.run_demo [--output-dir demo_output]``
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from demo.maisi_presets import (
    MAISI_TINY,
    MAISI_TINY_DIFFUSION_TRAINING,
    MAISI_TINY_DIVISIBLE_K,
    read_scalars,
    simulate_ct_dataset,
    write_initial_weights,
)
from demo.brats_presets import DEMO_AUTOENCODER, DEMO_DIFFUSION, DEMO_PATCH
from demo.runner import BUNDLES_DIR, bundle_command, display_command, run_bundle
from demo.synthetic import make_brats_like_dataset

logger = logging.getLogger("demo")

BRATS_AE_EPOCHS = 40
BRATS_DIFFUSION_EPOCHS = 200

def _step(title: str, bundle: Path, configs: list[str], overrides: dict) -> None:
    logger.info("%s\n    $ cd %s && %s", title, bundle.relative_to(BUNDLES_DIR.parent), display_command(bundle_command(configs, overrides)))
    start = time.perf_counter()
    run_bundle(bundle, configs, overrides)
    logger.info("    done in %.1f s", time.perf_counter() - start)


def brats_preview(data_dir: Path, samples: list[str], path: Path, scale: int = 3) -> Path:
    """
    Write one PNG: central axial slices of training volumes (top row) above generated samples (bottom row),
    each enlarged ``scale`` times, so the two can be compared at a glance.
    """
    from PIL import Image

    real = []
    for volume_path in sorted((data_dir / "Task01_BrainTumour" / "imagesTr").glob("*.nii.gz"))[: len(samples)]:
        flair = np.asarray(nib.load(str(volume_path)).dataobj)[..., 0]
        centre = flair.shape[0] // 2 - DEMO_PATCH // 2
        flair = flair[centre : centre + DEMO_PATCH, centre : centre + DEMO_PATCH, flair.shape[2] // 2]
        real.append(np.round(np.flipud(flair.T)[:, ::-1] / max(float(flair.max()), 1e-6) * 255).astype(np.uint8))
    generated = [np.asarray(Image.open(sample)) for sample in samples]
    rows = [np.concatenate(row, axis=1) for row in (real, generated)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)
    return path


def run_brats_demo(output_dir: Path) -> dict:
    """Run the brats_ldm2d chain on generated data; return where the results are."""
    bundle = BUNDLES_DIR / "brats_ldm2d"
    root = output_dir / "brats_ldm2d"
    data_dir = root / "data"
    make_brats_like_dataset(data_dir, num_volumes=8, shape=(72, 72, 16), seed=0)
    common = {
        "bundle_root": str(root),
        "dataset_dir": str(data_dir),
        "num_workers": 0,
        "val_frac": 0.25,
        "train_patch_size": [DEMO_PATCH, DEMO_PATCH],
        "num_slices_per_volume": 16,
        "train_batch_size_img": 2,
        "train_batch_size_slice": 8,
        "log_every_n_iterations": 20,
        **DEMO_AUTOENCODER,
    }
    # the perceptual term (a ResNet50 on every slice) would cost most of the step on a CPU; the demo drops it
    _step(
        "[1/4] train the autoencoder (VAE-GAN, without the perceptual term)",
        bundle,
        ["train_autoencoder.json"],
        {**common, "max_epochs": BRATS_AE_EPOCHS, "val_interval": BRATS_AE_EPOCHS, "discriminator_def#channels": 16, "lr": 1e-3, "perceptual_weight": 0.0},
    )
    autoencoder = root / "runs/train_autoencoder/model_autoencoder.pt"
    _step(
        "[2/4] train the latent diffusion model",
        bundle,
        ["train_autoencoder.json", "train_diffusion.json"],
        {**common, **DEMO_DIFFUSION, "max_epochs": BRATS_DIFFUSION_EPOCHS, "lr": 2e-3, "load_autoencoder_path": str(autoencoder)},
    )
    samples_dir = root / "samples"
    _step(
        "[3/4] sample new slices (DDIM, 50 steps)",
        bundle,
        ["inference.json"],
        {
            "bundle_root": str(root),
            "output_dir": str(samples_dir),
            "overwrite": True,
            "load_autoencoder_path": str(autoencoder),
            "load_diffusion_path": str(root / "runs/train_diffusion/model.pt"),
            "latent_shape": [1, DEMO_PATCH // 4, DEMO_PATCH // 4],
            "num_output_samples": 6,
            "num_inference_steps": 50,
            "random_seed": 0,
            **DEMO_AUTOENCODER,
            **DEMO_DIFFUSION,
        },
    )
    reconstruction_dir = root / "reconstruction"
    _step(
        "[4/4] check reconstructions of held-out slices",
        bundle,
        ["inference_autoencoder.json"],
        {
            "bundle_root": str(root),
            "dataset_dir": str(data_dir),
            "output_dir": str(reconstruction_dir),
            "overwrite": True,
            "load_autoencoder_path": str(autoencoder),
            "val_frac": 0.25,
            "num_workers": 0,
            "infer_patch_size": [DEMO_PATCH, DEMO_PATCH],
            "num_slices_per_volume": 16,
            **DEMO_AUTOENCODER,
        },
    )
    samples = [s["png"] for s in json.loads((samples_dir / "inference_report.json").read_text())["samples"]]
    reconstruction = json.loads((reconstruction_dir / "reconstruction_report.json").read_text())["mean"]
    return {
        "preview": str(brats_preview(data_dir, samples, root / "preview_training_vs_samples.png")),
        "samples": samples,
        "tensorboard": str(root / "runs"),
        "reconstruction_psnr": round(reconstruction["psnr"], 2),
        "reconstruction_ssim": round(reconstruction["ssim"], 3),
    }


def _data_prep(title: str, bundle: Path, arguments: list[str]) -> None:
    command = [sys.executable, "-m", "scripts.data_prep", *arguments]
    logger.info("%s\n    $ cd %s && python -m scripts.data_prep %s", title, bundle.relative_to(BUNDLES_DIR.parent), " ".join(arguments))
    subprocess.run(command, cwd=bundle, check=True, capture_output=True, text=True)


def run_maisi_demo(output_dir: Path) -> dict:
    """Run the MAISI diffusion-training flow on a simulated CT dataset; return where the results are."""
    bundle = BUNDLES_DIR / "maisi_ct_generative"
    root = output_dir / "maisi_ct_generative"
    data_dir = root / "data"
    simulate_ct_dataset(data_dir, num_images=4, shape=(64, 64, 32), spacing=(3.0, 3.0, 4.0), seed=0)
    _data_prep("[1/5] check the images", bundle, ["check", str(data_dir / "images"), "--report", str(root / "data_check_report.json")])
    _data_prep(
        "[2/5] build the datalist (2 folds, body regions from the labels)",
        bundle,
        ["datalist", str(data_dir / "images"), str(data_dir / "datalist.json"), "--label_dir", str(data_dir / "labels"), "--num_folds", "2", "--regions_from_labels", "True"],
    )
    # the tiny autoencoder and ControlNet are untrained stand-ins for the published weights
    weights = write_initial_weights(bundle, ["inference.json"], MAISI_TINY, root / "models", {"autoencoder_def": None, "controlnet_def": "controlnet_state_dict"})
    common = {"bundle_root": str(bundle), **MAISI_TINY}
    _step(
        "[3/5] encode the images into latent embeddings (posterior mean + sidecars)",
        bundle,
        ["inference.json", "create_embeddings.json"],
        {
            **common,
            "datalist_file": str(data_dir / "datalist.json"),
            "embedding_output_dir": str(root / "runs/create_embeddings"),
            "trained_autoencoder_path": weights["autoencoder_def"],
            "embedding_divisible_k": MAISI_TINY_DIVISIBLE_K,
        },
    )
    train_dir = root / "runs/train_diffusion"
    _step(
        "[4/5] train the diffusion UNet (rectified flow)",
        bundle,
        ["inference.json", "train_diffusion.json"],
        {
            **common,
            **MAISI_TINY_DIFFUSION_TRAINING,
            "latent_datalist_file": str(root / "runs/create_embeddings/datalist_latents.json"),
            "train_output_dir": str(train_dir),
            "max_epochs": 10,
            "save_interval": 5,
        },
    )
    mask = np.zeros((64, 64, 32), dtype=np.uint8)
    mask[8:-8, 8:-8, :] = 200
    mask[20:40, 20:40, 8:24] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([4.0, 4.0, 8.0, 1.0])), str(root / "mask.nii.gz"))
    generated_dir = root / "generated"
    _step(
        "[5/5] generate a CT from a mask with the trained UNet (trained_diffusion_path)",
        bundle,
        ["inference.json"],
        {
            **common,
            "output_dir": str(generated_dir),
            "mask_path": str(root / "mask.nii.gz"),
            "output_size": [256, 256, 128],
            "spacing": [1.0, 1.0, 2.0],
            "num_inference_steps": 4,
            "quality_check_max_attempts": 1,
            "augment_masks": False,
            "trained_autoencoder_path": weights["autoencoder_def"],
            "trained_controlnet_path": weights["controlnet_def"],
            "trained_diffusion_path": str(train_dir / "diff_unet_3d_rflow-ct.pt"),
        },
    )
    losses = read_scalars(train_dir / "tensorboard", "train_loss")
    return {
        "data_check_report": str(root / "data_check_report.json"),
        "latent_datalist": str(root / "runs/create_embeddings/datalist_latents.json"),
        "diffusion_loss_first_last_epoch": [round(float(np.mean(losses[:4])), 3), round(float(np.mean(losses[-4:])), 3)],
        "trained_diffusion": str(train_dir / "diff_unet_3d_rflow-ct.pt"),
        "generated": sorted(str(p) for p in generated_dir.rglob("*") if p.suffix in (".gz", ".png")),
        "tensorboard": str(root / "runs"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="where everything is written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    summary = {"brats_ldm2d": run_brats_demo(args.output_dir.resolve())}
    summary["maisi_ct_generative"] = run_maisi_demo(args.output_dir.resolve())
    logger.info("demo finished in %.0f s:\n%s", time.perf_counter() - start, json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
