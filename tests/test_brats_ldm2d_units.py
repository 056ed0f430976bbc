"""Unit tests of brats_ldm2d's scripts and of its input validation (no training)."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle, run_in_process
from demo.synthetic import make_brats_like_dataset

BUNDLE = BUNDLES_DIR / "brats_ldm2d"
PUBLISHED_PARAMETER_COUNTS = {"autoencoder_def": 12_151_496, "network_def": 15_392_641, "discriminator_def": 692_769}


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(BUNDLE) as module:
        yield module


def build(config_name: str, net_id: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / config_name)
    return parser.get_parsed_content(net_id)


@pytest.mark.parametrize(
    "config_name,net_id",
    [("inference.json", "autoencoder_def"), ("inference.json", "network_def"), ("train_autoencoder.json", "discriminator_def")],
)
def test_full_size_networks_match_published_parameter_counts(config_name, net_id):
    network = build(config_name, net_id)
    assert sum(p.numel() for p in network.parameters()) == PUBLISHED_PARAMETER_COUNTS[net_id]


def _as_generative_layout(state_dict: dict) -> dict:
    """Rename MONAI-core keys back to the MONAI GenerativeModels layout (the inverse of the loader's mapping)."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"\.attn\.(to_[qkv]\.(weight|bias))$", r".\1", key)
        key = key.replace(".postconv.conv.", ".conv.conv.")
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("net_id", ["autoencoder_def", "network_def"])
def test_published_checkpoint_layouts_load_strictly(scripts, tmp_path, net_id):
    source = build("inference.json", net_id)
    torch.manual_seed(1)
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    reference = source.state_dict()

    plain = tmp_path / "plain.pt"
    torch.save(reference, plain)
    generative = tmp_path / "generative.pt"
    old_layout = _as_generative_layout(reference)
    assert set(old_layout) != set(reference), "the old layout must differ for this test to mean anything"
    torch.save(old_layout, generative)

    for path in (plain, generative):
        target = build("inference.json", net_id)
        assert scripts.checkpoint.load_network_weights(target, path) == {}
        for key, value in target.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_loading_rejects_unexpected_keys(scripts, tmp_path):
    network = build("inference.json", "network_def")
    state = network.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="extra.weight"):
        scripts.checkpoint.load_network_weights(network, tmp_path / "bad.pt")


def test_diffusion_checkpoint_scale_factor(scripts, tmp_path):
    network = build("inference.json", "network_def")
    torch.save(network.state_dict(), tmp_path / "published.pt")
    assert scripts.inference.load_diffusion_checkpoint(network, tmp_path / "published.pt") == 1.0
    torch.save({"unet_state_dict": network.state_dict(), "scale_factor": 0.87}, tmp_path / "ours.pt")
    assert scripts.inference.load_diffusion_checkpoint(network, tmp_path / "ours.pt") == pytest.approx(0.87)


