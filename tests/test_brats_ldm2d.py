"""End-to-end tests of the brats_ldm2d bundle: train autoencoder -> train diffusion -> sample -> reconstruct.

The configs run in-process through ``monai.bundle.ConfigWorkflow`` (``run_in_process``); the command line itself
is exercised by ``test_brats_ldm2d_package.py`` (``python -m monai.bundle run`` from the installed zip) and by
the ``torchrun`` tests here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle_helpers import BUNDLES_DIR, error_chain, run_bundle, run_in_process
from demo.brats_presets import TINY_AUTOENCODER, TINY_DIFFUSION, TINY_DISCRIMINATOR
from demo.synthetic import make_brats_like_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUNDLE = BUNDLES_DIR / "brats_ldm2d"
PATCH = 32
SLICES_PER_VOLUME = 8
NUM_VOLUMES = 6
VAL_FRAC = 0.34  # 2 validation and 4 training volumes, so each of 2 ranks has a validation volume
AE_CONFIGS = ["train_autoencoder.json"]
DIFFUSION_CONFIGS = ["train_autoencoder.json", "train_diffusion.json"]

LATENT_SHAPE = [1, PATCH // 4, PATCH // 4]


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Collect every INFO+ log message of the block (what ``configs/logging.conf`` shows on the console)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(), logging.getLogger("monai.handlers.StatsHandler")]  # the latter does not propagate
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def train(configs, overrides) -> str:
    """Run a training config in-process; return its log."""
    with captured_logs() as messages:
        run_in_process(BUNDLE, configs, overrides)
    return "\n".join(messages)


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


def sample(root, **extra) -> dict:
    """Run inference.json in-process; return its report."""
    output_dir = root / extra.pop("output_dir")  # names are taken relative to the run folder
    run_in_process(BUNDLE, ["inference.json"], inference_overrides(root, output_dir=str(output_dir), **extra))
    return json.loads((output_dir / "inference_report.json").read_text())


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd")
    make_brats_like_dataset(root, num_volumes=NUM_VOLUMES, shape=(40, 40, 16), seed=0)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir, one_torch_thread):
    """Train the tiny autoencoder (2 epochs, then resumed to 3) and the tiny diffusion model (2 epochs)."""
    root = tmp_path_factory.mktemp("brats_run")
    logs = {}
    logs["ae"] = train(AE_CONFIGS, train_overrides(root, dataset_dir, 2))
    logs["ae_resumed"] = train(AE_CONFIGS, train_overrides(root, dataset_dir, 3))
    diffusion = {**train_overrides(root, dataset_dir, 2), **TINY_DIFFUSION}
    diffusion["load_autoencoder_path"] = str(root / "runs/train_autoencoder/model_autoencoder.pt")
    logs["diffusion"] = train(DIFFUSION_CONFIGS, diffusion)
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
    first = train(DIFFUSION_CONFIGS, {**overrides, "max_epochs": 1})
    assert "(computed from" in first
    resumed = train(DIFFUSION_CONFIGS, overrides)
    assert "checkpoint_last.pt)" in resumed and "(computed from" not in resumed
    checkpoint = torch.load(root / "runs/train_diffusion_resume/checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 3


def test_sampling_outputs_and_determinism(trained):
    root, _ = trained
    report = sample(root, output_dir="out_a", num_output_samples=2)
    sample(root, output_dir="out_b", num_output_samples=1)
    sample(root, output_dir="out_c", random_seed=7)

    settings = report["settings"]
    assert settings["num_inference_steps"] == 5 and settings["scheduler"] == "ddim"
    assert settings["num_output_samples"] == 2 and settings["latent_shape"] == LATENT_SHAPE
    assert settings["world_size"] == 1 and settings["overwrite"] is False
    assert 0.0 < settings["scale_factor"] < 100.0
    assert [s["seed"] for s in report["samples"]] == [0, 1]
    arrays = []
    for record in report["samples"]:
        image = nib.load(record["nifti"])
        data = image.get_fdata(dtype=np.float32)
        assert data.shape == (PATCH, PATCH, 1)
        assert image.get_data_dtype() == np.float32
        assert 0.0 <= data.min() and data.max() <= 1.0
        assert record["min"] == pytest.approx(float(data.min())) and record["max"] == pytest.approx(float(data.max()))
        assert record["seconds"] > 0
        np.testing.assert_allclose(image.affine, np.eye(4))
        picture = np.asarray(Image.open(record["png"]))
        assert picture.shape == (PATCH, PATCH) and picture.dtype == np.uint8
        arrays.append(data)
    assert not np.array_equal(arrays[0], arrays[1]), "different seeds gave the same sample"

    repeated = nib.load(root / "out_b/sample_0000_seed0.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(repeated, arrays[0])
    other_seed = nib.load(root / "out_c/sample_0000_seed7.nii.gz").get_fdata(dtype=np.float32)
    assert not np.array_equal(other_seed, arrays[0])


def test_sampling_with_ddpm_scheduler(trained):
    root, _ = trained
    report = sample(root, output_dir="out_ddpm", scheduler="ddpm", num_inference_steps=3)
    assert report["settings"]["scheduler"] == "ddpm" and report["settings"]["num_inference_steps"] == 3
    data = nib.load(report["samples"][0]["nifti"]).get_fdata()
    assert data.shape == (PATCH, PATCH, 1) and np.isfinite(data).all()


def test_sampling_never_overwrites_an_earlier_run_silently(trained):
    root, _ = trained
    first = sample(root, output_dir="out_again", num_output_samples=1)
    nifti = root / "out_again/sample_0000_seed0.nii.gz"
    before = nifti.read_bytes()
    with pytest.raises(Exception) as refused:
        sample(root, output_dir="out_again", num_output_samples=1, random_seed=3)
    message = error_chain(refused.value)
    assert "FileExistsError: output_dir=" in message and "already holds an earlier run" in message
    assert "--overwrite true" in message
    assert nifti.read_bytes() == before and not (root / "out_again/sample_0000_seed3.nii.gz").exists()

    second = sample(root, output_dir="out_again", num_output_samples=1, random_seed=3, overwrite=True)
    assert second["settings"]["overwrite"] is True and [s["seed"] for s in second["samples"]] == [3]
    assert first["samples"][0]["nifti"] != second["samples"][0]["nifti"]


def test_multi_gpu_sampling_writes_the_same_bytes_as_one_process(trained, tmp_path):
    """Samples split over 2 gloo ranks: byte-identical files to a 1-process run, one merged report."""
    root, _ = trained
    single = sample(root, output_dir=str(tmp_path / "single"), num_output_samples=3, random_seed=5)
    overrides = inference_overrides(root, output_dir=str(tmp_path / "ranks"), num_output_samples=3, random_seed=5)
    run_bundle(BUNDLE, ["inference.json", "multi_gpu_inference.json"], overrides, torchrun_procs=2)
    merged = json.loads((tmp_path / "ranks/inference_report.json").read_text())

    assert merged["settings"]["world_size"] == 2
    assert [s["index"] for s in merged["samples"]] == [0, 1, 2] and [s["seed"] for s in merged["samples"]] == [5, 6, 7]
    written = sorted(p.name for p in (tmp_path / "ranks").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())
    for record in single["samples"]:
        image = nib.load(record["nifti"]).get_fdata()
        assert 0.0 < image.std(), "a blank sample would make the byte comparison meaningless"
        for key in ("nifti", "png"):
            name = record[key].rsplit("/", 1)[-1]
            assert (tmp_path / "ranks" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_reconstruction_report(trained, dataset_dir):
    root, _ = trained
    overrides = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(root / "reconstruction"),
        "load_autoencoder_path": str(root / "runs/train_autoencoder/model_autoencoder.pt"),
        "val_frac": VAL_FRAC,
        "num_workers": 0,
        "infer_patch_size": [PATCH, PATCH],
        "num_slices_per_volume": SLICES_PER_VOLUME,
        "num_worst_cases": 1,
        **TINY_AUTOENCODER,
    }
    run_in_process(BUNDLE, ["inference_autoencoder.json"], overrides)
    report = json.loads((root / "reconstruction/reconstruction_report.json").read_text())
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

    with pytest.raises(Exception) as refused:
        run_in_process(BUNDLE, ["inference_autoencoder.json"], overrides)
    assert "output_dir=" in error_chain(refused.value) and "already holds an earlier run" in error_chain(refused.value)


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
