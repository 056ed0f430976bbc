"""The packaged zip of maisi_mr_generative is self-contained: installed with ``monai.bundle download`` it runs on its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np

from bundle_helpers import BUNDLES_DIR, run_bundle
from ci.package_bundle import build_bundle_zip
from test_maisi_mr_generative import TINY, write_brats_mask, write_tiny_weights

BUNDLE = BUNDLES_DIR / "maisi_mr_generative"


def test_zip_installs_and_runs_from_its_own_folder(tmp_path):
    archive = build_bundle_zip(BUNDLE, tmp_path / "dist")
    version = json.loads((BUNDLE / "configs/metadata.json").read_text())["version"]
    assert archive.name == f"maisi_mr_generative_v{version}.zip"

    install_dir = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "maisi_mr_generative", "--url", archive.as_uri(),
         "--bundle_dir", str(install_dir)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    installed = install_dir / "maisi_mr_generative"
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
    assert report["settings"]["files"]["trained_controlnet_path"] == "./models/controlnet_3d_rflow-mr.pt"
    image = nib.load(installed / "output" / "sample_0000_seed0_image.nii.gz")
    data = np.asarray(image.dataobj)
    assert image.shape == (128, 128, 128) and data.dtype == np.int16 and data.min() >= 0
    labels = np.asarray(nib.load(installed / "output" / "sample_0000_seed0_label.nii.gz").dataobj)
    assert {401, 402, 403} <= set(np.unique(labels))
