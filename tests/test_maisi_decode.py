"""Tests of common/maisi/core/decode.py: split and sliding-window decode and decode planning (CPU, tiny networks)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiConvolution

from bundle_helpers import BUNDLES_DIR, bundle_scripts

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only planned for, never used: no CUDA call happens when a budget is given


@pytest.fixture(scope="module")
def decode() -> ModuleType:
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        return importlib.import_module("scripts.decode")


def _maisi_autoencoder(**overrides) -> AutoencoderKlMaisi:
    arguments = dict(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
        num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6, attention_levels=[False, False, False],
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_convtranspose=False,
        norm_float16=False, num_splits=1, dim_split=1,
    )
    return AutoencoderKlMaisi(**{**arguments, **overrides})


TINY_DECODER = {"num_channels": [8, 8, 8], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}


@pytest.fixture(scope="module")
def autoencoder() -> AutoencoderKlMaisi:
    """A tiny MAISI autoencoder (random weights, seeded): 8 channels, 4 norm groups, latent 4, split axis 1."""
    torch.manual_seed(0)
    return _maisi_autoencoder(**TINY_DECODER).eval()


def _latent(*spatial: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, *spatial, generator=torch.Generator().manual_seed(seed))


class _PointwiseAutoencoder(torch.nn.Module):
    """A decoder without spatial context (channel sum, 4x nearest upsampling): tiling it is exact."""

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z.sum(1, keepdim=True), scale_factor=4, mode="nearest")


class _CountingDecoder:
    """Wrap a LatentDecoder's forward to count the decoder calls."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.calls = 0
        self._forward = decoder.forward
        decoder.forward = self  # type: ignore[method-assign]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self._forward(z)


# ---------------------------------------------------------------------------------------------- decoding


def test_latent_decoder_divides_by_scale_factor(decode, autoencoder):
    z = _latent(8, 8, 8)
    with torch.no_grad():
        expected = autoencoder.decode_stage_2_outputs(z / 2.5)
        got = decode.LatentDecoder(autoencoder, torch.tensor(2.5))(z)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="scale_factor"):
        decode.LatentDecoder(autoencoder, 0.0)


def test_set_autoencoder_splits_sets_every_convolution(decode, autoencoder):
    convolutions = [m for m in autoencoder.modules() if isinstance(m, MaisiConvolution)]
    try:
        assert decode.set_autoencoder_splits(autoencoder, 4) == len(convolutions) > 0
        assert {m.num_splits for m in convolutions} == {4}
        assert decode.get_autoencoder_splits(autoencoder) == (4, 1)
    finally:
        decode.set_autoencoder_splits(autoencoder, 1)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="autoencoder_tp_num_splits"):
            decode.set_autoencoder_splits(autoencoder, bad)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_split_decode_equals_unsplit(decode, autoencoder, num_splits):
    decoder = decode.LatentDecoder(autoencoder, 1.0)
    z = _latent(8, 12, 8)  # 12 voxels along the split axis: 3 per split at 4 splits
    whole = decode.DecodePlan(None, 0.4, 1, CPU, 1)
    split = decode.DecodePlan(None, 0.4, num_splits, CPU, 1)
    try:
        reference = decode.decode_latent(decoder, z, whole, progress=False)
        got = decode.decode_latent(decoder, z, split, progress=False)
        assert decode.get_autoencoder_splits(autoencoder) == (num_splits, 1)
    finally:
        decode.set_autoencoder_splits(autoencoder, 1)
    assert got.shape == reference.shape == (1, 1, 32, 48, 32)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_split_count_that_drops_voxels_is_refused(decode, autoencoder):
    # upstream MaisiConvolution silently decodes 7 latent voxels with 2 splits to 24 image voxels, not 28
    assert not decode.splits_compatible(7, 2) and not decode.splits_compatible(8, 4)
    assert decode.splits_compatible(12, 4) and decode.splits_compatible(7, 1)
    decoder = decode.LatentDecoder(autoencoder, 1.0)
    with pytest.raises(ValueError, match="autoencoder_tp_num_splits"):
        decode.decode_latent(decoder, _latent(8, 7, 8), decode.DecodePlan(None, 0.4, 2, CPU, 1), progress=False)
    assert decode.get_autoencoder_splits(autoencoder) == (1, 1)  # refused before the network is changed


