"""MAISI evaluation (configs/evaluate_fid.json, evaluate_autoencoder.json on top of inference.json): known answers on CPU."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
FID_CONFIGS = ["inference.json", "evaluate_fid.json"]
RECON_CONFIGS = ["inference.json", "evaluate_autoencoder.json"]
TINY_LAYERS, TINY_BASE = [1, 1, 1, 1], 1
TINY_BACKBONE = {"backbone_def#layers": TINY_LAYERS, "backbone_def#base_channels": TINY_BASE}
TINY_AUTOENCODER = {
    "autoencoder_def#num_channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": [1, 1, 1],
    "autoencoder_def#norm_num_groups": 8,
}
TARGET = [40, 36, 32]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tiny_backbone(fid_module, path: Path, style: str = "keras", seed: int = 0) -> Path:
    """A tiny ResNetFeatures state dict (variance-preserving convolutions, spread BatchNorm statistics): its features vary."""
    torch.manual_seed(seed)
    network = fid_module.ResNetFeatures(style, TINY_LAYERS, TINY_BASE)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, 0.0, 0.5)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def write_volume(path: Path, volume: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


def ct_body(shape, rng: np.random.Generator, contrast: float) -> np.ndarray:
    """Air around a soft-tissue body with a bright random blob; ``contrast`` sets the blob intensity."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    volume = np.full(shape, -1000.0)
    volume[3:-3, 3:-3, :] = rng.normal(40.0, 30.0, size=(shape[0] - 6, shape[1] - 6, shape[2]))
    centre = np.array([rng.integers(s // 3, s - s // 3) for s in shape]).reshape(3, 1, 1, 1)
    volume[((grid - centre) ** 2).sum(0) < 25] = contrast
    return volume


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(BUNDLE) as package:
        import scripts.evaluation
        import scripts.evaluation_diversity
        import scripts.evaluation_fid
        import scripts.evaluation_recon
        import scripts.fid  # noqa: F401

        yield package


@pytest.fixture(scope="module")
def workspace(scripts, tmp_path_factory):
    """3 real and 3 synthetic CT volumes (different shapes, padded/cropped to TARGET), labels and a tiny backbone."""
    root = tmp_path_factory.mktemp("maisi_eval")
    rng = np.random.default_rng(0)
    shapes = [(42, 34, 32), (38, 38, 34), (40, 36, 32)]
    for index, shape in enumerate(shapes):
        write_volume(root / "real" / f"real_{index}.nii.gz", ct_body(shape, rng, 700.0))
        synthetic = ct_body(shape, rng, 300.0)
        labels = np.zeros(shape, dtype=np.uint8)
        labels[6:12, 6:12, 4:10], labels[14:20, 6:12, 4:10] = 1, 3  # liver, spleen
        synthetic[labels == 1], synthetic[labels == 3] = 60.0 + index, 900.0  # liver in range, spleen above it
        write_volume(root / "synthetic" / f"sample_{index:04d}_seed{index}_image.nii.gz", synthetic)
        label_ext = ".nii.gz" if index else ".nii"  # generation's label_output_ext may differ from the image's
        write_volume(root / "synthetic" / f"sample_{index:04d}_seed{index}_label{label_ext}", labels)
    (root / "synthetic" / "generation_report.json").write_text("{}")  # other files of a generation folder are ignored
    write_tiny_backbone(scripts.fid, root / "models" / "RadImageNet-ResNet50_notop.pth")
    return root


def fid_overrides(workspace: Path, output: Path, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "model_dir": str(workspace / "models"),
        "real_dir": str(workspace / "real"),
        "synthetic_dir": str(workspace / "synthetic"),
        "target_shape": TARGET,
        "center_slices_ratio": None,
        "output_dir": str(output),
        "feature_cache_dir": str(output / "cache"),
        "slice_batch_size": 5,
        "ms_ssim_num_pairs": 2,
        "ms_ssim_kernel_size": 2,
        "mmd_shape": [8, 8, 8],
        "progress": False,
        **TINY_BACKBONE,
        **extra,
    }


def parser_for(configs, overrides, bundle: Path = BUNDLE) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in configs])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def run_in_process(configs, overrides, bundle: Path = BUNDLE) -> ConfigParser:
    """Run ``configs`` of ``bundle`` as ``monai.bundle run`` does (the bundle's ``scripts`` must be imported)."""
    parser = parser_for(configs, overrides, bundle)
    for section in ("initialize", "run", "finalize"):
        parser.get_parsed_content(section)
    return parser


def initialize_error(parser: ConfigParser) -> BaseException:
    """The error ``initialize`` raises, unwrapped from MONAI's ``RuntimeError`` chain."""
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("initialize")
    error = info.value
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------
# protocol
# ---------------------------------------------------------------------------------------------------


def test_plane_slicing_on_an_asymmetric_volume(scripts):
    plane_slices = scripts.evaluation_fid.plane_slices
    i, j, k = np.meshgrid(np.arange(6), np.arange(5), np.arange(4), indexing="ij")
    volume = torch.from_numpy(100.0 * i + 10.0 * j + k)  # value = 100 x + 10 y + z
    xy, yz, zx = (plane_slices(volume, plane) for plane in ("xy", "yz", "zx"))
    assert xy.shape == (4, 6, 5) and yz.shape == (6, 5, 4) and zx.shape == (5, 6, 4)
    assert xy[3, 2, 1] == 213 and yz[2, 1, 3] == 213 and zx[1, 2, 3] == 213  # rows/columns: xy (x, y), yz (y, z), zx (x, z)
    torch.testing.assert_close(plane_slices(volume, "yz", 0.5), yz[1:4])  # int(0.25 * 6) .. int(0.75 * 6)
    with pytest.raises(ValueError, match="plane='xz'"):
        plane_slices(volume, "xz")


def test_center_slice_indices(scripts):
    center = scripts.evaluation_fid.center_slice_range
    assert center(512, 0.4) == (153, 358)  # 205 slices, as the published evaluation
    assert center(10, 0.5) == (2, 7) and center(7, 0.3) == (2, 4)
    assert center(16, None) == (0, 16) and center(16, 1.0) == (0, 16)
    for bad in (0, 1.5, "0.4"):
        with pytest.raises(ValueError, match=f"center_slices_ratio={bad!r}"):
            center(16, bad)


def test_ct_preprocessing_orients_pads_crops_and_clips(scripts, tmp_path):
    volume = np.arange(10 * 6 * 4, dtype=np.float32).reshape(10, 6, 4) * 30.0 - 1500.0  # -1500 .. 5670 HU
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))  # stored L->R reversed (LPS)
    transform = scripts.evaluation.fid_preprocessing([8, 8, 4], None, "ct")
    result = scripts.evaluation.load_volume(transform, path).numpy()
    ras = volume[::-1, ::-1, :]
    expected = np.full((8, 8, 4), -1000.0, dtype=np.float32)
    expected[:, 1:7, :] = np.clip(ras[1:9], -1000.0, 1000.0)  # x: centre crop 10 -> 8, y: pad 6 -> 8 with -1000
    np.testing.assert_array_equal(result, expected)


