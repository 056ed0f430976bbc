"""
MAISI diffusion training through the CT bundle's own configs, on the CPU with tiny networks: datalist ->
embeddings (posterior means + sidecars) -> rflow-ct training that learns -> resume and fine-tune with the
stored scale factor; bad training ids fail before training. The runs are in-process (``monai.bundle``'s
``initialize``/``run``/``finalize``); ``test_maisi_training_diffusion_flow.py`` covers ddpm-ct, the command line
under torchrun and generation with the trained UNet.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_in_process
from demo.maisi_presets import (
    MAISI_TINY,
    MAISI_TINY_DIFFUSION_TRAINING,
    read_scalars,
    simulated_embeddings,
)

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
SHAPE = (32, 32, 32)
SPACING = (1.5, 1.5, 2.0)
NUM_IMAGES = 4
ABDOMEN = [0, 0, 1, 0]


def _parser(config_files, overrides):
    return parse_bundle_config(BUNDLE, config_files, {"bundle_root": str(BUNDLE), **overrides})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_diffusion")
    paths = simulated_embeddings(BUNDLE, root, NUM_IMAGES, SHAPE, SPACING, run=run_in_process)
    return root, {"autoencoder_def": paths["trained_autoencoder_path"], "controlnet_def": paths["trained_controlnet_path"]}


def _train_overrides(root, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "latent_datalist_file": str(root / "embeddings/datalist_latents.json"),
        "train_output_dir": str(output_dir),
        **MAISI_TINY,
        **MAISI_TINY_DIFFUSION_TRAINING,
        **extra,
    }


def test_embeddings_are_posterior_means_with_sidecars(workspace):
    root, weights = workspace
    datalist = json.loads((root / "embeddings/datalist_latents.json").read_text())["training"]
    assert len(datalist) == NUM_IMAGES and {item["fold"] for item in datalist} == {0, 1}
    with bundle_scripts(BUNDLE):
        from scripts.decode import set_autoencoder_splits
        from scripts.embeddings import read_latent, read_sidecar

        parser = _parser(["inference.json", "create_embeddings.json"], {**MAISI_TINY, "dataset_dir": str(root / "data")})
        autoencoder = parser.get_parsed_content("autoencoder_def")
        autoencoder.load_state_dict(torch.load(weights["autoencoder_def"], weights_only=True))
        autoencoder.eval()
        set_autoencoder_splits(autoencoder, 1)
        transform = parser.get_parsed_content("embedding_transform")
        for item in datalist:
            path = root / "embeddings" / item["image"]
            image = nib.load(str(path))
            assert image.shape == (8, 8, 8, 4) and image.get_data_dtype() == np.float32
            np.testing.assert_allclose(np.diag(image.affine)[:3], [4 * s for s in SPACING])
            sidecar = read_sidecar(path)
            assert sidecar == {
                "dim": list(SHAPE),
                "spacing": list(SPACING),
                "modality": 1,
                "top_region_index": ABDOMEN,
                "bottom_region_index": ABDOMEN,
            }
            assert nib.load(item["label"]).shape == SHAPE  # labels stay at image resolution for the ControlNet
            source = root / "data/images" / path.name.replace("_emb.nii.gz", ".nii.gz")
            with torch.no_grad():
                z_mu, _ = autoencoder.encode(torch.as_tensor(transform({"image": str(source)})["image"])[None])
            torch.testing.assert_close(read_latent(path), z_mu[0], rtol=1e-4, atol=1e-5)  # the mean, not a sample


def test_rflow_training_learns_exports_and_resumes_with_stored_scale_factor(workspace, tmp_path):
    root, _ = workspace
    output = tmp_path / "train"
    run_in_process(BUNDLE, ["inference.json", "train_diffusion.json"], _train_overrides(root, output, max_epochs=10, save_interval=5))
    losses = read_scalars(output / "tensorboard", "train_loss")
    assert len(losses) == 10 * NUM_IMAGES and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])  # the tiny task is learned, not only run

    exported = torch.load(output / "diff_unet_3d_rflow-ct.pt", weights_only=True)
    assert set(exported) == {"unet_state_dict", "scale_factor"}
    with bundle_scripts(BUNDLE):
        from scripts.embeddings import load_datalist, read_latent

        first = load_datalist(root / "embeddings/datalist_latents.json")[0]["image"]
        assert exported["scale_factor"] == pytest.approx(1.0 / read_latent(first).std().item(), rel=1e-5)
    with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
        unet = _parser(["inference.json"], MAISI_TINY).get_parsed_content("diffusion_unet_def")
    unet.load_state_dict(exported["unet_state_dict"], strict=True)
    checkpoint = torch.load(output / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 10 and checkpoint["iteration"] == 10 * NUM_IMAGES
    assert checkpoint["scale_factor"] == exported["scale_factor"]
    assert checkpoint["lr_scheduler"]["last_epoch"] == 10 * NUM_IMAGES
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.0  # polynomial decay ends at 0

    # resume: continues at epoch 11 with the scale factor of the checkpoint (a sentinel proves it is not recomputed)
    checkpoint["scale_factor"] = 0.5
    torch.save(checkpoint, output / "checkpoint_last.pt")
    run_in_process(BUNDLE, ["inference.json", "train_diffusion.json"], _train_overrides(root, output, max_epochs=11))
    resumed = torch.load(output / "checkpoint_last.pt", weights_only=True)
    assert resumed["epoch"] == 11 and resumed["iteration"] == 11 * NUM_IMAGES
    assert resumed["scale_factor"] == 0.5
    assert torch.load(output / "diff_unet_3d_rflow-ct.pt", weights_only=True)["scale_factor"] == 0.5
    assert len(read_scalars(output / "tensorboard", "train_loss")) == 11 * NUM_IMAGES
    resumed_weights = torch.load(output / "diff_unet_3d_rflow-ct.pt", weights_only=True)["unet_state_dict"]
    assert any(not torch.equal(resumed_weights[k], v) for k, v in exported["unet_state_dict"].items())  # decay re-spread over 11 epochs

    # fine-tuning from an exported UNet (config resolved in-process) keeps its scale factor and its weights
    torch.save(dict(exported, scale_factor=0.75), tmp_path / "pretrained.pt")
    overrides = _train_overrides(root, tmp_path / "finetune", finetune=True, trained_diffusion_path=str(tmp_path / "pretrained.pt"))
    with bundle_scripts(BUNDLE):
        parser = _parser(["inference.json", "train_diffusion.json"], overrides)
        assert parser.get_parsed_content("scale_factor") == 0.75
        finetuned = parser.get_parsed_content("diffusion_unet").state_dict()
    for key, value in exported["unet_state_dict"].items():
        torch.testing.assert_close(finetuned[key], value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_epochs": 0}, "max_epochs=0 is not allowed"),
        ({"lr": -1.0}, "lr=-1.0 is not allowed"),
        ({"modality": "mri_t1x"}, "mri_t1x"),
        ({"validation_fold": "0"}, "validation_fold='0' must be an integer fold number or null"),
        ({"finetune": True, "trained_diffusion_path": "missing.pt"}, "trained_diffusion_path='missing.pt' does not exist"),
        ({"exported_diffusion_path": "$@trained_diffusion_path"}, "is trained_diffusion_path; choose another file"),
    ],
)
def test_bad_training_inputs_fail_before_training(workspace, tmp_path, overrides, message):
    root, _ = workspace
    parser = _parser(["inference.json", "train_diffusion.json"], _train_overrides(root, tmp_path, **overrides))
    with bundle_scripts(BUNDLE), pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("prepare")
    assert isinstance(raised.value.__cause__, ValueError) and message in str(raised.value.__cause__)
    assert not (tmp_path / "checkpoint_last.pt").exists()


