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
"""Checks of the local Medical Segmentation Decathlon dataset and of user-facing ids, run before any weights load."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .checks import check_amp, check_files_exist, check_positive_int

__all__ = [
    "check_amp",
    "check_choice",
    "check_msd_dataset",
    "check_positive_int",
    "check_training_settings",
    "check_weights_file",
]

MSD_TASK = "Task01_BrainTumour"
MSD_PROPERTY_KEYS = (
    "name",
    "description",
    "reference",
    "licence",
    "tensorImageSize",
    "modality",
    "labels",
    "numTraining",
    "numTest",
)
EXPECTED_LAYOUT = (
    "<dataset_dir>/Task01_BrainTumour/dataset.json and <dataset_dir>/Task01_BrainTumour/imagesTr/BRATS_*.nii.gz "
    "(the Medical Segmentation Decathlon layout, 4-channel volumes of which channel 0 is FLAIR)"
)


def check_msd_dataset(dataset_dir: str | os.PathLike, task: str = MSD_TASK) -> Path:
    """
    Check that ``dataset_dir`` holds an MSD task folder with a usable ``dataset.json``.

    Parameters
    ----------
    dataset_dir
        the config id ``dataset_dir``: the folder that contains ``Task01_BrainTumour``.
    task
        the MSD task folder name.

    Returns
    -------
    Path
        The task folder.

    Raises
    ------
    FileNotFoundError
        the folder, ``dataset.json`` or an image it lists is missing.
    ValueError
        ``dataset.json`` is not valid JSON, lacks an MSD property or has no ``training`` images.
    """
    task_dir = Path(dataset_dir) / task
    if not task_dir.is_dir():
        raise FileNotFoundError(
            f"dataset_dir={dataset_dir} does not contain {task}. Expected layout: {EXPECTED_LAYOUT}. "
            "Download Task01_BrainTumour.tar from http://medicaldecathlon.com/ and extract it into dataset_dir "
            "(nothing is downloaded at run time)."
        )
    index_file = task_dir / "dataset.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"dataset_dir={dataset_dir}: {index_file} is missing. Expected layout: {EXPECTED_LAYOUT}.")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"dataset_dir={dataset_dir}: {index_file} is not valid JSON ({error}).") from error
    if not isinstance(index, dict):
        raise ValueError(f"dataset_dir={dataset_dir}: {index_file} must hold a JSON object.")
    absent = [key for key in MSD_PROPERTY_KEYS if key not in index]
    if absent:
        raise ValueError(f"dataset_dir={dataset_dir}: {index_file} lacks the MSD properties {absent}.")
    training = index.get("training")
    if not isinstance(training, list) or not training or not all(isinstance(e, dict) and "image" in e for e in training):
        raise ValueError(
            f"dataset_dir={dataset_dir}: {index_file} needs a non-empty 'training' list of {{'image': ...}} entries."
        )
    missing = [e["image"] for e in training if not (task_dir / e["image"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset_dir={dataset_dir}: {len(missing)} image(s) listed in {index_file} are missing, e.g. {missing[:3]}."
        )
    return task_dir


def check_choice(name: str, value: object, allowed: Sequence[object]) -> object:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError`` naming the id ``name``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")
    return value


def check_weights_file(name: str, path: str | os.PathLike, bundle_root: str | os.PathLike) -> Path:
    """
    Check that the weights file given by the config id ``name`` exists (``checks.check_files_exist`` for one id).

    Raises
    ------
    FileNotFoundError
        with the download command for the published weights.
    """
    check_files_exist({name: path}, bundle_root)
    return Path(path)


def check_training_settings(
    max_epochs: object,
    lr: object,
    train_batch_size_img: object,
    train_batch_size_slice: object,
    num_slices_per_volume: object,
    val_frac: object,
    channel: object,
    loss_weights: dict[str, object],
) -> None:
    """
    Check the training ids before anything is built; each error names the id, the value and what is allowed.

    Parameters
    ----------
    loss_weights
        ``{"kl_weight": ..., "perceptual_weight": ..., "adv_weight": ...}``.
    """
    for name, value in (
        ("max_epochs", max_epochs),
        ("train_batch_size_img", train_batch_size_img),
        ("train_batch_size_slice", train_batch_size_slice),
        ("num_slices_per_volume", num_slices_per_volume),
    ):
        check_positive_int(name, value)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ValueError(f"lr={lr!r} is not allowed; it must be a number in (0, 1).")
    if isinstance(val_frac, bool) or not isinstance(val_frac, (int, float)) or not 0 < val_frac < 1:
        raise ValueError(f"val_frac={val_frac!r} is not allowed; it must be a number in (0, 1).")
    check_choice("channel", channel, (0, 1, 2, 3))
    for name, value in loss_weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}={value!r} is not allowed; it must be a number >= 0.")
