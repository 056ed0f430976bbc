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
FID features from a ResNet50 trunk loaded only from local files, shared by the 2D and the 2.5D FID.

Backbones (config id ``backbone``):

- ``radimagenet_resnet50``: the RadImageNet ResNet50 of the published MAISI evaluation, file
  ``RadImageNet-ResNet50_notop.pth`` (a plain state dict converted from Keras): biased convolutions,
  BatchNorm eps 1.001e-5, the stride on the first 1x1 convolution of each bottleneck, no pooling or
  classifier. Key names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
  ``layer4.2.bn3``, ``layerN.0.downsample.0/1``), each convolution with a ``bias``.
- ``imagenet_resnet50``: torchvision's ``resnet50`` (bias-free convolutions, eps 1e-5, stride on the
  3x3 convolution); a plain torchvision state dict, whose classifier ``fc.*`` is ignored.

Both become a :class:`ResNetFeatures` trunk whose layer-4 map is averaged over space: 2048 values per
image. Weights load strictly with ``weights_only=True``; nothing is downloaded at run time, and a missing
file is refused with the command that downloads it (:func:`check_backbone_file`).

Images are prepared as in the published evaluation (:func:`normalise_for_backbone`): grey repeated to
3 channels, ordered BGR, min-max scaled with one minimum and maximum for the whole stack, then the
channel means 0.406 / 0.456 / 0.485 subtracted (no division by a standard deviation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import atomic_torch_save

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BGR_MEANS",
    "BackboneSpec",
    "FeatureBackbone",
    "FeatureCache",
    "ResNetFeatures",
    "backbone_spec",
    "backbone_style",
    "check_backbone_file",
    "default_backbone_path",
    "extract_features",
    "file_sha256",
    "frechet_distance",
    "gather_items",
    "load_backbone",
    "load_feature_backbone",
    "normalise_for_backbone",
    "process_rank",
    "shard",
]

BGR_MEANS = (0.406, 0.456, 0.485)  # subtracted from channels 0, 1, 2 (B, G, R) after min-max scaling
MINMAX_EPS = 1e-10  # added to (max - min), as the published evaluation does
RESNET50_LAYERS = (3, 4, 6, 3)
EXPANSION = 4  # bottleneck output channels = 4 x its width
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class BackboneSpec:
    """
    A feature backbone: its published file, where to get it and its architecture variant.

    Attributes
    ----------
    name
        the ``backbone`` id value.
    file_name
        the published weights file name.
    url
        where the file is downloaded from (by the user; never at run time).
    style
        ``"keras"`` (RadImageNet conversion) or ``"torchvision"``.
    bn_eps
        BatchNorm epsilon of the original network.
    """

    name: str
    file_name: str
    url: str
    style: str
    bn_eps: float


BACKBONES = {
    "radimagenet_resnet50": BackboneSpec(
        name="radimagenet_resnet50",
        file_name="RadImageNet-ResNet50_notop.pth",
        url="https://huggingface.co/MONAI/checkpoints/resolve/main/RadImageNet-ResNet50_notop.pth",
        style="keras",
        bn_eps=1.001e-5,
    ),
    "imagenet_resnet50": BackboneSpec(
        name="imagenet_resnet50",
        file_name="resnet50-0676ba61.pth",
        url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        style="torchvision",
        bn_eps=1e-5,
    ),
}


def backbone_spec(backbone: Any) -> BackboneSpec:
    """
    The :class:`BackboneSpec` of the config id ``backbone``.

    Raises
    ------
    ValueError
        ``backbone`` is not one of :data:`BACKBONES`.
    """
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not allowed; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[backbone]


def backbone_style(backbone: Any) -> str:
    """``"keras"`` or ``"torchvision"``: the :class:`ResNetFeatures` variant of ``backbone`` (checked)."""
    return backbone_spec(backbone).style


def default_backbone_path(backbone: Any, model_dir: str | os.PathLike) -> str:
    """``<model_dir>/<published file name>`` of ``backbone`` (the default of ``backbone_weights_path``)."""
    return os.path.join(str(model_dir), backbone_spec(backbone).file_name)


