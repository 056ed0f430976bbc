"""MAISI ControlNet fine-tuning (configs/train_controlnet.json on top of inference.json) on tiny synthetic latents and masks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import IterationEvents
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_bundle
from demo.maisi_presets import MAISI_TINY_AUTOENCODER, MAISI_TINY_CONTROLNET, MAISI_TINY_UNET

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
CONFIGS = ["inference.json", "train_controlnet.json"]
VERSION_CONFIGS = {"rflow-ct": ["inference.json"], "ddpm-ct": ["inference.json", "inference_ddpm_ct.json"]}
LATENT_SHAPE = (8, 8, 8)
IMAGE_SHAPE = tuple(4 * s for s in LATENT_SHAPE)
SPACING = [1.5, 1.5, 2.0]
NEW_LABEL = 129  # a free id for a new class, as in the published kidney-tumour fine-tuning
LUNG_TUMOR, LUNG_LOBE = 23, 28
TINY = {
    **MAISI_TINY_AUTOENCODER,  # only the generation at 256x256x128 decodes
    **MAISI_TINY_UNET,
    **MAISI_TINY_CONTROLNET,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parser(config_files, overrides, bundle=BUNDLE):
    return parse_bundle_config(bundle, config_files, overrides)


def _messages(error: BaseException | None) -> str:
    """The messages of an exception and its causes (the config parser wraps errors of expressions)."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__
    return "\n".join(texts)


def _randomised(network):
    """MONAI zero-initialises output convolutions; a frozen UNet must respond to its inputs for the test to learn."""
    for parameter in network.parameters():
        if parameter.dim() > 1 and not parameter.detach().abs().sum():
            torch.nn.init.normal_(parameter, std=0.2)
    return network


def _tiny_weights(models_dir, version):
    parser = _parser(VERSION_CONFIGS[version], {"bundle_root": str(BUNDLE), **TINY})
    torch.manual_seed(0)
    paths = {}
    for net_id, key in (("autoencoder_def", None), ("diffusion_unet_def", "unet_state_dict"), ("controlnet_def", "controlnet_state_dict")):
        with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
            state = _randomised(parser.get_parsed_content(net_id)).state_dict()
        payload = state if key is None else {key: state}
        if key == "unet_state_dict":
            payload["scale_factor"] = torch.tensor(1.0)
        path = models_dir / f"{version}_{net_id}.pt"
        torch.save(payload, path)
        paths[net_id] = str(path)
    return {
        "trained_autoencoder_path": paths["autoencoder_def"],
        "trained_diffusion_path": paths["diffusion_unet_def"],
        "trained_controlnet_path": paths["controlnet_def"],
    }


def _pair(rng):
    """A mask with body, a lung lobe holding a tumour and the new class; the latent encodes where the new class is."""
    mask = np.zeros(IMAGE_SHAPE, dtype=np.uint8)
    mask[4:-4, 4:-4, :] = 200
    mask[4:16, 4:16, 4:28] = LUNG_LOBE
    mask[8:12, 8:12, 12:16] = LUNG_TUMOR
    corner = rng.integers(16, 24, size=3)
    mask[corner[0] : corner[0] + 8, corner[1] : corner[1] + 8, corner[2] : corner[2] + 8] = NEW_LABEL
    coarse = mask[::4, ::4, ::4]
    latent = np.where(coarse == NEW_LABEL, 1.0, -0.5).astype(np.float32)[None].repeat(4, axis=0)
    latent += rng.normal(0, 0.05, latent.shape).astype(np.float32)
    return mask, latent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    with bundle_scripts(BUNDLE) as scripts:
        import scripts.embeddings as embeddings

        rng = np.random.default_rng(0)
        entries = []
        for index, fold in enumerate([1, 1, 1, 1, 0]):
            mask, latent = _pair(rng)
            nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), str(root / f"case{index}_label.nii.gz"))
            sidecar = embeddings.make_sidecar(IMAGE_SHAPE, SPACING, 1, [0, 1, 0, 0], [0, 0, 1, 0])
            embeddings.write_latent(root / f"case{index}_emb.nii.gz", torch.from_numpy(latent), SPACING, sidecar)
            entries.append({"image": f"case{index}_emb.nii.gz", "label": f"case{index}_label.nii.gz", "fold": fold})
        assert scripts is not None
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    (root / "models").mkdir()
    weights = {version: _tiny_weights(root / "models", version) for version in VERSION_CONFIGS}
    return root, weights


