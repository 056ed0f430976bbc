"""Unit tests of brats_ldm2d's scripts and of its input validation (no training)."""

from __future__ import annotations

import json
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_helpers import BUNDLES_DIR, bundle_scripts, error_chain, run_in_process
from demo.synthetic import make_brats_like_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


def test_slice_draws_are_named_and_distinct(scripts):
    from monai.data import MetaTensor

    volume = MetaTensor(torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5), meta={"filename_or_obj": "v.nii"})
    draw = scripts.latents.RandSliceSamplesd(keys="image", num_samples=4)
    draw.set_random_state(seed=0)
    items = draw({"image": volume})
    indices = [int(item["slice_id"].rsplit(":", 1)[1]) for item in items]
    assert len(set(indices)) == 4 and all(item["slice_id"].startswith("v.nii:") for item in items)
    for item, z in zip(items, indices):
        assert item["image"].shape == (1, 2, 3)
        torch.testing.assert_close(torch.as_tensor(item["image"]), torch.as_tensor(volume[..., z]))
    assert len(draw({"image": volume[..., :2]})) == 4  # fewer slices than draws: drawn with replacement
    with pytest.raises(ValueError, match="filename_or_obj"):
        draw({"image": torch.zeros(1, 2, 3, 5)})


class _CountingEncoder(torch.nn.Module):
    """Stands in for ``AutoencoderKL``: ``encode`` returns (2 * x, 1 + x) and counts the slices it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def encode(self, images):
        self.seen += images.shape[0]
        return 2 * images, 1 + images


def test_latent_memo_encodes_each_slice_once(scripts):
    encoder = _CountingEncoder()
    memo = scripts.latents.LatentMemo(encoder, "cpu", batch_size=2)
    images = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1)
    z_mu, z_sigma = memo(images, ["a", "b", "a"])  # a repeated key is encoded once
    assert encoder.seen == 2 and len(memo) == 2
    torch.testing.assert_close(z_mu.flatten(), torch.tensor([0.0, 2.0, 0.0]))
    torch.testing.assert_close(z_sigma.flatten(), torch.tensor([1.0, 2.0, 1.0]))
    z_mu, _ = memo(torch.full((2, 1, 1, 1), 9.0), ["b", "c"])  # b is known: its stored latent is used
    assert encoder.seen == 3 and len(memo) == 3
    torch.testing.assert_close(z_mu.flatten(), torch.tensor([2.0, 18.0]))
    with pytest.raises(ValueError, match="encode_batch_size=0"):
        scripts.latents.LatentMemo(encoder, "cpu", batch_size=0)


def test_memo_prepare_batch_draws_scaled_latents(scripts):
    memo = scripts.latents.LatentMemo(_CountingEncoder(), "cpu", batch_size=4)
    prepare = scripts.latents.MemoLatentPrepareBatch(memo, scale_factor=0.5, num_train_timesteps=10)
    batch = {"image": torch.full((2, 1, 2, 2), 3.0), "slice_id": ["x:0", "x:1"]}
    torch.manual_seed(0)
    noisy, noise, args, kwargs = prepare(batch, torch.device("cpu"))
    torch.manual_seed(0)
    eps = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(noisy, (6.0 + 4.0 * eps) * 0.5)  # the clean latent is the inferer's input
    assert noise.shape == (2, 1, 2, 2) and torch.equal(kwargs["noise"], noise)
    assert kwargs["timesteps"].shape == (2,) and int(kwargs["timesteps"].max()) < 10


def test_scale_factor_is_inverse_std(scripts):
    z_mu, z_sigma = torch.randn(50, 1, 4, 4) * 3.0, torch.full((50, 1, 4, 4), 1e-6)
    assert scripts.latents.compute_scale_factor(z_mu, z_sigma) == pytest.approx(1.0 / z_mu.std().item(), rel=1e-4)


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


def _failure(configs, overrides, tmp_path, monkeypatch) -> str:
    """Run configs in-process where any ``torch.load`` raises; return the messages of the error they stop with."""

    def no_weights(*args, **kwargs):
        raise AssertionError("torch.load was called: a weights file was opened before the bad input was refused")

    monkeypatch.setattr(torch, "load", no_weights)
    with pytest.raises(Exception) as failure:
        run_in_process(BUNDLE, configs, {"bundle_root": str(tmp_path), **overrides})
    message = error_chain(failure.value)
    assert "torch.load was called" not in message
    return message


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"num_inference_steps": 0}, "num_inference_steps=0 is not allowed; it must be an integer >= 1"),
        ({"num_inference_steps": 5000}, "num_inference_steps=5000 is not allowed; it must be between 1 and 1000"),
        ({"scheduler": "pndm"}, "scheduler='pndm' is not allowed; choose one of ['ddim', 'ddpm']"),
        ({"num_output_samples": -1}, "num_output_samples=-1 is not allowed"),
        ({"random_seed": -2}, "random_seed=-2 is not allowed; it must be an integer >= 0"),
        ({"latent_shape": [64, 64]}, "latent_shape=[64, 64] is not allowed; it must be 3 integers >= 1"),
        ({"overwrite": "yes"}, "overwrite='yes' is not allowed; it must be true or false"),
        ({}, "load_autoencoder_path="),
    ],
)
def test_inference_rejects_bad_input_before_loading_weights(tmp_path, monkeypatch, overrides, expected):
    output = _failure(["inference.json"], overrides, tmp_path, monkeypatch)
    assert expected in output
    if overrides:  # the weights are absent too: the value check must come first
        assert "load_autoencoder_path=" not in output
    else:  # no weights downloaded: the message says how to get them
        assert "python -m monai.bundle download_large_files --bundle_path" in output
        assert "large_files.yml" in output


def test_inference_refuses_an_earlier_run_before_loading_weights(tmp_path, monkeypatch):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "inference_report.json").write_text("{}")
    output = _failure(["inference.json"], {}, tmp_path, monkeypatch)
    assert f"output_dir={tmp_path / 'output'} already holds an earlier run (inference_report.json)" in output
    assert "load_autoencoder_path=" not in output


def test_training_rejects_missing_dataset(tmp_path, monkeypatch):
    output = _failure(["train_autoencoder.json"], {"dataset_dir": str(tmp_path / "nowhere")}, tmp_path, monkeypatch)
    assert "dataset_dir=" in output and "does not contain Task01_BrainTumour" in output


def test_diffusion_training_requires_autoencoder_weights(tmp_path, monkeypatch):
    make_brats_like_dataset(tmp_path, num_volumes=1, shape=(8, 8, 4))
    configs = ["train_autoencoder.json", "train_diffusion.json"]
    output = _failure(configs, {"dataset_dir": str(tmp_path)}, tmp_path, monkeypatch)
    assert "load_autoencoder_path=" in output and "download_large_files" in output


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
def test_training_rejects_bad_overrides_before_building_anything(tmp_path, monkeypatch, overrides, expected):
    overrides = {"dataset_dir": str(tmp_path / "nowhere"), "device": "$torch.device('cpu')", **overrides}
    output = _failure(["train_autoencoder.json"], overrides, tmp_path, monkeypatch)
    assert expected in output
    assert "does not contain Task01_BrainTumour" not in output  # the id checks come first


def _load_bench():
    """The benchmark module (its zoo-style reference iterations are what the bundle is compared with)."""
    import importlib.util

    from bundle_helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_brats_ldm2d", REPO_ROOT / "bench" / "bench_brats_ldm2d.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def perceptual(scripts):
    """The frozen, randomly initialised ResNet50 perceptual loss (the published default)."""
    torch.manual_seed(0)
    return scripts.losses.build_perceptual_loss(2, pretrained=False, weights_path=None)


def _tiny_vaegan(scripts, perceptual):
    """Tiny autoencoder + discriminator from the training config, and the perceptual loss."""
    from demo.brats_presets import TINY_AUTOENCODER, TINY_DISCRIMINATOR

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train_autoencoder.json")
    for key, value in {**TINY_AUTOENCODER, **TINY_DISCRIMINATOR, "device": "$torch.device('cpu')"}.items():
        parser[key] = value
    torch.manual_seed(0)
    generator, discriminator = parser.get_parsed_content("autoencoder_def"), parser.get_parsed_content("discriminator_def")
    return parser, generator, discriminator, perceptual


def _vaegan_trainer(scripts, parser, generator, discriminator, perceptual, images, lr=0.0):
    return scripts.trainers.VAEGANTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": images}],
        epoch_length=1,
        g_network=generator,
        g_optimizer=torch.optim.SGD(generator.parameters(), lr=lr),
        g_loss_function=scripts.losses.generator_adversarial_loss,
        recon_loss_function=torch.nn.L1Loss(),
        d_network=discriminator,
        d_optimizer=torch.optim.SGD(discriminator.parameters(), lr=lr),
        d_loss_function=scripts.losses.discriminator_adversarial_loss,
        kl_weight=parser["kl_weight"],
        perceptual_loss=perceptual,
        perceptual_weight=parser["perceptual_weight"],
        adv_weight=parser["adv_weight"],
    )


def test_vaegan_losses_and_gradients_equal_the_zoo_iteration(scripts, perceptual):
    """The bundle's iteration and the benchmark's re-creation of the model-zoo VaeGanTrainer agree (same start)."""
    import copy

    bench = _load_bench()
    parser, generator, discriminator, perceptual = _tiny_vaegan(scripts, perceptual)
    images = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    ref_g, ref_d = copy.deepcopy(generator), copy.deepcopy(discriminator)
    trainer = _vaegan_trainer(scripts, parser, generator, discriminator, perceptual, images)
    gradients = {}
    trainer.add_event_handler(
        scripts.trainers.IterationEvents.BACKWARD_COMPLETED,
        lambda engine: gradients.update(g={n: p.grad.clone() for n, p in generator.named_parameters()}),
    )
    torch.manual_seed(7)  # the autoencoder's reparameterisation draws noise
    output = trainer._iteration(trainer, {"image": images})
    gradients["d"] = {n: p.grad.clone() for n, p in discriminator.named_parameters()}

    reference = bench.ZooStyleVAEGANStep(
        generator=ref_g,
        discriminator=ref_d,
        g_optimizer=torch.optim.SGD(ref_g.parameters(), lr=0.0),  # lr 0: the gradients stay readable, the weights fixed
        d_optimizer=torch.optim.SGD(ref_d.parameters(), lr=0.0),
        perceptual_loss=perceptual,
        kl_weight=parser["kl_weight"],
        perceptual_weight=parser["perceptual_weight"],
        adv_weight=parser["adv_weight"],
    )
    torch.manual_seed(7)
    g_loss, d_loss = reference(images)

    torch.testing.assert_close(output["loss"], g_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(output["discriminator_loss"], d_loss, rtol=1e-5, atol=1e-7)
    assert float(output["perceptual_loss"]) > 0 and float(output["generator_loss"]) > 0  # every term took part
    for network, ours in ((ref_g, gradients["g"]), (ref_d, gradients["d"])):
        # some gradients are 0 up to rounding (e.g. conv biases before a 1-channel GroupNorm group): compare
        # them on the scale of the network's largest gradient
        scale = max(float(p.grad.abs().max()) for p in network.parameters())
        for name, parameter in network.named_parameters():
            torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_vaegan_iteration_fires_iteration_events(scripts, perceptual):
    """Handlers keyed on MONAI's IterationEvents run, in SupervisedTrainer's order, with the state they expect."""
    from monai.engines import IterationEvents
    from monai.utils import AdversarialIterationEvents

    parser, generator, discriminator, perceptual = _tiny_vaegan(scripts, perceptual)
    images = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    trainer = _vaegan_trainer(scripts, parser, generator, discriminator, perceptual, images, lr=1.0)
    initial = {n: p.detach().clone() for n, p in generator.named_parameters()}
    seen = []

    def record(event):
        def handler(engine):
            output = engine.state.output
            state = {"event": event, "has_pred": "pred" in output, "has_loss": "loss" in output}
            state["g_grads"] = all(p.grad is not None for p in generator.parameters())
            state["g_updated"] = any(not torch.equal(initial[n], p) for n, p in generator.named_parameters())
            seen.append(state)

        return handler

    for event in IterationEvents:
        trainer.add_event_handler(event, record(event))
    trainer.add_event_handler(AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED, record("d_model"))
    # gradient clipping, the typical BACKWARD_COMPLETED handler: with SGD at lr 1 the update is the clipped gradient
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED, lambda engine: torch.nn.utils.clip_grad_norm_(generator.parameters(), 1e-3)
    )
    trainer.run()

    order = [state["event"] for state in seen]
    assert order == [
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        "d_model",
        IterationEvents.MODEL_COMPLETED,
    ]
    forward, loss, backward, _, model = seen
    assert forward["has_pred"] and not forward["has_loss"] and not forward["g_grads"]
    assert loss["has_loss"] and not loss["g_grads"]
    assert backward["g_grads"] and not backward["g_updated"]  # before the optimizer step, as in SupervisedTrainer
    assert model["g_updated"]
    update = torch.cat([(p.detach() - initial[n]).flatten() for n, p in generator.named_parameters()])
    assert float(update.norm()) == pytest.approx(1e-3, rel=1e-3)  # the clipping handler ran before the step
    assert isinstance(trainer.state.output, dict) and set(scripts.trainers.loss_terms(trainer.state.output)) >= {
        "loss",
        "kl_loss",
        "perceptual_loss",
        "discriminator_loss",
    }


def test_perceptual_weights_load_where_monai_pretrained_path_does_not(scripts, tmp_path):
    """Why ``build_perceptual_loss`` loads the ResNet50 weights itself (see its comment), shown on two files."""
    import torchvision
    from monai.losses import PerceptualLoss

    resnet = torchvision.models.resnet50()
    plain, head_free = tmp_path / "plain.pt", tmp_path / "head_free.pt"
    torch.save(resnet.state_dict(), plain)
    torch.save({"state_dict": {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}}, head_free)
    for path in (plain, head_free):
        loss = scripts.losses.build_perceptual_loss(2, pretrained=True, weights_path=path)
        torch.testing.assert_close(loss.perceptual_function.model.conv1.weight, resnet.conv1.weight)
    with pytest.raises(KeyError):
        PerceptualLoss(2, "resnet50", is_fake_3d=False, pretrained_path=str(plain), pretrained_state_dict_key="state_dict")
    with pytest.raises(RuntimeError, match="fc.weight"):
        PerceptualLoss(2, "resnet50", is_fake_3d=False, pretrained_path=str(head_free), pretrained_state_dict_key="state_dict")


def test_write_slice_uses_a_nifti_writer_atomically(scripts, tmp_path):
    import nibabel as nib

    image = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    nii_path, png_path = scripts.inference.write_slice(torch.as_tensor(image), tmp_path, "slice", pixdim=0.5)
    written = nib.load(nii_path)
    assert written.shape == (3, 4, 1) and written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32)[..., 0], image)
    np.testing.assert_allclose(written.affine, np.diag([0.5, 0.5, 1.0, 1.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice.nii.gz", "slice.png"]  # no temporary left behind

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scripts.inference.NibabelWriter, "write", broken)
        with pytest.raises(OSError, match="disk full"):
            scripts.inference.write_slice(np.zeros((3, 4)), tmp_path, "slice")
    np.testing.assert_array_equal(nib.load(nii_path).get_fdata(dtype=np.float32)[..., 0], image)  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice.nii.gz", "slice.png"]
    with pytest.raises(ValueError, match="expected a 2D slice"):
        scripts.inference.write_slice(np.zeros((2, 3, 4)), tmp_path, "volume")


def test_output_folder_detects_only_an_earlier_run(scripts, tmp_path):
    folder = scripts.inference.OutputFolder(tmp_path / "out", prefix="sample")
    assert folder.check() is folder  # a missing folder is fine
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a run")
    (tmp_path / "out" / "other_0000_seed0.png").write_bytes(b"")
    folder.check()  # other files and other prefixes are not this run's
    (tmp_path / "out" / "sample_0003_seed3.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"output_dir=.* already holds an earlier run \(sample_0003_seed3.nii.gz\)"):
        folder.check()
    scripts.inference.OutputFolder(tmp_path / "out", prefix="sample", overwrite=True).check()
    assert folder.stem(3, 3) == "sample_0003_seed3"


def _tiny_weights(tmp_path) -> dict:
    """Random tiny autoencoder and UNet weights in the published (plain state dict) format; the overrides that use them."""
    from demo.brats_presets import TINY_AUTOENCODER, TINY_DIFFUSION

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    for key, value in {**TINY_AUTOENCODER, **TINY_DIFFUSION}.items():
        parser[key] = value
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), tmp_path / "autoencoder.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "unet.pt")
    return {
        "bundle_root": str(tmp_path),
        "load_autoencoder_path": str(tmp_path / "autoencoder.pt"),
        "load_diffusion_path": str(tmp_path / "unet.pt"),
        "latent_shape": [1, 8, 8],
        "num_inference_steps": 3,
        "num_output_samples": 2,
        **TINY_AUTOENCODER,
        **TINY_DIFFUSION,
    }


def test_compile_overlay_agrees_with_eager(tmp_path):
    """
    inference_compile.json compiles the UNet and the decoder and gives the eager images.

    The test compiles with ``compile_backend: aot_eager`` (graph capture and AOT decomposition, the overlay's
    wiring, no C++ code generation): the default inductor backend works on this CPU but takes about 2-3 minutes
    even for these tiny networks on a 2-core machine. Inductor's numbers are measured by
    ``bench/bench_brats_ldm2d.py --sections compile`` (max abs difference in bench/RESULTS.md).
    """
    import nibabel as nib

    overrides = _tiny_weights(tmp_path)
    eager = run_in_process(BUNDLE, ["inference.json"], {**overrides, "output_dir": str(tmp_path / "eager")})
    compiled = run_in_process(
        BUNDLE,
        ["inference.json", "inference_compile.json"],
        {**overrides, "output_dir": str(tmp_path / "compiled"), "compile_backend": "aot_eager"},
    )
    sampler = compiled.get_parsed_content("sampler")
    assert isinstance(sampler.diffusion, torch._dynamo.eval_frame.OptimizedModule)
    assert hasattr(sampler.autoencoder.decode_stage_2_outputs, "_torchdynamo_orig_callable")
    assert eager.get_parsed_content("sampler").diffusion is eager.get_parsed_content("diffusion")
    for name in ("sample_0000_seed0.nii.gz", "sample_0001_seed1.nii.gz"):
        reference = nib.load(tmp_path / "eager" / name).get_fdata()
        assert reference.std() > 0
        np.testing.assert_allclose(nib.load(tmp_path / "compiled" / name).get_fdata(), reference, atol=1e-5)