def test_whole_decode_on_cpu_is_float32(decode, autoencoder):
    decoder = decode.LatentDecoder(autoencoder, 1.0)
    image = decode.decode_latent(decoder, _latent(8, 8, 8), decode.DecodePlan(None, 0.4, 1, CPU, 1), progress=False)
    assert image.dtype == torch.float32 and image.device == CPU and image.shape == (1, 1, 32, 32, 32)
    assert not image.requires_grad


def test_roi_covering_the_latent_is_the_whole_decode(decode, autoencoder):
    decoder = decode.LatentDecoder(autoencoder, 1.0)
    z = _latent(12, 8, 8)
    whole = decode.decode_latent(decoder, z, decode.DecodePlan(None, 0.4, 1, CPU, 1), progress=False)
    counter = _CountingDecoder(decoder)
    covering = decode.decode_latent(decoder, z, decode.DecodePlan((16, 8, 20), 0.6, 1, CPU, 1), progress=False)
    assert counter.calls == 1
    assert torch.equal(covering, whole)


def test_sliding_window_stitching_is_exact_for_a_pointwise_decoder(decode):
    decoder = decode.LatentDecoder(_PointwiseAutoencoder(), 2.0)
    z = _latent(20, 13, 9)
    whole = decode.decode_latent(decoder, z, decode.DecodePlan(None, 0.4, 1, CPU, 1), progress=False)
    counter = _CountingDecoder(decoder)
    plan = decode.plan_decode(z.shape, CPU, roi_size=(8, 8, 40), overlap=0.5, num_splits=1, memory_budget_gb=100)
    tiled = decode.decode_latent(decoder, z, plan, progress=False)
    assert plan.roi_size == (8, 8, 9) and counter.calls == plan.num_tiles == 4 * 3 * 1
    assert tiled.shape == whole.shape == (1, 1, 80, 52, 36) and tiled.dtype == torch.float32
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_sliding_window_decode_is_close_to_whole_decode(decode, autoencoder):
    decoder = decode.LatentDecoder(autoencoder, 1.0)
    z = _latent(24, 12, 12)
    whole = decode.decode_latent(decoder, z, decode.DecodePlan(None, 0.4, 1, CPU, 1), progress=False)
    tiled = decode.decode_latent(decoder, z, decode.DecodePlan((16, 12, 12), 0.5, 1, CPU, 2), progress=False)
    assert tiled.shape == whole.shape == (1, 1, 96, 48, 48)
    inner = (slice(None), slice(None), slice(16, -16))  # away from the volume borders along the tiled axis
    a, b = tiled[inner].flatten(), whole[inner].flatten()
    # tiles normalise with their own GroupNorm statistics, so the match is close, not exact
    relative = ((a - b).norm() / b.norm()).item()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    unrelated = decode.decode_latent(
        decoder, _latent(24, 12, 12, seed=7), decode.DecodePlan(None, 0.4, 1, CPU, 1), progress=False
    )
    baseline = ((unrelated[inner].flatten() - b).norm() / b.norm()).item()
    assert relative < 0.2 and correlation > 0.98 and relative < baseline / 4


# --------------------------------------------------------------------------------------------- planning


def test_num_tiles_matches_monai_and_the_published_example(decode):
    # latent 128^3, roi 80^3, overlap 0.4 -> 8 tiles (MAISI docs)
    assert decode.count_sliding_windows((128, 128, 128), (80, 80, 80), 0.4) == 8
    plan = decode.plan_decode((4, 128, 128, 128), CUDA, roi_size=(80, 80, 80), overlap=0.4, memory_budget_gb=80)
    assert plan.num_tiles == 8 and plan.roi_size == (80, 80, 80) and plan.kind == "sliding-window"
    assert "8 tiles" in plan.describe() and "(80, 80, 80)" in plan.describe()
    for spatial, roi, overlap in [((20, 13, 9), (8, 8, 40), 0.5), ((17, 12, 9), (12, 12, 6), 0.6666), ((5, 5, 5), (3, 3, 3), 0.9)]:
        decoder = decode.LatentDecoder(_PointwiseAutoencoder(), 1.0)
        counter = _CountingDecoder(decoder)
        decode.decode_latent(decoder, _latent(*spatial), decode.DecodePlan(roi, overlap, 1, CPU, 1), progress=False)
        assert counter.calls == decode.count_sliding_windows(spatial, roi, overlap) > 1, (spatial, roi, overlap)
    from monai.data.utils import dense_patch_slices  # counted without listing them, as many as MONAI lists

    for spatial in [(1, 7, 16), (9, 13, 31), (33, 20, 18)]:
        for roi in [(1, 1, 1), (3, 5, 8), (8, 8, 8), (16, 16, 16), (80, 80, 80)]:
            for overlap in (0.0, 0.25, 0.4, 0.5, 0.6666, 0.9):
                clamped = decode.clamp_roi(roi, spatial)
                interval = [r if r == n else max(int(r * (1 - overlap)), 1) for r, n in zip(clamped, spatial)]
                expected = len(dense_patch_slices(spatial, clamped, interval))
                assert decode.count_sliding_windows(spatial, roi, overlap) == expected, (spatial, roi, overlap)


