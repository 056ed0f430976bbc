"""End-to-end tests of the brats_ldm2d bundle: train autoencoder -> train diffusion -> sample -> reconstruct."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle_helpers import BUNDLES_DIR, run_bundle
from demo.brats_presets import TINY_AUTOENCODER, TINY_DIFFUSION, TINY_DISCRIMINATOR
from demo.synthetic import make_brats_like_dataset

BUNDLE = BUNDLES_DIR / "brats_ldm2d"
PATCH = 32
SLICES_PER_VOLUME = 8
NUM_VOLUMES = 6
VAL_FRAC = 0.34  # 2 validation and 4 training volumes, so each of 2 ranks has a validation volume

LATENT_SHAPE = [1, PATCH // 4, PATCH // 4]


def train_overrides(root, dataset_dir, epochs):
    return {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "max_epochs": epochs,
        "val_interval": 1,
        "val_frac": VAL_FRAC,
        "num_workers": 0,
        "cache_rate": 0.0,
        "train_patch_size": [PATCH, PATCH],
        "num_slices_per_volume": SLICES_PER_VOLUME,
        "train_batch_size_img": 1,
        "train_batch_size_slice": 4,
        "log_every_n_iterations": 1,
        **TINY_DISCRIMINATOR,
        **TINY_AUTOENCODER,
    }


def inference_overrides(root, **extra):
    return {
        "bundle_root": str(root),
        "load_autoencoder_path": str(root / "runs/train_autoencoder/model_autoencoder.pt"),
        "load_diffusion_path": str(root / "runs/train_diffusion/model.pt"),
        "latent_shape": LATENT_SHAPE,
        "num_inference_steps": 5,
        **TINY_AUTOENCODER,
        **TINY_DIFFUSION,
        **extra,
    }


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd")
    make_brats_like_dataset(root, num_volumes=NUM_VOLUMES, shape=(40, 40, 16), seed=0)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir):
    """Train the tiny autoencoder (2 epochs, then resumed to 3) and the tiny diffusion model (2 epochs)."""
    root = tmp_path_factory.mktemp("brats_run")
    logs = {}
    logs["ae"] = run_bundle(BUNDLE, ["train_autoencoder.json"], train_overrides(root, dataset_dir, 2)).stdout
    logs["ae_resumed"] = run_bundle(BUNDLE, ["train_autoencoder.json"], train_overrides(root, dataset_dir, 3)).stdout
    diffusion = {**train_overrides(root, dataset_dir, 2), **TINY_DIFFUSION}
    diffusion["load_autoencoder_path"] = str(root / "runs/train_autoencoder/model_autoencoder.pt")
    logs["diffusion"] = run_bundle(BUNDLE, ["train_autoencoder.json", "train_diffusion.json"], diffusion).stdout
    return root, logs


def _tiny_autoencoder():
    from monai.networks.nets import AutoencoderKL

    config = json.loads((BUNDLE / "configs/train_autoencoder.json").read_text())["autoencoder_def"]
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    kwargs.update({k.split("#")[1]: v for k, v in TINY_AUTOENCODER.items()})
    return AutoencoderKL(**kwargs)


def test_autoencoder_training_writes_loadable_weights_and_logs(trained):
    root, logs = trained
    run_dir = root / "runs/train_autoencoder"
    weights = torch.load(run_dir / "model_autoencoder.pt", map_location="cpu", weights_only=True)
    network = _tiny_autoencoder()
    network.load_state_dict(weights, strict=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    checkpoint = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) >= {"autoencoder", "discriminator", "optimizer_g", "optimizer_d", "epoch", "iteration"}
    assert checkpoint["epoch"] == 3
    iterations_per_epoch = 4  # 4 training volumes, one volume (4 slices) per batch
    assert checkpoint["iteration"] == 3 * iterations_per_epoch

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalar_tags = set(events.Tags()["scalars"])
    assert {"loss", "kl_loss", "perceptual_loss", "discriminator_loss", "psnr", "ssim"} <= scalar_tags
    assert events.Tags()["images"], "validation image grids are missing from TensorBoard"
    assert "Epoch[3] Metrics" in logs["ae_resumed"]


def test_autoencoder_training_resumes_from_last_checkpoint(trained):
    _, logs = trained
    assert re.search(r"resumed from .*checkpoint_last.pt at epoch 2", logs["ae_resumed"])
    assert "Epoch: 1/3" not in logs["ae_resumed"] and "Epoch: 3/3" in logs["ae_resumed"]


def test_diffusion_checkpoint_holds_scale_factor(trained):
    root, logs = trained
    run_dir = root / "runs/train_diffusion"
    exported = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert set(exported) == {"unet_state_dict", "scale_factor"}
    scale_factor = float(exported["scale_factor"])
    assert 0.0 < scale_factor < 100.0
    checkpoint = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert float(checkpoint["scale_factor"]) == scale_factor
    assert checkpoint["epoch"] == 2
    logged = float(re.search(r"latent scale factor ([0-9.]+) \(computed", logs["diffusion"]).group(1))
    assert logged == pytest.approx(scale_factor, rel=1e-5)


def test_diffusion_resume_reuses_stored_scale_factor(trained, dataset_dir):
    root, _ = trained
    overrides = {**train_overrides(root, dataset_dir, 3), **TINY_DIFFUSION}
    overrides["load_autoencoder_path"] = str(root / "runs/train_autoencoder/model_autoencoder.pt")
    overrides["output_dir"] = str(root / "runs/train_diffusion_resume")
    first = run_bundle(BUNDLE, ["train_autoencoder.json", "train_diffusion.json"], {**overrides, "max_epochs": 1})
    assert "(computed from" in first.stdout
    resumed = run_bundle(BUNDLE, ["train_autoencoder.json", "train_diffusion.json"], overrides)
    assert "checkpoint_last.pt)" in resumed.stdout and "(computed from" not in resumed.stdout
    checkpoint = torch.load(root / "runs/train_diffusion_resume/checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 3


def test_sampling_outputs_and_determinism(trained, tmp_path):
    root, _ = trained
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_bundle(BUNDLE, ["inference.json"], inference_overrides(root, output_dir=str(out_a), num_output_samples=2))
    run_bundle(BUNDLE, ["inference.json"], inference_overrides(root, output_dir=str(out_b), num_output_samples=1))
    run_bundle(BUNDLE, ["inference.json"], inference_overrides(root, output_dir=str(out_c), random_seed=7))

    report = json.loads((out_a / "inference_report.json").read_text())
    assert report["settings"]["num_inference_steps"] == 5 and report["settings"]["scheduler"] == "ddim"
    assert [s["seed"] for s in report["samples"]] == [0, 1]
    arrays = []
    for sample in report["samples"]:
        image = nib.load(sample["nifti"])
        data = image.get_fdata(dtype=np.float32)
        assert data.shape == (PATCH, PATCH, 1)
        assert image.get_data_dtype() == np.float32
        assert 0.0 <= data.min() and data.max() <= 1.0
        np.testing.assert_allclose(image.affine, np.eye(4))
        picture = np.asarray(Image.open(sample["png"]))
        assert picture.shape == (PATCH, PATCH) and picture.dtype == np.uint8
        arrays.append(data)
    assert not np.array_equal(arrays[0], arrays[1]), "different seeds gave the same sample"

    repeated = nib.load(out_b / "sample_0000_seed0.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(repeated, arrays[0])
    other_seed = nib.load(out_c / "sample_0000_seed7.nii.gz").get_fdata(dtype=np.float32)
    assert not np.array_equal(other_seed, arrays[0])


def test_sampling_with_ddpm_scheduler(trained, tmp_path):
    root, _ = trained
    run_bundle(
        BUNDLE, ["inference.json"], inference_overrides(root, output_dir=str(tmp_path), scheduler="ddpm", num_inference_steps=3)
    )
    report = json.loads((tmp_path / "inference_report.json").read_text())
    assert report["settings"]["scheduler"] == "ddpm"
    data = nib.load(report["samples"][0]["nifti"]).get_fdata()
    assert data.shape == (PATCH, PATCH, 1) and np.isfinite(data).all()


def test_reconstruction_report(trained, dataset_dir, tmp_path):
    root, _ = trained
    overrides = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path),
        "load_autoencoder_path": str(root / "runs/train_autoencoder/model_autoencoder.pt"),
        "val_frac": VAL_FRAC,
        "num_workers": 0,
        "infer_patch_size": [PATCH, PATCH],
        "num_slices_per_volume": SLICES_PER_VOLUME,
        "num_worst_cases": 1,
        **TINY_AUTOENCODER,
    }
    run_bundle(BUNDLE, ["inference_autoencoder.json"], overrides)
    report = json.loads((tmp_path / "reconstruction_report.json").read_text())
    assert len(report["cases"]) == report["num_cases"] == 2  # the MAISI reconstruction report format
    assert report["units"] == {"psnr": "dB", "ssim": "1", "mae": "intensity on [0, 1]"}
    for case in report["cases"]:
        original = nib.load(case["original"]).get_fdata()
        reconstruction = nib.load(case["reconstruction"]).get_fdata()
        assert original.shape == reconstruction.shape == (PATCH, PATCH, 1)
        assert 0.0 <= original.min() and original.max() <= 1.0
        mse = float(np.mean((original - reconstruction) ** 2))
        assert case["psnr"] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-3)
        assert case["mae"] == pytest.approx(float(np.mean(np.abs(original - reconstruction))), rel=1e-4)
    assert np.isfinite(report["mean"]["psnr"]) and -1.0 <= report["mean"]["ssim"] <= 1.0
    assert report["mean"]["mae"] == pytest.approx(np.mean([case["mae"] for case in report["cases"]]))
    worst = min(range(2), key=lambda index: report["cases"][index]["psnr"])
    assert report["worst_metric"] == "psnr" and [case["index"] for case in report["worst_cases"]] == [worst]
    with Image.open(report["worst_cases"][0]["preview"]) as preview:  # input | reconstruction | difference
        assert preview.size == (3 * PATCH + 2 * 4, PATCH)
    assert report["settings"]["load_autoencoder_path"] == overrides["load_autoencoder_path"]


def test_multi_gpu_overlays_with_gloo(dataset_dir, tmp_path):
    overrides = train_overrides(tmp_path, dataset_dir, 1)
    run_bundle(BUNDLE, ["train_autoencoder.json", "multi_gpu_train_autoencoder.json"], overrides, torchrun_procs=2)
    checkpoint = torch.load(tmp_path / "runs/train_autoencoder/checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert checkpoint["iteration"] == 2  # 4 training volumes shared by 2 ranks
    assert checkpoint["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(2 * 5e-05)
    assert len(list((tmp_path / "runs/train_autoencoder/tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes TensorBoard
    _tiny_autoencoder().load_state_dict(checkpoint["autoencoder"], strict=True)

    diffusion = {**overrides, **TINY_DIFFUSION}
    diffusion["load_autoencoder_path"] = str(tmp_path / "runs/train_autoencoder/model_autoencoder.pt")
    configs = ["train_autoencoder.json", "train_diffusion.json"]
    configs += ["multi_gpu_train_autoencoder.json", "multi_gpu_train_diffusion.json"]
    run_bundle(BUNDLE, configs, diffusion, torchrun_procs=2)
    exported = torch.load(tmp_path / "runs/train_diffusion/model.pt", weights_only=True)
    assert "module.conv_in.conv.weight" not in exported["unet_state_dict"]
    assert "conv_in.conv.weight" in exported["unet_state_dict"]
    checkpoint = torch.load(tmp_path / "runs/train_diffusion/checkpoint_last.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2 * 5e-05)
