# Copyright (c) MONAI generative bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Tiny MAISI settings shared by the demo, the tests and the benchmark smoke run.

The overrides shrink the networks of a MAISI bundle's ``inference.json`` (the published architectures
stay the defaults); :func:`simulate_ct_dataset` writes the simulated dataset of the MAISI diffusion
training tutorial (spheres in a volume, here in Hounsfield units with a label mask); and
:func:`write_initial_weights` writes weight files for the networks a step needs but does not train.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from demo.runner import bundle_scripts

# Attention only in the middle block (self-attention at >= 16k tokens is very slow on the CPU).
_TINY_UNET = {
    "num_channels": [8, 16, 16],
    "attention_levels": [False, False, False],
    "num_head_channels": [0, 0, 8],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
}
# 2 channels at every level and no residual blocks (the blocks that change the width between levels): images
# are decoded at the bundles' real output sizes (CT: at least 256x256x128, 8.4 M voxels), where a decode costs
# what its full-resolution stage costs.
MAISI_TINY_AUTOENCODER = {
    "autoencoder_def#num_channels": [2, 2, 2],
    "autoencoder_def#num_res_blocks": [0, 0, 0],
    "autoencoder_def#norm_num_groups": 2,
}
MAISI_TINY_UNET = {f"diffusion_unet_def#{key}": value for key, value in _TINY_UNET.items()}
MAISI_TINY_CONTROLNET = {
    **{f"controlnet_def#{key}": value for key, value in _TINY_UNET.items()},
    "controlnet_def#conditioning_embedding_num_channels": [8, 8, 8],
}
MAISI_TINY = {**MAISI_TINY_AUTOENCODER, **MAISI_TINY_UNET, **MAISI_TINY_CONTROLNET}
# A 3-level UNet halves the latent twice: latents divisible by 4, images by 16.
MAISI_TINY_DIVISIBLE_K = 16

# Training settings that make the tiny diffusion task learn in a few dozen iterations.
MAISI_TINY_DIFFUSION_TRAINING = {"lr": 1e-3, "num_workers": 0, "progress": False, "log_every_n_iterations": 1}

SIMULATED_LABEL = 1  # liver: marks the abdomen region for ddpm-ct region conditioning
BODY_LABEL = 200


