"""The packaged zip of maisi_mr_generative is self-contained: installed with ``monai.bundle download`` it runs on its own."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np

from bundle_helpers import BUNDLES_DIR, bundle_scripts, install_packaged_bundle, run_bundle
from test_maisi_evaluation import TINY_BACKBONE, run_in_process, write_tiny_backbone, write_volume
from test_maisi_mr_generative import TINY, write_brats_mask, write_tiny_weights

BUNDLE = BUNDLES_DIR / "maisi_mr_generative"


def test_zip_installs_and_runs_from_its_own_folder(tmp_path):
    installed = install_packaged_bundle(BUNDLE, tmp_path)
    version = json.loads((BUNDLE / "configs/metadata.json").read_text())["version"]
    assert [p.name for p in (tmp_path / "dist").iterdir()] == [f"maisi_mr_generative_v{version}.zip"]
    for relpath in ("LICENSE", "large_files.yml", "docs/README.md", "configs/inference.json",
                    "configs/inference_rflow_mr_brain.json", "configs/modality_mapping.json", "scripts/generation.py"):
        assert (installed / relpath).read_bytes() == (BUNDLE / relpath).read_bytes()
    assert not (installed / "models").exists()

    # tiny weights under the published file names, so the installed config runs with its own paths
    weights = write_tiny_weights(tmp_path / "weights", bundle=installed)
    (installed / "models").mkdir()
    shutil.copy(weights["trained_autoencoder_path"], installed / "models/autoencoder_v2.pt")
    shutil.copy(weights["trained_diffusion_path"], installed / "models/diff_unet_3d_rflow-mr.pt")
    shutil.copy(weights["trained_controlnet_path"], installed / "models/controlnet_3d_rflow-mr.pt")
    write_brats_mask(tmp_path / "mask.nii.gz")

    overrides = {"output_size": [128, 128, 128], "spacing": [2.0, 2.0, 2.0], "num_inference_steps": 2, "progress": False,
                 "mask_path": str(tmp_path / "mask.nii.gz"), **TINY}
    run_bundle(installed, ["inference.json"], overrides)  # bundle_root "." = the installed folder
    report = json.loads((installed / "output/generation_report.json").read_text())
    assert report["settings"]["version"] == "rflow-mr" and report["settings"]["cfg_guidance_scale"] == 15.0
    assert report["settings"]["files"]["trained_controlnet_path"] == "models/controlnet_3d_rflow-mr.pt"  # bundle_root "."
    image = nib.load(installed / "output" / "sample_0000_seed0_image.nii.gz")
    data = np.asarray(image.dataobj)
    assert image.shape == (128, 128, 128) and data.dtype == np.int16 and data.min() >= 0
    labels = np.asarray(nib.load(installed / "output" / "sample_0000_seed0_label.nii.gz").dataobj)
    assert {401, 402, 403} <= set(np.unique(labels))
    _evaluations_run_from_the_installed_folder(installed, tmp_path)


def _evaluations_run_from_the_installed_folder(installed, tmp_path):
    """evaluate_fid.json (MR percentile normalisation, ImageNet backbone) and evaluate_autoencoder.json, default paths."""
    rng = np.random.default_rng(0)
    entries = []
    for index in range(2):
        volume = np.zeros((40, 36, 32), dtype=np.float32)
        volume[4:-4, 4:-4, 4:-4] = rng.gamma(4.0, 100.0, size=(32, 28, 24))
        write_volume(tmp_path / "real_mr" / f"brain_{index}.nii.gz", volume, spacing=(2.0, 2.0, 2.0))
        entries.append({"image": f"brain_{index}.nii.gz"})
    (tmp_path / "real_mr" / "datalist.json").write_text(json.dumps({"training": entries}))
    fid = {"bundle_root": str(installed), "backbone": "imagenet_resnet50", "real_dir": str(tmp_path / "real_mr"),
           "target_shape": [40, 36, 32], "target_spacing": [2.0, 2.0, 2.0], "progress": False, "ms_ssim_kernel_size": 2, **TINY_BACKBONE}
    recon = {"bundle_root": str(installed), "dataset_dir": str(tmp_path / "real_mr"), "progress": False, "write_reconstructions": True, **TINY}
    with bundle_scripts(installed) as scripts:  # in-process runs of the installed configs with the installed scripts
        import scripts.fid

        write_tiny_backbone(scripts.fid, installed / "models" / "resnet50-0676ba61.pth", style="torchvision")
        run_in_process(["inference.json", "evaluate_fid.json"], fid, installed)  # synthetic_dir: the generated output/
        run_in_process(["inference.json", "evaluate_autoencoder.json"], recon, installed)  # models/autoencoder_v2.pt
    report = json.loads((installed / "output/evaluate_fid/fid_report.json").read_text())
    assert report["settings"]["intensity"] == "mr" and report["settings"]["backbone"] == "imagenet_resnet50"
    assert report["settings"]["backbone_weights_path"] == str(installed / "models/resnet50-0676ba61.pth")
    assert report["settings"]["center_slices_ratio"] == 0.4 and report["num_synthetic_volumes"] == 1
    assert report["num_slices"]["real"] == {"xy": 2 * 13, "yz": 2 * 16, "zx": 2 * 15}  # ratio 0.4 of (40, 36, 32)
    assert all(report[f"fid_{plane}"] > 0 for plane in ("xy", "yz", "zx"))
    distribution = json.loads((installed / "output/evaluate_fid/distribution_report.json").read_text())
    assert distribution["ms_ssim"]["real"]["pairs"][0]["first"] == 0 and distribution["ms_ssim"]["synthetic"] is None
    assert distribution["organ_hu_medians"] is None  # MR: no HU table

    report = json.loads((installed / "output/evaluate_autoencoder/reconstruction_report.json").read_text())
    assert report["num_cases"] == 2 and report["units"]["mae"] == "normalised MR units"
    assert report["settings"]["trained_autoencoder_path"] == f"{installed}/models/autoencoder_v2.pt" and report["settings"]["intensity"] == "mr"
    original = np.asarray(nib.load(report["cases"][0]["original"]).dataobj)
    assert original.shape == (40, 36, 32) and original.min() == 0.0 and 1.0 < original.max()  # 99.5th percentile -> 1, not clipped
    assert len(report["worst_cases"]) == 2 and all(np.isfinite(case["psnr"]) for case in report["cases"])
