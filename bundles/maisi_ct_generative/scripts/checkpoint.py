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
"""Atomic checkpoint writing, resumable training checkpoints and strict weight loading."""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.networks.utils import get_state_dict

logger = logging.getLogger(__name__)

LAST_CHECKPOINT_NAME = "checkpoint_last.pt"


def is_main_process() -> bool:
    """Return ``True`` on rank 0, or when no process group is initialised."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap_module(network: torch.nn.Module) -> torch.nn.Module:
    """
    Return the plain module inside a ``DistributedDataParallel``/``DataParallel`` wrapper.

    For state dicts use ``monai.networks.utils.get_state_dict``, which unwraps the same way; this function is
    for what needs the module itself (``load_state_dict``, reading a network's input flags).
    """
    return network.module if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else network


def _create_temporary(folder: Path, prefix: str, suffix: str) -> str:
    """
    Create an empty, uniquely named file. Unlike ``tempfile.mkstemp`` (always mode 0600), the mode follows
    the umask, so the renamed file gets the same permissions as any other new file.
    """
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in '{folder}'.")


def _fsync(path: str) -> None:
    try:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    except OSError:  # e.g. file systems without fsync; the rename is still atomic
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], suffix: str | None = None) -> Path:
    """
    Call ``write(temporary_name)`` and rename the result over ``path``: readers see the old file or the
    complete new one, never a half-written file.

    The temporary file is hidden (``.<name>.<random>.tmp<suffix>``), lives in ``path``'s folder (so
    ``os.replace``, atomic on POSIX and Windows, is a rename and never a copy), is flushed to disk before
    the rename and is removed if anything fails, leaving any previous ``path`` untouched. Its permissions
    follow the umask.

    Parameters
    ----------
    path
        destination file; its folder is created if needed.
    write
        writes the content to the file name it is given (e.g. ``lambda tmp: nib.save(image, tmp)``).
    suffix
        ending of the temporary name, which is how writers that choose the format from the name (NIfTI,
        ITK, PIL) pick it; ``None`` takes ``path``'s suffixes (``".nii.gz"`` for ``"a.nii.gz"``).

    Returns
    -------
    Path
        The destination path.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.name[: len(path.name) - len(suffix)] if suffix and path.name.lower().endswith(suffix.lower()) else path.name
    tmp_name = _create_temporary(path.parent, f".{base}.", f".tmp{suffix}")
    try:
        write(tmp_name)
        _fsync(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """
    Save ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one
    (:func:`atomic_write`).

    Parameters
    ----------
    obj
        object to save (state dicts, tensors, plain Python values).
    path
        destination file.

    Returns
    -------
    Path
        The destination path.
    """
    return atomic_write(path, lambda tmp_name: torch.save(obj, tmp_name), suffix="")


class ResumableCheckpoint:
    """
    Ignite handler that keeps ``<ckpt_dir>/checkpoint_last.pt`` up to date and resumes from it.

    On ``Events.STARTED`` the last checkpoint, if present, is loaded into every object of ``save_dict``
    (on every rank) and the engine continues from the saved epoch. Every ``save_interval`` epochs and
    at the end of training, rank 0 writes the checkpoint atomically. Only state dicts and integers are
    stored, so the file loads with ``weights_only=True``.

    A ``LambdaLR`` in ``save_dict`` takes its factor from the current config (e.g. a polynomial decay over
    the new ``max_epochs``), so after loading, the optimiser's learning rates are recomputed from it: the
    first resumed iteration already runs at the new schedule's rate, not at the rate the old schedule
    stored in the optimiser state (0 at the end of a finished run).

    Why not MONAI's ``CheckpointSaver``/``CheckpointLoader`` or ignite's ``Checkpoint``: ``CheckpointSaver``
    writes with ``DiskSaver(atomic=False)``, so a run killed while saving leaves a truncated file, and it
    names interval checkpoints by epoch, so a resume must first find the newest one; ``CheckpointLoader``
    has no "load it if it exists"; ignite's ``Checkpoint`` with a fixed file name removes the previous file
    before it writes the new one, so a crash in between leaves no checkpoint at all. Here the one file is
    always either the previous checkpoint or the complete new one (:func:`atomic_torch_save`).

    Parameters
    ----------
    ckpt_dir
        folder of the checkpoint.
    save_dict
        objects with ``state_dict``/``load_state_dict`` (networks, optimizers, schedulers).
        Wrapped (DDP) networks are unwrapped, so single- and multi-GPU checkpoints are interchangeable.
    save_interval
        save every N epochs.
    map_location
        where tensors are mapped on load; defaults to the CPU.
    resume
        set ``False`` to ignore an existing checkpoint (it is then overwritten).
    extra
        plain values stored with the checkpoint (e.g. the latent ``scale_factor``).
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        map_location: str | torch.device | None = None,
        resume: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}.")
        self.path = Path(ckpt_dir) / LAST_CHECKPOINT_NAME
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.map_location = map_location if map_location is not None else "cpu"
        self.resume = resume
        self.extra = dict(extra or {})
        self._saved_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        """Register the resume and save callbacks on ``engine``."""
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        """Collect the state of every object plus the engine's epoch and iteration."""
        state: dict[str, Any] = {name: get_state_dict(obj) for name, obj in self.save_dict.items()}
        state.update(self.extra)
        state["epoch"] = int(engine.state.epoch)
        state["iteration"] = int(engine.state.iteration)
        return state

    def save(self, engine: Engine) -> None:
        """Write the checkpoint atomically on rank 0 (once per epoch)."""
        if is_main_process() and self._saved_epoch != engine.state.epoch:
            self._saved_epoch = engine.state.epoch
            atomic_torch_save(self.state_dict(engine), self.path)
            logger.info("saved checkpoint %s at epoch %d", self.path, engine.state.epoch)

    def load(self, engine: Engine) -> None:
        """Restore every object and the engine counters from the last checkpoint, if it exists."""
        if not self.resume or not self.path.is_file():
            return
        checkpoint = torch.load(self.path, map_location=self.map_location, weights_only=True)
        missing = [name for name in self.save_dict if name not in checkpoint]
        if missing:
            raise KeyError(f"checkpoint {self.path} has no entries for {missing}; delete it to start afresh.")
        for name, obj in self.save_dict.items():
            unwrap_module(obj).load_state_dict(checkpoint[name])
        for obj in self.save_dict.values():
            if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):
                _apply_lambda_lr(obj)
        engine.state.epoch = checkpoint["epoch"]
        engine.state.iteration = checkpoint["iteration"]
        logger.info("resumed from %s at epoch %d (iteration %d)", self.path, engine.state.epoch, engine.state.iteration)