def _overrides(root, weights, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "datalist_file": str(root / "datalist.json"),
        "train_output_dir": str(output_dir),
        "batch_size": 2,
        "num_workers": 0,
        "cache_rate": 1.0,
        "lr": 0.001,
        "log_every_n_iterations": 1,
        "weighted_loss_label": [NEW_LABEL],
        "weighted_loss": 10,
        **TINY,
        **weights,
        **extra,
    }


def _train_in_process(config_files, overrides, bundle=BUNDLE):
    """Run the training config in-process; the terms and the learning rate of every iteration are recorded."""
    with bundle_scripts(bundle) as scripts:
        parser = _parser(config_files, overrides, bundle)
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        terms: list[dict[str, float]] = []
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: terms.append({"lr": e.optimizer.param_groups[0]["lr"]}))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms[-1].update(scripts.controlnet_training.loss_terms(e.state.output)))
        trainer.run()
        return parser, trainer, terms


@pytest.mark.parametrize("version", ["rflow-ct", "ddpm-ct"])
def test_loss_goes_down(workspace, tmp_path, version):
    root, weights = workspace
    overrides = _overrides(root, weights[version], tmp_path, max_epochs=15, controlnet_init_path=None, lr_schedule=False, lr=0.01)
    parser, trainer, terms = _train_in_process([*VERSION_CONFIGS[version], "train_controlnet.json"], overrides)
    assert len(terms) == 15 * 2
    losses = np.array([t["l1_loss"] for t in terms])
    assert np.isfinite(losses).all()
    assert losses[-8:].mean() < 0.8 * losses[:8].mean(), losses
    assert {t["lr"] for t in terms} == {0.01}  # lr_schedule=false: a constant factor of 1
    unet_before = torch.load(weights[version]["trained_diffusion_path"], map_location="cpu", weights_only=True)["unet_state_dict"]
    for key, value in parser.get_parsed_content("diffusion_unet").state_dict().items():
        torch.testing.assert_close(value, unet_before[key])  # the diffusion UNet stays frozen


def test_controlnet_init_from_unet_and_weighted_loss(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(root, weights["rflow-ct"], tmp_path, max_epochs=1, controlnet_init_path=None)
    with bundle_scripts(BUNDLE) as scripts:
        parser = _parser(CONFIGS, overrides)
        parser.get_parsed_content("initialize")
        assert parser.get_parsed_content("controlnet_source") == "diffusion_unet"
        unet = parser.get_parsed_content("diffusion_unet").state_dict()
        controlnet = parser.get_parsed_content("controlnet").state_dict()
        shared = [k for k in controlnet if k in unet and controlnet[k].shape == unet[k].shape]
        assert len(shared) > 20 and all(torch.equal(controlnet[k], unet[k]) for k in shared)
        labels = torch.zeros((1, 1, 8, 8, 8), dtype=torch.long)
        labels[..., :4, :, :] = NEW_LABEL
        weights_map = parser.get_parsed_content("controlnet_loss").voxel_weights(labels)
        assert weights_map[..., :4, :, :].unique().tolist() == [10.0] and weights_map[..., 4:, :, :].unique().tolist() == [1.0]
        assert scripts.controlnet_training.polynomial_total_iters(3, 2) == 6


def test_iteration_events_fire_for_handlers(workspace, tmp_path):
    """ControlNet training runs SupervisedTrainer's own iteration: handlers keyed on MONAI's IterationEvents run."""
    root, weights = workspace
    overrides = _overrides(root, weights["rflow-ct"], tmp_path, max_epochs=1, controlnet_init_path=None)
    with bundle_scripts(BUNDLE):
        parser = _parser(CONFIGS, overrides)
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        controlnet, unet = parser.get_parsed_content("controlnet"), parser.get_parsed_content("diffusion_unet")
        seen, clipped, snapshot = [], [], {}

        def clip_gradients(engine):  # the typical BACKWARD_COMPLETED handler
            clipped.append(float(torch.nn.utils.clip_grad_norm_(controlnet.parameters(), max_norm=1e-3)))
            grads = [p.grad for p in controlnet.parameters() if p.grad is not None]
            seen.append(("backward", bool(grads), all(p.grad is None for p in unet.parameters())))
            clipped.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            snapshot.update({k: v.clone() for k, v in controlnet.state_dict().items()})

        def model_completed(engine):
            seen.append(("model", any(not torch.equal(v, snapshot[k]) for k, v in controlnet.state_dict().items())))

        trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda e: seen.append(("forward", tuple(e.state.output["pred"]["pred"].shape))))
        trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: seen.append(("loss", sorted(k for k in e.state.output if "loss" in k))))
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, clip_gradients)
        trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, model_completed)
        trainer.run()
    per_iteration = [
        ("forward", (2, 4, *LATENT_SHAPE)),
        ("loss", ["l1_loss", "loss", "region_contrastive_loss"]),
        ("backward", True, True),  # ControlNet gradients, none for the frozen UNet
        ("model", True),  # the optimiser stepped after the BACKWARD_COMPLETED handler
    ]
    assert seen == per_iteration * 2
    assert clipped[0] > 1e-3 and clipped[1] == pytest.approx(1e-3, rel=1e-3)  # the handler's clipping took effect