# ---------------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1) with torchvision's parameter names."""

    def __init__(self, in_channels: int, width: int, stride: int, keras: bool, bn_eps: float) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride if keras else 1, bias=keras)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1 if keras else stride, padding=1, bias=keras)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=keras)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=keras), nn.BatchNorm2d(out_channels, eps=bn_eps)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetFeatures(nn.Module):
    """
    A ResNet50-style trunk without pooling or classifier; ``forward`` returns the layer-4 map ``(N, C, h, w)``.

    With the defaults (``layers=(3, 4, 6, 3)``, ``base_channels=64``) it is exactly ResNet50 and loads the
    published state dicts strictly: ``style="keras"`` the RadImageNet file, ``style="torchvision"`` a
    torchvision ``resnet50`` state dict without ``fc.*``. ``C = 8 * EXPANSION * base_channels`` (2048).
    Smaller ``layers``/``base_channels`` give tiny networks for tests.

    Parameters
    ----------
    style
        ``"keras"`` or ``"torchvision"`` (see the module docstring).
    layers
        bottleneck blocks per stage.
    base_channels
        stem width; stage ``i`` has width ``base_channels * 2**i``.
    """

    def __init__(self, style: str = "keras", layers: Sequence[int] = RESNET50_LAYERS, base_channels: int = 64) -> None:
        super().__init__()
        if style not in ("keras", "torchvision"):
            raise ValueError(f"style={style!r} is not allowed; choose 'keras' or 'torchvision'.")
        layers = [int(n) for n in layers]
        if len(layers) != 4 or min(layers) < 1 or int(base_channels) < 1:
            raise ValueError(f"layers={layers} must be four counts >= 1 and base_channels={base_channels} >= 1.")
        keras = style == "keras"
        bn_eps = BACKBONES["radimagenet_resnet50" if keras else "imagenet_resnet50"].bn_eps
        self.style = style
        self.layers = tuple(layers)
        self.base_channels = int(base_channels)
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=keras)
        self.bn1 = nn.BatchNorm2d(base_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = base_channels
        for stage, blocks in enumerate(layers):
            width = base_channels * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for block in range(blocks):
                stage_blocks.append(_Bottleneck(channels, width, stride if block == 0 else 1, keras, bn_eps))
                channels = width * EXPANSION
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.out_channels = channels

    def architecture(self) -> dict[str, Any]:
        """The settings that define the network (for reports and the feature cache key)."""
        return {"style": self.style, "layers": list(self.layers), "base_channels": self.base_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_backbone_file(backbone: Any, path: Any, config_id: str = "backbone_weights_path") -> Path:
    """
    Check that the backbone weights file exists; say how to download it otherwise. Reads nothing else.

    Raises
    ------
    ValueError
        ``backbone`` is unknown.
    FileNotFoundError
        the file is missing: the message names ``config_id``, the path and the download command.
    """
    spec = backbone_spec(backbone)
    if path is None or not Path(path).is_file():
        target = path if path is not None else f"<folder>/{spec.file_name}"
        raise FileNotFoundError(
            f"{config_id}={None if path is None else str(path)!r} does not exist. The {spec.name} backbone is loaded "
            f"only from a local file (nothing is downloaded at run time). Download it with:\n"
            f"    curl -L --create-dirs -o {target} {spec.url}\n"
            f"or set --{config_id} to your copy of {spec.file_name}."
        )
    return Path(path)


def load_backbone(
    network: ResNetFeatures, backbone: Any, path: Any, map_location: str | torch.device = "cpu"
) -> str:
    """
    Load the local weights of ``backbone`` into ``network`` strictly and put it in eval mode.

    Parameters
    ----------
    network
        a :class:`ResNetFeatures` of ``backbone``'s style.
    backbone
        the ``backbone`` id.
    path
        the weights file (``backbone_weights_path``): a plain state dict, optionally under ``"state_dict"``;
        torchvision's ``fc.*`` classifier entries are dropped.
    map_location
        device the tensors are mapped to while loading.

    Returns
    -------
    str
        the file's SHA-256, for reports and the feature cache.

    Raises
    ------
    FileNotFoundError
        see :func:`check_backbone_file`.
    RuntimeError
        the file does not fit the network (missing/unexpected keys or shapes).
    """
    spec = backbone_spec(backbone)
    path = check_backbone_file(backbone, path)
    if network.style != spec.style:
        raise ValueError(f"backbone={spec.name!r} needs a '{spec.style}' ResNetFeatures, got style '{network.style}'.")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"backbone_weights_path={str(path)!r} is not a {spec.name} state dict: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}."
        )
    network.load_state_dict(state, strict=True)
    network.requires_grad_(False)
    return file_sha256(path)


@dataclass
class FeatureBackbone:
    """
    A loaded backbone: the network, where its weights came from, and the device it runs on.

    Attributes
    ----------
    network
        the :class:`ResNetFeatures` trunk, in eval mode on ``device``.
    name
        the ``backbone`` id value.
    weights_path
        the ``backbone_weights_path`` it was loaded from.
    sha256
        the weights file's SHA-256.
    device
        where the network runs.
    """

    network: ResNetFeatures
    name: str
    weights_path: str
    sha256: str
    device: torch.device

    def settings(self) -> dict[str, Any]:
        """Backbone id, weights hash and architecture: what makes two feature sets comparable."""
        return {"backbone": self.name, "backbone_sha256": self.sha256, **self.network.architecture()}

    def features(self, images: torch.Tensor, batch_size: int, value_range: Sequence[float] | None = None) -> torch.Tensor:
        """:func:`extract_features` of ``images`` with this backbone."""
        return extract_features(self.network, images, batch_size, self.device, value_range)


def load_feature_backbone(
    network: ResNetFeatures, backbone: Any, weights_path: Any, device: torch.device | str
) -> FeatureBackbone:
    """
    Load ``backbone``'s local weights into ``network`` (:func:`load_backbone`) and move it to ``device``.

    Raises
    ------
    FileNotFoundError, RuntimeError, ValueError
        see :func:`load_backbone`.
    """
    device = torch.device(device)
    sha256 = load_backbone(network, backbone, weights_path, map_location="cpu")
    return FeatureBackbone(network.to(device).eval(), str(backbone), str(weights_path), sha256, device)


# ---------------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------------


def normalise_for_backbone(images: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """
    ``(N, 1, H, W)`` grey images -> the backbone's ``(N, 3, H, W)`` input.

    Repeat to 3 channels, order BGR, scale ``(x - low) / (high - low + 1e-10)`` with ``low``/``high`` given
    by the caller (the min and max of the whole stack, never per image), subtract :data:`BGR_MEANS`.
    """
    x = images.float().repeat(1, 3, 1, 1)[:, [2, 1, 0]]
    x = (x - low) / (high - low + MINMAX_EPS)
    return x - torch.tensor(BGR_MEANS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    value_range: Sequence[float] | None = None,
) -> torch.Tensor:
    """
    Spatially averaged layer-4 features of a stack of grey images, computed ``batch_size`` images at a time.

    Parameters
    ----------
    backbone
        a :class:`ResNetFeatures` (eval mode, on ``device``).
    images
        ``(N, H, W)`` stack (any device, any real dtype).
    batch_size
        images per forward pass (``slice_batch_size``); the result does not depend on it.
    device
        where the backbone runs.
    value_range
        ``(low, high)`` mapped to [0, 1]; ``None``: the min and max of the whole stack.

    Returns
    -------
    torch.Tensor
        ``(N, C)`` float32 on the CPU (float32 throughout, no autocast).
    """
    if images.ndim != 3:
        raise ValueError(f"images must be an (N, H, W) stack, got shape {tuple(images.shape)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"slice_batch_size={batch_size!r} is not allowed; it must be an integer >= 1.")
    stack = images.float()
    if value_range is None:
        low, high = stack.min(), stack.max()
    else:
        low, high = (torch.tensor(float(v)) for v in value_range)
    low, high = low.to(device), high.to(device)
    features = []
    for start in range(0, stack.shape[0], batch_size):
        batch = stack[start : start + batch_size, None].to(device)
        features.append(backbone(normalise_for_backbone(batch, low, high)).mean(dim=(2, 3)).float().cpu())
    return torch.cat(features) if features else torch.zeros(0, getattr(backbone, "out_channels", 0))


def frechet_distance(synthetic: torch.Tensor, real: torch.Tensor) -> float:
    """
    FID between two ``(N, C)`` feature sets with ``monai.metrics.FIDMetric`` (float64 statistics).

    Raises
    ------
    ValueError
        a set has fewer than 2 rows or the feature sizes differ.
    """
    from monai.metrics import FIDMetric

    if synthetic.ndim != 2 or real.ndim != 2 or synthetic.shape[1] != real.shape[1]:
        raise ValueError(f"feature sets must be (N, C) with one C, got {tuple(synthetic.shape)} and {tuple(real.shape)}.")
    if min(synthetic.shape[0], real.shape[0]) < 2:
        raise ValueError(f"FID needs at least 2 feature rows per set, got {synthetic.shape[0]} and {real.shape[0]}.")
    return float(FIDMetric()(synthetic.double(), real.double()))


class FeatureCache:
    """
    Per-file features on disk, keyed by the file's content and every setting that shapes the features.

    The key is the SHA-256 of ``<content sha256>`` and the JSON of ``settings`` (preprocessing, backbone
    id, architecture and weights hash): a changed setting or a changed file never reuses stale features.
    Entries are ``<cache_dir>/<key>.pt``, written atomically, read with ``weights_only=True``.

    Parameters
    ----------
    cache_dir
        the folder; ``None`` disables the cache.
    settings
        JSON-serialisable settings.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, settings: Mapping[str, Any]) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.settings = json.dumps(dict(settings), sort_keys=True, default=str)
        self._content: dict[str, str] = {}

    def entry_path(self, source: str | os.PathLike) -> Path | None:
        """The cache file of ``source`` under the current settings (``None`` without a cache)."""
        if self.cache_dir is None:
            return None
        name = str(source)
        if name not in self._content:
            self._content[name] = file_sha256(source)
        key = hashlib.sha256(f"{self._content[name]}\n{self.settings}".encode()).hexdigest()
        return self.cache_dir / f"{key}.pt"

    def load(self, source: str | os.PathLike) -> dict[str, torch.Tensor] | None:
        """The cached features of ``source``, or ``None``."""
        path = self.entry_path(source)
        if path is None or not path.is_file():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        return dict(entry["features"]) if entry.get("settings") == self.settings else None

    def save(self, source: str | os.PathLike, features: Mapping[str, torch.Tensor]) -> None:
        """Store the features of ``source`` (no-op without a cache)."""
        path = self.entry_path(source)
        if path is not None:
            payload = {"settings": self.settings, "source": str(source), "features": {k: v.contiguous() for k, v in features.items()}}
            atomic_torch_save(payload, path)


# ---------------------------------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------------------------------


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Round-robin share of ``rank``: items ``rank, rank + W, ...`` (ranks may hold different counts)."""
    return list(items[rank::world_size])


def _all_gather_rows(rows: torch.Tensor, sizes: Sequence[int], device: torch.device) -> list[torch.Tensor]:
    """All-gather ``(n_r, C)`` tensors of different lengths: pad to the longest, gather, trim."""
    longest = max(sizes)
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:size].cpu() for part, size in zip(parts, sizes)]


def gather_items(local: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """
    Gather per-item feature dictionaries from every rank, in the global item order.

    Rank ``r`` holds items ``r, r + W, ...`` (:func:`shard`), each a mapping ``name -> (n_i, C)``;
    ranks may hold different numbers of items and rows. Every rank receives the full list, ordered as
    in one process, so the figures computed from it are exactly the single-process ones.

    Parameters
    ----------
    local
        this rank's items.
    device
        device of the collective (CUDA for NCCL, CPU for gloo).
    """
    rank, world_size = process_rank()
    if world_size == 1:
        return [dict(item) for item in local]
    layout = [sorted(item) for item in local], [[tuple(item[k].shape) for k in sorted(item)] for item in local]
    layouts: list[Any] = [None] * world_size
    dist.all_gather_object(layouts, layout)
    names = next((keys[0] for keys, _ in layouts if keys), [])
    gathered: list[list[dict[str, torch.Tensor]]] = [[{} for _ in keys] for keys, _ in layouts]
    for position, name in enumerate(names):
        shapes = [[item_shapes[position] for item_shapes in shapes_r] for _, shapes_r in layouts]
        row_shape = next(s[0][1:] for s in shapes if s)
        dtype = next(item[name].dtype for item in local) if local else torch.float32
        rows = torch.cat([item[name] for item in local]) if local else torch.zeros((0, *row_shape), dtype=dtype)
        parts = _all_gather_rows(rows, [sum(s[0] for s in shapes_r) for shapes_r in shapes], torch.device(device))
        for r, (part, shapes_r) in enumerate(zip(parts, shapes)):
            for index, chunk in enumerate(torch.split(part, [s[0] for s in shapes_r])):
                gathered[r][index][name] = chunk
    total = sum(len(items) for items in gathered)
    return [gathered[i % world_size][i // world_size] for i in range(total)]
