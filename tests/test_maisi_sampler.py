"""Tests of the shared MAISI sampler (rectified flow and DDPM, ControlNet, classifier-free guidance) with tiny networks."""

from __future__ import annotations

import importlib

import pytest
import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from bundle_helpers import BUNDLES_DIR, bundle_scripts

LATENT = (1, 4, 8, 8, 8)
TINY = {
    "spatial_dims": 3,
    "in_channels": 4,
    "num_channels": [8, 16],
    "attention_levels": [False, True],
    "num_head_channels": [0, 8],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "use_flash_attention": False,
}


@pytest.fixture(scope="module")
def sampler():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield importlib.import_module("scripts.sampler")


def _networks(rflow: bool = True):
    torch.manual_seed(0)
    extra = {"num_class_embeds": 128, "include_fc": True, "resblock_updown": True} if rflow else {}
    unet = DiffusionModelUNetMaisi(
        out_channels=4,
        include_spacing_input=True,
        include_top_region_index_input=not rflow,
        include_bottom_region_index_input=not rflow,
        **TINY,
        **extra,
    ).eval()
    controlnet = ControlNetMaisi(
        conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 8, 8], **TINY, **extra
    ).eval()
    # Both networks zero-initialise their output convolutions; randomise every all-zero weight so that
    # the UNet predicts a non-zero velocity and the ControlNet residuals matter.
    for network in (unet, controlnet):
        for parameter in network.parameters():
            if parameter.dim() > 1 and not parameter.detach().abs().sum():
                torch.nn.init.normal_(parameter, std=0.05)
    return unet, controlnet


def _conditions(sampler, rflow: bool = True, with_mask: bool = True):
    mask = torch.randint(0, 2, (1, 8, 32, 32, 32), generator=torch.Generator().manual_seed(1)).float()
    regions = {} if rflow else {"top_region": torch.tensor([[0.0, 100.0, 0.0, 0.0]]), "bottom_region": torch.tensor([[0.0, 0.0, 100.0, 0.0]])}
    return sampler.SamplingConditions(
        spacing=torch.tensor([[150.0, 150.0, 200.0]]),
        class_labels=torch.tensor([1]) if rflow else None,
        controlnet_cond=mask if with_mask else None,
        unconditional_controlnet_cond=torch.zeros_like(mask) if with_mask else None,
        **regions,
    )


def _rflow():
    return RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True, sample_method="uniform")


def test_rflow_sampling_is_deterministic_and_follows_the_velocity(sampler):
    unet, controlnet = _networks()
    conditions = _conditions(sampler)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    first = sampler.sample_latent(unet, _rflow(), noise, conditions, 3, controlnet=controlnet, progress=False)
    second = sampler.sample_latent(unet, _rflow(), noise, conditions, 3, controlnet=controlnet, progress=False)
    assert first.shape == noise.shape and first.dtype == noise.dtype
    assert not torch.allclose(first, noise), "the sampler must move the latent"
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    scheduler = _rflow()
    schedule = sampler.set_schedule(scheduler, 3, noise)
    assert [n for _, n in schedule][-1] == 0 and len(schedule) == 3
    expected = noise
    with torch.no_grad():
        for t, next_t in schedule:
            velocity = sampler.predict(unet, controlnet, expected, t.reshape(1), conditions)
            expected = expected + velocity * (float(t) - next_t) / 1000.0
    torch.testing.assert_close(first, expected)


def test_rflow_schedule_shifts_with_latent_size(sampler):
    small = [float(t) for t, _ in sampler.set_schedule(_rflow(), 30, torch.zeros(1, 4, 64, 64, 32))]
    large = [float(t) for t, _ in sampler.set_schedule(_rflow(), 30, torch.zeros(1, 4, 128, 128, 128))]
    assert small[0] == pytest.approx(1000.0) and large[0] == pytest.approx(1000.0)
    assert small[1] == pytest.approx(978.5, abs=0.6) and small[-1] == pytest.approx(51.9, abs=0.6)
    assert large[1] == pytest.approx(991.5, abs=0.6) and large[-1] == pytest.approx(121.2, abs=0.6)


def test_controlnet_mask_changes_the_result(sampler):
    unet, controlnet = _networks()
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    conditions = _conditions(sampler)
    other = sampler.SamplingConditions(**{**vars(conditions), "controlnet_cond": 1 - conditions.controlnet_cond})
    a = sampler.sample_latent(unet, _rflow(), noise, conditions, 2, controlnet=controlnet, progress=False)
    b = sampler.sample_latent(unet, _rflow(), noise, other, 2, controlnet=controlnet, progress=False)
    assert not torch.allclose(a, b)


