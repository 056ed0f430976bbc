"""Resource estimates for the dry run (common/maisi/core/resources.py): figures from measured per-voxel costs."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA is only planned for, never used


@pytest.fixture(scope="module")
def modules():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield importlib.import_module("scripts.resources"), importlib.import_module("scripts.decode")


def test_cpu_estimate_adds_up_the_measured_figures(modules):
    resources, decode = modules
    costs = resources.CPU_COSTS
    latent = (4, 64, 64, 32)
    plan = decode.plan_decode(latent, CPU, memory_budget_gb=24, resident_gb=resources.resident_gb(CPU, uses_controlnet=True))
    estimate = resources.estimate_generation_resources(latent, CPU, 30, uses_controlnet=True, cfg_guidance=False, decode_plan=plan)
    voxels = 64 * 64 * 32
    resident = costs.resident_bytes + costs.unet_weight_bytes + costs.controlnet_weight_bytes + costs.autoencoder_weight_bytes
    sampling = (resident + costs.step_bytes_per_voxel * voxels) / 1e9
    assert estimate.unet.peak_gb == pytest.approx(sampling)
    assert estimate.unet.seconds == pytest.approx(30 * (costs.unet_seconds[0] + costs.unet_seconds[1] * voxels))
    assert estimate.controlnet.seconds == pytest.approx(30 * (costs.controlnet_seconds[0] + costs.controlnet_seconds[1] * voxels))
    assert estimate.decoder.peak_gb == pytest.approx(plan.estimated_peak_gb)  # the plan counted the same resident memory
    assert estimate.decoder.seconds == pytest.approx(costs.decode_seconds_per_voxel * plan.decoded_voxels)
    assert estimate.peak_gb == max(estimate.unet.peak_gb, estimate.controlnet.peak_gb, estimate.decoder.peak_gb)
    assert estimate.seconds == pytest.approx(estimate.unet.seconds + estimate.controlnet.seconds + estimate.decoder.seconds)
    text = estimate.describe()
    assert "estimate" in text and "unet" in text and "decoder" in text and plan.describe() in text


def test_guidance_doubles_the_batch_and_no_controlnet_drops_it(modules):
    resources, decode = modules
    plan = decode.plan_decode((4, 32, 32, 32), CPU, memory_budget_gb=64)
    plain = resources.estimate_generation_resources((32, 32, 32), CPU, 10, True, False, plan)
    guided = resources.estimate_generation_resources((32, 32, 32), CPU, 10, True, True, plan)
    image_only = resources.estimate_generation_resources((32, 32, 32), CPU, 10, False, False, plan)
    resident = plain.unet.peak_gb - resources.CPU_COSTS.step_bytes_per_voxel * 32**3 / 1e9
    assert guided.unet.peak_gb - resident == pytest.approx(2 * (plain.unet.peak_gb - resident))
    assert guided.unet.seconds > 1.9 * plain.unet.seconds and guided.decoder == plain.decoder
    assert image_only.controlnet is None and image_only.unet.peak_gb < plain.unet.peak_gb


def test_cpu_figures_reproduce_the_measured_step_peaks(modules):
    resources, decode = modules
    # bench/RESULTS.md: one ControlNet + UNet step, whole process, 2026-12-01 (MiB); the estimate also
    # holds the autoencoder's weights, which that measurement did not load
    measured = {(32, 32, 16): 2055, (32, 32, 32): 2298, (64, 64, 32): 3303, (128, 128, 32): 7628}
    for latent, mib in measured.items():
        plan = decode.plan_decode((4, *latent), CPU, memory_budget_gb=64)
        estimate = resources.estimate_generation_resources(latent, CPU, 1, True, False, plan)
        assert mib * 2**20 / 1e9 <= estimate.unet.peak_gb <= 1.15 * mib * 2**20 / 1e9, (latent, estimate.unet.peak_gb)


def test_exact_group_norm_plans_count_their_extra_work(modules):
    resources, decode = modules
    tile = decode.plan_decode((4, 64, 64, 32), CPU, memory_budget_gb=4)
    exact = decode.plan_decode((4, 64, 64, 32), CPU, memory_budget_gb=4, group_norm="exact")
    assert tile.kind == exact.kind == "halo"
    seconds = [resources.estimate_generation_resources((64, 64, 32), CPU, 1, True, False, p).decoder.seconds for p in (tile, exact)]
    assert seconds[1] == pytest.approx(resources.EXACT_GROUP_NORM_WORK * seconds[0])


def test_cuda_estimate_follows_the_published_a100_figures(modules):
    resources, decode = modules
    # MAISI docs/performance.md (A100 80 GB, rflow-ct, 30 steps): DM time 2 s at latent 64x64x32, 19 s at 128^3
    for latent, published in (((64, 64, 32), 2.0), ((128, 128, 32), 5.0), ((128, 128, 128), 19.0)):
        plan = decode.plan_decode((4, *latent), CUDA, memory_budget_gb=80)
        estimate = resources.estimate_generation_resources(latent, CUDA, 30, True, False, plan)
        assert estimate.unet.seconds == pytest.approx(published, rel=0.3), latent
        assert estimate.unet.peak_gb is None and estimate.controlnet.seconds is None  # not measured: not invented
        assert estimate.decoder.peak_gb is not None
    assert "not measured" in estimate.describe() and "published" in estimate.describe()


def test_bad_requests_are_refused(modules):
    resources, decode = modules
    plan = decode.plan_decode((4, 8, 8, 8), CPU, memory_budget_gb=8)
    for steps in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            resources.estimate_generation_resources((8, 8, 8), CPU, steps, True, False, plan)
    with pytest.raises(ValueError, match="latent_shape"):
        resources.estimate_generation_resources((8, 8), CPU, 1, True, False, plan)


def test_largest_ct_volume_that_fits_in_24_gb(modules):
    resources, _ = modules
    settings_ct = importlib.import_module("scripts.settings_ct")  # the CT bundle's copy, imported by the fixture
    sizes = [(xy, xy, z) for xy in settings_ct.CT_OUTPUT_SIZE_XY for z in settings_ct.CT_OUTPUT_SIZE_Z]
    size, peak = resources.largest_fitting_volume(24.0, CPU, sizes)
    assert peak <= 24.0 and resources.pair_generation_peak_gb(size, CPU, 24.0) == peak
    larger = [s for s in sizes if math.prod(s) > math.prod(size)]
    assert larger and all(resources.pair_generation_peak_gb(s, CPU, 24.0) > 24.0 for s in larger)
    with pytest.raises(ValueError, match="no output size"):
        resources.largest_fitting_volume(1.0, CPU, sizes)
