"""maisi_ct_generative end to end on the CPU with tiny networks, a synthetic mask database and a user mask."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_helpers import BUNDLES_DIR, run_bundle

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
OUTPUT_SIZE = [256, 256, 128]
SPACING = [1.5, 1.5, 2.0]
DATABASE_LABELS = {1, 3, 200}  # liver, spleen, body

TINY_UNET = {"num_channels": [8, 16, 16], "attention_levels": [False, False, False], "num_head_channels": [0, 0, 8], "num_res_blocks": 1, "norm_num_groups": 8}  # attention only in the middle block, at 2k tokens
TINY = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
    **{f"diffusion_unet_def#{k}": v for k, v in TINY_UNET.items()},
    **{f"controlnet_def#{k}": v for k, v in TINY_UNET.items()},
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
}
VERSION_CONFIGS = {"rflow-ct": ["inference.json"], "ddpm-ct": ["inference.json", "inference_ddpm_ct.json"]}


def _write_mask(path, shape, spacing, labelled_boxes):
    mask = np.zeros(shape, dtype=np.uint8)
    for label, box in labelled_boxes:
        mask[box] = label
    nib.save(nib.Nifti1Image(mask, np.diag([*spacing, 1.0])), str(path))
    return mask


def _body_with_organs(shape):
    x, y, z = shape
    return [
        (200, np.s_[x // 8 : -x // 8, y // 8 : -y // 8, :]),
        (1, np.s_[x // 4 : x // 2, y // 4 : y // 2, z // 4 : 3 * z // 4]),
        (3, np.s_[x // 2 + 8 : 3 * x // 4, y // 4 : y // 2, z // 4 : z // 2]),
    ]


def _tiny_weights(models_dir, version):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in VERSION_CONFIGS[version]])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in TINY.items():
        parser[key] = value
    torch.manual_seed(0)
    paths = {}
    for net_id, file_name, key in (
        ("autoencoder_def", "autoencoder.pt", None),
        ("diffusion_unet_def", f"unet_{version}.pt", "unet_state_dict"),
        ("controlnet_def", f"controlnet_{version}.pt", "controlnet_state_dict"),
    ):
        network = parser.get_parsed_content(net_id)
        for parameter in network.parameters():  # non-zero everywhere, so the ControlNet and UNet matter
            if parameter.dim() > 1 and not parameter.detach().abs().sum():
                torch.nn.init.normal_(parameter, std=0.02)
        state = network.state_dict()
        payload = state if key is None else {key: state}
        if key == "unet_state_dict":
            payload["scale_factor"] = torch.tensor(1.0)
        torch.save(payload, models_dir / file_name)
        paths[net_id] = models_dir / file_name
    return {
        "trained_autoencoder_path": str(paths["autoencoder_def"]),
        "trained_diffusion_path": str(paths["diffusion_unet_def"]),
        "trained_controlnet_path": str(paths["controlnet_def"]),
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_ct")
    masks_dir = root / "datasets" / "masks"
    masks_dir.mkdir(parents=True)
    _write_mask(masks_dir / "case_exact.nii.gz", OUTPUT_SIZE, SPACING, _body_with_organs(OUTPUT_SIZE))
    entries = [
        {
            "pseudo_label_filename": "case_exact.nii.gz",
            "spacing": SPACING,
            "dim": OUTPUT_SIZE,
            "label_list": sorted(DATABASE_LABELS),
            "top_region_index": [0, 0, 1, 0],
            "bottom_region_index": [0, 0, 1, 0],
        }
    ]
    (root / "datasets" / "database.json").write_text(json.dumps(entries))
    user_shape, user_spacing = [128, 128, 64], [3.0, 3.0, 4.0]
    _write_mask(root / "user_mask.nii.gz", user_shape, user_spacing, _body_with_organs(user_shape))
    (root / "models").mkdir()
    weights = {version: _tiny_weights(root / "models", version) for version in VERSION_CONFIGS}
    return root, weights


def _overrides(root, weights, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "output_dir": str(output_dir),
        "all_mask_files_json": str(root / "datasets" / "database.json"),
        "all_mask_files_base_dir": str(root / "datasets" / "masks"),
        "output_size": OUTPUT_SIZE,
        "spacing": SPACING,
        "num_inference_steps": 2,
        "quality_check_max_attempts": 1,
        "augment_masks": False,
        "progress": False,
        **TINY,
        **weights,
        **extra,
    }


def _load(report_path):
    report = json.loads(report_path.read_text())
    return report, report["samples"]


def test_database_mask_pairs_outputs_and_determinism(workspace, tmp_path):
    root, weights = workspace
    run_bundle(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "a", num_output_samples=2, quality_check_max_attempts=2))
    run_bundle(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "b", num_output_samples=1))
    report, samples = _load(tmp_path / "a" / "generation_report.json")
    assert [s["seed"] for s in samples] == [100_003, 100_004]  # the second attempt's seeds
    assert report["settings"]["version"] == "rflow-ct" and "decode" in report["settings"]["decode_plan"]
    database_mask = nib.load(root / "datasets" / "masks" / "case_exact.nii.gz").get_fdata()
    for sample in samples:
        image = nib.load(sample["image"])
        label = nib.load(sample["label"])
        data = np.asarray(image.dataobj)
        labels = np.asarray(label.dataobj)
        assert data.shape == tuple(OUTPUT_SIZE) and data.dtype == np.int16 and image.get_data_dtype() == np.int16
        assert data.min() >= -1000 and data.max() <= 1000
        assert (data[labels == 0] == -1000).all()
        assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0} | DATABASE_LABELS
        np.testing.assert_array_equal(labels, database_mask)  # raw ids, not renumbered, no augmentation
        np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert Image.open(sample["preview"]).mode in ("RGB", "RGBA")
        quality = sample["quality_check"]  # random tiny networks: the HU check fails, so every attempt is used
        assert quality["passed"] is False and quality["attempts"] == 2 and quality["failed_organs"]
        assert sample["mask_source"].startswith("database:case_exact.nii.gz")
    second_attempt = np.asarray(nib.load(samples[0]["image"]).dataobj)
    _, single = _load(tmp_path / "b" / "generation_report.json")
    assert single[0]["seed"] == 0 and single[0]["quality_check"]["attempts"] == 1
    first_attempt = np.asarray(nib.load(single[0]["image"]).dataobj)
    assert not np.array_equal(second_attempt, first_attempt)  # a retry draws new noise
    assert not np.array_equal(np.asarray(nib.load(samples[1]["image"]).dataobj), second_attempt)
    run_bundle(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "c", num_output_samples=1))
    _, repeated = _load(tmp_path / "c" / "generation_report.json")
    np.testing.assert_array_equal(np.asarray(nib.load(repeated[0]["image"]).dataobj), first_attempt)


def test_user_mask_ddpm_and_guidance(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(
        root, weights["ddpm-ct"], tmp_path / "ddpm", mask_path=str(root / "user_mask.nii.gz"), image_output_ext=".nii"
    )
    run_bundle(BUNDLE, VERSION_CONFIGS["ddpm-ct"], overrides)
    report, samples = _load(tmp_path / "ddpm" / "generation_report.json")
    assert report["settings"]["version"] == "ddpm-ct"
    sample = samples[0]
    assert sample["mask_source"].startswith("user:") and sample["image"].endswith(".nii")
    labels = np.asarray(nib.load(sample["label"]).dataobj)
    assert labels.shape == tuple(OUTPUT_SIZE) and set(np.unique(labels)) <= {0} | DATABASE_LABELS
    assert {1, 3} <= set(np.unique(labels))

    guided = _overrides(root, weights["rflow-ct"], tmp_path / "cfg", cfg_guidance_scale=2.0)
    unguided = _overrides(root, weights["rflow-ct"], tmp_path / "nocfg")
    run_bundle(BUNDLE, ["inference.json"], guided)
    run_bundle(BUNDLE, ["inference.json"], unguided)
    images = [np.asarray(nib.load(_load(tmp_path / d / "generation_report.json")[1][0]["image"]).dataobj) for d in ("cfg", "nocfg")]
    assert not np.array_equal(*images)  # the unconditional branch (modality 0) changes the result
