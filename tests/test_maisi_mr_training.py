"""
The seed-000 flow for MR through maisi_mr_generative's own configs, on the CPU with tiny networks: simulated MR
volumes -> datalist -> percentile normalisation -> latent embeddings (+ sidecars) -> rectified-flow training with
modality dropout -> generation with the trained UNet (one id changed), run in-process. The multi-GPU overlay and
ControlNet training on the embedded masks are in test_maisi_mr_training_multi.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_in_process
from demo.maisi_presets import MAISI_TINY, MAISI_TINY_DIFFUSION_TRAINING, MAISI_TINY_DIVISIBLE_K, read_scalars, write_initial_weights

BUNDLE = BUNDLES_DIR / "maisi_mr_generative"
SHAPE = (32, 32, 32)
SPACING = (2.0, 2.0, 2.0)
NUM_IMAGES = 4
MRI_T1 = 9
BRAIN = 22
BRATS_IDS = (401, 402, 403)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def simulate_mr_dataset(folder: Path, num_images: int = NUM_IMAGES, shape=SHAPE, spacing=SPACING, seed: int = 0) -> list[Path]:
    """
    MR-like volumes (arbitrary positive units, int16, bright tail) with label maps: a head (brain 22) holding a
    BraTS-like tumour (402 oedema around 403 enhancing around 401 core, ids above 255). Returns the image paths.
    """
    rng = np.random.RandomState(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij"))
    head = (grid**2).sum(0) < 0.8
    paths = []
    for index in range(num_images):
        centre = rng.uniform(-0.3, 0.3, size=3).reshape(3, 1, 1, 1)
        distance = np.sqrt(((grid - centre) ** 2).sum(0))
        labels = np.where(head, BRAIN, 0).astype(np.int16)
        for label_id, radius in ((402, 0.45), (403, 0.3), (401, 0.15)):
            labels[head & (distance < radius)] = label_id
        intensity = {0: 0.0, BRAIN: 400.0, 402: 700.0, 403: 1500.0, 401: 150.0}
        image = np.vectorize(intensity.get)(labels) * rng.uniform(0.5, 2.0)  # arbitrary scanner scale
        image = np.clip(image + rng.normal(0.0, 20.0, size=shape) * head, 0, None)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(np.round(image).astype(np.int16), affine), str(folder / "images" / f"mr_{index:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(folder / "labels" / f"mr_{index:03d}.nii.gz"))
        paths.append(folder / "images" / f"mr_{index:03d}.nii.gz")
    return paths


def _parser(config_files, overrides):
    return parse_bundle_config(BUNDLE, config_files, {"bundle_root": str(BUNDLE), **overrides})


def prepare_mr_embeddings(root: Path) -> dict[str, str]:
    """
    Simulated MR data -> datalist (mri_t1) -> embeddings with a tiny autoencoder; returns the initial weights.

    In-process: the data_prep command line is tested in test_maisi_data_prep.py, the embedding config's under
    torchrun in test_maisi_create_embeddings_multi_gpu.py.
    """
    simulate_mr_dataset(root / "data")
    with bundle_scripts(BUNDLE):
        from scripts.data_prep import datalist

        datalist(str(root / "data/images"), str(root / "data/datalist.json"), label_dir=str(root / "data/labels"), num_folds=2, modality="mri_t1")
    weights = write_initial_weights(
        BUNDLE, ["inference.json"], MAISI_TINY, root / "models", {"autoencoder_def": None, "diffusion_unet_def": "unet_state_dict"}
    )
    run_in_process(
        BUNDLE,
        ["inference.json", "create_embeddings.json"],
        {
            "bundle_root": str(BUNDLE),
            "datalist_file": str(root / "data/datalist.json"),
            "embedding_output_dir": str(root / "embeddings"),
            "trained_autoencoder_path": weights["autoencoder_def"],
            "embedding_divisible_k": MAISI_TINY_DIVISIBLE_K,
            "progress": False,
            **MAISI_TINY,
        },
    )
    return weights


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_mr_training")
    return root, prepare_mr_embeddings(root)


def _train_overrides(root, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "latent_datalist_file": str(root / "embeddings/datalist_latents.json"),
        "train_output_dir": str(output_dir),
        **MAISI_TINY,
        **MAISI_TINY_DIFFUSION_TRAINING,
        **extra,
    }


def test_mr_embeddings_use_percentile_normalisation(workspace):
    root, weights = workspace
    datalist = json.loads((root / "embeddings/datalist_latents.json").read_text())["training"]
    assert len(datalist) == NUM_IMAGES and {item["fold"] for item in datalist} == {0, 1}
    with bundle_scripts(BUNDLE):
        from scripts.decode import set_autoencoder_splits
        from scripts.embeddings import read_latent, read_sidecar

        parser = _parser(["inference.json", "create_embeddings.json"], MAISI_TINY)
        transform = parser.get_parsed_content("embedding_transform")
        autoencoder = parser.get_parsed_content("autoencoder_def")
        autoencoder.load_state_dict(torch.load(weights["autoencoder_def"], weights_only=True))
        set_autoencoder_splits(autoencoder.eval(), 1)
        for item in datalist:
            path = root / "embeddings" / item["image"]
            assert nib.load(str(path)).shape == (8, 8, 8, 4)
            assert read_sidecar(path) == {
                "dim": list(SHAPE), "spacing": list(SPACING), "modality": MRI_T1,
                "top_region_index": [0, 0, 0, 0], "bottom_region_index": [0, 0, 0, 0],
            }
            source = root / "data/images" / path.name.replace("_emb.nii.gz", ".nii.gz")
            raw = np.asarray(nib.load(str(source)).dataobj).astype(np.float64)
            normalised = torch.as_tensor(transform({"image": str(source)})["image"])
            # percentiles: 0 -> 0 and the 99.5th percentile -> 1, the bright tail above 1 is kept (not clipped)
            expected = (raw - np.percentile(raw, 0)) / (np.percentile(raw, 99.5) - np.percentile(raw, 0))
            np.testing.assert_allclose(normalised[0].numpy(), expected, rtol=1e-4, atol=1e-5)
            assert normalised.max() > 1.0 and normalised.min() == 0.0
            with torch.no_grad():
                z_mu, _ = autoencoder.encode(normalised[None])
            torch.testing.assert_close(read_latent(path), z_mu[0], rtol=1e-4, atol=1e-5)  # the posterior mean


def test_rflow_mr_training_with_modality_dropout_then_generation(workspace, tmp_path):
    root, weights = workspace
    output = tmp_path / "train"
    run_in_process(BUNDLE, ["inference.json", "train_diffusion.json"], _train_overrides(root, output, max_epochs=8))
    losses = read_scalars(output / "tensorboard", "train_loss")
    assert len(losses) == 8 * NUM_IMAGES and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])  # the tiny task is learned, not only run
    exported_path = output / "diff_unet_3d_rflow-mr.pt"  # named after the bundle's version
    exported = torch.load(exported_path, weights_only=True)
    assert set(exported) == {"unet_state_dict", "scale_factor"}
    assert torch.load(output / "checkpoint_last.pt", weights_only=True)["epoch"] == 8

    with bundle_scripts(BUNDLE):
        from scripts.diffusion_training import augment_modality_labels

        parser = _parser(["inference.json", "train_diffusion.json"], _train_overrides(root, output))
        assert parser.get_parsed_content("train_modality_code") == MRI_T1
        assert (parser["modality_generalize_prob"], parser["modality_dropout_prob"]) == (0.1, 0.1)  # published dropout

        torch.manual_seed(0)
        augmented = augment_modality_labels(torch.full((4000,), MRI_T1), 0.1, 0.1)
        shares = {code: float((augmented == code).float().mean()) for code in (MRI_T1, 8, 0)}
        assert shares[MRI_T1] == pytest.approx(0.81, abs=0.03) and shares[0] == pytest.approx(0.1, abs=0.02)
        assert shares[8] == pytest.approx(0.09, abs=0.02) and sum(shares.values()) == pytest.approx(1.0)

    # generation with the trained UNet: only trained_diffusion_path changes
    overrides = {
        "bundle_root": str(BUNDLE),
        "output_dir": str(tmp_path / "generated"),
        "output_size": [128, 128, 128],
        "spacing": [2.0, 2.0, 2.0],
        "num_inference_steps": 2,
        "progress": False,
        "trained_autoencoder_path": weights["autoencoder_def"],
        "trained_diffusion_path": str(exported_path),
        **MAISI_TINY,
    }
    run_in_process(BUNDLE, ["inference.json"], overrides)
    report = json.loads((tmp_path / "generated/generation_report.json").read_text())
    assert report["settings"]["files"]["trained_diffusion_path"] == str(exported_path)
    image = nib.load(report["samples"][0]["image"])
    data = np.asarray(image.dataobj)
    assert image.shape == (128, 128, 128) and data.dtype == np.int16 and data.min() >= 0 and data.max() > 0
    np.testing.assert_allclose(image.header.get_zooms()[:3], [2.0, 2.0, 2.0])
