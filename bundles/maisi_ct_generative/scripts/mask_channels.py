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
The mask generator's output channels: the channel table (``label_dict_124_to_132.json``) and the map from
per-channel logits to MAISI label ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .labels import format_ids, default_data_path, load_json

__all__ = ["CHANNEL_TABLE_FILENAME", "channel_to_label_table", "load_channel_table", "mask_logits_to_labels"]

CHANNEL_TABLE_FILENAME = "label_dict_124_to_132.json"


def load_channel_table(path: str | Path | None = None) -> dict[int, int]:
    """
    Read the mask generator's channel table (``label_dict_124_to_132.json``) as channel -> MAISI id.

    Parameters
    ----------
    path
        JSON file of ``name: [channel, label_id]`` entries; ``None`` reads the packaged file.

    Returns
    -------
    dict[int, int]
        Generator channel index -> MAISI label id.
    """
    path = default_data_path(CHANNEL_TABLE_FILENAME) if path is None else Path(path)
    try:
        return channel_to_label_table(load_json(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def channel_to_label_table(table: Mapping[Any, Any]) -> dict[int, int]:
    """
    Normalise a channel table to ``{channel: label_id}``.

    Parameters
    ----------
    table
        Either the structure of ``label_dict_124_to_132.json`` (``{"body": [124, 200], ...}``: name ->
        ``[channel, label_id]``) or a plain ``{channel: label_id}`` mapping.

    Returns
    -------
    dict[int, int]
        Channel index -> MAISI label id.

    Raises
    ------
    ValueError
        If an entry is malformed or a channel appears twice.
    """
    result: dict[int, int] = {}
    for key, value in table.items():
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != 2:
                raise ValueError(f"entry {key!r} must be [channel, label_id], got {value!r}.")
            channel, label_id = value
        else:
            channel, label_id = key, value
        channel, label_id = int(channel), int(label_id)
        if channel < 0 or label_id < 0:
            raise ValueError(f"entry {key!r}: channel and label id must be non-negative, got {value!r}.")
        if channel in result:
            raise ValueError(f"channel {channel} is mapped twice (entry {key!r}).")
        result[channel] = label_id
    return result


def mask_logits_to_labels(
    logits_or_probs: torch.Tensor, channel_to_label: Mapping[Any, Any]
) -> torch.Tensor:
    """
    Turn the mask generator's per-channel output into a MAISI label map.

    ``argmax`` over channels (softmax would not change it), then a lookup table maps channel index ->
    MAISI id.

    Parameters
    ----------
    logits_or_probs
        Generator output of shape ``(B, C, *spatial)``.
    channel_to_label
        ``label_dict_124_to_132.json`` content (``{"body": [124, 200], ...}``) or ``{channel: label_id}``;
        it must cover channels ``0 .. C-1`` exactly.

    Returns
    -------
    torch.Tensor
        ``int64`` label map of shape ``(B, 1, *spatial)`` on the input's device.

    Raises
    ------
    ValueError
        If the table does not match the number of channels.
    """
    if logits_or_probs.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial) logits, got shape {tuple(logits_or_probs.shape)}.")
    table = channel_to_label_table(channel_to_label)
    num_channels = logits_or_probs.shape[1]
    missing = sorted(set(range(num_channels)) - set(table))
    extra = sorted(c for c in table if c >= num_channels)
    if missing or extra:
        raise ValueError(
            f"the channel table does not match the {num_channels} output channels: "
            f"missing channels {format_ids(missing)}; channels beyond the output {format_ids(extra)}."
        )
    lookup = torch.as_tensor([table[c] for c in range(num_channels)], dtype=torch.int64, device=logits_or_probs.device)
    return lookup[torch.argmax(logits_or_probs, dim=1, keepdim=True)]