def test_plan_honours_explicit_values(decode):
    plan = decode.plan_decode(
        (1, 4, 128, 128, 128), CPU, roi_size=[64, 64, 48], overlap=0.25, num_splits=4, memory_budget_gb=1
    )
    assert (plan.roi_size, plan.overlap, plan.num_splits, plan.stitch_device) == ((64, 64, 48), 0.25, 4, CPU)
    # an explicit split count is kept even where the automatic plan would not need it
    assert decode.plan_decode((4, 32, 32, 32), CPU, num_splits=8, memory_budget_gb=1000) == dataclasses.replace(
        decode.plan_decode((4, 32, 32, 32), CPU, memory_budget_gb=1000),
        num_splits=8,
        num_splits_source="autoencoder_tp_num_splits",
    )
    # explicit roi, automatic splits; a roi covering the latent is a whole-volume decode
    assert decode.plan_decode((4, 32, 32, 32), CPU, roi_size=48, memory_budget_gb=1000).roi_size is None
    partial = decode.plan_decode((4, 32, 32, 32), CPU, roi_size=(16, 48, 48), memory_budget_gb=1000)
    assert partial.roi_size == (16, 32, 32) and partial.num_tiles == 3


def test_plan_warns_when_explicit_values_exceed_the_budget(decode, caplog):
    with caplog.at_level(logging.WARNING):
        plan = decode.plan_decode((4, 128, 128, 128), CPU, roi_size=80, num_splits=2, memory_budget_gb=1)
    assert plan.roi_size == (80, 80, 80) and plan.num_splits == 2
    assert "exceeds" in caplog.text


def test_automatic_plan_shrinks_monotonically_with_the_budget(decode):
    budgets = [1000, 400, 160, 80, 45, 32, 24, 16, 8, 4, 2]
    for device in (CPU, CUDA):
        # halo tiles (the default): smaller windows and more decoded voxels (halos) as the budget shrinks
        plans = [decode.plan_decode((4, 64, 64, 64), device, memory_budget_gb=b) for b in budgets[:-1]]
        assert plans[0].kind == "whole" and plans[-1].kind == "halo"
        windows = [64**3 if p.kind == "whole" else _window_voxels(decode, p) for p in plans]
        decoded = [p.decoded_voxels for p in plans]
        assert windows == sorted(windows, reverse=True) and decoded == sorted(decoded), (device, windows, decoded)
        for plan in plans:
            assert plan.estimated_peak_gb <= 0.85 * plan.budget_gb + 1e-9
        # sliding windows (halo=None): fewer tiles first, rois shrink in steps of 4 down to 16
        plans = [decode.plan_decode((4, 128, 128, 128), device, memory_budget_gb=b, halo=None) for b in budgets]
        assert plans[0].roi_size is None and plans[-1].roi_size is not None
        tiles = [p.num_tiles for p in plans]
        voxels = [128**3 if p.roi_size is None else p.roi_size[0] ** 3 for p in plans]
        assert tiles == sorted(tiles) and voxels == sorted(voxels, reverse=True), (device, tiles, voxels)
        for plan in plans:
            assert plan.roi_size is None or all(16 <= r and r % 4 == 0 for r in plan.roi_size)
            assert plan.estimated_peak_gb <= 0.85 * plan.budget_gb + 1e-9 or plan.roi_size == (16, 16, 16)