def test_mr_preprocessing_uses_the_clipped_percentile_range(scripts, tmp_path):
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    volume[2:6, 2:6, 2:6] = np.linspace(1.0, 400.0, 64).reshape(4, 4, 4)
    volume[0, 0, 0] = 1e6  # one very bright voxel: clipped, it does not compress the range
    path = write_volume(tmp_path / "mr.nii.gz", volume)
    result = scripts.evaluation.load_volume(scripts.evaluation.fid_preprocessing([10, 8, 8], None, "mr"), path).numpy()
    upper = np.percentile(volume, 99.5)
    np.testing.assert_allclose(result[1:9], np.clip(volume / upper, 0.0, 1.0), rtol=1e-5, atol=1e-6)
    assert result[0].max() == 0.0 and result[9].max() == 0.0  # padded with the MR background
    assert scripts.evaluation.evaluation_intensity("mri_t1", BUNDLE / "configs/modality_mapping.json") == "mr"
    assert scripts.evaluation.evaluation_intensity("ct", BUNDLE / "configs/modality_mapping.json") == "ct"


# ---------------------------------------------------------------------------------------------------
# 2.5D FID config
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_run(workspace):
    output = workspace / "run_ratio"
    run_in_process(FID_CONFIGS, fid_overrides(workspace, output, center_slices_ratio=0.5))
    return output


