"""maisi_mr_generative end to end on the CPU with tiny networks: both versions, guidance, determinism, image-from-mask."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle, run_in_process
from demo.maisi_presets import MAISI_TINY_AUTOENCODER, MAISI_TINY_CONTROLNET, MAISI_TINY_UNET

BUNDLE = BUNDLES_DIR / "maisi_mr_generative"
OUTPUT_SIZE = [128, 128, 128]
SPACING = [2.0, 2.0, 2.0]
BRATS_IDS = (401, 402, 403)  # BraTS tumour sub-regions of the CT/MR label dictionary: above 255
BRAIN = 22

TINY = {
    **MAISI_TINY_AUTOENCODER,  # the decode runs at the full output size
    **MAISI_TINY_UNET,
    **MAISI_TINY_CONTROLNET,
    "controlnet_def#conditioning_embedding_num_channels": [4, 4, 4],
    # pinned: with null the planner follows the RAM free at the start (whole-volume decode or halo tiles, whose
    # tile statistics change the values slightly), so reruns would not be comparable on a busy machine
    "memory_budget_gb": 64.0,
}
VERSION_CONFIGS = {"rflow-mr": ["inference.json"], "rflow-mr-brain": ["inference.json", "inference_rflow_mr_brain.json"]}


def tiny_parser(bundle: Path = BUNDLE, configs: list[str] | None = None) -> ConfigParser:
    """The bundle's configs with the tiny network overrides."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in configs or ["inference.json"]])
    parser["bundle_root"] = str(bundle)
    for key, value in TINY.items():
        parser[key] = value
    return parser


