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
Memory-efficient attention for the MAISI networks on every device.

MONAI's attention blocks (``SABlock`` inside ``SpatialAttentionBlock``, ``CrossAttentionBlock``) take
``use_flash_attention``: with it they call ``torch.nn.functional.scaled_dot_product_attention``, which
never materialises the ``tokens x tokens`` attention matrix and runs on CUDA *and* on the CPU. Its
outputs agree with the explicit softmax(QK^T)V path to float32 rounding (``bench/bench_maisi_ct.py``
measures the difference on the full-size networks; ``tests/test_maisi_attention.py`` checks it).

``DiffusionModelUNetMaisi`` alone refuses the flag when CUDA is absent, although nothing in it needs
CUDA. :class:`DiffusionModelUNetMaisi` here is MONAI's network with that check lifted: same modules,
same state-dict keys (the published checkpoints load strictly), attention switched on after
construction by :func:`use_memory_efficient_attention`.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
    DiffusionModelUNetMaisi as _MonaiDiffusionModelUNetMaisi,
)

__all__ = ["DiffusionModelUNetMaisi", "attention_blocks", "use_memory_efficient_attention"]


def attention_blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """
    The attention blocks of ``network`` that honour ``use_flash_attention`` at call time.

    Parameters
    ----------
    network
        Any module.

    Returns
    -------
    list of torch.nn.Module
        Every submodule with a ``use_flash_attention`` attribute and an attention ``scale`` (MONAI's
        ``SABlock`` and ``CrossAttentionBlock``).
    """
    return [m for m in network.modules() if hasattr(m, "use_flash_attention") and hasattr(m, "scale")]


def use_memory_efficient_attention(network: torch.nn.Module, enabled: bool = True) -> int:
    """
    Switch every attention block of ``network`` to ``scaled_dot_product_attention`` (or back).

    Parameters
    ----------
    network
        The network, changed in place; weights and state-dict keys are untouched.
    enabled
        ``True``: memory-efficient attention; ``False``: the explicit softmax(QK^T)V path.

    Returns
    -------
    int
        Number of attention blocks set.

    Raises
    ------
    ValueError
        When a block also saves its attention maps (``save_attn``), which the fused kernel cannot return.
    """
    blocks = attention_blocks(network)
    for block in blocks:
        if enabled and getattr(block, "save_attn", False):
            raise ValueError(f"{type(block).__name__} saves its attention maps (save_attn); it cannot use flash attention.")
        block.use_flash_attention = bool(enabled)
    return len(blocks)


class DiffusionModelUNetMaisi(_MonaiDiffusionModelUNetMaisi):
    """
    ``monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi`` whose
    ``use_flash_attention`` also works without CUDA.

    Parameters
    ----------
    *args, **kwargs
        The arguments of MONAI's ``DiffusionModelUNetMaisi``.
    use_flash_attention
        Use ``scaled_dot_product_attention`` in every attention block, on any device.
    """

    def __init__(self, *args: Any, use_flash_attention: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, use_flash_attention=False, **kwargs)
        use_memory_efficient_attention(self, use_flash_attention)
