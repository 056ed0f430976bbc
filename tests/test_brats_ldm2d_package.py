"""The published zip of brats_ldm2d is self-contained: installed with ``monai.bundle download`` it runs on its own."""

from __future__ import annotations

import json

import nibabel as nib
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from bundle_helpers import BUNDLES_DIR, bundle_scripts, install_packaged_bundle, run_bundle
from demo.synthetic import make_brats_like_dataset
from test_brats_ldm2d import TINY_AUTOENCODER, TINY_DIFFUSION
from test_maisi_evaluation import TINY_BACKBONE, run_in_process, write_tiny_backbone

BUNDLE = BUNDLES_DIR / "brats_ldm2d"


def _tiny_network(config: dict, net_id: str, network_class, tiny: dict) -> torch.nn.Module:
    kwargs = {k: v for k, v in config[net_id].items() if k != "_target_"}
    kwargs.update({k.split("#")[1]: v for k, v in tiny.items()})
    return network_class(**kwargs)


def test_zip_installs_and_runs_from_its_own_folder(tmp_path):
    installed = install_packaged_bundle(BUNDLE, tmp_path)
    version = json.loads((BUNDLE / "configs/metadata.json").read_text())["version"]
    assert [p.name for p in (tmp_path / "dist").iterdir()] == [f"brats_ldm2d_v{version}.zip"]
    for relpath in ("LICENSE", "large_files.yml", "docs/README.md", "configs/inference.json", "scripts/inference.py"):
        assert (installed / relpath).read_bytes() == (BUNDLE / relpath).read_bytes()
    assert not (installed / "models").exists()

    config = json.loads((installed / "configs/inference.json").read_text())
    torch.manual_seed(0)
    (installed / "models").mkdir()
    autoencoder = _tiny_network(config, "autoencoder_def", AutoencoderKL, TINY_AUTOENCODER)
    torch.save(autoencoder.state_dict(), installed / "models/model_autoencoder.pt")
    diffusion = _tiny_network(config, "network_def", DiffusionModelUNet, TINY_DIFFUSION)
    torch.save(diffusion.state_dict(), installed / "models/model.pt")  # the published (plain) format

    overrides = {"latent_shape": [1, 8, 8], "num_inference_steps": 2, "num_output_samples": 3, **TINY_AUTOENCODER, **TINY_DIFFUSION}
    result = run_bundle(installed, ["inference.json"], overrides)  # bundle_root "." = the installed folder
    assert "holds no scale_factor (published format); using 1.0" in result.stdout
    report = json.loads((installed / "output/inference_report.json").read_text())
    assert report["settings"]["scale_factor"] == 1.0
    image = nib.load(installed / "output" / "sample_0000_seed0.nii.gz")
    assert image.shape == (32, 32, 1)

    # 2D FID of the generated slices against the central slices of the validation volumes, default paths
    make_brats_like_dataset(tmp_path / "msd", num_volumes=6, shape=(40, 40, 16), seed=0)
    fid = {"bundle_root": str(installed), "dataset_dir": str(tmp_path / "msd"), "val_frac": 0.34, "infer_patch_size": [32, 32],
           "num_slices_per_volume": 4, "progress": False, **TINY_BACKBONE}
    with bundle_scripts(installed) as scripts:  # in-process run of the installed configs with the installed scripts
        write_tiny_backbone(scripts.fid, installed / "models" / "RadImageNet-ResNet50_notop.pth")
        run_in_process(["inference_autoencoder.json", "evaluate_fid.json"], fid, installed)
    report = json.loads((installed / "output/evaluate_fid/fid_report.json").read_text())
    assert report["num_synthetic_slices"] == 3 and report["num_real_volumes"] == 2 and report["num_real_slices"] == 2 * 4
    assert report["fid"] > 0 and report["settings"]["backbone"] == "radimagenet_resnet50"
    assert report["settings"]["backbone_weights_path"] == f"{installed}/models/RadImageNet-ResNet50_notop.pth"
    assert len(list((installed / "output/fid_feature_cache").glob("*.pt"))) == 2 + 3  # per real volume and per slice
