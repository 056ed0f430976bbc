"""
The simulated-data flow of MAISI diffusion training (the MAISI diffusion tutorial's simulate -> embeddings ->
train -> generate) with the CT bundle's own configs on the CPU: rflow-ct training under ``torchrun`` with
2 gloo processes, generation with the exported UNet by changing ``trained_diffusion_path`` only, and
ddpm-ct training with body-region inputs.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle, run_in_process
from demo.maisi_presets import MAISI_TINY, MAISI_TINY_DIFFUSION_TRAINING, read_scalars, simulated_embeddings

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
NUM_IMAGES = 4
LR = 1e-3


def _unet(config_files):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in config_files])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in MAISI_TINY.items():
        parser[key] = value
    with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
        return parser.get_parsed_content("diffusion_unet_def")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_diffusion_flow")
    return root, simulated_embeddings(BUNDLE, root, NUM_IMAGES, run=run_in_process)


def _train_overrides(paths, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "latent_datalist_file": paths["latent_datalist_file"],
        "train_output_dir": str(output_dir),
        **MAISI_TINY,
        **MAISI_TINY_DIFFUSION_TRAINING,
        "lr": LR,
        **extra,
    }


@pytest.fixture(scope="module")
def ddp_trained(workspace):
    root, paths = workspace
    output = root / "ddp"
    configs = ["inference.json", "train_diffusion.json", "multi_gpu_train_diffusion.json"]
    run_bundle(BUNDLE, configs, _train_overrides(paths, output, max_epochs=2), torchrun_procs=2)
    return output


def test_torchrun_two_processes_rank0_outputs_and_lr_per_rank(ddp_trained):
    checkpoint = torch.load(ddp_trained / "checkpoint_last.pt", weights_only=True)
    iterations_per_rank = 2 * NUM_IMAGES // 2  # 2 epochs, 4 latents shared by 2 ranks
    assert checkpoint["epoch"] == 2 and checkpoint["iteration"] == iterations_per_rank
    assert checkpoint["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(2 * LR)  # lr x world size
    assert checkpoint["lr_scheduler"]["last_epoch"] == iterations_per_rank
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.0  # the decay spans this rank's iterations exactly
    exported = torch.load(ddp_trained / "diff_unet_3d_rflow-ct.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in exported["unet_state_dict"])  # DDP unwrapped
    _unet(["inference.json"]).load_state_dict(exported["unet_state_dict"], strict=True)
    assert exported["scale_factor"] == checkpoint["scale_factor"] > 0
    losses = read_scalars(ddp_trained / "tensorboard", "train_loss")
    assert len(losses) == iterations_per_rank and all(np.isfinite(losses))  # rank 0 logs alone
    assert len(list((ddp_trained / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes TensorBoard


def test_generation_with_the_trained_unet_by_one_id(workspace, ddp_trained, tmp_path):
    _, paths = workspace
    mask = np.zeros((64, 64, 32), dtype=np.uint8)
    mask[8:-8, 8:-8, :] = 200
    mask[20:40, 20:40, 8:24] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([4.0, 4.0, 8.0, 1.0])), str(tmp_path / "mask.nii.gz"))
    overrides = {
        "bundle_root": str(BUNDLE),
        "output_dir": str(tmp_path / "generated"),
        "mask_path": str(tmp_path / "mask.nii.gz"),
        "output_size": [256, 256, 128],
        "spacing": [1.0, 1.0, 2.0],
        "num_inference_steps": 2,
        "quality_check_max_attempts": 1,
        "augment_masks": False,
        "progress": False,
        "trained_autoencoder_path": paths["trained_autoencoder_path"],
        "trained_controlnet_path": paths["trained_controlnet_path"],
        "trained_diffusion_path": str(ddp_trained / "diff_unet_3d_rflow-ct.pt"),
        **MAISI_TINY,
    }
    run_in_process(BUNDLE, ["inference.json"], overrides)  # the generation command line is tested with the generation tests
    images = sorted((tmp_path / "generated").rglob("*image*.nii.gz"))
    assert len(images) == 1, sorted(p.name for p in (tmp_path / "generated").rglob("*"))
    image = nib.load(str(images[0]))
    assert image.shape == (256, 256, 128) and image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.header.get_zooms()[:3], [1.0, 1.0, 2.0])
    assert "".join(nib.aff2axcodes(image.affine)) == "RAS"
    data = np.asarray(image.dataobj)
    assert -1000 <= data.min() and data.max() <= 1000


def test_ddpm_training_uses_body_regions_and_loads_into_ddpm_unet(workspace, tmp_path):
    _, paths = workspace
    configs = ["inference.json", "inference_ddpm_ct.json", "train_diffusion.json"]
    run_in_process(BUNDLE, configs, _train_overrides(paths, tmp_path, max_epochs=1, validation_fold=0))
    exported = torch.load(tmp_path / "diff_unet_3d_ddpm-ct.pt", weights_only=True)
    _unet(["inference.json", "inference_ddpm_ct.json"]).load_state_dict(exported["unet_state_dict"], strict=True)
    assert any("top_region" in key for key in exported["unet_state_dict"])
    losses = read_scalars(tmp_path / "tensorboard", "train_loss")
    assert len(losses) == NUM_IMAGES // 2 and all(np.isfinite(losses))  # fold 0 held out