def test_training_pair_transform(workspace, tmp_path):
    root, _ = workspace
    mask = np.asarray(nib.load(root / "case0_label.nii.gz").dataobj).astype(np.int16)
    mask[:4, :4, :4] = 401  # an MR tumour id above 255: mapped as generation maps it
    nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), str(tmp_path / "mr_label.nii.gz"))
    nib.save(nib.Nifti1Image(mask[:-4], np.diag([*SPACING, 1.0])), str(tmp_path / "bad_label.nii.gz"))
    with bundle_scripts(BUNDLE):
        from scripts.controlnet_training import controlnet_train_transforms

        transform = controlnet_train_transforms()
        sample = transform({"image": str(root / "case0_emb.nii.gz"), "label": str(tmp_path / "mr_label.nii.gz")})
        with pytest.raises(Exception) as error:
            transform({"image": str(root / "case0_emb.nii.gz"), "label": str(tmp_path / "bad_label.nii.gz")})
    assert sample["image"].shape == (4, *LATENT_SHAPE) and sample["label"].shape == (1, *IMAGE_SHAPE)
    assert sample["label"].dtype == torch.int16 and int(sample["label"][0, 0, 0, 0]) == 129
    assert set(torch.unique(sample["label"]).tolist()) == {0, 129, 200, LUNG_TUMOR, LUNG_LOBE}
    assert sample["spacing"].tolist() == pytest.approx(SPACING) and int(sample["modality"]) == 1
    assert sample["top_region_index"].tolist() == [0, 1, 0, 0]
    assert "does not match its latent" in _messages(error.value)


def test_mr_bundle_trains_on_mr_label_ids(workspace, tmp_path):
    """The shared config on the MR bundle: MR sidecars (modality 9) and a BraTS tumour id 401, trained as 129."""
    root, _ = workspace
    mr_bundle = BUNDLES_DIR / "maisi_mr_generative"
    parser = _parser(["inference.json"], {"bundle_root": str(mr_bundle), **TINY}, mr_bundle)
    torch.manual_seed(0)
    unet_path = tmp_path / "mr_unet.pt"
    with bundle_scripts(mr_bundle):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
        unet_state = _randomised(parser.get_parsed_content("diffusion_unet_def")).state_dict()
    torch.save({"unet_state_dict": unet_state, "scale_factor": 1.0}, unet_path)
    with bundle_scripts(mr_bundle):
        import scripts.embeddings as embeddings

        entries = []
        for index, fold in enumerate([1, 1, 0]):
            mask, latent = _pair(np.random.default_rng(index))
            mask = mask.astype(np.int16)
            mask[mask == NEW_LABEL] = 401
            nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), str(tmp_path / f"mr{index}_label.nii.gz"))
            embeddings.write_latent(tmp_path / f"mr{index}_emb.nii.gz", torch.from_numpy(latent), SPACING, embeddings.make_sidecar(IMAGE_SHAPE, SPACING, 9))
            entries.append({"image": f"mr{index}_emb.nii.gz", "label": f"mr{index}_label.nii.gz", "fold": fold})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    overrides = {
        **_overrides(root, {"trained_diffusion_path": str(unet_path)}, tmp_path / "run", max_epochs=2, controlnet_init_path=None),
        "bundle_root": str(mr_bundle),
        "datalist_file": str(tmp_path / "datalist.json"),
    }
    parser, trainer, terms = _train_in_process(["inference.json", "train_controlnet.json"], overrides, mr_bundle)
    assert len(terms) == 2 and all(np.isfinite(t["loss"]) for t in terms)
    trained_labels = torch.unique(trainer.state.batch["label"]).tolist()  # the last training batch's masks
    assert set(trained_labels) <= {0, 200, LUNG_TUMOR, LUNG_LOBE, NEW_LABEL}
    assert NEW_LABEL in trained_labels  # 401 arrived as 129
    exported = torch.load(tmp_path / "run" / "controlnet.pt", map_location="cpu", weights_only=True)
    assert set(exported["controlnet_state_dict"]) == set(parser.get_parsed_content("controlnet").state_dict())