def _window_voxels(decode, plan, spatial=(64, 64, 64)) -> int:
    """Latent voxels of the largest window of a halo plan's last stage."""
    return max(math.prod(t.window_shape) for t in decode.halo_tiles(spatial, plan.halo_core, plan.halo))


def test_sliding_windows_where_the_halo_plans_stored_map_does_not_fit(decode):
    # a 512^3 image on 8 GB of host RAM: the half-resolution map a halo decode keeps is 8.6 GB
    plan = decode.plan_decode((4, 128, 128, 128), CPU, memory_budget_gb=8)
    assert plan.kind == "sliding-window" and plan.estimated_peak_gb <= 0.85 * 8
    assert decode.plan_decode((4, 128, 128, 128), CPU, memory_budget_gb=24).kind == "halo"


def test_automatic_plan_raises_splits_before_shrinking_the_roi(decode):
    # a model in which splitting saves memory: whole-volume splits rise first, then the roi shrinks
    model = decode.DecoderMemoryModel("test", ((1, 100e3), (2, 60e3), (4, 40e3), (8, 30e3), (16, 25e3)), 0.0)
    budgets = [50, 20, 13, 10, 8, 6, 4, 2, 1]
    plans = [decode.plan_decode((4, 64, 64, 64), CPU, memory_budget_gb=b, memory_model=model, halo=None) for b in budgets]
    whole = [p.num_splits for p in plans if p.roi_size is None]
    assert whole == [1, 2, 4, 8, 16]
    tiled = [p for p in plans if p.roi_size is not None]
    assert plans[: len(whole)] == [p for p in plans if p.roi_size is None] and tiled
    sizes = [p.roi_size[0] for p in tiled]
    assert sizes == sorted(sizes, reverse=True) and all(p.roi_size[1] % p.num_splits == 0 for p in tiled)


def test_splits_respect_32bit_indexing_on_cuda(decode):
    # the published A100 runs: [80,80,80] with 2 splits fits within 2**31 elements per chunk, 1 split does not
    model = decode.CUDA_DECODER_MEMORY
    assert model.within_index_limit((80, 80, 80), 2, 1) and not model.within_index_limit((80, 80, 80), 1, 1)
    assert decode.plan_decode((4, 128, 128, 128), CUDA, memory_budget_gb=80, halo=None).describe().startswith(
        "sliding-window decode: roi (80, 80, 80), overlap 0.4, 8 tiles, 2 splits"
    )
    halo = decode.plan_decode((4, 128, 128, 128), CUDA, memory_budget_gb=40)
    assert halo.kind == "halo" and halo.num_splits > 1  # halo windows split too where indexing needs it
    tiles = decode.halo_tiles((128, 128, 128), halo.halo_core, halo.halo)
    assert all(model.within_index_limit(t.window_shape, halo.num_splits, 1) for t in tiles)
    big = decode.plan_decode((4, 128, 128, 128), CUDA, memory_budget_gb=1000)
    assert big.roi_size is None and big.num_splits == 16  # the whole 512^3 image needs 16 splits
    assert decode.plan_decode((4, 64, 64, 64), CUDA, memory_budget_gb=80).num_splits == 2
    assert decode.plan_decode((4, 64, 64, 64), CPU, memory_budget_gb=80).num_splits == 1  # no such limit on CPU


def test_cuda_model_agrees_with_the_published_a100_runs(decode):
    # docs/performance.md (A100 80 GB): latent tile, split count and peak GB of the 512^3 runs
    model = decode.CUDA_DECODER_MEMORY
    published = {2: [((64, 64, 48), 22.8), ((80, 80, 80), 45.3)], 4: [((80, 80, 48), 28.4), ((80, 80, 96), 49.7)]}
    for splits, ((tile0, peak0), (tile1, peak1)) in published.items():
        slope = (peak1 - peak0) * 1e9 / (tile1[0] * tile1[1] * tile1[2] - tile0[0] * tile0[1] * tile0[2])
        assert model.bytes_per_latent_voxel(splits) >= slope  # the model's per-voxel cost is not below the data
        assert model.within_index_limit(tile0, splits, 1) and model.within_index_limit(tile1, splits, 1)
    # the other published runs also keep every chunk within 32-bit indexing
    for tile, splits in [((64, 64, 32), 2), ((48, 48, 64), 4), ((80, 80, 32), 2), ((64, 64, 64), 4)]:
        assert model.within_index_limit(tile, splits, 1)


