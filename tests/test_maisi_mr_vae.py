"""MR autoencoder training (train_autoencoder.json on maisi_mr_generative's inference.json): percentile-normalised MR patches."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.utils import AdversarialKeys

from bundle_helpers import BUNDLES_DIR, bundle_scripts
from test_maisi_mr_training import simulate_mr_dataset

BUNDLE = BUNDLES_DIR / "maisi_mr_generative"
TINY = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
    "discriminator_def#channels": 8,
    "discriminator_def#num_layers_d": 2,
}


def test_mr_autoencoder_training_on_percentile_normalised_patches(tmp_path):
    images = simulate_mr_dataset(tmp_path / "data", num_images=5, shape=(24, 24, 24))
    entries = [{"image": str(path), "fold": int(index == 4)} for index, path in enumerate(images)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    overrides = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(tmp_path),
        "datalist_file": str(tmp_path / "datalist.json"),
        "validation_fold": 1,
        "train_output_dir": str(tmp_path / "train"),
        "modality": "mri_t2",
        "finetune": False,
        "patch_size": [16, 16, 16],
        "val_sliding_window_patch_size": [16, 16, 16],
        "batch_size": 2,
        "num_workers": 0,
        "cache_rate": 1.0,
        "perceptual_weight": 0.0,
        "adv_weight": 0.0,
        "lr_warmup": False,
        "lr": 0.002,
        "random_aug": False,
        "spacing_type": "original",
        "max_epochs": 8,
        "val_interval": 8,
        "log_every_n_iterations": 1,
        **TINY,
    }
    with bundle_scripts(BUNDLE) as scripts:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / name) for name in ("inference.json", "train_autoencoder.json")])
        for key, value in overrides.items():
            parser[key] = value
        parser.get_parsed_content("initialize")
        raw = np.asarray(nib.load(str(images[0])).dataobj).astype(np.float64)
        patch = parser.get_parsed_content("validate#preprocessing")({"image": str(images[0])})["image"]
        expected = raw / np.percentile(raw, 99.5)  # MR: 0 -> 0, the 99.5th percentile -> 1, bright tail kept
        np.testing.assert_allclose(np.asarray(patch[0]), expected, rtol=1e-4, atol=1e-5)
        trainer = parser.get_parsed_content("train#trainer")
        losses: list[float] = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: losses.append(scripts.trainers.loss_terms(e.state.output)[AdversarialKeys.RECONSTRUCTION_LOSS]),
        )
        trainer.run()
    assert len(losses) == 8 * 2 and all(np.isfinite(losses))  # 4 training images, batch 2
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    exported = sorted((tmp_path / "train").glob("*.pt"))
    assert exported, sorted(p.name for p in (tmp_path / "train").rglob("*"))
    autoencoder = ConfigParser(json.loads((BUNDLE / "configs/inference.json").read_text()))
    for key, value in TINY.items():
        if key.startswith("autoencoder_def"):
            autoencoder[key] = value
    network = autoencoder.get_parsed_content("autoencoder_def", instantiate=True)
    state = torch.load(tmp_path / "train" / "autoencoder.pt", weights_only=True)
    network.load_state_dict(state, strict=True)  # the published plain format, loadable by generation