def test_fid_report(fid_run, workspace):
    report = read_json(fid_run / "fid_report.json")
    planes = [report[f"fid_{plane}"] for plane in ("xy", "yz", "zx")]
    assert all(value > 1e-3 for value in planes)  # blobs of 700 HU vs 300 HU
    assert report["fid_avg"] == pytest.approx(sum(planes) / 3, rel=1e-12)
    # ratio 0.5 of (40, 36, 32): xy z 8..24, yz x 10..30, zx y 9..27; three volumes per set
    assert report["num_slices"] == {"real": {"xy": 48, "yz": 60, "zx": 54}, "synthetic": {"xy": 48, "yz": 60, "zx": 54}}
    assert report["num_real_volumes"] == report["num_synthetic_volumes"] == 3
    assert report["feature_dim"] == 8 * 4 * TINY_BASE
    settings = report["settings"]
    assert settings["target_shape"] == TARGET and settings["target_spacing"] == [1.0, 1.0, 1.0]
    assert settings["center_slices_ratio"] == 0.5 and settings["intensity"] == "ct" and settings["backbone"] == "radimagenet_resnet50"
    assert settings["backbone_sha256"] == _sha256(workspace / "models" / "RadImageNet-ResNet50_notop.pth")
    assert [Path(p).name for p in report["synthetic_volumes"]] == [f"sample_{i:04d}_seed{i}_image.nii.gz" for i in range(3)]
    with Image.open(report["chart"]) as chart:
        assert chart.size == (480, 320)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fid_of_a_set_against_a_copy_of_itself_is_zero(workspace, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workspace / "real", copy)
    run_in_process(FID_CONFIGS, fid_overrides(workspace, tmp_path / "out", synthetic_dir=str(copy), ms_ssim_num_pairs=0, mmd_shape=None))
    report = read_json(tmp_path / "out" / "fid_report.json")
    for plane in ("xy", "yz", "zx", "avg"):
        assert abs(report[f"fid_{plane}"]) < 1e-6


def test_feature_cache_is_reused_and_invalidated(scripts, workspace, tmp_path, monkeypatch):
    loads = []
    original = scripts.evaluation_fid.load_volume
    monkeypatch.setattr(scripts.evaluation_fid, "load_volume", lambda transform, path: loads.append(Path(path).name) or original(transform, path))
    overrides = fid_overrides(workspace, tmp_path, ms_ssim_num_pairs=0, mmd_shape=None)
    run_in_process(FID_CONFIGS, overrides)
    first = read_json(tmp_path / "fid_report.json")
    assert len(loads) == 6
    run_in_process(FID_CONFIGS, overrides)
    assert len(loads) == 6  # nothing changed: every feature comes from the cache
    assert read_json(tmp_path / "fid_report.json")["fid_avg"] == first["fid_avg"]
    run_in_process(FID_CONFIGS, {**overrides, "center_slices_ratio": 0.5})
    assert len(loads) == 12  # a changed setting never reuses stale features
    real = tmp_path / "real"
    shutil.copytree(workspace / "real", real)
    write_volume(real / "real_1.nii.gz", np.full((40, 36, 32), 100.0))
    run_in_process(FID_CONFIGS, {**overrides, "real_dir": str(real)})
    assert loads[12:] == ["real_1.nii.gz"]  # a changed file is read again, the others come from the cache
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 13


