"""Unit tests of the MAISI diffusion-training helpers (scripts/diffusion_training.py) and the embedding/datalist helpers."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from bundle_helpers import BUNDLES_DIR, bundle_scripts

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(BUNDLE):
        yield SimpleNamespace(
            training=importlib.import_module("scripts.diffusion_training"),
            trainers=importlib.import_module("scripts.trainers"),
            embeddings=importlib.import_module("scripts.embeddings"),
            checkpoint=importlib.import_module("scripts.checkpoint"),
        )


class FakeUNet(torch.nn.Module):
    """Records the keyword inputs; flags as DiffusionModelUNetMaisi has them."""

    def __init__(self, num_class_embeds=128, spacing=True, regions=False):
        super().__init__()
        self.num_class_embeds = num_class_embeds
        self.include_spacing_input = spacing
        self.include_top_region_index_input = regions
        self.include_bottom_region_index_input = regions


def _batch(batch_size=2, shape=(4, 4, 4, 4), modality=(3, 9)):
    return {
        "image": torch.randn(batch_size, *shape),
        "spacing": torch.tensor([[1.5, 1.5, 2.0]] * batch_size),
        "modality": torch.tensor(modality[:batch_size]),
        "top_region_index": torch.tensor([[0.0, 1.0, 0.0, 0.0]] * batch_size),
        "bottom_region_index": torch.tensor([[0.0, 0.0, 1.0, 0.0]] * batch_size),
    }


def test_modality_dropout_generalises_then_drops(scripts):
    labels = torch.tensor([3] * 5000 + [9] * 5000 + [1] * 5000)
    out = scripts.training.augment_modality_labels(labels, 0.1, 0.1, torch.Generator().manual_seed(0))
    ct, mr, generic = out[:5000], out[5000:10000], out[10000:]
    assert set(ct.tolist()) == {0, 1, 3} and set(mr.tolist()) == {0, 8, 9} and set(generic.tolist()) == {0, 1}
    assert (ct == 1).float().mean() == pytest.approx(0.09, abs=0.015)  # 0.1 generalised, then 10% of those dropped
    assert (out == 0).float().mean() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(scripts.training.augment_modality_labels(labels, 0.0, 0.0), labels)
    with pytest.raises(ValueError, match="modality_dropout_prob=1.5"):
        scripts.training.augment_modality_labels(labels, 0.1, 1.5)


def test_rflow_prepare_batch_targets_velocity_and_passes_scaled_conditions(scripts):
    torch.manual_seed(0)
    unet = FakeUNet().train()
    prepare = scripts.training.LatentDiffusionPrepareBatch(RFlowScheduler(1000, use_timestep_transform=True), unet, 0.5, 0.0, 0.0)
    batch = _batch()
    noisy, target, args, kwargs = prepare(batch, "cpu")
    latents = batch["image"] * 0.5
    assert args == () and set(kwargs) == {"timesteps", "class_labels", "spacing_tensor"}
    t = kwargs["timesteps"].float() / 1000
    noise = latents - target  # target = x0 - noise
    torch.testing.assert_close(noisy, (1 - t)[:, None, None, None, None] * latents + t[:, None, None, None, None] * noise)
    assert kwargs["class_labels"].tolist() == [3, 9] and kwargs["class_labels"].dtype == torch.long
    assert kwargs["spacing_tensor"].tolist() == [[150.0, 150.0, 200.0]] * 2
    assert ((kwargs["timesteps"] >= 0) & (kwargs["timesteps"] <= 1000)).all()


def test_ddpm_prepare_batch_targets_noise_and_passes_regions(scripts):
    torch.manual_seed(0)
    scheduler = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    unet = FakeUNet(num_class_embeds=None, regions=True)
    _, _, _, kwargs = scripts.training.LatentDiffusionPrepareBatch(scheduler, unet, 1.0)(_batch(), "cpu")
    assert set(kwargs) == {"timesteps", "spacing_tensor", "top_region_index_tensor", "bottom_region_index_tensor"}
    assert kwargs["timesteps"].dtype == torch.long
    assert kwargs["top_region_index_tensor"].tolist() == [[0.0, 100.0, 0.0, 0.0]] * 2
    batch = _batch()
    batch["top_region_index"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="top_region_index but a training sample has none"):
        scripts.training.LatentDiffusionPrepareBatch(scheduler, unet, 1.0)(batch, "cpu")
    with pytest.raises(ValueError, match="scale_factor=0"):
        scripts.training.LatentDiffusionPrepareBatch(scheduler, unet, 0)


def test_ddpm_target_is_the_drawn_noise(scripts):
    scheduler = DDPMScheduler(1000)
    prepare = scripts.training.LatentDiffusionPrepareBatch(scheduler, FakeUNet(num_class_embeds=None, spacing=False), 1.0)
    batch = _batch()
    torch.manual_seed(1)
    noisy, target, _, kwargs = prepare(batch, "cpu")
    torch.testing.assert_close(noisy, scheduler.add_noise(batch["image"], target, kwargs["timesteps"]))
    scheduler.prediction_type = "v_prediction"
    torch.manual_seed(1)
    _, velocity, _, kwargs = prepare(batch, "cpu")
    torch.testing.assert_close(velocity, scheduler.get_velocity(batch["image"], target, kwargs["timesteps"]))


def test_scale_factor_precedence_checkpoint_then_pretrained_then_first_batch(scripts, tmp_path):
    latent = torch.randn(4, 4, 4, 4) * 3
    path = scripts.embeddings.write_latent(tmp_path / "a_emb.nii.gz", latent, (1, 1, 1), {"dim": [16, 16, 16], "spacing": [1, 1, 1], "modality": 1})
    items = [{"image": str(path)}]
    computed = scripts.training.resolve_scale_factor(items, 1, tmp_path / "run")
    assert computed == pytest.approx(1 / latent.std().item(), rel=1e-5)
    torch.save({"unet_state_dict": {}, "scale_factor": torch.tensor(0.7)}, tmp_path / "pretrained.pt")
    assert scripts.training.resolve_scale_factor(items, 1, tmp_path / "run", tmp_path / "pretrained.pt") == pytest.approx(0.7)
    (tmp_path / "run").mkdir()
    torch.save({"scale_factor": 0.3, "epoch": 1}, tmp_path / "run/checkpoint_last.pt")
    assert scripts.training.resolve_scale_factor(items, 1, tmp_path / "run", tmp_path / "pretrained.pt") == 0.3
    assert scripts.training.resolve_scale_factor(items, 1, tmp_path / "run", None, resume=False) == pytest.approx(computed)
    torch.save({"unet_state_dict": {}}, tmp_path / "no_factor.pt")
    with pytest.raises(ValueError, match="has no 'scale_factor'"):
        scripts.training.resolve_scale_factor(items, 1, tmp_path / "other", tmp_path / "no_factor.pt")
    with pytest.raises(ValueError, match="standard deviation"):
        scripts.training.compute_scale_factor([torch.zeros(4, 2, 2, 2)])


def test_polynomial_decay_follows_the_configured_length(scripts):
    decay = scripts.training.polynomial_decay(10, 2.0)
    assert [decay(s) for s in (0, 5, 10, 20)] == [1.0, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="total_iters=0"):
        scripts.training.polynomial_decay(0)


def test_terminate_on_nan_raises_without_completing(scripts):
    from ignite.engine import Engine, Events

    losses = iter([1.0, float("nan"), 0.5])
    engine = Engine(lambda e, b: {"loss": torch.tensor(next(losses))})
    scripts.trainers.TerminateOnNan().attach(engine)
    completed = []
    engine.add_event_handler(Events.COMPLETED, lambda e: completed.append(True))
    with pytest.raises(FloatingPointError, match=r"loss is \[nan\] at epoch 1, iteration 2"):
        engine.run([0, 1, 2], max_epochs=1)
    assert not completed  # exporters and checkpoints on COMPLETED never see the NaN weights


def test_summary_writer_on_rank_zero_only(scripts, tmp_path, monkeypatch):
    writer = scripts.trainers.rank_zero_summary_writer(str(tmp_path / "rank0"))
    writer.add_scalar("loss", 1.0, 1)
    writer.close()
    assert len(list((tmp_path / "rank0").glob("events.out.tfevents.*"))) == 1
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    other = scripts.trainers.rank_zero_summary_writer(str(tmp_path / "rank1"))
    other.add_scalar("loss", 1.0, 1)
    other.add_image("slice", torch.zeros(1, 4, 4), 1)
    other.close()
    assert not (tmp_path / "rank1").exists()


def test_terminate_on_nan_checks_every_named_loss_term(scripts, tmp_path):
    from ignite.engine import Engine

    outputs = iter([{"loss": 1.0, "g_loss": 2.0}, {"loss": 1.0, "g_loss": float("inf")}])
    engine = Engine(lambda e, b: next(outputs))
    network = torch.nn.Linear(1, 1)
    exported = tmp_path / "exported.pt"
    scripts.checkpoint.ModelExporter(path=str(exported), network=network).attach(engine)
    scripts.trainers.TerminateOnNan(lambda output: output).attach(engine)
    with pytest.raises(FloatingPointError, match=r"g_loss is \[inf\] at epoch 1, iteration 2"):
        engine.run([0, 1], max_epochs=1)
    assert not exported.exists()


@pytest.mark.parametrize("config", ["train_autoencoder.json", "train_controlnet.json", "train_diffusion.json"])
def test_every_training_config_stops_on_nan_without_exporting(config):
    text = (BUNDLE / "configs" / config).read_text()
    assert "scripts.trainers.TerminateOnNan" in text and "ignite.handlers.TerminateOnNan" not in text


def test_training_settings_and_finetune_errors(scripts, tmp_path):
    check = scripts.training.check_diffusion_training_settings
    check(1, 1e-5, 1, 1, 1)
    for args, message in (((1, 0, 1, 1, 1), "lr=0"), ((1, 1e-5, 0, 1, 1), "train_batch_size=0"), ((True, 1e-5, 1, 1, 1), "max_epochs=True")):
        with pytest.raises(ValueError, match=message):
            check(*args)
    assert scripts.training.load_pretrained_unet(torch.nn.Linear(1, 1), tmp_path / "x.pt", False, "cpu") is None
    with pytest.raises(ValueError, match="finetune=true but trained_diffusion_path="):
        scripts.training.load_pretrained_unet(torch.nn.Linear(1, 1), tmp_path / "x.pt", True, "cpu")
    with pytest.raises(ValueError, match="finetune='yes'"):
        scripts.training.load_pretrained_unet(torch.nn.Linear(1, 1), tmp_path / "x.pt", "yes", "cpu")


def test_datalist_loading_folds_and_shapes(scripts, tmp_path):
    emb = scripts.embeddings
    sidecar = {"dim": [16, 16, 16], "spacing": [1, 1, 1], "modality": 1}
    emb.write_latent(tmp_path / "a_emb.nii.gz", np.zeros((4, 4, 4, 4)), (1, 1, 1), sidecar)
    emb.write_latent(tmp_path / "b_emb.nii.gz", np.zeros((4, 4, 4, 2)), (1, 1, 1), dict(sidecar, dim=[16, 16, 8]))
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "a_emb.nii.gz", "fold": 0}, {"image": "b_emb.nii.gz", "fold": 1}]}))
    items = emb.load_datalist(tmp_path / "list.json")
    assert [item["image"] for item in items] == [str(tmp_path / "a_emb.nii.gz"), str(tmp_path / "b_emb.nii.gz")]
    assert [i["fold"] for i in emb.select_folds(items, 0)] == [1]
    assert [i["fold"] for i in emb.select_folds(items, 0, training=False)] == [0]
    assert len(emb.select_folds(items, None)) == 2
    emb.check_latent_shapes(items, 1)
    with pytest.raises(ValueError, match="train_batch_size=2 needs latents of one shape"):
        emb.check_latent_shapes(items, 2)
    (tmp_path / "bad.json").write_text(json.dumps({"training": [{"image": "missing_emb.nii.gz"}]}))
    with pytest.raises(ValueError, match="missing_emb.nii.gz' does not exist"):
        emb.load_datalist(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"training": [{"image": "a_emb.nii.gz", "fold": -1}]}))
    with pytest.raises(ValueError, match="fold=-1"):
        emb.load_datalist(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"validation": []}))
    with pytest.raises(ValueError, match="no non-empty 'training' list"):
        emb.load_datalist(tmp_path / "bad.json")


class MeanEncoder(torch.nn.Module):
    """A stand-in autoencoder: z_mu = 4x4x4 average pool repeated on 4 channels, z_sigma = 1."""

    def encode(self, image):
        mu = torch.nn.functional.avg_pool3d(image, 4).repeat(1, 4, 1, 1, 1)
        return mu, torch.ones_like(mu)


def test_sliding_window_encode_matches_whole_volume(scripts):
    image = torch.rand(1, 1, 32, 32, 16)
    whole = scripts.embeddings.encode_posterior_mean(MeanEncoder(), image)
    windowed = scripts.embeddings.encode_posterior_mean(MeanEncoder(), image, sliding_window_size=[16, 16, 16], overlap=0.5)
    assert whole.shape == windowed.shape == (1, 4, 8, 8, 4)
    torch.testing.assert_close(windowed, whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        scripts.embeddings.encode_posterior_mean(MeanEncoder(), torch.rand(1, 1, 30, 32, 16))
    with pytest.raises(ValueError, match="embedding_sliding_window_size"):
        scripts.embeddings.encode_posterior_mean(MeanEncoder(), image, sliding_window_size=[10, 16, 16])


def test_create_embeddings_errors_name_the_image(scripts, tmp_path):
    from monai.transforms import Compose, EnsureTyped, LoadImaged

    transform = Compose([LoadImaged("image", image_only=True, ensure_channel_first=True), EnsureTyped("image")])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), dtype=np.float32), np.eye(4)), str(tmp_path / "two.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"nope")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.float32), np.eye(4)), str(tmp_path / "ok.nii.gz"))
    for name, message in (("two.nii.gz", "two.nii.gz' has shape"), ("broken.nii.gz", "broken.nii.gz' cannot be loaded")):
        with pytest.raises(ValueError, match=message):
            scripts.embeddings.create_embeddings(MeanEncoder(), [{"image": str(tmp_path / name)}], transform, tmp_path / "e", tmp_path / "l.json", 1, "cpu", progress=False)
    with pytest.raises(ValueError, match="ok.nii.gz' has modality='ct'"):
        scripts.embeddings.create_embeddings(MeanEncoder(), [{"image": str(tmp_path / "ok.nii.gz"), "modality": "ct"}], transform, tmp_path / "e", tmp_path / "l.json", 1, "cpu", progress=False)
    written = scripts.embeddings.create_embeddings(MeanEncoder(), [{"image": str(tmp_path / "ok.nii.gz"), "fold": 3}], transform, tmp_path / "e", tmp_path / "l.json", 9, "cpu", progress=False)
    assert json.loads(written.read_text()) == {"training": [{"image": "e/ok_emb.nii.gz", "fold": 3}]}
    assert scripts.embeddings.read_sidecar(tmp_path / "e/ok_emb.nii.gz")["modality"] == 9