def write_tiny_weights(models_dir: Path, bundle: Path = BUNDLE, seed: int = 0, wrap_autoencoder: bool = False) -> dict[str, str]:
    """
    Random tiny weights in the published layouts: autoencoder plain (or wrapped in ``unet_state_dict``, as some
    published files are), ``{"unet_state_dict", "scale_factor"}``, ``{"controlnet_state_dict"}``.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    parser = tiny_parser(bundle)
    torch.manual_seed(seed)
    paths = {}
    for net_id, config_id, key in (
        ("autoencoder_def", "trained_autoencoder_path", "unet_state_dict" if wrap_autoencoder else None),
        ("diffusion_unet_def", "trained_diffusion_path", "unet_state_dict"),
        ("controlnet_def", "trained_controlnet_path", "controlnet_state_dict"),
    ):
        with bundle_scripts(bundle):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
            network = parser.get_parsed_content(net_id)
        for parameter in network.parameters():  # MONAI zero-inits output convs: randomise so every net matters
            if parameter.dim() > 1 and not parameter.detach().abs().sum():
                torch.nn.init.normal_(parameter, std=0.02)
        state = network.state_dict()
        payload = state if key is None else {key: state}
        if key == "unet_state_dict" and net_id == "diffusion_unet_def":
            payload["scale_factor"] = torch.tensor(1.0)
        path = models_dir / f"{net_id}_{seed}.pt"
        torch.save(payload, path)
        paths[config_id] = str(path)
    return paths


def write_brats_mask(path: Path, shape=(100, 100, 80), spacing=(2.4, 2.4, 2.4)) -> np.ndarray:
    """A brain with the three BraTS tumour sub-regions (ids 401-403), int16."""
    mask = np.zeros(shape, dtype=np.int16)
    x, y, z = shape
    mask[x // 6 : -x // 6, y // 6 : -y // 6, z // 6 : -z // 6] = BRAIN
    mask[x // 3 : x // 2, y // 3 : y // 2, z // 3 : z // 2] = 402
    mask[x // 3 + 3 : x // 2 - 3, y // 3 + 3 : y // 2 - 3, z // 3 + 3 : z // 2 - 3] = 403
    mask[x // 3 + 6 : x // 2 - 6, y // 3 + 6 : y // 2 - 6, z // 3 + 6 : z // 2 - 6] = 401
    nib.save(nib.Nifti1Image(mask, np.diag([*spacing, 1.0])), str(path))
    return mask


def overrides(weights: dict[str, str], output_dir: Path, **extra) -> dict:
    return {
        "bundle_root": str(BUNDLE),
        "output_dir": str(output_dir),
        "output_size": OUTPUT_SIZE,
        "spacing": SPACING,
        "num_inference_steps": 2,
        "progress": False,
        **TINY,
        **weights,
        **extra,
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_mr")
    weights = {
        "rflow-mr": write_tiny_weights(root / "models", seed=0, wrap_autoencoder=True),
        "rflow-mr-brain": write_tiny_weights(root / "models", seed=1),
    }
    write_brats_mask(root / "brats_mask.nii.gz")
    return root, weights


def _report(output_dir: Path) -> tuple[dict, list[dict]]:
    report = json.loads((output_dir / "generation_report.json").read_text())
    return report, report["samples"]


def _image(sample: dict) -> np.ndarray:
    return np.asarray(nib.load(sample["image"]).dataobj)


def _check_mr_image(sample: dict, size, spacing) -> np.ndarray:
    image = nib.load(sample["image"])
    data = np.asarray(image.dataobj)
    assert data.shape == tuple(size) and data.dtype == np.int16 and image.get_data_dtype() == np.int16
    assert data.min() >= 0 and data.max() > 0  # MR units: no negative values
    np.testing.assert_allclose(image.affine, np.diag([*spacing, 1.0]), atol=1e-6)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert Image.open(sample["preview"]).mode == "RGB"
    assert sample["intensity_percentile_99_5"] == pytest.approx(float(np.percentile(data, 99.5)))
    return data


def test_both_versions_guidance_defaults_and_determinism(workspace, tmp_path):
    root, weights = workspace
    # the command line once (python -m monai.bundle run), in-process otherwise
    run_bundle(BUNDLE, VERSION_CONFIGS["rflow-mr"], overrides(weights["rflow-mr"], tmp_path / "mr", num_output_samples=2))
    report, samples = _report(tmp_path / "mr")
    settings = report["settings"]
    assert settings["version"] == "rflow-mr" and settings["cfg_guidance_scale"] == 15.0
    assert settings["requests"][0]["modality"] == 9  # "mri_t1", normalised to its code
    assert "trained_controlnet_path" not in settings["files"]  # image-only: no ControlNet is needed or loaded
    assert [s["seed"] for s in samples] == [0, 1] and all(s["mask_source"] == "none (image only)" for s in samples)
    first, second = (_check_mr_image(s, OUTPUT_SIZE, SPACING) for s in samples)
    assert "label" not in samples[0] and not np.array_equal(first, second)

    # rflow-mr-brain: its own weights, guidance 2 and seed 1234 by default (geometry kept small here)
    run_in_process(BUNDLE, VERSION_CONFIGS["rflow-mr-brain"], overrides(weights["rflow-mr-brain"], tmp_path / "brain", modality=11, spacing=[1.0, 1.0, 1.5]))
    report, samples = _report(tmp_path / "brain")
    settings = report["settings"]
    assert settings["version"] == "rflow-mr-brain" and settings["cfg_guidance_scale"] == 2.0 and settings["requests"][0]["modality"] == 11
    assert settings["files"]["trained_autoencoder_path"].endswith("autoencoder_def_1.pt")
    assert samples[0]["seed"] == 1234
    _check_mr_image(samples[0], OUTPUT_SIZE, [1.0, 1.0, 1.5])

    # same seed -> same output, whatever the number of samples
    run_in_process(BUNDLE, VERSION_CONFIGS["rflow-mr"], overrides(weights["rflow-mr"], tmp_path / "again", modality="MRI_T1"))
    _, again = _report(tmp_path / "again")
    np.testing.assert_array_equal(_image(again[0]), first)


def test_image_from_mask_with_labels_above_255(workspace, tmp_path):
    root, weights = workspace
    mask_path = root / "brats_mask.nii.gz"
    common = {"mask_path": str(mask_path), "modality": "mri_flair", "cfg_guidance_scale": 0.0}
    run_in_process(BUNDLE, ["inference.json"], overrides(weights["rflow-mr"], tmp_path / "mask", **common))
    report, samples = _report(tmp_path / "mask")
    assert report["settings"]["files"]["trained_controlnet_path"] == weights["rflow-mr"]["trained_controlnet_path"]
    sample = samples[0]
    assert sample["mask_source"] == f"user:{mask_path}"
    image = _check_mr_image(sample, OUTPUT_SIZE, SPACING)
    label_file = nib.load(sample["label"])
    labels = np.asarray(label_file.dataobj)
    assert labels.shape == tuple(OUTPUT_SIZE) and label_file.get_data_dtype() == np.int16
    assert set(np.unique(labels)) == {0, BRAIN, *BRATS_IDS}  # raw ids kept in the written label map
    np.testing.assert_allclose(label_file.affine, np.diag([*SPACING, 1.0]), atol=1e-6)
    assert (image[labels == 0] > 0).any()  # default: the image is not cut to the mask