def test_missing_backbone_is_refused_before_any_volume_loads(workspace, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a volume or weights file was read")

    monkeypatch.setattr("monai.transforms.LoadImaged.__call__", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    missing = tmp_path / "none" / "RadImageNet-ResNet50_notop.pth"
    parser = parser_for(FID_CONFIGS, fid_overrides(workspace, tmp_path, backbone_weights_path=str(missing)))
    error = initialize_error(parser)
    assert isinstance(error, FileNotFoundError)
    assert re.search(r"backbone_weights_path='.*none/RadImageNet-ResNet50_notop.pth' does not exist.*\n.*curl -L", str(error))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"target_shape": [40, 0, 32]}, r"target_shape=\[40, 0, 32\] is not allowed; it must be null or three integers >= 1"),
        ({"target_spacing": [1.0, -1.0, 1.0]}, r"target_spacing=\[1.0, -1.0, 1.0\] is not allowed"),
        ({"backbone": "inception_v3"}, r"backbone='inception_v3' is not allowed"),
        ({"real_datalist": "list.json"}, r"set exactly one of real_dir and real_datalist"),
        ({"num_images": 0}, r"num_images=0 is not allowed"),
        ({"ms_ssim_kernel_size": 11}, r"ms_ssim_kernel_size=11 needs every side of target_shape=\[40, 36, 32\] to be at least 176"),
        ({"evaluation_intensity": "pet"}, r"evaluation_intensity='pet' is not allowed"),
    ],
)
def test_bad_ids_are_refused(workspace, tmp_path, override, message):
    parser = parser_for(FID_CONFIGS, {**fid_overrides(workspace, tmp_path), **override})
    assert re.search(message, str(initialize_error(parser)))


def test_datalist_gives_the_same_figures_as_the_folder(workspace, fid_run, tmp_path):
    entries = [{"image": str(p)} for p in sorted((workspace / "real").glob("*.nii.gz"))][::-1]  # order does not matter
    (tmp_path / "real.json").write_text(json.dumps({"training": entries}))
    overrides = fid_overrides(workspace, tmp_path, center_slices_ratio=0.5, real_dir=None, real_datalist=str(tmp_path / "real.json"))
    run_in_process(FID_CONFIGS, {**overrides, "ms_ssim_num_pairs": 0, "mmd_shape": None, "feature_cache_dir": str(fid_run / "cache")})
    assert read_json(tmp_path / "fid_report.json")["fid_avg"] == read_json(fid_run / "fid_report.json")["fid_avg"]


# ---------------------------------------------------------------------------------------------------
# diversity and distribution
# ---------------------------------------------------------------------------------------------------


def test_distribution_report(scripts, fid_run, workspace):
    report = read_json(fid_run / "distribution_report.json")
    diversity = report["ms_ssim"]["synthetic"]
    assert [(p["first"], p["second"]) for p in diversity["pairs"]] == scripts.evaluation_diversity.pair_indices(3, 2)
    assert diversity["mean"] == pytest.approx(np.mean([p["ms_ssim"] for p in diversity["pairs"]]))
    assert all(0.0 < p["ms_ssim"] < 1.0 for p in diversity["pairs"] + report["ms_ssim"]["real"]["pairs"])
    organs = report["organ_hu_medians"]["organs"]
    assert set(organs) == {"liver", "spleen"}
    assert organs["liver"]["median_of_medians"] == pytest.approx(61.0) and organs["liver"]["passed_cases"] == 3
    assert organs["spleen"]["median_of_medians"] == pytest.approx(900.0) and organs["spleen"]["passed_cases"] == 0
    assert organs["spleen"]["high"] < 900.0 and organs["liver"]["low"] <= 60.0 <= organs["liver"]["high"]
    assert report["mmd"]["num_volumes_per_set"] == 3 and report["mmd"]["mmd_shape"] == [8, 8, 8]


