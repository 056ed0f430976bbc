"""
MR ControlNet training on BraTS-like masks (ids 401-403, above the 8-bit range) through maisi_mr_generative's
configs (train_controlnet.json on top of inference.json), then image-from-mask generation with the trained
ControlNet by changing one id.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_in_process
from test_maisi_mr_generative import TINY

BUNDLE = BUNDLES_DIR / "maisi_mr_generative"
CONFIGS = ["inference.json", "train_controlnet.json"]
LATENT_SHAPE = (8, 8, 8)
IMAGE_SHAPE = tuple(4 * s for s in LATENT_SHAPE)
SPACING = [2.0, 2.0, 2.0]
MRI_FLAIR = 11
BRAIN = 22
MAPPED_CORE = 129  # 401 (necrotic core) in the ControlNet range: the label the published MR recipe weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parser(config_files, overrides):
    return parse_bundle_config(BUNDLE, config_files, overrides)


def _pair(rng):
    """A brain holding a BraTS-like tumour at a random place; the latent encodes where the tumour is."""
    mask = np.zeros(IMAGE_SHAPE, dtype=np.int16)
    mask[4:-4, 4:-4, 4:-4] = BRAIN
    c = rng.integers(4, 16, size=3)
    mask[c[0] : c[0] + 12, c[1] : c[1] + 12, c[2] : c[2] + 12] = 402
    mask[c[0] + 2 : c[0] + 10, c[1] + 2 : c[1] + 10, c[2] + 2 : c[2] + 10] = 403
    mask[c[0] + 4 : c[0] + 8, c[1] + 4 : c[1] + 8, c[2] + 4 : c[2] + 8] = 401
    coarse = mask[::4, ::4, ::4]
    latent = np.where(coarse > 255, 1.0, -0.5).astype(np.float32)[None].repeat(4, axis=0)
    latent += rng.normal(0, 0.05, latent.shape).astype(np.float32)
    return mask, latent


def _tiny_weights(models_dir):
    parser = _parser(["inference.json"], {"bundle_root": str(BUNDLE), **TINY})
    torch.manual_seed(0)
    paths = {}
    for net_id, config_id, key in (
        ("autoencoder_def", "trained_autoencoder_path", None),
        ("diffusion_unet_def", "trained_diffusion_path", "unet_state_dict"),
    ):
        with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
            network = parser.get_parsed_content(net_id)
        for parameter in network.parameters():  # a frozen UNet must respond to its inputs for the ControlNet to learn
            if parameter.dim() > 1 and not parameter.detach().abs().sum():
                torch.nn.init.normal_(parameter, std=0.2)
        payload = network.state_dict() if key is None else {key: network.state_dict(), "scale_factor": torch.tensor(1.0)}
        paths[config_id] = str(models_dir / f"{net_id}.pt")
        torch.save(payload, paths[config_id])
    return paths


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mr_controlnet")
    with bundle_scripts(BUNDLE):
        from scripts.embeddings import make_sidecar, write_latent

        rng = np.random.default_rng(0)
        entries = []
        for index, fold in enumerate([1, 1, 1, 1, 0]):
            mask, latent = _pair(rng)
            nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), str(root / f"case{index}_label.nii.gz"))
            sidecar = make_sidecar(IMAGE_SHAPE, SPACING, MRI_FLAIR, [0, 0, 0, 0], [0, 0, 0, 0])
            write_latent(root / f"case{index}_emb.nii.gz", torch.from_numpy(latent), SPACING, sidecar)
            entries.append({"image": f"case{index}_emb.nii.gz", "label": f"case{index}_label.nii.gz", "fold": fold})
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    (root / "models").mkdir()
    return root, _tiny_weights(root / "models")


def _overrides(root, weights, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "datalist_file": str(root / "datalist.json"),
        "train_output_dir": str(output_dir),
        "controlnet_init_path": None,  # no MR ControlNet is published: start from the UNet
        "batch_size": 2,
        "num_workers": 0,
        "cache_rate": 1.0,
        "log_every_n_iterations": 1,
        **TINY,
        **weights,
        **extra,
    }


def test_mr_controlnet_learns_on_labels_above_255(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(root, weights, tmp_path, max_epochs=15, lr_schedule=False, lr=0.01, weighted_loss=10)
    with bundle_scripts(BUNDLE) as scripts:
        parser = _parser(CONFIGS, overrides)
        assert parser["weighted_loss_label"] == [MAPPED_CORE]  # the published MR recipe's weighted label
        parser.get_parsed_content("initialize")
        item = parser.get_parsed_content("train#datalist")[0]
        prepared = parser.get_parsed_content("train#preprocessing")(item)
        raw = np.asarray(nib.load(item["label"]).dataobj)
        assert {401, 402, 403} <= set(np.unique(raw).tolist())
        assert set(torch.unique(prepared["label"]).tolist()) == {0, BRAIN, 129, 130, 131}  # mapped before binarising
        assert int(prepared["modality"]) == MRI_FLAIR
        trainer = parser.get_parsed_content("train#trainer")
        terms: list[dict[str, float]] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms.append(scripts.controlnet_training.loss_terms(e.state.output)))
        trainer.run()
    losses = np.array([t["l1_loss"] for t in terms])
    assert len(losses) == 15 * 2 and np.isfinite(losses).all()
    assert losses[-8:].mean() < 0.8 * losses[:8].mean(), losses


def test_trained_mr_controlnet_generates_from_a_brats_mask(workspace, tmp_path):
    root, weights = workspace
    # in-process, as on the command line (where None must be the expression "$None": the CLI drops a plain None)
    run_in_process(BUNDLE, CONFIGS, _overrides(root, weights, tmp_path / "train", max_epochs=1, progress=False, controlnet_init_path="$None"))
    exported = tmp_path / "train" / "controlnet.pt"
    assert set(torch.load(exported, weights_only=True)) == {"controlnet_state_dict"}

    mask_path = root / "case0_label.nii.gz"
    overrides = {
        "bundle_root": str(BUNDLE),
        "output_dir": str(tmp_path / "generated"),
        "output_size": [128, 128, 128],
        "spacing": [1.0, 1.0, 1.0],
        "modality": "mri_flair",
        "num_inference_steps": 2,
        "progress": False,
        "mask_path": str(mask_path),
        "trained_controlnet_path": str(exported),  # the one id that switches to the trained ControlNet
        **TINY,
        **weights,
    }
    run_in_process(BUNDLE, ["inference.json"], overrides)
    report = json.loads((tmp_path / "generated/generation_report.json").read_text())
    sample = report["samples"][0]
    assert report["settings"]["files"]["trained_controlnet_path"] == str(exported) and sample["mask_source"] == f"user:{mask_path}"
    image = nib.load(sample["image"])
    data = np.asarray(image.dataobj)
    assert image.shape == (128, 128, 128) and data.dtype == np.int16 and data.min() >= 0 and data.max() > 0
    labels = np.asarray(nib.load(sample["label"]).dataobj)
    assert set(np.unique(labels).tolist()) == {0, BRAIN, 401, 402, 403}  # 2 mm mask resampled to 1 mm, raw ids
