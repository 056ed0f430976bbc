"""Known answers for the shared FID core (common/core/fid.py) and the shared evaluation report (evaluation_report.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision
from PIL import Image

from bundle_helpers import BUNDLES_DIR, bundle_scripts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KERAS_RESNET50_NOTOP_PARAMS = 23_587_712  # keras.applications.ResNet50(include_top=False).count_params()


@pytest.fixture(scope="module")
def core():
    with bundle_scripts(BUNDLES_DIR / "brats_ldm2d"):  # common/core is copied into every bundle
        import scripts.evaluation_report
        import scripts.fid

        yield scripts.fid, scripts.evaluation_report


def test_fid_of_a_set_against_itself_is_zero(core):
    fid, _ = core
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert abs(fid.frechet_distance(features, features)) < 1e-6
    assert abs(fid.frechet_distance(features, features[torch.randperm(300)])) < 1e-6  # row order does not matter


def test_fid_of_two_gaussian_sets_equals_the_closed_form(core):
    fid, _ = core
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(8, 8))
    real = rng.normal(size=(500, 8)) @ mixing
    synthetic = rng.normal(loc=0.7, scale=1.3, size=(400, 8)) @ mixing.T
    mu_r, mu_s = real.mean(0), synthetic.mean(0)
    cov_r, cov_s = np.cov(real, rowvar=False), np.cov(synthetic, rowvar=False)
    expected = ((mu_s - mu_r) ** 2).sum() + np.trace(cov_s) + np.trace(cov_r) - 2 * np.trace(scipy.linalg.sqrtm(cov_s @ cov_r).real)
    measured = fid.frechet_distance(torch.from_numpy(synthetic).float(), torch.from_numpy(real).float())
    assert expected > 1.0
    assert measured == pytest.approx(expected, rel=1e-5)  # float32 features, float64 statistics
    with pytest.raises(ValueError, match="at least 2"):
        fid.frechet_distance(torch.zeros(1, 8), torch.zeros(5, 8))


def test_torchvision_trunk_loads_a_torchvision_state_dict_and_gives_its_pooled_features(core, tmp_path):
    fid, _ = core
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")  # with fc.*, as torchvision publishes it
    trunk = fid.ResNetFeatures(fid.backbone_style("imagenet_resnet50"))
    digest = fid.load_backbone(trunk, "imagenet_resnet50", tmp_path / "resnet50.pth")
    assert digest == fid.file_sha256(tmp_path / "resnet50.pth") and len(digest) == 64
    reference.fc = torch.nn.Identity()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(image)
        measured = trunk.eval()(image).mean(dim=(2, 3))
    assert measured.shape == (2, 2048)
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-5)


def test_radimagenet_trunk_has_the_keras_resnet50_layout(core, tmp_path):
    fid, _ = core
    with torch.device("meta"):
        trunk = fid.ResNetFeatures("keras")
        out = trunk(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 2048, 7, 7)
    state = trunk.state_dict()
    counted = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert counted == KERAS_RESNET50_NOTOP_PARAMS  # Keras counts BN moving statistics as parameters
    assert {"conv1.bias", "layer1.0.conv1.bias", "layer1.0.downsample.0.bias", "layer4.2.conv3.bias"} <= set(state)
    block = trunk.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)  # Keras: stride on the first 1x1
    assert block.bn1.eps == pytest.approx(1.001e-5)
    assert fid.BACKBONES["radimagenet_resnet50"].file_name == "RadImageNet-ResNet50_notop.pth"


def test_backbone_weights_are_checked_strictly(core, tmp_path):
    fid, _ = core
    small = fid.ResNetFeatures("keras", [1, 1, 1, 1], 2)
    state = small.state_dict()
    del state["layer4.0.conv3.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"backbone_weights_path=.*missing \['layer4.0.conv3.bias'\]"):
        fid.load_backbone(fid.ResNetFeatures("keras", [1, 1, 1, 1], 2), "radimagenet_resnet50", tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="needs a 'torchvision' ResNetFeatures"):
        fid.load_backbone(small, "imagenet_resnet50", tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"backbone='inception' is not allowed; choose one of \['imagenet_resnet50', 'radimagenet_resnet50'\]"):
        fid.backbone_style("inception")


def test_missing_backbone_file_names_the_id_and_the_download_command(core, tmp_path):
    fid, _ = core
    missing = tmp_path / "models" / "RadImageNet-ResNet50_notop.pth"
    with pytest.raises(FileNotFoundError) as error:
        fid.check_backbone_file("radimagenet_resnet50", missing)
    message = str(error.value)
    assert f"backbone_weights_path='{missing}' does not exist" in message
    assert f"curl -L --create-dirs -o {missing} https://huggingface.co/MONAI/checkpoints/resolve/main/RadImageNet-ResNet50_notop.pth" in message
    assert fid.default_backbone_path("imagenet_resnet50", "models") == "models/resnet50-0676ba61.pth"


class _Recorder(torch.nn.Module):
    """Records its inputs; returns them as a (N, 3, H, W) "feature map"."""

    out_channels = 3

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return x


def test_normalisation_uses_the_whole_stack_not_each_slice(core):
    fid, _ = core
    stack = torch.zeros(2, 4, 4)
    stack[0, 0, 0] = 10.0  # slice 0 spans [0, 10]
    stack[1, 0, 0] = 5.0  # slice 1 spans [0, 5]
    recorder = _Recorder()
    features = fid.extract_features(recorder, stack, batch_size=1, device="cpu")  # one slice per batch
    second = recorder.inputs[1][0]  # (3, 4, 4): channels B, G, R
    means = torch.tensor(fid.BGR_MEANS).view(3, 1, 1)
    torch.testing.assert_close(second + means, torch.where(stack[1] > 0, 0.5, 0.0).expand(3, 4, 4))  # 5 / 10, not 5 / 5
    torch.testing.assert_close(second[:, 1, 1], -means.flatten())  # zero -> minus the channel mean, no std division
    assert features.shape == (2, 3)
    fixed = fid.extract_features(_Recorder(), stack, 2, "cpu", value_range=(0.0, 20.0))
    torch.testing.assert_close(fixed[1] + means.flatten(), torch.full((3,), 5.0 / 20 / 16))  # mean over 16 pixels


def test_features_do_not_depend_on_the_slice_batch_size(core):
    fid, _ = core
    torch.manual_seed(0)
    trunk = fid.ResNetFeatures("keras", [1, 1, 1, 1], 2).eval()
    stack = torch.rand(7, 32, 24) * 2000 - 1000
    torch.testing.assert_close(fid.extract_features(trunk, stack, 1, "cpu"), fid.extract_features(trunk, stack, 64, "cpu"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="slice_batch_size=0"):
        fid.extract_features(trunk, stack, 0, "cpu")


def test_feature_cache_is_keyed_by_content_and_settings(core, tmp_path):
    fid, _ = core
    source = tmp_path / "volume.nii.gz"
    source.write_bytes(b"volume one")
    features = {"xy": torch.arange(6.0).view(3, 2)}
    cache = fid.FeatureCache(tmp_path / "cache", {"center_slices_ratio": 0.4, "backbone_sha256": "abc"})
    assert cache.load(source) is None
    cache.save(source, features)
    torch.testing.assert_close(cache.load(source)["xy"], features["xy"])
    assert fid.FeatureCache(tmp_path / "cache", {"center_slices_ratio": 0.5, "backbone_sha256": "abc"}).load(source) is None
    assert fid.FeatureCache(tmp_path / "cache", {"center_slices_ratio": 0.4, "backbone_sha256": "abd"}).load(source) is None
    source.write_bytes(b"volume two")
    assert fid.FeatureCache(tmp_path / "cache", {"center_slices_ratio": 0.4, "backbone_sha256": "abc"}).load(source) is None
    assert fid.FeatureCache(None, {}).load(source) is None


def test_single_process_gather_and_shard(core):
    fid, _ = core
    items = [{"xy": torch.ones(n, 2) * n} for n in (1, 2, 3)]
    gathered = fid.gather_items(items)
    assert [g["xy"].shape[0] for g in gathered] == [1, 2, 3]
    assert fid.shard(list(range(5)), 1, 2) == [1, 3] and fid.shard(list(range(5)), 0, 2) == [0, 2, 4]
    assert fid.process_rank() == (0, 1)


def test_reconstruction_report_format_and_worst_cases(core, tmp_path):
    _, report_module = core
    cases = [{"psnr": 30.0, "mae": 5.0}, {"psnr": 20.0, "mae": 9.0}, {"psnr": float("inf"), "mae": 0.0}, {"psnr": 25.0, "mae": 7.0}]
    assert report_module.worst_case_indices(cases, "psnr", 2) == [2, 1]  # non-finite first, then the lowest PSNR
    assert report_module.worst_case_indices(cases[:2] + cases[3:], "mae", 2) == [1, 2]  # the highest MAE
    report = report_module.reconstruction_report(cases, ["psnr", "mae"], {"psnr": "dB", "mae": "HU"}, {"x": 1}, "psnr", [1])
    assert report["mean"]["mae"] == pytest.approx(21 / 4) and report["worst_cases"] == [{"index": 1, **cases[1]}]
    path = report_module.write_json_report(tmp_path / "report.json", report)
    written = json.loads(path.read_text())
    assert written["mean"]["psnr"] is None and written["cases"][2]["psnr"] is None  # inf is not JSON
    assert written["units"] == {"psnr": "dB", "mae": "HU"} and written["num_cases"] == 4
    chart = report_module.bar_chart_png({"xy": 2.685, "yz": 4.723, "zx": 7.963}, tmp_path / "chart.png", "FID")
    with Image.open(chart) as picture:
        assert picture.size == (480, 320)
        assert picture.getpixel((240, 270)) == (70, 110, 170)  # inside the yz bar (second slot)
        assert picture.getpixel((100, 150)) == (255, 255, 255)  # above the shorter xy bar
