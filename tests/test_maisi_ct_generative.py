"""maisi_ct_generative: published architectures and checkpoint layouts, and validation before any weight loads."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
PUBLISHED_PARAMETER_COUNTS = {
    "rflow-ct": {
        "autoencoder_def": 20_944_897,
        "diffusion_unet_def": 180_500_868,
        "controlnet_def": 72_037_072,
        "mask_generation_autoencoder_def": 5_256_509,
        "mask_generation_diffusion_def": 197_163_012,
    },
    "ddpm-ct": {"diffusion_unet_def": 169_370_884, "controlnet_def": 68_644_944},
}
VERSION_CONFIGS = {"rflow-ct": ["inference.json"], "ddpm-ct": ["inference.json", "inference_ddpm_ct.json"]}
MASK_GENERATION_DEFS = ("mask_generation_autoencoder_def", "mask_generation_diffusion_def")


def parser_for(version: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in VERSION_CONFIGS[version]])
    parser["bundle_root"] = str(BUNDLE)
    return parser


@pytest.mark.parametrize("version", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_full_size_networks_match_published_parameter_counts(version):
    parser = parser_for(version)
    assert parser.get_parsed_content("version") == version
    for net_id, expected in PUBLISHED_PARAMETER_COUNTS[version].items():
        with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
            network = parser.get_parsed_content(net_id, instantiate=True)
        if net_id in MASK_GENERATION_DEFS:  # built on demand ("_mode_": "callable"), see the next test
            assert isinstance(network, functools.partial), net_id
            network = network()
        assert sum(p.numel() for p in network.parameters()) == expected, net_id


def test_mask_generation_networks_are_built_only_for_controllable_anatomy_size(monkeypatch, tmp_path):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.nets import DiffusionModelUNet

    built = []
    for network_class in (AutoencoderKlMaisi, DiffusionModelUNet):
        original = network_class.__init__

        def counting_init(self, *args, _original=original, **kwargs):
            built.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(network_class, "__init__", counting_init)
    tiny = {
        "mask_generation_autoencoder_def#num_channels": [8, 8, 8],
        "mask_generation_autoencoder_def#norm_num_groups": 4,
        "mask_generation_diffusion_def#channels": [8, 16],
        "mask_generation_diffusion_def#attention_levels": [False, True],
        "mask_generation_diffusion_def#num_head_channels": [0, 8],
        "mask_generation_diffusion_def#norm_num_groups": 4,
        "trained_mask_generation_autoencoder_path": str(tmp_path / "absent.pt"),
    }
    with bundle_scripts(BUNDLE):
        for sizes, expected in (([], []), ([["liver", 0.5]], ["AutoencoderKlMaisi", "DiffusionModelUNet"])):
            parser = parser_for("rflow-ct")
            parser["controllable_anatomy_size"] = sizes
            for key, value in tiny.items():
                parser[key] = value
            built.clear()
            if sizes:  # built, then its weights are looked for
                with pytest.raises(RuntimeError) as error:
                    parser.get_parsed_content("mask_generator")
                assert isinstance(error.value.__cause__, FileNotFoundError) and "absent.pt" in str(error.value.__cause__)
            else:
                assert parser.get_parsed_content("mask_generator") is None
            assert built == expected


def test_published_checkpoint_formats_load_strictly(tmp_path):
    parser = parser_for("rflow-ct")
    with bundle_scripts(BUNDLE):
        networks = {name: parser.get_parsed_content(name) for name in ("autoencoder_def", "diffusion_unet_def", "controlnet_def")}
    torch.manual_seed(0)
    for network in networks.values():
        for parameter in network.parameters():
            torch.nn.init.normal_(parameter, std=0.01)
    torch.save(networks["autoencoder_def"].state_dict(), tmp_path / "autoencoder_v1.pt")
    torch.save(
        {"unet_state_dict": networks["diffusion_unet_def"].state_dict(), "scale_factor": torch.tensor(1.0124), "epoch": 3},
        tmp_path / "diff_unet_3d_rflow-ct.pt",
    )
    torch.save({"controlnet_state_dict": networks["controlnet_def"].state_dict(), "epoch": 3}, tmp_path / "controlnet.pt")

    fresh = parser_for("rflow-ct")
    with bundle_scripts(BUNDLE):
        generation = importlib.import_module("scripts.generation")
        loaded = generation.load_pair_networks(
            fresh.get_parsed_content("autoencoder_def"),
            fresh.get_parsed_content("diffusion_unet_def"),
            fresh.get_parsed_content("controlnet_def"),
            tmp_path / "autoencoder_v1.pt",
            tmp_path / "diff_unet_3d_rflow-ct.pt",
            tmp_path / "controlnet.pt",
            "cpu",
        )
    assert loaded.scale_factor == pytest.approx(1.0124)
    for name, network in (("autoencoder_def", loaded.autoencoder), ("diffusion_unet_def", loaded.diffusion_unet), ("controlnet_def", loaded.controlnet)):
        assert not network.training
        for key, value in network.state_dict().items():
            assert torch.equal(value, networks[name].state_dict()[key]), (name, key)


def _failure(tmp_path, **overrides):
    paths = {"model_dir": str(tmp_path / "models"), "dataset_dir": str(tmp_path / "datasets"), "output_dir": str(tmp_path / "out")}
    result = run_bundle(BUNDLE, ["inference.json"], {**paths, **overrides}, check=False)
    assert result.returncode != 0
    return result.stdout


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"body_region": ["abdomn"]}, "Did you mean 'abdomen'"),
        ({"anatomy_list": ["livr"]}, "Did you mean 'liver'"),
        ({"output_size": [256, 256, 177]}, "output_size"),
        ({"output_size": [256, 384, 256]}, "output_size"),
        ({"spacing": [1.5, 1.5, 9.0]}, "spacing"),
        ({"spacing": [0.5, 0.5, 1.0]}, "256"),
        ({"controllable_anatomy_size": [["hepatic tumor", 0.3], ["bone lesion", 0.2]]}, "tumour"),
        ({"controllable_anatomy_size": [["liver", 0.5]] * 11}, "controllable_anatomy_size"),
        ({"controllable_anatomy_size": [["liver", 1.5]]}, "controllable_anatomy_size"),
        ({"modality": "mri_t1"}, "maisi_mr_generative"),
        ({"num_output_samples": 0}, "num_output_samples=0 is not allowed"),
        ({"version": "rflow-cct"}, "rflow-ct"),
    ],
)
def test_invalid_inputs_fail_before_any_weight_loads(tmp_path, overrides, expected):
    output = _failure(tmp_path, **overrides)
    assert expected in output
    assert "missing file(s)" not in output  # the input check comes before the weights check


def test_missing_weights_name_the_ids_and_the_download_command(tmp_path):
    output = _failure(tmp_path)
    assert "missing file(s): trained_autoencoder_path=" in output
    assert "trained_controlnet_path=" in output and "all_mask_files_json=" in output
    assert "python -m monai.bundle download_large_files --bundle_path" in output


def test_user_mask_is_checked_before_any_weight_loads(tmp_path):
    import nibabel as nib
    import numpy as np

    fractional = np.zeros((8, 8, 8), dtype=np.float32)
    fractional[2:4, 2:4, 2:4] = 1.5
    nib.save(nib.Nifti1Image(fractional, np.eye(4)), str(tmp_path / "fractional.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.uint8), np.eye(4)), str(tmp_path / "empty.nii.gz"))
    output = _failure(tmp_path, mask_path=str(tmp_path / "fractional.nii.gz"))
    assert "mask_path=" in output and "non-integer or negative values" in output
    assert "missing file(s)" not in output
    output = _failure(tmp_path, mask_path=str(tmp_path / "empty.nii.gz"))
    assert "has no foreground label" in output
    output = _failure(tmp_path, mask_path=str(tmp_path / "absent.nii.gz"))
    assert "mask_path=" in output and "does not exist" in output