def test_ms_ssim_and_mmd_known_answers(scripts):
    diversity = scripts.evaluation_diversity
    volume = torch.rand(48, 48, 48, generator=torch.Generator().manual_seed(0))
    assert diversity.ms_ssim(volume, volume, kernel_size=3) == pytest.approx(1.0, abs=1e-5)
    assert diversity.ms_ssim(volume, torch.rand(48, 48, 48), kernel_size=3) < 0.5
    rng = np.random.default_rng(0)
    real, synthetic = rng.random((4, 1, 3, 3, 3)), rng.random((4, 1, 3, 3, 3)) + 0.2
    x, y = real.reshape(4, -1), synthetic.reshape(4, -1)
    kxx, kyy, kxy = x @ x.T, y @ y.T, y @ x.T
    expected = (kxx.sum() - np.trace(kxx)) / 12 + (kyy.sum() - np.trace(kyy)) / 12 - 2 * kxy.mean()
    assert diversity.mmd(torch.from_numpy(real), torch.from_numpy(synthetic)) == pytest.approx(expected, rel=1e-10)
    assert diversity.pair_indices(4, 100) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert diversity.pair_indices(40, 5) == diversity.pair_indices(40, 5) and len(set(diversity.pair_indices(40, 5))) == 5


# ---------------------------------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------------------------------


def test_two_gloo_processes_give_exactly_the_single_process_figures(workspace, fid_run, tmp_path, installed_ct_bundle):
    """Two torchrun processes from the installed packaged zip against one process from the source bundle."""
    overrides = fid_overrides(workspace, tmp_path, center_slices_ratio=0.5, bundle_root=str(installed_ct_bundle))
    run_bundle(installed_ct_bundle, [*FID_CONFIGS, "multi_gpu_evaluate_fid.json"], overrides, torchrun_procs=2)  # 2 and 1 volumes
    single, multi = read_json(fid_run / "fid_report.json"), read_json(tmp_path / "fid_report.json")
    for key in ("fid_xy", "fid_yz", "fid_zx", "fid_avg", "num_slices"):
        assert multi[key] == single[key], key
    assert multi["settings"]["world_size"] == 2 and single["settings"]["world_size"] == 1
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 6  # every volume extracted once, by its rank
    single_distribution, multi_distribution = read_json(fid_run / "distribution_report.json"), read_json(tmp_path / "distribution_report.json")
    for report, bundle in ((single_distribution, BUNDLE), (multi_distribution, installed_ct_bundle)):  # each bundle's own table
        assert report["organ_hu_medians"].pop("statistics_json") == str(bundle / "configs/image_median_statistics_ct.json")
    assert multi_distribution == single_distribution