def test_region_contrastive_loss(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(root, weights["rflow-ct"], tmp_path, max_epochs=1, use_region_contrastive_loss=True, region_contrastive_loss_weight=1.0)
    _, _, terms = _train_in_process(CONFIGS, overrides)
    contrastive = [t["region_contrastive_loss"] for t in terms]
    assert all(np.isfinite(contrastive)) and any(c != 0 for c in contrastive)
    assert all(t["loss"] == pytest.approx(t["l1_loss"] + t["region_contrastive_loss"], rel=1e-5) for t in terms)


def test_region_contrastive_loss_needs_the_lesion_free_prediction():
    with bundle_scripts(BUNDLE):
        from scripts.controlnet_training import ControlNetLoss

        loss = ControlNetLoss(torch.nn.L1Loss(reduction="none"), [NEW_LABEL], 10.0, use_region_contrastive_loss=True, region_contrastive_loss_weight=1.0)
        prediction = {"pred": torch.zeros(1, 4, 2, 2, 2)}
        targets = {"target": torch.ones(1, 4, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)}
        with pytest.raises(ValueError, match="lesion_free_condition"):
            loss(prediction, targets)
        loss.use_region_contrastive_loss = False
        assert float(loss(prediction, targets)) == 1.0 and float(loss.terms["l1_loss"]) == 1.0


def test_train_resume_export_and_generate_with_user_mask(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(root, weights["rflow-ct"], tmp_path / "run", max_epochs=1)
    _, _, first = _train_in_process(CONFIGS, overrides)  # the command line is exercised by test_torchrun_two_processes
    assert [t["lr"] for t in first] == pytest.approx([0.001, 0.001 * (1 - 1 / 2) ** 2])  # polynomial decay over 2 iterations
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == 2 and {"controlnet", "optimizer", "lr_scheduler"} <= set(checkpoint)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.0  # the first schedule ended
    _, trainer, terms = _train_in_process(CONFIGS, {**overrides, "max_epochs": 2})
    assert len(terms) == 2 and trainer.state.epoch == 2  # resumed after epoch 1: only the second epoch ran
    # the decay continues over the new length (4 iterations), from the first resumed iteration on (PolynomialLR kept 0)
    assert [t["lr"] for t in terms] == pytest.approx([0.001 * (1 - 2 / 4) ** 2, 0.001 * (1 - 3 / 4) ** 2])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["iteration"] == 4
    assert checkpoint["lr_scheduler"]["last_epoch"] == 4  # the polynomial schedule counts iterations
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "l1_loss", "region_contrastive_loss"} <= set(events.Tags()["scalars"])
    exported = torch.load(tmp_path / "run" / "controlnet.pt", map_location="cpu", weights_only=True)
    assert set(exported) == {"controlnet_state_dict"}
    published = torch.load(weights["rflow-ct"]["trained_controlnet_path"], map_location="cpu", weights_only=True)["controlnet_state_dict"]
    assert set(exported["controlnet_state_dict"]) == set(published)
    assert not all(torch.equal(exported["controlnet_state_dict"][k], published[k]) for k in published)

    # generation uses the fine-tuned ControlNet by changing trained_controlnet_path only
    tuned_path = str(tmp_path / "run" / "controlnet.pt")
    user_mask = root / "user_mask.nii.gz"
    mask = np.zeros((128, 128, 64), dtype=np.uint8)
    mask[16:-16, 16:-16, :] = 200
    mask[40:72, 40:72, 16:48] = 1
    mask[80:96, 40:60, 20:40] = NEW_LABEL
    nib.save(nib.Nifti1Image(mask, np.diag([3.0, 3.0, 4.0, 1.0])), str(user_mask))
    generation = {
        "bundle_root": str(BUNDLE),
        "output_dir": str(tmp_path / "generated"),
        "mask_path": str(user_mask),
        "output_size": [256, 256, 128],
        "spacing": SPACING,
        "num_inference_steps": 2,
        "quality_check_max_attempts": 1,
        "progress": False,
        **TINY,
        **weights["rflow-ct"],
        "trained_controlnet_path": tuned_path,
    }
    with bundle_scripts(BUNDLE):  # the generation config run in-process, as `monai.bundle run` runs it
        parser = _parser(["inference.json"], generation)
        for section in ("initialize", "run", "finalize"):
            parser.get_parsed_content(section)
        networks = parser.get_parsed_content("networks")
    for key, value in networks.controlnet.state_dict().items():
        torch.testing.assert_close(value, exported["controlnet_state_dict"][key])
    report = json.loads((tmp_path / "generated" / "generation_report.json").read_text())
    assert report["settings"]["files"]["trained_controlnet_path"] == tuned_path
    sample = report["samples"][0]
    image = nib.load(sample["image"])
    labels = np.asarray(nib.load(sample["label"]).dataobj)
    data = np.asarray(image.dataobj)
    assert data.shape == (256, 256, 128) and data.dtype == np.int16 and data.min() >= -1000 and data.max() <= 1000
    assert NEW_LABEL in np.unique(labels) and (data[labels == 0] == -1000).all() and data[labels > 0].std() > 0
    np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"weighted_loss_label": [300]}, "weighted_loss_label=[300]"),
        ({"weighted_loss": 0.5}, "weighted_loss=0.5"),
        ({"use_region_contrastive_loss": "yes"}, "use_region_contrastive_loss='yes'"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lr_schedule": "yes"}, "lr_schedule='yes'"),
        ({"validation_fold": 1, "datalist_file": "missing.json"}, "datalist_file=missing.json"),
        ({"controlnet_init_path": "missing_controlnet.pt"}, "controlnet_init_path=missing_controlnet.pt"),
        ({"trained_diffusion_path": "missing_unet.pt"}, "trained_diffusion_path=missing_unet.pt"),
        ({"exported_controlnet_path": "PUBLISHED"}, "it is trained_controlnet_path"),
    ],
)
def test_bad_ids_refused_before_weights_load(workspace, tmp_path, extra, message):
    root, weights = workspace
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    extra = {key: weights["rflow-ct"]["trained_controlnet_path"] if value == "PUBLISHED" else value for key, value in extra.items()}
    overrides = _overrides(root, {**weights["rflow-ct"], "trained_diffusion_path": str(corrupt)}, tmp_path, **extra)
    with bundle_scripts(BUNDLE), pytest.raises(Exception) as error:
        _parser(CONFIGS, overrides).get_parsed_content("initialize")
    assert message in _messages(error.value)


def test_torchrun_two_processes(workspace, tmp_path):
    root, weights = workspace
    # the region-contrastive term runs the DDP-wrapped ControlNet twice per iteration
    overrides = _overrides(root, weights["rflow-ct"], tmp_path, max_epochs=1, batch_size=1, use_region_contrastive_loss=True)
    run_bundle(BUNDLE, [*CONFIGS, "multi_gpu_train_controlnet.json"], overrides, torchrun_procs=2)
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == 2  # 4 pairs over 2 ranks, batch 1
    assert checkpoint["lr_scheduler"]["_step_count"] == 3  # PolynomialLR over this rank's 2 iterations
    exported = torch.load(tmp_path / "controlnet.pt", map_location="cpu", weights_only=True)
    assert set(exported) == {"controlnet_state_dict"}
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes TensorBoard
