"""Tests of common/maisi/scripts/decode.py: split and sliding-window decode and decode planning (CPU, tiny networks)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
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


@pytest.fixture(scope="module")
def autoencoder() -> AutoencoderKlMaisi:
    """A tiny MAISI autoencoder (random weights, seeded): 8 channels, 4 norm groups, latent 4, split axis 1."""
    torch.manual_seed(0)
    network = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        num_channels=[8, 8, 8],
        num_res_blocks=[1, 1, 1],
        norm_num_groups=4,
        norm_eps=1e-6,
        attention_levels=[False, False, False],
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_convtranspose=False,
        norm_float16=False,
        num_splits=1,
        dim_split=1,
    )
    return network.eval()


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
    assert plan.num_tiles == 8 and plan.roi_size == (80, 80, 80)
    assert "8 tiles" in plan.describe() and "(80, 80, 80)" in plan.describe()
    cases = [((20, 13, 9), (8, 8, 40), 0.5), ((64, 64, 64), (48, 48, 64), 0.6666), ((5, 5, 5), (3, 3, 3), 0.9)]
    for spatial, roi, overlap in cases:
        assert decode.count_sliding_windows(spatial, roi, overlap) == decode._window_count(spatial, roi, overlap)


def test_plan_honours_explicit_values(decode):
    plan = decode.plan_decode(
        (1, 4, 128, 128, 128), CPU, roi_size=[64, 64, 48], overlap=0.25, num_splits=4, memory_budget_gb=1
    )
    assert (plan.roi_size, plan.overlap, plan.num_splits, plan.stitch_device) == ((64, 64, 48), 0.25, 4, CPU)
    # an explicit split count is kept even where the automatic plan would not need it
    assert decode.plan_decode((4, 32, 32, 32), CPU, num_splits=8, memory_budget_gb=1000) == dataclasses.replace(
        decode.plan_decode((4, 32, 32, 32), CPU, memory_budget_gb=1000), num_splits=8
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
    for device in (CPU, CUDA):
        budgets = [1000, 400, 160, 80, 45, 32, 24, 16, 8, 4, 2]
        plans = [decode.plan_decode((4, 128, 128, 128), device, memory_budget_gb=b) for b in budgets]
        assert plans[0].roi_size is None  # whole volume when the budget is large
        assert plans[-1].roi_size is not None
        tiles = [p.num_tiles for p in plans]
        voxels = [128**3 if p.roi_size is None else p.roi_size[0] ** 3 for p in plans]
        assert tiles == sorted(tiles) and voxels == sorted(voxels, reverse=True), (device, tiles, voxels)
        for plan in plans:
            assert plan.roi_size is None or all(16 <= r and r % 4 == 0 for r in plan.roi_size)
            assert plan.estimated_peak_gb <= 0.85 * plan.budget_gb + 1e-9 or plan.roi_size == (16, 16, 16)


def test_automatic_plan_raises_splits_before_shrinking_the_roi(decode):
    # a model in which splitting saves memory: whole-volume splits rise first, then the roi shrinks
    model = decode.DecoderMemoryModel("test", ((1, 100e3), (2, 60e3), (4, 40e3), (8, 30e3), (16, 25e3)), 0.0)
    budgets = [50, 20, 13, 10, 8, 6, 4, 2, 1]
    plans = [decode.plan_decode((4, 64, 64, 64), CPU, memory_budget_gb=b, memory_model=model) for b in budgets]
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
    assert decode.plan_decode((4, 128, 128, 128), CUDA, memory_budget_gb=80).describe().startswith(
        "sliding-window decode: roi (80, 80, 80), overlap 0.4, 8 tiles, 2 splits"
    )
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
    assert huge.stitch_device == CPU and huge.roi_size is not None
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