def simulate_ct_dataset(
    folder: str | Path,
    num_images: int = 4,
    shape: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    seed: int = 0,
) -> list[tuple[Path, Path]]:
    """
    Write ``num_images`` CT-like volumes (HU, int16) and label masks into ``folder/images`` and ``folder/labels``.

    Each volume is air (-1000 HU) around a soft-tissue body (40 HU) holding a few spheres (200 HU) that are
    labelled ``SIMULATED_LABEL``; the body is labelled 200. Returns the ``(image, label)`` paths.
    """
    from monai.data import create_test_image_3d

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, spacing), 1.0])
    rng = np.random.RandomState(seed)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grid) < 0.8
    pairs = []
    for index in range(num_images):
        _, spheres = create_test_image_3d(*shape, num_objs=3, rad_max=max(2, min(shape) // 6), rad_min=2, num_seg_classes=1, random_state=rng)
        spheres = (spheres > 0) & body
        hu = np.full(shape, -1000.0)
        hu[body] = 40.0
        hu[spheres] = 200.0
        hu += rng.normal(0.0, 10.0, size=hu.shape) * body
        labels = np.where(spheres, SIMULATED_LABEL, np.where(body, BODY_LABEL, 0)).astype(np.uint8)
        image_path = folder / "images" / f"sim_{index:03d}.nii.gz"
        label_path = folder / "labels" / f"sim_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), affine), str(image_path))
        nib.save(nib.Nifti1Image(labels, affine), str(label_path))
        pairs.append((image_path, label_path))
    return pairs


def write_initial_weights(
    bundle_dir: str | Path,
    config_files: Sequence[str],
    overrides: Mapping[str, object],
    out_dir: str | Path,
    networks: Mapping[str, str | None],
    seed: int = 0,
) -> dict[str, str]:
    """
    Instantiate ``networks`` (config id -> state-dict key, ``None`` for a plain state dict) with ``overrides``
    and save their randomly initialised weights to ``out_dir/<id>.pt``; zero-initialised weights (MONAI's
    output convolutions) are redrawn so every network changes its input. Returns config id -> file path.
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(Path(bundle_dir) / "configs" / name) for name in config_files])
    parser["bundle_root"] = str(bundle_dir)
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for net_id, state_key in networks.items():
        with bundle_scripts(Path(bundle_dir)):  # the UNet's _target_ is the bundle's scripts.attention
            network = parser.get_parsed_content(net_id, instantiate=True)
        for parameter in network.parameters():
            if parameter.dim() > 1 and not parameter.detach().abs().sum():
                torch.nn.init.normal_(parameter, std=0.02)
        state = network.state_dict()
        payload = state if state_key is None else {state_key: state}
        if state_key == "unet_state_dict":
            payload["scale_factor"] = 1.0
        path = out_dir / f"{net_id}.pt"
        torch.save(payload, path)
        paths[net_id] = str(path)
    return paths


def read_scalars(tensorboard_dir: str | Path, tag: str) -> list[float]:
    """The values of one scalar ``tag`` from the TensorBoard event files under ``tensorboard_dir``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(tensorboard_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return [values[step] for step in sorted(values)]


def write_datalist(path: str | Path, items: Sequence[Mapping[str, object]]) -> Path:
    """Write ``{"training": items}`` to ``path``."""
    path = Path(path)
    path.write_text(json.dumps({"training": list(items)}, indent=4))
    return path


def simulated_embeddings(
    bundle_dir: str | Path,
    root: str | Path,
    num_images: int = 4,
    shape: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    run: Callable[[Path, Sequence[str], Mapping[str, object]], object] | None = None,
) -> dict[str, str]:
    """
    The first steps of the simulated-data flow, through the bundle's own code and configs.

    Simulates the dataset under ``root/data``, writes its datalist with ``scripts.data_prep datalist``
    (2 folds, body regions from the labels), writes a tiny initial autoencoder (and ControlNet, for
    generation) under ``root/models``, and encodes the images with ``configs/create_embeddings.json``
    into ``root/embeddings``, run by ``run(bundle_dir, config_files, overrides)`` (default
    ``demo.runner.run_bundle``, the command line; tests pass an in-process runner). Returns the paths:
    ``trained_autoencoder_path``, ``trained_controlnet_path``, ``latent_datalist_file``.
    """
    import subprocess
    import sys

    from demo.runner import run_bundle

    bundle_dir, root = Path(bundle_dir), Path(root)
    simulate_ct_dataset(root / "data", num_images, shape, spacing, seed=0)
    command = [sys.executable, "-m", "scripts.data_prep", "datalist", str(root / "data/images"), str(root / "data/datalist.json")]
    command += ["--label_dir", str(root / "data/labels"), "--num_folds", "2", "--regions_from_labels", "True"]
    subprocess.run(command, cwd=bundle_dir, check=True, capture_output=True, text=True)
    weights = write_initial_weights(
        bundle_dir, ["inference.json"], MAISI_TINY, root / "models", {"autoencoder_def": None, "controlnet_def": "controlnet_state_dict"}
    )
    overrides = {
        "bundle_root": str(bundle_dir),
        "datalist_file": str(root / "data/datalist.json"),
        "embedding_output_dir": str(root / "embeddings"),
        "trained_autoencoder_path": weights["autoencoder_def"],
        "embedding_divisible_k": MAISI_TINY_DIVISIBLE_K,
        "progress": False,
        **MAISI_TINY,
    }
    (run or run_bundle)(bundle_dir, ["inference.json", "create_embeddings.json"], overrides)
    return {
        "trained_autoencoder_path": weights["autoencoder_def"],
        "trained_controlnet_path": weights["controlnet_def"],
        "latent_datalist_file": str(root / "embeddings" / "datalist_latents.json"),
    }
