"""Memory-efficient attention on the CPU for the MAISI networks (common/maisi/core/attention.py)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi as MonaiUNet
from monai.networks.nets import DiffusionModelUNet

from bundle_helpers import BUNDLES_DIR, REPO_ROOT, bundle_scripts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"spatial_dims": 3, "in_channels": 4, "num_channels": [8, 16], "attention_levels": [False, True],
        "num_head_channels": [0, 8], "num_res_blocks": 1, "norm_num_groups": 8}  # fmt: skip


@pytest.fixture(scope="module")
def attention():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield importlib.import_module("scripts.attention")


def _randomise_zero_weights(network: torch.nn.Module) -> torch.nn.Module:
    for parameter in network.parameters():  # MONAI zero-initialises output convolutions
        if parameter.dim() > 1 and not parameter.detach().any():
            torch.nn.init.normal_(parameter, std=0.05)
    return network.eval()


def test_monai_refuses_flash_attention_without_cuda_and_ours_accepts_it(attention):
    if torch.cuda.is_available():
        pytest.skip("MONAI's check only refuses on machines without CUDA")
    with pytest.raises(ValueError, match="Flash attention is only available for GPU"):
        MonaiUNet(out_channels=4, use_flash_attention=True, **TINY)
    torch.manual_seed(0)
    ours = attention.DiffusionModelUNetMaisi(out_channels=4, use_flash_attention=True, **TINY)
    torch.manual_seed(0)
    reference = MonaiUNet(out_channels=4, use_flash_attention=False, **TINY)
    blocks = attention.attention_blocks(ours)
    assert blocks and all(block.use_flash_attention for block in blocks)
    assert not any(block.use_flash_attention for block in attention.attention_blocks(reference))
    # the same modules and state-dict keys: published checkpoints load strictly into ours
    ours.load_state_dict(reference.state_dict(), strict=True)


def test_scaled_dot_product_attention_agrees_with_the_explicit_path(attention):
    torch.manual_seed(0)
    unet = _randomise_zero_weights(MonaiUNet(out_channels=4, include_spacing_input=True, **TINY))
    controlnet = _randomise_zero_weights(ControlNetMaisi(conditioning_embedding_in_channels=8,
                                                         conditioning_embedding_num_channels=[8, 8, 8], **TINY))
    mask_unet = _randomise_zero_weights(DiffusionModelUNet(
        spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=1, channels=(8, 16), attention_levels=(False, True),
        norm_num_groups=8, num_head_channels=(0, 8), with_conditioning=True, cross_attention_dim=10, upcast_attention=True,
    ))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, 8, generator=generator)
    t = torch.tensor([10.0, 700.0])
    spacing = torch.tensor([[1.5, 1.5, 2.0]] * 2) * 100
    mask = torch.randint(0, 2, (2, 8, 32, 32, 32), generator=generator).float()
    context = torch.rand(2, 1, 10, generator=generator)
    calls = {
        "unet": lambda: unet(x=x, timesteps=t, spacing_tensor=spacing),
        "controlnet": lambda: controlnet(x=x, timesteps=t, controlnet_cond=mask)[1],
        "mask_unet": lambda: mask_unet(x=x, timesteps=t, context=context),
    }
    for name, network in (("unet", unet), ("controlnet", controlnet), ("mask_unet", mask_unet)):
        with torch.no_grad():
            assert attention.use_memory_efficient_attention(network, False) > 0
            explicit = calls[name]()
            assert attention.use_memory_efficient_attention(network, True) > 0
            fused = calls[name]()
        assert explicit.abs().max() > 1e-3, name  # the comparison is not between zeros
        torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5, msg=name)
    # and in training: the gradients agree too
    grads = []
    for enabled in (False, True):
        attention.use_memory_efficient_attention(unet, enabled)
        unet.zero_grad()
        unet(x=x, timesteps=t, spacing_tensor=spacing).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * grads[0].abs().max().item())


def test_bundle_configs_use_it_on_every_device():
    for bundle in ("maisi_ct_generative", "maisi_mr_generative"):
        config = json.loads((REPO_ROOT / "bundles" / bundle / "configs" / "inference.json").read_text())
        assert config["use_flash_attention"] is True
        assert config["diffusion_unet_def"]["_target_"] == "scripts.attention.DiffusionModelUNetMaisi"
        assert config["diffusion_unet_def"]["use_flash_attention"] == config["controlnet_def"]["use_flash_attention"] == "@use_flash_attention"


def test_saved_attention_maps_cannot_use_the_fused_kernel(attention):
    from monai.networks.blocks.selfattention import SABlock

    block = SABlock(hidden_size=16, num_heads=2, save_attn=True)
    with pytest.raises(ValueError, match="save_attn"):
        attention.use_memory_efficient_attention(block)