def test_cpu_stitching_for_huge_outputs(decode):
    huge = decode.plan_decode((4, 512, 512, 512), CUDA, memory_budget_gb=80)  # a 2048^3 image: 34 GB
    assert huge.stitch_device == CPU and huge.kind == "sliding-window"  # a halo decode would keep 550 GB
    assert decode.plan_decode((4, 512, 512, 512), CUDA, memory_budget_gb=80, halo=None).stitch_device == CPU
    small = decode.plan_decode((4, 64, 64, 64), CUDA, memory_budget_gb=80)
    assert small.stitch_device == CUDA and small.roi_size is None
    assert decode.plan_decode((4, 64, 64, 64), CPU, memory_budget_gb=80).stitch_device == CPU


def test_default_budget_is_read_from_the_host(decode):
    assert decode.available_memory_bytes(CPU) > 0
    plan = decode.plan_decode((4, 16, 16, 16), "cpu")
    assert plan.budget_gb > 0 and plan.stitch_device == CPU


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"roi_size": 0}, "autoencoder_sliding_window_infer_size"),
        ({"roi_size": (80, 80)}, "autoencoder_sliding_window_infer_size"),
        ({"roi_size": (80, -1, 80)}, "autoencoder_sliding_window_infer_size"),
        ({"roi_size": "80"}, "autoencoder_sliding_window_infer_size"),
        ({"overlap": 1.0}, "autoencoder_sliding_window_infer_overlap"),
        ({"overlap": -0.1}, "autoencoder_sliding_window_infer_overlap"),
        ({"overlap": "0.4"}, "autoencoder_sliding_window_infer_overlap"),
        ({"num_splits": 0}, "autoencoder_tp_num_splits"),
        ({"num_splits": 2.0}, "autoencoder_tp_num_splits"),
        ({"roi_size": 80, "num_splits": 3}, "autoencoder_tp_num_splits"),  # 80 is not divisible by 3
        ({"roi_size": 16, "num_splits": 8}, "autoencoder_tp_num_splits"),  # 2 voxels per split
        ({"memory_budget_gb": 0}, "memory_budget_gb"),
        ({"memory_budget_gb": -4.0}, "memory_budget_gb"),
        ({"memory_budget_gb": float("nan")}, "memory_budget_gb"),
    ],
)
def test_invalid_settings_raise(decode, kwargs, setting):
    kwargs = {"memory_budget_gb": 80, **kwargs}
    with pytest.raises(ValueError, match=setting):
        decode.plan_decode((4, 128, 128, 128), CPU, **kwargs)


def test_invalid_latent_and_plan_raise(decode, autoencoder):
    for shape in [(128, 128), (4, 0, 128, 128), (1, 1, 4, 8, 8, 8)]:
        with pytest.raises(ValueError, match="latent_shape"):
            decode.plan_decode(shape, CPU, memory_budget_gb=1)
    with pytest.raises(ValueError, match="autoencoder_tp_num_splits"):
        decode.DecodePlan(None, 0.4, 0, CPU, 1)
    with pytest.raises(ValueError, match="autoencoder_sliding_window_infer_overlap"):
        decode.DecodePlan((8, 8, 8), 1.5, 1, CPU, 1)
    with pytest.raises(ValueError, match="latent"):
        whole = decode.DecodePlan(None, 0.4, 1, CPU, 1)
        decode.decode_latent(decode.LatentDecoder(autoencoder), torch.zeros(4, 8, 8, 8), whole)
    with pytest.raises(RuntimeError if not torch.cuda.is_available() else ValueError, match="memory_budget_gb"):
        if not torch.cuda.is_available():
            decode.available_memory_bytes(CUDA)
        else:
            decode.plan_decode((4, 8, 8, 8), CUDA, memory_budget_gb=-1)
    plan = decode.DecodePlan((8, 8, 8), 0.4, 1, "cpu", 1)
    assert plan.stitch_device == CPU
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_splits = 2


# ------------------------------------------------------------------------------------ settings and reports


