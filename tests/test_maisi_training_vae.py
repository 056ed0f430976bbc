"""MAISI autoencoder training (configs/train_autoencoder.json on top of inference.json) on tiny synthetic CT volumes."""

from __future__ import annotations

import importlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.utils import AdversarialKeys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
CONFIGS = ["inference.json", "train_autoencoder.json"]
SHAPE = (24, 24, 24)
TINY = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
    "discriminator_def#channels": 8,
    "discriminator_def#num_layers_d": 2,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ct_volume(rng: np.random.Generator) -> np.ndarray:
    """A body (0 HU) in air (-1000 HU) with a bright sphere at a random place: learnable in a few dozen steps."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[3:-3, 3:-3, :] = 0.0
    centre = rng.integers(8, 16, size=3).reshape(3, 1, 1, 1)
    volume[((grid - centre) ** 2).sum(0) < 16] = 600.0
    return volume


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_data")
    rng = np.random.default_rng(0)
    entries = []
    for index, fold in enumerate([1, 1, 1, 1, 0]):
        name = f"case{index}.nii.gz"
        nib.save(nib.Nifti1Image(_ct_volume(rng), np.diag([1.5, 1.5, 2.0, 1.0])), str(root / name))
        entries.append({"image": name, "fold": fold})
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    return root


def _overrides(dataset, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(dataset),
        "train_output_dir": str(output_dir),
        "finetune": False,
        "patch_size": [16, 16, 16],
        "val_sliding_window_patch_size": [16, 16, 16],
        "batch_size": 2,
        "num_workers": 0,
        "cache_rate": 1.0,
        "perceptual_weight": 0.0,
        "lr_warmup": False,
        "lr": 0.002,
        "log_every_n_iterations": 1,
        **TINY,
        **extra,
    }


def _parser(overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in CONFIGS])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_reconstruction_loss_goes_down(dataset, tmp_path):
    overrides = _overrides(dataset, tmp_path, max_epochs=12, val_interval=12, adv_weight=0.0, random_aug=False, spacing_type="original")
    with bundle_scripts(BUNDLE) as scripts:
        parser = _parser(overrides)
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator")
        evaluator.run()
        untrained = dict(evaluator.state.metrics)
        losses: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(scripts.trainers.loss_terms(e.state.output)[AdversarialKeys.RECONSTRUCTION_LOSS]))
        trainer.run()
        metrics = evaluator.state.metrics
    assert len(losses) == 12 * 2  # 4 training images, batch 2
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.5 * first, (first, last)
    assert metrics["val_psnr"] > untrained["val_psnr"] + 2, (untrained, metrics)  # sliding-window validation improves
    assert metrics["val_ssim"] > untrained["val_ssim"] and 0 < metrics["val_ssim"] <= 1


def test_train_resume_export_and_use_in_inference(dataset, tmp_path):
    resnet = tmp_path / "resnet50.pt"
    from torchvision.models import resnet50

    torch.save({"state_dict": resnet50().state_dict()}, resnet)  # a local perceptual network: nothing is downloaded
    overrides = _overrides(dataset, tmp_path / "run", max_epochs=1, val_interval=1, perceptual_weight=0.3, perceptual_loss_model_weights_path=str(resnet))
    log = run_bundle(BUNDLE, CONFIGS, overrides).stdout
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == 2
    assert {"autoencoder", "discriminator", "optimizer_g", "optimizer_d", "lr_scheduler_g", "lr_scheduler_d"} <= set(checkpoint)
    assert "val_psnr" in log and "perceptual_loss" in log
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"val_psnr", "val_ssim", "reconstruction_loss", "perceptual_loss", "kl_loss", "discriminator_loss"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"]  # reconstruction slices of the validation volume
    first_export = torch.load(tmp_path / "run" / "autoencoder.pt", map_location="cpu", weights_only=True)

    with bundle_scripts(BUNDLE):  # resume in-process (the command line ran above)
        parser = _parser({**overrides, "max_epochs": 2, "perceptual_weight": 0.0})
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        iterations: list[int] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
        trainer.run()
    assert iterations == [3, 4]  # continued after the saved epoch 1 / iteration 2
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["iteration"] == 4
    exported = torch.load(tmp_path / "run" / "autoencoder.pt", map_location="cpu", weights_only=True)
    assert set(exported) == set(first_export) and not all(torch.equal(exported[k], first_export[k]) for k in exported)

    # the generation config uses the export by changing trained_autoencoder_path only (strict load)
    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.json"))
        parser["bundle_root"] = str(BUNDLE)
        for key, value in TINY.items():
            if key.startswith("autoencoder_def"):
                parser[key] = value
        parser["trained_autoencoder_path"] = str(tmp_path / "run" / "autoencoder.pt")
        autoencoder = parser.get_parsed_content("autoencoder_def")
        checkpoint_module = importlib.import_module("scripts.checkpoint")
        checkpoint_module.load_network_weights(autoencoder, parser.get_parsed_content("trained_autoencoder_path"))
    for key, value in autoencoder.state_dict().items():
        torch.testing.assert_close(value, exported[key])

    # fine-tuning starts from the exported weights (strict load through trained_autoencoder_path)
    finetuned = {**overrides, "train_output_dir": str(tmp_path / "finetune"), "finetune": True, "val_interval": 5}
    finetuned["trained_autoencoder_path"] = str(tmp_path / "run" / "autoencoder.pt")
    with bundle_scripts(BUNDLE):
        parser = _parser(finetuned)
        parser.get_parsed_content("initialize")
        network = parser.get_parsed_content("gnetwork")
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, exported[key])


def test_mr_bundle_trains_on_mr_images(tmp_path):
    """The shared config on the MR bundle (modality mri_t1: percentile intensity scaling, no HU clipping)."""
    mr_bundle = BUNDLES_DIR / "maisi_mr_generative"
    rng = np.random.default_rng(1)
    entries = []
    for index, fold in enumerate([1, 1, 0]):
        volume = (_ct_volume(rng) + 1000.0) * 0.4  # arbitrary MR units: background 0, tissue 400, lesion 640
        nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.0, 1.0])), str(tmp_path / f"mr{index}.nii.gz"))
        entries.append({"image": f"mr{index}.nii.gz", "fold": fold})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    overrides = {**_overrides(tmp_path, tmp_path / "run", max_epochs=2, val_interval=2), "bundle_root": str(mr_bundle)}
    with bundle_scripts(mr_bundle):
        parser = ConfigParser()
        parser.read_config([str(mr_bundle / "configs" / name) for name in CONFIGS])
        for key, value in overrides.items():
            parser[key] = value
        assert parser.get_parsed_content("modality").startswith("mri")
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        trainer.run()
        metrics = parser.get_parsed_content("validate#evaluator").state.metrics
    assert trainer.state.iteration == 2 and np.isfinite(metrics["val_psnr"]) and 0 < metrics["val_ssim"] <= 1
    assert float(trainer.state.output["image"].max()) > 0.9  # the 99.5th percentile maps to 1 (no HU window)
    assert set(torch.load(tmp_path / "run" / "autoencoder.pt", map_location="cpu", weights_only=True)) == set(parser.get_parsed_content("gnetwork").state_dict())


def test_transforms_fixed_spacing_mr_and_channel_selection(tmp_path):
    two_channels = np.stack([np.full(SHAPE, 10.0), np.linspace(0, 500, np.prod(SHAPE)).reshape(SHAPE)], axis=-1)
    nib.save(nib.Nifti1Image(two_channels.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "mr.nii.gz"))
    with bundle_scripts(BUNDLE) as scripts:
        import scripts.vae_training as vae_training

        train = vae_training.autoencoder_train_transforms("mri_t1", [16, 16, 16], False, "fixed", [4.0, 4.0, 4.0], select_channel=1)
        val = vae_training.autoencoder_val_transforms("mri_t1", None, "fixed", [4.0, 4.0, 4.0], select_channel=1)
        patch = train({"image": str(tmp_path / "mr.nii.gz")})["image"]
        volume = val({"image": str(tmp_path / "mr.nii.gz")})
        with pytest.raises(RuntimeError) as error:  # MONAI wraps errors raised inside transforms
            vae_training.autoencoder_train_transforms("mri_t1", [16, 16, 16], False, "original", select_channel=2)({"image": str(tmp_path / "mr.nii.gz")})
        warmup = [scripts.vae_training.lr_warmup_factor(epoch) for epoch in (0, 9, 10, 19, 20)]
    assert "select_channel=2 is not allowed for an image with 2 channel(s)" in str(error.value.__cause__)
    assert warmup == [0.01, 0.01, 0.1, 0.1, 1.0] and vae_training.lr_warmup_factor(0, enabled=False) == 1.0
    assert patch.shape == (1, 16, 16, 16)  # 24 voxels at 2 mm -> 12 at 4 mm, zero padded to the patch
    assert 0.9 < float(patch.max()) <= 1.01 and float(patch.min()) == 0.0  # MR: 99.5th percentile -> 1, then resampled
    assert volume["image"].shape == (1, 12, 12, 12) and torch.equal(volume["image"], volume["label"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"recon_loss": "l3"}, "recon_loss='l3'"),
        ({"patch_size": [30, 16, 16]}, "patch_size=[30, 16, 16]"),
        ({"spacing_type": "fixed"}, "resample_spacing=None"),
        ({"spacing_type": "rand_zoom", "random_aug": False}, "random_aug=False"),
        ({"kl_weight": -1.0}, "kl_weight=-1.0"),
        ({"perceptual_weight": 0.3}, "perceptual_loss_model_weights_path"),
        ({"validation_fold": 7}, "no validation entries"),
        ({"trained_autoencoder_path": "missing_autoencoder.pt"}, "trained_autoencoder_path=missing_autoencoder.pt"),
        ({"exported_autoencoder_path": "CORRUPT"}, "it is trained_autoencoder_path"),
    ],
)
def test_bad_ids_refused_before_weights_load(dataset, tmp_path, extra, message):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    extra = {key: str(corrupt) if value == "CORRUPT" else value for key, value in extra.items()}
    overrides = _overrides(dataset, tmp_path, finetune=True, **{"trained_autoencoder_path": str(corrupt), **extra})
    with bundle_scripts(BUNDLE), pytest.raises(Exception) as error:
        _parser(overrides).get_parsed_content("initialize")
    texts, cause = [], error.value
    while cause is not None:  # the config parser wraps errors of expressions
        texts.append(str(cause))
        cause = cause.__cause__
    assert message in "\n".join(texts)


def test_torchrun_two_processes(dataset, tmp_path):
    overrides = _overrides(dataset, tmp_path, max_epochs=1, val_interval=1, batch_size=1)
    log = run_bundle(BUNDLE, [*CONFIGS, "multi_gpu_train_autoencoder.json"], overrides, torchrun_procs=2).stdout
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == 2  # 4 images over 2 ranks, batch 1
    assert (tmp_path / "autoencoder.pt").is_file() and "val_psnr" in log
    assert checkpoint["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(0.004)  # lr x world size
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes TensorBoard


def test_mr_artifact_augmentations_only_for_mr_with_random_aug():
    with bundle_scripts(BUNDLE):
        import scripts.vae_training as vae_training

        def names(modality, random_aug):
            transforms = vae_training.autoencoder_train_transforms(modality, [16, 16, 16], random_aug, "original").transforms
            return [type(t).__name__ for t in transforms]

        mr, ct, mr_plain = names("mri_t1", True), names("ct", True), names("mri_t1", False)
        published = {t.__class__.__name__: t for t in vae_training.mr_artifact_augmentations()}
    artifacts = ["RandBiasFieldd", "RandGibbsNoised", "RandHistogramShiftd"]
    assert all(name in mr for name in artifacts)
    assert not any(name in ct or name in mr_plain for name in artifacts)
    assert mr.count("RandAdjustContrastd") == 2 and ct.count("RandAdjustContrastd") == 1
    assert published["RandAdjustContrastd"].adjuster.gamma == (0.5, 2.0)
    probabilities = {name: transform.prob for name, transform in published.items()}
    assert probabilities == {"RandBiasFieldd": 0.3, "RandGibbsNoised": 0.3, "RandAdjustContrastd": 0.3, "RandHistogramShiftd": 0.05}
