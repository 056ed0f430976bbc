"""maisi_ct_generative: published architectures and checkpoint layouts, lazy mask networks, the CLI error path."""

from __future__ import annotations

import functools
import importlib
import pickle

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_bundle

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
        # shapes without allocating the weights; the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
        with bundle_scripts(BUNDLE), torch.device("meta"):
            network = parser.get_parsed_content(net_id, instantiate=True)
            if net_id in MASK_GENERATION_DEFS:  # built on demand ("_mode_": "callable"), see the next test
                assert isinstance(network, functools.partial), net_id
                network = network()
        assert sum(p.numel() for p in network.parameters()) == expected, net_id


def test_mask_generation_networks_are_built_only_when_a_mask_is_generated(monkeypatch, tmp_path):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.nets import DiffusionModelUNet

    built = []
    for network_class in (AutoencoderKlMaisi, DiffusionModelUNet):
        original = network_class.__init__

        def counting_init(self, *args, _original=original, **kwargs):
            built.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(network_class, "__init__", counting_init)
    for name in ("mask_autoencoder.pt", "mask_unet.pt", "sizes.json", "autoencoder.pt", "unet.pt", "controlnet.pt"):
        (tmp_path / name).write_bytes(b"not a real file")
    tiny = {
        "bundle_root": str(BUNDLE),
        "controllable_anatomy_size": [["liver", 0.5]],
        "output_dir": str(tmp_path / "out"),
        "mask_generation_autoencoder_def#num_channels": [8, 8, 8],
        "mask_generation_autoencoder_def#norm_num_groups": 4,
        "mask_generation_diffusion_def#channels": [8, 16],
        "mask_generation_diffusion_def#attention_levels": [False, True],
        "mask_generation_diffusion_def#num_head_channels": [0, 8],
        "mask_generation_diffusion_def#norm_num_groups": 4,
        "trained_mask_generation_autoencoder_path": str(tmp_path / "mask_autoencoder.pt"),
        "trained_mask_generation_diffusion_path": str(tmp_path / "mask_unet.pt"),
        "all_anatomy_size_condtions_json": str(tmp_path / "sizes.json"),
        "trained_autoencoder_path": str(tmp_path / "autoencoder.pt"),
        "trained_diffusion_path": str(tmp_path / "unet.pt"),
        "trained_controlnet_path": str(tmp_path / "controlnet.pt"),
    }
    with bundle_scripts(BUNDLE):
        parser = parse_bundle_config(BUNDLE, ["inference.json"], tiny)
        sources = parser.get_parsed_content("mask_source")
        assert built == []  # the mask source exists, the mask networks do not
        with pytest.raises(pickle.UnpicklingError):  # the first generated mask builds them, then reads their weights
            sources.by_kind["generated"].mask_for(parser.get_parsed_content("settings").requests[0], 0, 0)
        assert built == ["AutoencoderKlMaisi", "DiffusionModelUNet"]


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
        settings = importlib.import_module("scripts.settings")
        files = settings.RequiredFiles(
            {
                "trained_autoencoder_path": tmp_path / "autoencoder_v1.pt",
                "trained_diffusion_path": tmp_path / "diff_unet_3d_rflow-ct.pt",
                "trained_controlnet_path": tmp_path / "controlnet.pt",
            },
            BUNDLE,
        )
        loaded = generation.load_generation_networks(
            fresh.get_parsed_content("autoencoder_def"),
            fresh.get_parsed_content("diffusion_unet_def"),
            fresh.get_parsed_content("controlnet_def"),
            files,
            "cpu",
        )
    assert loaded.scale_factor == pytest.approx(1.0124)
    for name, network in (("autoencoder_def", loaded.autoencoder), ("diffusion_unet_def", loaded.diffusion_unet), ("controlnet_def", loaded.controlnet)):
        assert not network.training
        for key, value in network.state_dict().items():
            assert torch.equal(value, networks[name].state_dict()[key]), (name, key)


def test_cli_error_names_the_id_and_writes_nothing(tmp_path):
    paths = {"model_dir": str(tmp_path / "models"), "dataset_dir": str(tmp_path / "datasets"), "output_dir": str(tmp_path / "out")}
    result = run_bundle(BUNDLE, ["inference.json"], {**paths, "body_region": ["abdomn"]}, check=False)
    assert result.returncode != 0
    assert "body_region=['abdomn'] is not allowed" in result.stdout and "Did you mean 'abdomen'" in result.stdout
    assert not (tmp_path / "out").exists()