def _apply_lambda_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimiser's learning rates to ``base_lr * factor(last_epoch)`` of the (restored) ``scheduler``."""
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reports


class ModelExporter:
    """
    Ignite handler that writes a network's final weights atomically when training completes (rank 0 only).

    Why not ``monai.handlers.CheckpointSaver(save_final=True, final_filename=...)``: ignite's ``Checkpoint``
    under it stores a one-entry ``save_dict`` as the bare state dict, so it cannot write the
    ``{state_dict_key: weights, **extra}`` files that generation reads (e.g. ``{"unet_state_dict": ...,
    "scale_factor": ...}``; extras are plain values, not objects with ``state_dict``), and it writes with
    ``atomic=False``, so a crash while exporting truncates the earlier export of the same name.

    Parameters
    ----------
    path
        destination file.
    network
        the network (DDP wrappers are unwrapped).
    state_dict_key
        when given, the file holds ``{state_dict_key: state_dict, **extra}``; otherwise
        the plain state dict (the format of the published checkpoints).
    extra
        additional entries stored next to the weights, e.g. ``{"scale_factor": 1.02}``.
        Callables are evaluated at save time.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        state_dict_key: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if extra and state_dict_key is None:
            raise ValueError("extra entries need a state_dict_key to store the weights under.")
        self.path = Path(path)
        self.network = network
        self.state_dict_key = state_dict_key
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        """Register the export on ``Events.COMPLETED``."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        """Write the weights (rank 0 only)."""
        if not is_main_process():
            return
        weights = get_state_dict(self.network)
        if self.state_dict_key is None:
            payload: Any = weights
        else:
            payload = {self.state_dict_key: weights}
            payload.update({k: (v() if callable(v) else v) for k, v in self.extra.items()})
        atomic_torch_save(payload, self.path)
        logger.info("exported %s", self.path)


_GENERATIVE_ATTENTION = re.compile(r"^(?P<block>.+)\.(?P<proj>to_q|to_k|to_v)\.(?P<param>weight|bias)$")
_GENERATIVE_ATTENTION_OUT = re.compile(r"^(?P<block>.+)\.proj_attn\.(?P<param>weight|bias)$")
_GENERATIVE_CROSS_ATTENTION_OUT = re.compile(r"^(?P<block>.+)\.to_out\.0\.(?P<param>weight|bias)$")


def convert_generative_state_dict(state_dict: Mapping[str, torch.Tensor], expected_keys: set[str]) -> dict:
    """
    Rename the keys of a MONAI GenerativeModels-era checkpoint to the MONAI core layout.

    Renames ``<block>.to_{q,k,v}`` to ``<block>.attn.to_{q,k,v}``, ``<block>.proj_attn`` to
    ``<block>.attn.out_proj``, cross-attention ``<block>.to_out.0`` to ``<block>.out_proj`` and the
    upsampling ``conv`` to ``postconv`` wherever the core layout expects it. Keys that already match
    are kept.

    Why not MONAI's ``AutoencoderKL/DiffusionModelUNet/ControlNet.load_old_state_dict``, which rename the
    same keys: they are not strict. They fill a copy of the network's own state dict, so a file key that maps
    to nothing is dropped silently and a network key missing from the file keeps its current (random)
    value; ``AutoencoderKL``'s even substitutes an identity ``out_proj`` when ``proj_attn`` is absent. A
    truncated or wrong checkpoint would then load without an error (checked with MONAI 1.6.1), whereas this
    mapping only renames, and the strict ``load_state_dict`` after it names every key that does not fit.
    They also exist only for those three classes (not ``DiffusionModelUNetMaisi``) and ``print`` to stdout.

    Parameters
    ----------
    state_dict
        the checkpoint's state dict.
    expected_keys
        the keys of the target network's state dict.

    Returns
    -------
    dict
        A new state dict; loading it strictly reports any key that could not be mapped.
    """
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        if key not in expected_keys:
            for pattern, template in (
                (_GENERATIVE_ATTENTION, "{block}.attn.{proj}.{param}"),
                (_GENERATIVE_ATTENTION_OUT, "{block}.attn.out_proj.{param}"),
                (_GENERATIVE_CROSS_ATTENTION_OUT, "{block}.out_proj.{param}"),
            ):
                match = pattern.match(key)
                if match and template.format(**match.groupdict()) in expected_keys:
                    new_key = template.format(**match.groupdict())
                    break
            else:
                upsample_key = key.replace(".conv.conv.", ".postconv.conv.")
                if upsample_key in expected_keys:
                    new_key = upsample_key
        converted[new_key] = value
    return converted


def load_network_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    state_dict_key: str | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """
    Load weights into ``network`` strictly, safely (``weights_only=True``) and on any device.

    Accepts plain state dicts (the published format), dicts that hold the state dict under
    ``state_dict_key`` (this collection's training output), and GenerativeModels-era key layouts.

    Parameters
    ----------
    network
        the network to fill (a DDP wrapper is unwrapped).
    path
        checkpoint file.
    state_dict_key
        key of the state dict inside the checkpoint, if it is wrapped. When the key is
        absent the file is treated as a plain state dict.
    map_location
        device the tensors are mapped to while loading.

    Returns
    -------
    dict[str, Any]
        The other entries of the checkpoint (e.g. ``scale_factor``); empty for a plain state dict.

    Raises
    ------
    FileNotFoundError
        when ``path`` does not exist.
    RuntimeError
        when the keys or shapes do not match the network (strict loading).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    extras: dict[str, Any] = {}
    if state_dict_key is not None and state_dict_key in checkpoint:
        extras = {k: v for k, v in checkpoint.items() if k != state_dict_key}
        checkpoint = checkpoint[state_dict_key]
    module = unwrap_module(network)
    expected = set(module.state_dict())
    module.load_state_dict(convert_generative_state_dict(checkpoint, expected), strict=True)
    return extras