# ---------------------------------------------------------------------------------------------------
# autoencoder reconstruction
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recon_workspace(scripts, tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi_recon")
    rng = np.random.default_rng(1)
    entries = []
    for index, shape in enumerate([(30, 26, 20), (24, 24, 16), (28, 20, 18)]):
        write_volume(root / f"case{index}.nii.gz", np.clip(ct_body(shape, rng, 1500.0), -2000, 3000), spacing=(1.5, 1.5, 2.0))
        entries.append({"image": f"case{index}.nii.gz", "fold": 0 if index else 1})
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    torch.manual_seed(0)
    autoencoder = parser_for(["inference.json"], TINY_AUTOENCODER).get_parsed_content("autoencoder_def")
    torch.save({"unet_state_dict": autoencoder.state_dict()}, root / "autoencoder.pt")
    return root


def recon_overrides(root: Path, output: Path, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(root),
        "trained_autoencoder_path": str(root / "autoencoder.pt"),
        "output_dir": str(output),
        "progress": False,
        **TINY_AUTOENCODER,
        **extra,
    }


def test_autoencoder_reconstruction_report_known_answers(recon_workspace, tmp_path, installed_ct_bundle):
    """From the installed packaged zip, with its own scripts, as a user runs it."""
    overrides = recon_overrides(
        recon_workspace, tmp_path, validation_fold=None, write_reconstructions=True, num_worst_cases=1,
        autoencoder_sliding_window_infer_size=[4, 4, 4], memory_budget_gb=2.0, bundle_root=str(installed_ct_bundle),
    )
    with bundle_scripts(installed_ct_bundle):
        run_in_process(RECON_CONFIGS, overrides, installed_ct_bundle)
    report = read_json(tmp_path / "reconstruction_report.json")
    assert report["num_cases"] == 3 and report["units"] == {"psnr": "dB", "ssim": "1", "mae": "HU"}
    for case in report["cases"]:
        source = nib.load(case["image"])
        original = np.asarray(nib.load(case["original"]).dataobj)
        reconstruction = np.asarray(nib.load(case["reconstruction"]).dataobj)
        np.testing.assert_allclose(original, np.clip(source.get_fdata(), -1000, 1000), atol=1e-3)  # HU, the input's shape
        assert reconstruction.shape == source.shape and -1000 <= reconstruction.min() and reconstruction.max() <= 1000
        mse = np.mean((original.astype(np.float64) - reconstruction) ** 2)
        assert case["psnr"] == pytest.approx(10 * np.log10(2000.0**2 / mse), rel=1e-4)
        assert case["mae"] == pytest.approx(np.mean(np.abs(original - reconstruction.astype(np.float64))), rel=1e-4)
        assert -1.0 <= case["ssim"] <= 1.0
        assert case["decode_plan"].startswith("sliding-window decode: roi (4, 4, 4)") and "of 2.00 GB budget" in case["decode_plan"]
        assert case["spacing"] == [1.5, 1.5, 2.0]
    assert report["mean"]["psnr"] == pytest.approx(np.mean([c["psnr"] for c in report["cases"]]))
    worst = min(range(3), key=lambda i: report["cases"][i]["psnr"])
    assert [c["index"] for c in report["worst_cases"]] == [worst]
    assert Path(report["worst_cases"][0]["preview"]).name == f"worst_01_case_{worst:04d}.png"
    with Image.open(report["worst_cases"][0]["preview"]) as preview:
        assert preview.mode == "RGB" and preview.size[1] > preview.size[0] / 2  # three rows
    assert report["settings"]["trained_autoencoder_path"] == str(recon_workspace / "autoencoder.pt")


def test_autoencoder_evaluation_selects_the_fold_and_refuses_missing_weights(recon_workspace, tmp_path, monkeypatch):
    parser = parser_for(RECON_CONFIGS, recon_overrides(recon_workspace, tmp_path))
    assert [Path(i["image"]).name for i in parser.get_parsed_content("evaluation_items")] == ["case1.nii.gz", "case2.nii.gz"]

    def refuse(*args, **kwargs):
        raise AssertionError("a volume or weights file was read")

    monkeypatch.setattr("monai.transforms.LoadImaged.__call__", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    missing = recon_overrides(recon_workspace, tmp_path, trained_autoencoder_path=str(tmp_path / "none.pt"))
    assert re.search(r"trained_autoencoder_path='.*none.pt' does not exist", str(initialize_error(parser_for(RECON_CONFIGS, missing))))
    wrong_fold = parser_for(RECON_CONFIGS, recon_overrides(recon_workspace, tmp_path, validation_fold=3))
    assert re.search(r"validation_fold=3 holds no entry .* its folds are \[0, 1\]", str(initialize_error(wrong_fold)))


def test_benchmark_smoke_run(scripts, tmp_path):
    """bench/bench_evaluation.py --tiny, in-process: every row timed, the right feature-row counts (timings meaningless)."""
    import importlib
    import sys

    from bundle_helpers import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        bench = importlib.import_module("bench_evaluation")
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    argv = ["--tiny", "--shape", "16", "16", "8", "--recon-shape", "16", "16", "12", "--repetitions", "1", "--device", "cpu"]
    assert bench.main([*argv, "--json-out", str(tmp_path / "bench.json")]) == 0
    report = read_json(tmp_path / "bench.json")
    outputs = report["outputs"]
    assert outputs["features_every_slice"] == outputs["features_every_slice_one_batch"] == 8 + 16 + 16
    assert outputs["features_ratio_0.4"] == 3 + 7 + 7  # int(0.3 * n) .. int(0.7 * n) per plane
    assert np.isfinite(outputs["reconstruction"]["psnr"]) and report["settings"]["autoencoder_parameters"] > 0
    assert all(row["repetitions"] == 1 and row["min_s"] > 0 for row in report["results"].values())