def test_check_decode_settings_normalises_and_names_the_id(decode):
    import numpy as np

    assert decode.check_decode_settings([48, 48, 64], 0.6666, 4) == ((48, 48, 64), 0.6666, 4)
    assert decode.check_decode_settings(np.array([8, 8, 8]), np.float64(0.25), None) == ((8, 8, 8), 0.25, None)
    assert decode.check_decode_settings(16, 0, None) == ((16, 16, 16), 0.0, None)
    assert decode.check_decode_settings(None, 0.4, None) == (None, 0.4, None)
    bad = [
        (([48, 48], 0.5, 4), "autoencoder_sliding_window_infer_size=[48, 48] is not allowed", "3 integers"),
        (([48, 0, 48], 0.5, 4), "autoencoder_sliding_window_infer_size=[48, 0, 48]", "3 integers"),
        (("48", 0.5, 4), "autoencoder_sliding_window_infer_size='48'", "3 integers"),
        ((None, 1.0, 4), "autoencoder_sliding_window_infer_overlap=1.0 is not allowed", "[0, 1)"),
        ((None, None, 4), "autoencoder_sliding_window_infer_overlap=None", "[0, 1)"),
        ((None, float("nan"), 4), "autoencoder_sliding_window_infer_overlap=nan", "[0, 1)"),
        ((None, 0.4, 0), "autoencoder_tp_num_splits=0 is not allowed", "integer >= 1, or null"),
        ((None, 0.4, 2.0), "autoencoder_tp_num_splits=2.0", "integer >= 1"),
        ((None, 0.4, "4"), "autoencoder_tp_num_splits='4'", "integer >= 1"),
        ((None, 0.4, True), "autoencoder_tp_num_splits=True", "integer >= 1"),
    ]
    for arguments, value, allowed in bad:
        with pytest.raises(ValueError) as error:
            decode.check_decode_settings(*arguments)
        assert value in str(error.value) and allowed in str(error.value), str(error.value)


def test_null_splits_are_planned_and_explicit_splits_honoured(decode, autoencoder):
    # the network definition says 4 splits; with autoencoder_tp_num_splits null the planner chooses (1 on
    # the CPU) and says so; an explicit value is kept and reported as such
    decoder = decode.LatentDecoder(autoencoder, 1.0)
    z = _latent(8, 12, 8)
    decode.set_autoencoder_splits(autoencoder, 4)
    try:
        planned = decode.plan_decode(z.shape, CPU, memory_budget_gb=100)
        assert planned.num_splits == 1 and planned.num_splits_source == "planned"
        assert "1 split (planned)" in planned.describe()
        decode.decode_latent(decoder, z, planned, progress=False)
        assert decode.get_autoencoder_splits(autoencoder) == (1, 1)  # the network's own 4 was not used
        explicit = decode.plan_decode(z.shape, CPU, num_splits=4, memory_budget_gb=100)
        assert explicit.num_splits == 4 and "4 splits (autoencoder_tp_num_splits)" in explicit.describe()
        decode.decode_latent(decoder, z, explicit, progress=False)
        assert decode.get_autoencoder_splits(autoencoder) == (4, 1)
    finally:
        decode.set_autoencoder_splits(autoencoder, 1)


class _RecordingTorch:
    """Stands in for ``torch`` inside ``monai.inferers.utils``: records the bytes of every 5-D buffer it allocates."""

    def __init__(self) -> None:
        self.allocated: list[int] = []

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def _record(self, factory, *args, **kwargs):
        tensor = factory(*args, **kwargs)
        if tensor.ndim == 5:
            self.allocated.append(tensor.numel() * tensor.element_size())
        return tensor

    def zeros(self, *args, **kwargs):
        return self._record(torch.zeros, *args, **kwargs)

    def empty(self, *args, **kwargs):
        return self._record(torch.empty, *args, **kwargs)


@pytest.fixture(scope="module")
def mask_autoencoder() -> AutoencoderKlMaisi:
    """A tiny decoder with the mask generator's 125 output channels (random weights, seeded)."""
    torch.manual_seed(3)
    return _maisi_autoencoder(in_channels=8, out_channels=125, use_convtranspose=True, **TINY_DECODER).eval()


