"""torch.compile and TensorRT overlays of the MAISI bundles (common/maisi/core/acceleration.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_helpers import BUNDLES_DIR, REPO_ROOT, bundle_scripts

BUNDLES = ("maisi_ct_generative", "maisi_mr_generative")
TINY_UNET = {"num_channels": [8, 8, 16, 16], "num_head_channels": [0, 0, 8, 8], "num_res_blocks": 1, "norm_num_groups": 8}
TINY = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
    **{f"diffusion_unet_def#{k}": v for k, v in TINY_UNET.items()},
    **{f"controlnet_def#{k}": v for k, v in TINY_UNET.items()},
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
}
WEIGHT_IDS = ("trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path")
# a run that needs no data files beyond the weights: CT image-only, MR without a mask
NO_DATA_RUN = {"maisi_ct_generative": {"image_only": True}, "maisi_mr_generative": {}}


@pytest.fixture(scope="module")
def acceleration():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield importlib.import_module("scripts.acceleration")


def _initialize(bundle: str, overlay: str, tmp_path: Path, **values):
    """The bundle's ``initialize`` with the overlay, tiny networks and empty (present) weight files."""
    root = REPO_ROOT / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "inference.json"), str(root / "configs" / overlay)])
    parser["bundle_root"] = str(root)
    parser["device"] = torch.device("cpu")
    for key, value in {**TINY, **NO_DATA_RUN[bundle], "output_dir": str(tmp_path / "out"), **values}.items():
        parser[key] = value
    for config_id in (*WEIGHT_IDS, "all_mask_files_json"):
        if config_id in parser:
            path = tmp_path / f"{config_id}.pt"
            path.touch()
            parser[config_id] = str(path)
    try:
        parser.get_parsed_content("initialize")
    except RuntimeError as error:  # ConfigParser wraps the error of a failing expression: re-raise the root cause
        root_cause = error
        while isinstance(root_cause, RuntimeError) and root_cause.__cause__ is not None:
            root_cause = root_cause.__cause__
        raise root_cause from None
    return parser


def _no_weight_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was loaded")

    monkeypatch.setattr(torch, "load", refuse)


def test_compile_is_in_place_and_keeps_the_state_dict(acceleration):
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.GroupNorm(1, 2))
    keys = list(network.state_dict())
    assert acceleration.compile_module(network, mode="default") is network
    assert network._compiled_call_impl is not None  # compiled lazily, at the first call
    assert list(network.state_dict()) == keys
    network.load_state_dict(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.GroupNorm(1, 2)).state_dict(), strict=True)
    untouched = torch.nn.Linear(2, 2)
    assert acceleration.compile_module(untouched, enabled=False)._compiled_call_impl is None
    with pytest.raises(ValueError, match="compile_mode='fast' is not allowed"):
        acceleration.compile_networks([untouched], mode="fast")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_compile_overlay_compiles_the_networks_before_their_weights_load(bundle, tmp_path, monkeypatch):
    _no_weight_loads(monkeypatch)
    with bundle_scripts(REPO_ROOT / "bundles" / bundle):
        parser = _initialize(bundle, "inference_compile.json", tmp_path)
        unet, controlnet = parser.get_parsed_content("diffusion_unet_def"), parser.get_parsed_content("controlnet_def")
        decoder = parser.get_parsed_content("autoencoder_def").decoder
    # the instances the bundle loads the weights into (strictly: keys unchanged) are the compiled ones
    for network in (unet, controlnet, decoder):
        assert network._compiled_call_impl is not None
    assert parser["compile_mode"] is None


@pytest.mark.parametrize("bundle", BUNDLES)
def test_trt_overlay_refuses_without_cuda_and_tensorrt_before_any_weight_loads(bundle, tmp_path, monkeypatch):
    _no_weight_loads(monkeypatch)
    with bundle_scripts(REPO_ROOT / "bundles" / bundle), pytest.raises(RuntimeError) as error:
        _initialize(bundle, "inference_trt.json", tmp_path)
    message = str(error.value)
    assert "configs/inference_trt.json needs TensorRT on CUDA" in message and "a CUDA device (device is cpu)" in message
    assert "inference_compile.json" in message  # what works instead


def test_tensorrt_check_names_every_missing_piece(acceleration, monkeypatch):
    monkeypatch.setattr(acceleration, "_missing_packages", lambda: ["tensorrt", "polygraphy"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError) as error:
        acceleration.check_tensorrt("cuda:0")
    assert "CUDA (torch.cuda.is_available() is False)" in str(error.value)
    assert "'tensorrt'" in str(error.value) and "'polygraphy'" in str(error.value)
    with pytest.raises(ValueError, match="trt_precision='int8' is not allowed"):
        acceleration.check_tensorrt("cuda:0", "int8")


def test_trt_compile_networks_wraps_as_the_published_bundle(acceleration, monkeypatch):
    import monai.networks.trt_compiler as trt_compiler

    calls = []
    monkeypatch.setattr(acceleration, "check_tensorrt", lambda device, precision: None)
    monkeypatch.setattr(trt_compiler, "trt_compile", lambda model, path, args=None, submodule=None: calls.append(
        (model, path, args, submodule)) or model)
    unet, autoencoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    out = acceleration.trt_compile_networks({"diffusion_unet": (unet, "/m/unet.pt"), "autoencoder": (autoencoder, "/m/ae.pt")},
                                            "cuda", "fp16", {"autoencoder": "decoder"})
    assert out == {"diffusion_unet": unet, "autoencoder": autoencoder}
    assert calls == [(unet, "/m/unet.pt", {"precision": "fp16"}, None), (autoencoder, "/m/ae.pt", {"precision": "fp16"}, "decoder")]
