"""maisi_mr_generative in-process: published architectures, input validation before weights, label mapping, guidance."""

from __future__ import annotations

import importlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_bundle
from test_maisi_mr_generative import BRAIN, BRATS_IDS, BUNDLE, SPACING, TINY, tiny_parser, write_brats_mask, write_tiny_weights

CT_BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
# Published parameter counts and state-dict sizes (NV config_network_rflow.json, MONAI 1.6.1).
PUBLISHED = {
    "autoencoder_def": (20_944_897, 130),
    "diffusion_unet_def": (180_500_868, 435),
    "controlnet_def": (72_037_072, 231),
}


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(BUNDLE) as package:
        for name in ("generation", "generation_mr", "settings_mr", "value_checks"):  # the bundle's own copies
            importlib.import_module(f"scripts.{name}")
        yield package


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("mr_units") / "models")


def _initialize(bundle, scripts, configs=("inference.json",), **values):
    """Evaluate the bundle's ``initialize`` list (what ``monai.bundle run`` does before any weights load)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in configs])
    parser["bundle_root"] = str(bundle)
    parser["model_dir"] = "/nonexistent/models"  # a weights load would fail with FileNotFoundError
    for key, value in values.items():
        parser[key] = value
    try:
        return parser.get_parsed_content("initialize")
    except RuntimeError as error:  # ConfigParser wraps the error of a failing expression: re-raise the root cause
        root = error
        while isinstance(root, RuntimeError) and root.__cause__ is not None:
            root = root.__cause__
        raise root from None


def test_published_architectures_for_both_versions(scripts):
    overlay = json.loads((BUNDLE / "configs/inference_rflow_mr_brain.json").read_text())
    assert not [key for key in overlay if "_def" in key or key == "noise_scheduler"]  # same networks for both versions
    assert overlay["trained_autoencoder_path"].endswith("/autoencoder_v1.pt'")  # rflow-mr-brain decodes with the CT VAE
    base = json.loads((BUNDLE / "configs/inference.json").read_text())
    assert base["trained_autoencoder_path"].endswith("/autoencoder_v2.pt'") and base["version"] == "rflow-mr"
    assert (base["cfg_guidance_scale"], overlay["cfg_guidance_scale"]) == (15.0, 2.0)
    # the published defaults of each version: geometry, steps, modality, seed
    assert (base["output_size"], base["spacing"], base["num_inference_steps"]) == ([128, 256, 256], [1.25, 1.0, 1.0], 30)
    assert (base["modality"], base["random_seed"]) == ("mri_t1", 0)
    assert (overlay["output_size"], overlay["spacing"], overlay["random_seed"]) == ([256, 256, 128], [0.94, 0.94, 1.36], 1234)
    ct = json.loads((CT_BUNDLE / "configs/inference.json").read_text())
    from monai.bundle import ConfigParser

    parser = ConfigParser(base)
    for net_id, (parameters, keys) in PUBLISHED.items():
        assert base[net_id] == ct[net_id]  # the CT bundle's published definitions, unchanged
        with torch.device("meta"):  # shapes and keys without allocating the weights
            network = parser.get_parsed_content(net_id)
        assert sum(p.numel() for p in network.parameters()) == parameters
        assert len(network.state_dict()) == keys
    scheduler = parser.get_parsed_content("noise_scheduler")
    assert type(scheduler).__name__ == "RFlowScheduler" and scheduler.num_train_timesteps == 1000


def test_strict_loading_rejects_a_mismatched_checkpoint(scripts, weights, tmp_path):
    parser = tiny_parser()
    state = torch.load(weights["trained_diffusion_path"], weights_only=True)
    state["unet_state_dict"].pop(next(iter(state["unet_state_dict"])))
    torch.save(state, tmp_path / "broken.pt")
    files = scripts.settings.RequiredFiles(
        {"trained_autoencoder_path": weights["trained_autoencoder_path"], "trained_diffusion_path": tmp_path / "broken.pt"}, BUNDLE
    )
    with pytest.raises(RuntimeError, match="Missing key"):
        scripts.generation.load_generation_networks(
            parser.get_parsed_content("autoencoder_def"), parser.get_parsed_content("diffusion_unet_def"),
            parser.get_parsed_content("controlnet_def"), files, "cpu",
        )


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"modality": "ct"}, ["modality='ct'", "a CT modality", "maisi_ct_generative", "mri_t1 (9)", "mri_flair (11)"]),
        ({"modality": 2}, ["modality=2", "ct_wo_contrast", "mri_t2 (10)"]),
        ({"modality": 0}, ["modality=0", "unconditional"]),
        ({"modality": "mri_t3"}, ["modality='mri_t3'", "Did you mean"]),
        ({"version": "rflow-ct"}, ["version='rflow-ct'"]),
        ({"output_size": [128, 128, 96]}, ["output_size=[128, 128, 96]", "z=96"]),
        ({"output_size": [256, 128, 128]}, ["output_size=[256, 128, 128]"]),
        ({"spacing": [0.3, 1.0, 1.0]}, ["spacing=[0.3, 1.0, 1.0]", "[0.4, 5.0]"]),
        ({"output_size": [512, 512, 128], "spacing": [1.5, 1.5, 2.0]}, ["field of view", "768 mm", "512 mm"]),
        ({"cfg_guidance_scale": -1}, ["cfg_guidance_scale=-1"]),
        ({"num_inference_steps": 0}, ["num_inference_steps=0"]),
        ({"random_seed": -3}, ["random_seed=-3"]),
        ({"controlnet_label_mapping": {"401": 300}}, ["controlnet_label_mapping=", "'401': 300"]),
    ],
)
def test_mr_inputs_refused_before_weights_load(scripts, values, expected):
    with pytest.raises(ValueError) as error:
        _initialize(BUNDLE, scripts, **values)
    for text in expected:
        assert text in str(error.value)


def test_ct_bundle_refuses_mr_modalities():
    with bundle_scripts(CT_BUNDLE) as ct_scripts:
        for modality in ("mri_t1", 9, "mri_flair_skull_stripped"):
            with pytest.raises(ValueError) as error:
                _initialize(CT_BUNDLE, ct_scripts, modality=modality)
            message = str(error.value)
            assert "an MR modality" in message and "maisi_mr_generative" in message
            assert "ct (1)" in message and "ct_contrast (3)" in message


def test_mask_checks_and_missing_weights(scripts, tmp_path):
    # valid inputs: the first problem is the missing weights, named with the download command
    with pytest.raises(FileNotFoundError) as error:
        _initialize(BUNDLE, scripts, ["inference.json", "inference_rflow_mr_brain.json"])
    message = str(error.value)
    assert "trained_diffusion_path=/nonexistent/models/diff_unet_3d_rflow-mr-brain_v1.pt" in message
    assert "autoencoder_v1.pt" in message and "python -m scripts.download" in message and "controlnet" not in message

    odd = np.zeros((64, 64, 64), dtype=np.int16)
    odd[20:40, 20:40, 20:40] = 300  # above 255 and not in the MR table
    odd[25:35, 25:35, 25:35] = 401
    nib.save(nib.Nifti1Image(odd, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "odd.nii.gz"))
    with pytest.raises(ValueError) as error:
        _initialize(BUNDLE, scripts, mask_path=str(tmp_path / "odd.nii.gz"))
    message = str(error.value)
    assert "mask_path=" in message and "300" in message and "controlnet_label_mapping" in message and "401" not in message
    with pytest.raises(FileNotFoundError, match="trained_controlnet_path="):  # mapped: only the weights are missing
        _initialize(BUNDLE, scripts, mask_path=str(tmp_path / "odd.nii.gz"), controlnet_label_mapping={"300": 140})
    corner = np.zeros((300, 16, 16), dtype=np.uint8)
    corner[:10] = BRAIN  # outside the central 128 voxels kept at the requested geometry
    nib.save(nib.Nifti1Image(corner, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "corner.nii.gz"))
    with pytest.raises(ValueError, match="no foreground label left at output_size=\\[128, 256, 256\\]"):
        _initialize(BUNDLE, scripts, mask_path=str(tmp_path / "corner.nii.gz"), spacing=[2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="mask_path='/nonexistent.nii.gz' does not exist"):
        _initialize(BUNDLE, scripts, mask_path="/nonexistent.nii.gz")


def test_cli_error_names_the_id(tmp_path):
    result = run_bundle(BUNDLE, ["inference.json"], {"modality": 1, "output_dir": str(tmp_path)}, check=False)
    assert result.returncode != 0
    assert "modality=1 (ct, code 1) is a CT modality" in result.stdout and "mri_t1 (9)" in result.stdout
    assert not list(tmp_path.iterdir())


def test_mr_label_mapping(scripts):
    labels = scripts.labels
    constants = scripts.constants
    assert dict(constants.MR_CONTROLNET_LABEL_MAP) == {401: 129, 402: 130, 403: 131, 500: 200}
    label_dict = labels.load_label_dict()
    names = {v: k for k, v in label_dict.items()}
    assert [names[i] for i in (129, 130, 131)] == ["dummy6", "dummy7", "dummy8"] and names[200] == "body"  # free slots + body
    raw = torch.tensor([0, BRAIN, *BRATS_IDS, 500, 255], dtype=torch.int16).reshape(1, 1, 7, 1, 1)
    mapped = labels.remap_mr_labels_for_controlnet(raw)
    assert mapped.dtype == torch.int16 and mapped.flatten().tolist() == [0, BRAIN, 129, 130, 131, 200, 255]
    planes = labels.binarize_labels(mapped)
    decoded = sum(planes[:, bit] * 2**bit for bit in range(8))
    assert decoded.flatten().tolist() == mapped.flatten().tolist()
    with pytest.raises(ValueError, match="401"):  # without the mapping, 401 cannot ride 8 bit planes
        labels.binarize_labels(raw)
    numpy_raw = np.array([[300, 401]], dtype=np.int16)
    assert labels.remap_mr_labels_for_controlnet(numpy_raw, {"300": 140, 401: 150}).tolist() == [[140, 150]]
    with pytest.raises(ValueError, match="300"):
        labels.remap_mr_labels_for_controlnet(numpy_raw)
    check = scripts.value_checks.check_controlnet_label_mapping
    assert check(None) == {} and check({"300": 140}) == {300: 140}
    for bad in ([300, 140], {"20": 140}, {"300": 256}, {"x": 1}):
        with pytest.raises(ValueError, match="controlnet_label_mapping="):
            check(bad)
    fov = scripts.settings_mr.check_field_of_view_mr
    assert fov([128, 256, 256], [1.25, 1.0, 1.0]) == (160.0, 256.0, 256.0)
    assert fov([512, 512, 128], [1.0, 1.0, 4.0]) == (512.0, 512.0, 512.0)


def test_guidance_controlnet_and_background(scripts, weights, tmp_path):
    parser = tiny_parser()
    files = scripts.settings.RequiredFiles({k: weights[k] for k in ("trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path")}, BUNDLE)
    networks = scripts.generation.load_generation_networks(
        parser.get_parsed_content("autoencoder_def"), parser.get_parsed_content("diffusion_unet_def"),
        parser.get_parsed_content("controlnet_def"), files, "cpu",
    )
    assert networks.controlnet is not None and networks.scale_factor == 1.0
    device = torch.device("cpu")
    request = scripts.settings_mr.MRRequest("sample", (128, 128, 128), tuple(SPACING), 1, 0, modality=10)
    write_brats_mask(tmp_path / "mask.nii.gz")
    mask = scripts.settings_mr.load_mr_mask(tmp_path / "mask.nii.gz", request.output_size, request.spacing, {})
    assert set(torch.unique(mask.controlnet_ids).tolist()) == {0, BRAIN, 129, 130, 131}
    assert set(torch.unique(mask.labels).tolist()) == {0, BRAIN, *BRATS_IDS}

    def latent(scale, mr_mask=None):
        noise = torch.randn((1, 4, 32, 32, 32), generator=torch.Generator().manual_seed(3))
        conditions = scripts.generation_mr.mr_conditions(request, mr_mask, device, torch.float32)
        assert conditions.class_labels.tolist() == [10] and conditions.spacing.tolist() == [[200.0, 200.0, 200.0]]
        return scripts.sampler.sample_latent(
            networks.diffusion_unet, parser.get_parsed_content("noise_scheduler"), noise, conditions, 2,
            controlnet=None if mr_mask is None else networks.controlnet, guidance_scale=scale, progress=False,
        )

    unguided = latent(0.0)
    torch.testing.assert_close(latent(1.0), unguided, rtol=1e-4, atol=1e-4)  # u + 1 * (c - u) = c
    assert (latent(15.0) - unguided).abs().mean() > 1e-3  # guidance against the null modality 0
    for parameter in networks.controlnet.controlnet_cond_embedding.parameters():  # random init barely passes the mask
        parameter.data.mul_(20.0)
    with_mask = latent(0.0, mask)
    flat = scripts.settings_mr.MRMask("user:flat", mask.labels, (mask.controlnet_ids > 0).to(torch.int16))
    assert (with_mask - unguided).abs().mean() > 1e-4 and (with_mask - latent(0.0, flat)).abs().mean() > 1e-4

    # zero_outside_mask: the generator sets label 0 to 0 (MR background)
    overrides = {
        "bundle_root": str(BUNDLE), "output_dir": str(tmp_path / "out"), "output_size": [128, 128, 128], "spacing": SPACING,
        "modality": "mri_t2", "num_inference_steps": 2, "cfg_guidance_scale": 0, "mask_path": str(tmp_path / "mask.nii.gz"),
        "zero_outside_mask": True, "progress": False, **weights,
    }  # fmt: skip
    config = parse_bundle_config(BUNDLE, ["inference.json"], {**overrides, **TINY})
    generator = config.get_parsed_content("generator")
    generator.networks = networks  # the ControlNet with the amplified embedding
    task = generator.tasks[0]
    output = generator.generate(task, generator.settings.requests[0])
    cut, labels = output["image"], output["labels"]
    assert cut.dtype == np.int16 and cut.min() >= 0 and set(output["entry"]["timings"]) == {"diffusion_s", "decode_s"}
    assert (cut[labels == 0] == 0).all() and (cut[labels > 0] > 0).mean() > 0.2