def test_planned_stitch_buffers_equal_the_allocated_ones(decode, mask_autoencoder, monkeypatch):
    import monai.inferers.utils

    decoder = decode.LatentDecoder(mask_autoencoder, 1.0)
    z = _latent(12, 8, 8)
    image_voxels = 48 * 32 * 32
    recorder = _RecordingTorch()
    monkeypatch.setattr(monai.inferers.utils, "torch", recorder)
    sliding = decode.plan_decode(z.shape, CPU, roi_size=(8, 8, 8), out_channels=125, memory_budget_gb=100)
    image = decode.decode_latent(decoder, z, sliding, progress=False)
    assert image.shape == (1, 125, 48, 32, 32)
    # SlidingWindowInferer's buffers on the stitch device: the 125-channel image and a 1-channel weight map
    assert sum(recorder.allocated) == (125 + 1) * 4 * image_voxels == round(sliding.stitch_gb * 1e9)
    one_channel = decode.plan_decode(z.shape, CPU, roi_size=(8, 8, 8), memory_budget_gb=100)
    assert sliding.estimated_peak_gb - one_channel.estimated_peak_gb == pytest.approx(
        (124 * 4 * image_voxels + 124 * 4 * 64 * 8 * 8 * 8) / 1e9  # the stitch buffers and the decoded tile
    )
    halo = decode.plan_decode(z.shape, CPU, out_channels=125, memory_budget_gb=0.8,
                              memory_model=decode.DecoderMemoryModel("test", ((1, 1e6),), 0.0))
    assert halo.kind == "halo" and halo.stitch_gb * 1e9 == 125 * 4 * image_voxels
    assert decode.decode_latent(decoder, z, halo, progress=False).numel() * 4 == round(halo.stitch_gb * 1e9)


def test_mask_decoder_stitches_on_the_cpu_when_its_buffers_exceed_the_budget(decode):
    # issue 9: the published mask decoder (125 channels, latent 64^3) on a 24 GB card; its stitch buffers
    # are 8.4 GB (125 x 256^3 float32), planned as 0.07 GB when it was taken for a 1-channel decoder
    for device in (CUDA, CPU):
        plan = decode.plan_decode((4, 64, 64, 64), device, out_channels=125, memory_budget_gb=24, halo=None)
        assert plan.stitch_gb == pytest.approx((125 + 1) * 4 * 256**3 / 1e9) and plan.out_channels == 125
        if device == CUDA:
            assert plan.stitch_device == CPU and "125 output channels, stitch on cpu" in plan.describe()
    assert decode.plan_decode((4, 64, 64, 64), CUDA, memory_budget_gb=24, halo=None).stitch_device == CUDA
    assert decode.plan_decode((4, 64, 64, 64), CUDA, out_channels=125, memory_budget_gb=80).stitch_device == CUDA
    with pytest.raises(ValueError, match="out_channels"):
        decode.plan_decode((4, 64, 64, 64), CPU, out_channels=0, memory_budget_gb=24)


def test_resident_memory_counts_against_the_budget(decode, caplog):
    alone = decode.plan_decode((4, 32, 32, 16), CPU, memory_budget_gb=4)
    assert alone.kind == "whole" and alone.resident_gb == 0
    crowded = decode.plan_decode((4, 32, 32, 16), CPU, memory_budget_gb=4, resident_gb=2.5)
    assert crowded.kind == "halo" and crowded.estimated_peak_gb <= 2.5 + 0.85 * 1.5 + 1e-9
    assert crowded.estimated_peak_gb > 2.5 and "2.50 GB resident" in crowded.describe()
    with caplog.at_level(logging.WARNING):
        decode.plan_decode((4, 32, 32, 16), CPU, memory_budget_gb=2, resident_gb=2.5)
    assert "exceeds" in caplog.text and "after 2.50 GB resident" in caplog.text
    assert decode.resident_memory_bytes(CPU) > 100e6  # this Python process with torch imported
    with pytest.raises(ValueError, match="resident_gb"):
        decode.plan_decode((4, 32, 32, 16), CPU, memory_budget_gb=4, resident_gb=-1)


# --------------------------------------------------------------------------------------------- halo tiles


