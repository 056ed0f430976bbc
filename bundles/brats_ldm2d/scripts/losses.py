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
"""Loss terms of the KL autoencoder GAN (2D and 3D): KL divergence, frozen perceptual network, least-squares adversarial terms."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.losses import PatchAdversarialLoss, PerceptualLoss

_ADVERSARIAL = PatchAdversarialLoss(criterion="least_squares", reduction="mean")


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """
    KL divergence of N(z_mu, z_sigma^2) from N(0, 1), summed over the latent dimensions and averaged over the batch.

    Parameters
    ----------
    z_mu
        latent means, shape (B, C, *spatial).
    z_sigma
        latent standard deviations, same shape.

    Returns
    -------
    torch.Tensor
        A scalar tensor.
    """
    z_var = z_sigma.float().pow(2)
    per_sample = 0.5 * (z_mu.float().pow(2) + z_var - torch.log(z_var) - 1).flatten(1).sum(dim=1)
    return per_sample.mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Least-squares adversarial loss of the generator: push the discriminator's logits for fakes towards "real"."""
    return _ADVERSARIAL(fake_logits.float(), target_is_real=True, for_discriminator=False)


def discriminator_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Least-squares adversarial loss of the discriminator, averaged over the real and the fake term."""
    fake_term = _ADVERSARIAL(fake_logits.float(), target_is_real=False, for_discriminator=True)
    real_term = _ADVERSARIAL(real_logits.float(), target_is_real=True, for_discriminator=True)
    return 0.5 * (fake_term + real_term)


def build_perceptual_loss(
    spatial_dims: int,
    pretrained: bool,
    weights_path: str | os.PathLike | None,
    state_dict_key: str | None = "state_dict",
    fake_3d_ratio: float = 0.2,
) -> PerceptualLoss:
    """
    Build the frozen ResNet50 perceptual loss without ever downloading weights.

    ``pretrained=False`` gives a randomly initialised (frozen) ResNet50, as the published BraTS default.
    ``pretrained=True`` needs ``weights_path``: a local ResNet50 state dict (torchvision layout, optionally
    wrapped under ``state_dict_key``). Loading is strict apart from the unused classifier head (``fc.*``).
    In 3D the 2D network is applied "2.5D" to a random ``fake_3d_ratio`` of the slices along each axis
    (MONAI's ``is_fake_3d``), as the published MAISI autoencoder training does.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    pretrained
        whether to load ``weights_path``.
    weights_path
        local weights file (config id ``perceptual_loss_model_weights_path``).
    state_dict_key
        key of the state dict inside the file, if wrapped.
    fake_3d_ratio
        fraction of the slices used per axis in 3D (ignored in 2D).

    Raises
    ------
    ValueError
        ``pretrained`` is true but no ``weights_path`` is given.
    FileNotFoundError
        ``weights_path`` does not exist.
    RuntimeError
        the weights do not fit ResNet50.
    """
    if pretrained:
        if not weights_path:
            raise ValueError(
                "pretrained=true needs perceptual_loss_model_weights_path: a local ResNet50 state dict "
                "(nothing is downloaded at run time). Set --pretrained false to use a random frozen ResNet50."
            )
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"perceptual_loss_model_weights_path={weights_path} does not exist.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims} is not allowed; the perceptual loss supports 2 or 3.")
    if not 0.0 < fake_3d_ratio <= 1.0:
        raise ValueError(f"fake_3d_ratio={fake_3d_ratio} is not allowed; it must lie in (0, 1].")
    # MONAI builds the network (pretrained=False: no download); the weights are loaded below rather than
    # through PerceptualLoss(pretrained_path=...), because MONAI 1.6.1 loads that file with
    # torch.load(path, weights_only=True) without map_location (weights saved from a GPU do not load on a
    # CPU-only machine), indexes it with pretrained_state_dict_key unconditionally (a plain state dict then
    # raises a bare KeyError) and loads the classifier head strictly (a feature-only ResNet50 state dict
    # is refused); its errors do not name the config id. tests/test_brats_ldm2d_units.py shows the
    # difference on a plain and a head-free state dict.
    loss = PerceptualLoss(
        spatial_dims=spatial_dims,
        network_type="resnet50",
        is_fake_3d=spatial_dims == 3,
        fake_3d_ratio=fake_3d_ratio,
        pretrained=False,
    )
    if pretrained:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        if state_dict_key and state_dict_key in state_dict:
            state_dict = state_dict[state_dict_key]
        head_free = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        feature_extractor = loss.perceptual_function.model
        expected = set(feature_extractor.state_dict())
        missing = sorted(expected - set(head_free))
        unexpected = sorted(set(head_free) - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"perceptual_loss_model_weights_path={weights_path} is not a ResNet50 state dict: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        feature_extractor.load_state_dict(head_free, strict=True)
    loss.requires_grad_(False)
    return loss.eval()


def local_perceptual_loss(
    spatial_dims: int,
    perceptual_weight: float,
    weights_path: str | os.PathLike | None,
    fake_3d_ratio: float = 0.2,
    device: torch.device | str = "cpu",
) -> PerceptualLoss | None:
    """
    The perceptual loss of a training config that never uses random or downloaded perceptual weights.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    perceptual_weight
        weight of the perceptual term (config id ``perceptual_weight``); 0 disables the term.
    weights_path
        local ResNet50 state dict (config id ``perceptual_loss_model_weights_path``).
    fake_3d_ratio
        fraction of the slices used per axis in 3D.
    device
        device of the loss network.

    Returns
    -------
    PerceptualLoss | None
        ``None`` when ``perceptual_weight`` is 0, otherwise the frozen loss with the local weights.

    Raises
    ------
    ValueError
        ``perceptual_weight`` > 0 without ``weights_path``.
    """
    if perceptual_weight == 0:
        return None
    if not weights_path:
        raise ValueError(
            f"perceptual_weight={perceptual_weight} needs perceptual_loss_model_weights_path: a local ResNet50 "
            "state dict (torchvision layout; nothing is downloaded at run time). Set --perceptual_weight 0 to "
            "train without the perceptual term."
        )
    return build_perceptual_loss(spatial_dims, True, weights_path, fake_3d_ratio=fake_3d_ratio).to(device)