def test_atomic_save_keeps_previous_file_on_failure(scripts, tmp_path):
    target = tmp_path / "ckpt.pt"
    scripts.checkpoint.atomic_torch_save({"epoch": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("boom")

    with pytest.raises(pickle.PicklingError):
        scripts.checkpoint.atomic_torch_save({"epoch": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_kl_divergence_closed_form(scripts):
    mu = torch.zeros(2, 1, 4, 4)
    assert scripts.losses.kl_divergence(mu, torch.ones_like(mu)).item() == pytest.approx(0.0)
    mu, sigma = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), 2.0)
    expected = 4 * 0.5 * (0.25 + 4.0 - np.log(4.0) - 1.0)
    assert scripts.losses.kl_divergence(mu, sigma).item() == pytest.approx(expected, rel=1e-6)


def test_adversarial_terms(scripts):
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert scripts.losses.generator_adversarial_loss(real).item() == pytest.approx(0.0)
    assert scripts.losses.discriminator_adversarial_loss(real, fake).item() == pytest.approx(0.0)
    assert scripts.losses.discriminator_adversarial_loss(fake, real).item() == pytest.approx(1.0)


def test_perceptual_loss_needs_local_weights(scripts, tmp_path):
    with pytest.raises(ValueError, match="perceptual_loss_model_weights_path"):
        scripts.losses.build_perceptual_loss(2, pretrained=True, weights_path=None)
    with pytest.raises(FileNotFoundError, match="perceptual_loss_model_weights_path"):
        scripts.losses.build_perceptual_loss(2, pretrained=True, weights_path=tmp_path / "missing.pt")

    import torchvision

    resnet = torchvision.models.resnet50()
    torch.save({"state_dict": resnet.state_dict()}, tmp_path / "resnet50.pt")
    loss = scripts.losses.build_perceptual_loss(2, pretrained=True, weights_path=tmp_path / "resnet50.pt")
    torch.testing.assert_close(loss.perceptual_function.model.conv1.weight, resnet.conv1.weight)
    assert not any(p.requires_grad for p in loss.parameters())

    torch.save({"state_dict": {"conv1.weight": resnet.conv1.weight}}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="not a ResNet50 state dict"):
        scripts.losses.build_perceptual_loss(2, pretrained=True, weights_path=tmp_path / "partial.pt")


def test_display_orientation_is_radiological(scripts):
    image = np.zeros((4, 6), dtype=np.float32)  # RAS array order: axis 0 runs to the right, axis 1 to anterior
    image[-1, -1] = 1.0  # the most right and most anterior pixel
    picture = scripts.inference.to_display(image)
    assert picture.shape == (6, 4) and picture.dtype == np.uint8
    assert picture[0, 0] == 255  # anterior at the top, patient right on the viewer's left
    assert picture.sum() == 255


def test_sample_latent_transform(scripts):
    item = {"z_mu": torch.full((1, 2, 2), 3.0), "z_sigma": torch.zeros(1, 2, 2)}
    transform = scripts.latents.SampleLatentd(scale_factor=0.5)
    assert torch.equal(transform(item)["image"], torch.full((1, 2, 2), 1.5))
    item["z_sigma"] = torch.ones(1, 2, 2)
    transform.set_random_state(seed=3)
    first = transform(item)["image"]
    transform.set_random_state(seed=3)
    assert torch.equal(first, transform(item)["image"])
    assert not torch.equal(first, transform(item)["image"])


def test_scale_factor_is_inverse_std(scripts):
    cache = [{"z_mu": torch.randn(1, 4, 4) * 3.0, "z_sigma": torch.full((1, 4, 4), 1e-6)} for _ in range(50)]
    values = torch.stack([c["z_mu"] for c in cache])
    assert scripts.latents.compute_scale_factor(cache) == pytest.approx(1.0 / values.std().item(), rel=1e-4)


class TestDatasetChecks:
    def test_missing_task_folder(self, scripts, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"dataset_dir=.* does not contain Task01_BrainTumour.*Expected layout"):
            scripts.data.check_msd_dataset(tmp_path)

    def test_missing_index(self, scripts, tmp_path):
        (tmp_path / "Task01_BrainTumour").mkdir()
        with pytest.raises(FileNotFoundError, match="dataset.json is missing"):
            scripts.data.check_msd_dataset(tmp_path)

    def test_malformed_index(self, scripts, tmp_path):
        task = make_brats_like_dataset(tmp_path, num_volumes=1, shape=(8, 8, 4))
        (task / "dataset.json").write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            scripts.data.check_msd_dataset(tmp_path)
        (task / "dataset.json").write_text(json.dumps({"name": "x"}))
        with pytest.raises(ValueError, match="lacks the MSD properties"):
            scripts.data.check_msd_dataset(tmp_path)

    def test_missing_image(self, scripts, tmp_path):
        task = make_brats_like_dataset(tmp_path, num_volumes=2, shape=(8, 8, 4))
        (task / "imagesTr" / "BRATS_002.nii.gz").unlink()
        with pytest.raises(FileNotFoundError, match="1 image.* missing.*BRATS_002"):
            scripts.data.check_msd_dataset(tmp_path)

    def test_valid(self, scripts, tmp_path):
        task = make_brats_like_dataset(tmp_path, num_volumes=2, shape=(8, 8, 4))
        assert scripts.data.check_msd_dataset(tmp_path) == task


def _failure(config, overrides, tmp_path):
    """The messages of the error that stops ``config`` (run in-process; the command line is tested below)."""
    with pytest.raises(Exception) as raised:
        run_in_process(BUNDLE, [config], {"bundle_root": str(tmp_path), **overrides})
    messages, error = [], raised.value
    while error is not None:  # the config parser wraps the errors of expressions
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"num_inference_steps": 0}, "num_inference_steps=0 is not allowed; it must be an integer >= 1"),
        ({"num_inference_steps": 5000}, "num_inference_steps=5000 is not allowed; it must be between 1 and 1000"),
        ({"scheduler": "pndm"}, "scheduler='pndm' is not allowed; choose one of ['ddim', 'ddpm']"),
        ({"num_output_samples": -1}, "num_output_samples=-1 is not allowed"),
        ({}, "load_autoencoder_path="),
    ],
)
def test_inference_rejects_bad_input_before_loading_weights(tmp_path, overrides, expected):
    output = _failure("inference.json", overrides, tmp_path)
    assert expected in output
    if overrides:  # the weights are absent too: the value check must come first
        assert "load_autoencoder_path=" not in output
    else:  # no weights downloaded: the message says how to get them
        assert "python -m monai.bundle download_large_files --bundle_path" in output
        assert "large_files.yml" in output


def test_training_rejects_missing_dataset(tmp_path):
    output = _failure("train_autoencoder.json", {"dataset_dir": str(tmp_path / "nowhere")}, tmp_path)
    assert "dataset_dir=" in output and "does not contain Task01_BrainTumour" in output


def test_diffusion_training_requires_autoencoder_weights(tmp_path):
    """On the command line: the run exits with an error that says how to get the weights."""
    make_brats_like_dataset(tmp_path, num_volumes=1, shape=(8, 8, 4))
    result = run_bundle(
        BUNDLE,
        ["train_autoencoder.json", "train_diffusion.json"],
        {"bundle_root": str(tmp_path), "dataset_dir": str(tmp_path)},
        check=False,
    )
    assert result.returncode != 0
    assert "load_autoencoder_path=" in result.stdout and "download_large_files" in result.stdout


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"val_frac": 1.5}, "val_frac=1.5 is not allowed; it must be a number in (0, 1)"),
        ({"train_batch_size_slice": 0}, "train_batch_size_slice=0 is not allowed"),
        ({"max_epochs": -1}, "max_epochs=-1 is not allowed"),
        ({"channel": 5}, "channel=5 is not allowed; choose one of [0, 1, 2, 3]"),
        ({"adv_weight": -0.5}, "adv_weight=-0.5 is not allowed"),
        ({"amp": True}, "amp=True is not allowed on device=cpu"),
    ],
)
def test_training_rejects_bad_overrides_before_building_anything(tmp_path, overrides, expected):
    output = _failure("train_autoencoder.json", {"dataset_dir": str(tmp_path / "nowhere"), **overrides}, tmp_path)
    assert expected in output
    assert "does not contain Task01_BrainTumour" not in output  # the id checks come first