def test_decoder_stages_cover_the_published_decoders_receptive_fields(decode):
    with torch.device("meta"):  # the full-size published decoders, no weights allocated
        image = _maisi_autoencoder()
        mask = _maisi_autoencoder(in_channels=8, out_channels=125, num_channels=[32, 64, 128], num_res_blocks=[1, 2, 2],
                                  use_convtranspose=True)
        attention = _maisi_autoencoder(with_decoder_nonlocal_attn=True, **TINY_DECODER)
    # latent resolution: conv_in + 4 convolutions; 2x: interpolation, conv, 4 convs; 4x: the same, conv_out
    assert [(s.scale, s.out_scale, s.radius, s.halo) for s in decode.decoder_stages(image)] == [
        (1, 1, 5.0, 5), (1, 2, 3.5, 4), (2, 4, 2.0, 2)]
    assert [s.halo for s in decode.decoder_stages(mask)] == [5, 3, 2]
    assert decode.decoder_stages(image)[-1].norm_radii == (0.75, 1.0, 1.25, 1.5, 1.75)  # before each group norm
    assert decode.DEFAULT_HALO == decode.decoder_stages(image)[-1].halo == decode.decoder_stages(mask)[-1].halo
    assert math.isinf(decode.decoder_stages(attention)[0].radius)


@pytest.mark.parametrize("core", [(10, 8, 12), (7, 6, 5)])
def test_halo_decode_with_exact_group_norms_is_the_whole_decode(decode, autoencoder, core):
    decoder = decode.LatentDecoder(autoencoder, 2.0)
    z = _latent(20, 16, 12)
    whole = decode.decode_latent(decoder, z, decode.DecodePlan(None, 0.4, 1, CPU, 1), progress=False)
    exact = decode.DecodePlan(None, 0.4, 1, CPU, 2, halo_core=core, halo=2, group_norm="exact")
    tile = dataclasses.replace(exact, group_norm="tile")
    sliding = decode.DecodePlan(core, 0.4, 1, CPU, 2)
    errors = {
        name: (decode.decode_latent(decoder, z, plan, progress=False) - whole).abs().max().item()
        for name, plan in (("exact", exact), ("tile", tile), ("sliding", sliding))
    }
    assert errors["exact"] < 1e-4, errors  # every kept voxel sees its receptive field and whole-volume statistics
    assert errors["tile"] > 100 * errors["exact"] and errors["sliding"] > errors["tile"], errors  # what the modes cost


def test_halo_plans_are_refused_for_decoders_they_cannot_reproduce(decode):
    plan = decode.DecodePlan(None, 0.4, 1, CPU, 2, halo_core=(4, 8, 8), halo=2)
    with pytest.raises(ValueError, match="decoder.blocks"):
        decode.decode_latent(decode.LatentDecoder(_PointwiseAutoencoder()), _latent(8, 8, 8), plan, progress=False)
    torch.manual_seed(0)
    attention = _maisi_autoencoder(with_decoder_nonlocal_attn=True, **TINY_DECODER).eval()
    with pytest.raises(ValueError, match="attention"):
        decode.decode_latent(decode.LatentDecoder(attention), _latent(8, 8, 8), plan, progress=False)
    with pytest.raises(ValueError, match="halo"):
        decode.DecodePlan(None, 0.4, 1, CPU, 2, halo_core=(4, 8, 8), halo=None)
    with pytest.raises(ValueError, match="group_norm"):
        decode.DecodePlan(None, 0.4, 1, CPU, 2, halo_core=(4, 8, 8), halo=2, group_norm="global")


def test_halo_tiles_partition_the_latent(decode):
    tiles = decode.halo_tiles((10, 7, 3), (4, 3, 3), (2, 1, 0))
    assert len(tiles) == 3 * 3 * 1
    covered = torch.zeros(10, 7, 3, dtype=torch.int32)
    for tile in tiles:
        covered[tile.core] += 1
        for core, window, size, halo in zip(tile.core, tile.window, (10, 7, 3), (2, 1, 0)):
            assert window.start == max(core.start - halo, 0) and window.stop == min(core.stop + halo, size)
    assert bool((covered == 1).all())


def test_halo_plans_refuse_decoder_hooks_they_would_skip(decode, autoencoder):
    handle = autoencoder.decoder.register_forward_hook(lambda module, args, output: output + 1)
    try:
        plan = decode.DecodePlan(None, 0.4, 1, CPU, 2, halo_core=(4, 8, 8), halo=2)
        with pytest.raises(ValueError, match="forward hooks"):
            decode.decode_latent(decode.LatentDecoder(autoencoder), _latent(8, 8, 8), plan, progress=False)
    finally:
        handle.remove()