def test_conditioning_embedding_is_computed_once_per_loop_with_the_same_result(sampler):
    """The loop embeds the mask once (guidance: once for the doubled batch), and equals a step-by-step reference."""
    unet, controlnet = _networks()
    conditions = _conditions(sampler)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    embedding = controlnet.controlnet_cond_embedding
    calls = []
    embedding.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    for guidance in (0.0, 3.0):
        calls.clear()
        sampled = sampler.sample_latent(unet, _rflow(), noise, conditions, 3, controlnet=controlnet, guidance_scale=guidance, progress=False)
        assert calls == [2 if guidance else 1]  # one embedding for the three steps, of the doubled batch with guidance
        assert controlnet.controlnet_cond_embedding is embedding  # restored after the loop
        scheduler, latent = _rflow(), noise  # reference: every step through the plain ControlNet
        guidance_conditions = conditions.with_guidance_batch() if guidance else None
        with torch.no_grad():
            for t, next_t in sampler.set_schedule(scheduler, 3, latent):
                prediction = sampler.guided_prediction(unet, controlnet, latent, t.reshape(1), conditions, guidance_conditions, guidance)
                latent, _ = scheduler.step(prediction, t, latent, next_t)
        assert len(calls) == 4  # the reference embedded at every step
        torch.testing.assert_close(sampled, latent, rtol=0, atol=0)


def test_classifier_free_guidance_combines_branches(sampler):
    unet, controlnet = _networks()
    conditions = _conditions(sampler)
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([500.0])
    with torch.no_grad():
        conditional = sampler.predict(unet, controlnet, latent, timesteps, conditions)
        unconditional_conditions = sampler.SamplingConditions(
            spacing=conditions.spacing,
            class_labels=torch.tensor([0]),
            controlnet_cond=conditions.unconditional_controlnet_cond,
        )
        unconditional = sampler.predict(unet, controlnet, latent, timesteps, unconditional_conditions)
        guided = sampler.guided_prediction(
            unet, controlnet, latent, timesteps, conditions, conditions.with_guidance_batch(), 2.0
        )
        unguided = sampler.guided_prediction(unet, controlnet, latent, timesteps, conditions, None, 0.0)
    torch.testing.assert_close(guided, unconditional + 2.0 * (conditional - unconditional), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unguided, conditional)
    assert not torch.allclose(conditional, unconditional)


def test_ddpm_sampling_with_region_inputs_is_reproducible(sampler):
    unet, controlnet = _networks(rflow=False)
    conditions = _conditions(sampler, rflow=False)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))

    def run(seed):
        scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
        generator = torch.Generator().manual_seed(seed)
        return sampler.sample_latent(unet, scheduler, noise, conditions, 4, controlnet=controlnet, generator=generator, progress=False)

    torch.testing.assert_close(run(5), run(5), rtol=0, atol=0)
    assert not torch.allclose(run(5), run(6))
    assert torch.isfinite(run(5)).all()


def test_ddim_sampling_is_the_deterministic_ddim_update(sampler):
    # the mask overlay's scheduler: sample_latent steps it like DDPM (t alone, the generator passed on); with
    # eta 0 the result does not depend on the generator and equals a hand-written DDIM loop
    unet, controlnet = _networks(rflow=False)
    conditions = _conditions(sampler, rflow=False)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))

    def scheduler():
        return DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sampler.sample_latent(unet, scheduler(), noise, conditions, 3, controlnet=controlnet, generator=generator, progress=False)

    reference = scheduler()
    reference.set_timesteps(3)
    latent = noise
    with torch.no_grad():
        for t in reference.timesteps:
            prediction = sampler.predict(unet, controlnet, latent, t.reshape(1), conditions)
            alpha = reference.alphas_cumprod[t]
            previous = t - 1000 // 3
            alpha_prev = reference.alphas_cumprod[previous] if previous >= 0 else reference.final_alpha_cumprod
            original = (latent - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
            latent = alpha_prev.sqrt() * original + (1 - alpha_prev).sqrt() * prediction
    torch.testing.assert_close(run(5), latent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(5), run(6), rtol=0, atol=0)


def test_image_only_sampling_and_errors(sampler):
    unet, controlnet = _networks()
    conditions = _conditions(sampler, with_mask=False)
    noise = torch.randn(LATENT)
    latent = sampler.sample_latent(unet, _rflow(), noise, conditions, 2, guidance_scale=3.0, progress=False)
    assert latent.shape == noise.shape
    with pytest.raises(ValueError, match="controlnet_cond"):
        sampler.sample_latent(unet, _rflow(), noise, conditions, 1, controlnet=controlnet, progress=False)
    with pytest.raises(ValueError, match="cfg_guidance_scale=-1"):
        sampler.sample_latent(unet, _rflow(), noise, conditions, 1, guidance_scale=-1.0, progress=False)
