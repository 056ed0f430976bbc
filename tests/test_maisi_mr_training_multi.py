"""
maisi_mr_generative training beyond one process and one network: the multi-GPU diffusion overlay with gloo, and
ControlNet training on the embedded simulated MR masks (BraTS ids above 255), both on the CPU with tiny networks.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import bundle_scripts, run_bundle, run_in_process
from demo.maisi_presets import MAISI_TINY, read_scalars
from test_maisi_mr_training import BUNDLE, NUM_IMAGES, _parser, _train_overrides, prepare_mr_embeddings


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_mr_training_multi")
    return root, prepare_mr_embeddings(root)


def test_multi_gpu_overlay_with_gloo(workspace, tmp_path):
    root, _ = workspace
    configs = ["inference.json", "train_diffusion.json", "multi_gpu_train_diffusion.json"]
    run_bundle(BUNDLE, configs, _train_overrides(root, tmp_path, max_epochs=1), torchrun_procs=2)
    losses = read_scalars(tmp_path / "tensorboard", "train_loss")
    assert len(losses) == NUM_IMAGES // 2 and all(np.isfinite(losses))  # each rank sees half; rank 0 logs
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes TensorBoard
    exported = torch.load(tmp_path / "diff_unet_3d_rflow-mr.pt", weights_only=True)
    with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
        unet = _parser(["inference.json"], MAISI_TINY).get_parsed_content("diffusion_unet_def")
    unet.load_state_dict(exported["unet_state_dict"], strict=True)  # no DDP "module." prefix
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["epoch"] == 1


def test_controlnet_trains_on_the_embedded_mr_masks(workspace, tmp_path):
    root, weights = workspace
    latent_datalist = root / "embeddings/datalist_latents.json"
    items = json.loads(latent_datalist.read_text())["training"]
    labels = [np.asarray(nib.load(str(latent_datalist.parent / item["label"])).dataobj) for item in items]
    assert all({401, 402, 403} <= set(np.unique(label).tolist()) for label in labels)  # ids 8 bit planes cannot hold
    overrides = {
        "bundle_root": str(BUNDLE),
        "datalist_file": str(latent_datalist),
        "train_output_dir": str(tmp_path),
        "controlnet_init_path": "$None",
        "trained_diffusion_path": weights["diffusion_unet_def"],
        "max_epochs": 1,
        "num_workers": 0,
        "log_every_n_iterations": 1,
        "progress": False,
        **MAISI_TINY,
    }
    run_in_process(BUNDLE, ["inference.json", "train_controlnet.json"], overrides)
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == sum(item["fold"] != 0 for item in items)  # fold 0 held out
    losses = read_scalars(tmp_path / "tensorboard", "l1_loss")
    assert len(losses) == checkpoint["iteration"] and all(np.isfinite(losses))
    exported = torch.load(tmp_path / "controlnet.pt", weights_only=True)
    with bundle_scripts(BUNDLE):
        controlnet = _parser(["inference.json"], MAISI_TINY).get_parsed_content("controlnet_def")
    controlnet.load_state_dict(exported["controlnet_state_dict"], strict=True)
