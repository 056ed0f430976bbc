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
Optional acceleration of the generation networks: ``torch.compile`` and TensorRT.

Both act **in place** on the network objects and keep their parameters and state-dict keys, so they can
run before the published weights are loaded strictly (``configs/inference_compile.json`` and
``configs/inference_trt.json`` apply them in ``initialize``, after the settings checks and before
``run`` loads any weight):

- :func:`compile_networks` calls ``module.compile(mode=...)`` (``torch.compile`` of the module's call;
  the compiled graph is built at the first call of each input shape).
- :func:`trt_compile_networks` calls MONAI's ``monai.networks.trt_compiler.trt_compile`` as the
  published MAISI bundle does: the diffusion UNet and the ControlNet whole, the autoencoder's
  ``decoder`` submodule; engines are built lazily at the first call and cached next to the checkpoint
  (``<checkpoint>.plan``, ``<checkpoint>.decoder.plan``). TensorRT needs CUDA, ``tensorrt`` and
  ``polygraphy``; :func:`check_tensorrt` raises a clear error naming what is missing.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["COMPILE_MODES", "TRT_PRECISIONS", "check_tensorrt", "compile_module", "compile_networks", "trt_compile_networks"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRT_PRECISIONS = ("fp32", "fp16", "bf16")
TRT_PACKAGES = ("tensorrt", "polygraphy")


def compile_module(module: torch.nn.Module, enabled: bool = True, mode: str | None = None) -> torch.nn.Module:
    """
    ``torch.compile`` a module in place (``module.compile``), or leave it as it is.

    Parameters
    ----------
    module
        The network.
    enabled
        ``False`` returns ``module`` untouched.
    mode
        ``compile_mode``: ``None`` (torch's default), ``"default"``, ``"reduce-overhead"``,
        ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.

    Returns
    -------
    torch.nn.Module
        The same object; its state-dict keys are unchanged.

    Raises
    ------
    ValueError
        For an unknown ``mode``.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r} is not allowed; it must be one of {list(COMPILE_MODES)}.")
    if enabled:
        module.compile(mode=mode)
        logger.info("torch.compile(%s, mode=%s): compiled at its first call", type(module).__name__, mode)
    return module


def compile_networks(
    networks: Sequence[torch.nn.Module], enabled: bool = True, mode: str | None = None
) -> list[torch.nn.Module]:
    """
    :func:`compile_module` for each network (e.g. the UNet, the ControlNet and ``autoencoder.decoder``).

    Parameters
    ----------
    networks
        The networks.
    enabled
        ``False`` leaves them untouched.
    mode
        ``compile_mode`` (see :func:`compile_module`).

    Returns
    -------
    list of torch.nn.Module
        The same objects.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r} is not allowed; it must be one of {list(COMPILE_MODES)}.")
    return [compile_module(network, enabled, mode) for network in networks]


def _missing_packages() -> list[str]:
    return [name for name in TRT_PACKAGES if importlib.util.find_spec(name) is None]


def check_tensorrt(device: torch.device | str, precision: str = "fp16") -> None:
    """
    Raise unless TensorRT acceleration can run: a CUDA device, CUDA available, ``tensorrt`` and
    ``polygraphy`` importable, and a known ``trt_precision``. Loads nothing.

    Parameters
    ----------
    device
        The generation device (``device``).
    precision
        ``trt_precision``: ``"fp32"``, ``"fp16"`` or ``"bf16"``.

    Raises
    ------
    RuntimeError
        Naming what is missing (``configs/inference_trt.json`` needs all of it).
    ValueError
        For an unknown ``trt_precision``.
    """
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"trt_precision={precision!r} is not allowed; it must be one of {list(TRT_PRECISIONS)}.")
    device = torch.device(device)
    missing = []
    if device.type != "cuda":
        missing.append(f"a CUDA device (device is {device})")
    elif not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    missing += [f"the Python package '{name}'" for name in _missing_packages()]
    if missing:
        raise RuntimeError(
            "configs/inference_trt.json needs TensorRT on CUDA; missing: " + ", ".join(missing) + ". "
            "Install TensorRT and polygraphy on a CUDA machine, or run without the TensorRT overlay "
            "(configs/inference_compile.json accelerates on any device)."
        )


def trt_compile_networks(
    networks: Mapping[str, tuple[torch.nn.Module, str]],
    device: torch.device | str,
    precision: str = "fp16",
    submodules: Mapping[str, str] | None = None,
) -> dict[str, torch.nn.Module]:
    """
    Wrap networks with MONAI's ``trt_compile`` (lazy TensorRT engines), as the published MAISI bundle does.

    Parameters
    ----------
    networks
        ``name -> (network, checkpoint path)``; the engine is cached next to the checkpoint.
    device
        The generation device; checked with :func:`check_tensorrt` first.
    precision
        ``trt_precision``: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    submodules
        ``name -> submodule`` to compile instead of the whole network (the autoencoder's ``"decoder"``).

    Returns
    -------
    dict of str to torch.nn.Module
        The same objects, their ``forward`` (or the submodule's) routed through TensorRT.
    """
    check_tensorrt(device, precision)
    from monai.networks.trt_compiler import trt_compile

    submodules = dict(submodules or {})
    args: dict[str, Any] = {"precision": precision}
    compiled = {}
    for name, (network, checkpoint) in networks.items():
        compiled[name] = trt_compile(network, str(checkpoint), args=args, submodule=submodules.get(name))
        logger.info("trt_compile(%s%s): engine built at its first call, cached next to %s", name,
                    f".{submodules[name]}" if name in submodules else "", checkpoint)
    return compiled
