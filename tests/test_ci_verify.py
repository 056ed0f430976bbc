"""Tests of ci/verify_bundle.py on copies of tests/fixtures/tiny_bundle, intact or broken."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import monai.bundle.scripts
import pytest
import yaml
from monai.bundle import ConfigParser

import ci.verify_bundle
from ci.verify_bundle import BundleVerificationError, main, verify_bundle

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_bundle"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A fresh copy of the tiny fixture bundle."""
    target = tmp_path / "tiny_bundle"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids that ``ConfigParser.get_parsed_content`` is asked for during the test, in order."""
    requested: list[str] = []
    original = ConfigParser.get_parsed_content

    def recording(self: ConfigParser, id: str = "", **kwargs: Any) -> Any:
        requested.append(id)
        return original(self, id, **kwargs)

    monkeypatch.setattr(ConfigParser, "get_parsed_content", recording)
    return requested


def edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    """Apply ``change`` to the JSON content of ``path`` in place."""
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content, indent=4))


def edit_large_files(bundle: Path, change: Callable[[dict], Any]) -> None:
    """Apply ``change`` to the first entry of ``large_files.yml``."""
    path = bundle / "large_files.yml"
    content = yaml.safe_load(path.read_text())
    change(content["large_files"][0])
    path.write_text(yaml.safe_dump(content))


def problems_of(bundle: Path) -> str:
    """The verification error message of a bundle that must fail."""
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(bundle)
    return str(info.value)


def test_valid_bundle_passes(bundle: Path) -> None:
    verify_bundle(bundle)
    assert "scripts" not in sys.modules
    assert str(bundle) not in sys.path


def test_cli_exit_codes(bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "LICENSE").unlink()
    assert main([str(bundle)]) == 0
    assert main([str(bundle), str(broken)]) == 1


def test_error_is_a_value_error(bundle: Path) -> None:
    (bundle / "LICENSE").unlink()
    with pytest.raises(ValueError, match=r"LICENSE: required file is missing"):
        verify_bundle(bundle)


@pytest.mark.parametrize(
    "relpath", ["LICENSE", "configs/logging.conf", "docs/README.md", "large_files.yml", "scripts/__init__.py"]
)
def test_missing_required_file(bundle: Path, relpath: str) -> None:
    (bundle / relpath).unlink()
    assert f"{relpath}: required file is missing" in problems_of(bundle)


def test_metadata_missing_required_field(bundle: Path) -> None:
    edit_json(bundle / "configs/metadata.json", lambda meta: meta.pop("authors"))
    assert "configs/metadata.json: $: 'authors' is a required property" in problems_of(bundle)


def test_metadata_lists_every_schema_violation(bundle: Path) -> None:
    def break_metadata(meta: dict) -> None:
        meta.pop("copyright")
        meta["network_data_format"]["inputs"]["image"]["num_channels"] = "one"

    edit_json(bundle / "configs/metadata.json", break_metadata)
    message = problems_of(bundle)
    assert "'copyright' is a required property" in message
    assert "$.network_data_format.inputs.image.num_channels: 'one' is not of type 'integer'" in message


def test_data_format_tensor_missing_field(bundle: Path) -> None:
    edit_json(
        bundle / "configs/metadata.json",
        lambda meta: meta["autoencoder_data_format"]["outputs"]["z_mu"].pop("is_patch_data"),
    )
    assert "$.autoencoder_data_format.outputs.z_mu: 'is_patch_data' is a required property" in problems_of(bundle)


def test_version_not_in_changelog(bundle: Path) -> None:
    edit_json(bundle / "configs/metadata.json", lambda meta: meta["changelog"].pop("0.2.0"))
    message = problems_of(bundle)
    assert "configs/metadata.json: version '0.2.0' is not a key of 'changelog'" in message


def test_version_not_newest(bundle: Path) -> None:
    edit_json(bundle / "configs/metadata.json", lambda meta: meta["changelog"].update({"0.10.0": "newer"}))
    message = problems_of(bundle)
    assert "configs/metadata.json: version '0.2.0' is not the newest in 'changelog' ('0.10.0' is newer)" in message


def test_invalid_version_string(bundle: Path) -> None:
    edit_json(bundle / "configs/metadata.json", lambda meta: meta.update(version="v0.2"))
    message = problems_of(bundle)
    assert "$.version: 'v0.2' does not match" in message
    assert "version 'v0.2' is not a key of 'changelog'" in message


def test_schema_is_never_downloaded(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(monai.bundle.scripts, "download_url", no_download)
    url = "https://example.com/schemas/meta_schema_unknown.json"
    edit_json(bundle / "configs/metadata.json", lambda meta: meta.update(schema=url))
    message = problems_of(bundle)
    assert f"configs/metadata.json: schema '{url}' has no local copy" in message
    assert "ci/schemas/meta_schema_unknown.json" in message


def test_config_not_valid_json(bundle: Path) -> None:
    path = bundle / "configs/inference.json"
    path.write_text(path.read_text().rstrip().rstrip("}") + ',\n}\n')
    message = problems_of(bundle)
    assert "configs/inference.json: not a valid JSON config" in message
    # the networks of the other configs are still checked
    assert "autoencoder_def" not in message


def test_config_duplicate_key(bundle: Path) -> None:
    path = bundle / "configs/train_autoencoder.json"
    path.write_text(path.read_text().replace('"bundle_root": ".",', '"bundle_root": ".",\n    "bundle_root": "..",'))
    assert "configs/train_autoencoder.json: not a valid JSON config: duplicate key(s) ['bundle_root']" in problems_of(
        bundle
    )


def test_overlay_is_parsed_not_instantiated(bundle: Path) -> None:
    overlay = bundle / "configs/multi_gpu_train_autoencoder.json"
    edit_json(overlay, lambda config: config.update(bogus_def={"_target_": "no.such.Module"}))
    verify_bundle(bundle)
    overlay.write_text("{")
    assert "configs/multi_gpu_train_autoencoder.json: not a valid JSON config" in problems_of(bundle)


def test_layered_config_is_read_on_top_of_its_base(bundle: Path, built: list[str]) -> None:
    layered = bundle / "configs/train_finetune.json"
    layered.write_text(json.dumps({"optimizer#lr": 1e-5, "autoencoder_def#latent_channels": 3}))
    verify_bundle(bundle)
    # the overridden autoencoder is a different definition, so it is built too
    assert built.count("autoencoder_def") == 2
    layered.write_text(json.dumps({"scheduler#gamma": 0.5}))
    message = problems_of(bundle)
    assert "configs/train_finetune.json: ConfigParser cannot read it, alone or on top of another config" in message


def test_definition_with_unknown_target(bundle: Path) -> None:
    edit_json(
        bundle / "configs/inference.json",
        lambda config: config["network_def"].update({"_target_": "scripts.tiny_net.NoSuchNet"}),
    )
    message = problems_of(bundle)
    assert "configs/inference.json: 'network_def' failed to instantiate" in message
    assert "NoSuchNet" in message
    assert message.count("failed to instantiate") == 1


def test_definition_with_bad_argument(bundle: Path) -> None:
    edit_json(bundle / "configs/train_autoencoder.json", lambda config: config["autoencoder_def"].update(channels=[4]))
    message = problems_of(bundle)
    assert "configs/train_autoencoder.json: 'autoencoder_def' failed to instantiate" in message
    assert "configs/inference.json: 'autoencoder_def' failed" not in message


def test_wrong_declared_output_shape(bundle: Path) -> None:
    edit_json(
        bundle / "configs/metadata.json",
        lambda meta: meta["network_data_format"]["outputs"]["pred"].update(spatial_shape=[4, 4]),
    )
    message = problems_of(bundle)
    assert (
        "configs/inference.json: 'network_def' vs configs/metadata.json 'network_data_format': "
        "output 'pred' has shape [1, 1, 8, 8], declared [1, 1, 4, 4]"
    ) in message


def test_wrong_declared_tuple_output(bundle: Path) -> None:
    def break_metadata(meta: dict) -> None:
        outputs = meta["autoencoder_data_format"]["outputs"]
        outputs["z_sigma"]["num_channels"] = 3
        outputs["z_sigma"]["dtype"] = "int64"

    edit_json(bundle / "configs/metadata.json", break_metadata)
    message = problems_of(bundle)
    assert "output 'z_sigma' has shape [1, 2, 4, 4], declared [1, 3, 4, 4]" in message
    assert "output 'z_sigma' has dtype torch.float32, declared torch.int64" in message
    assert "output 'reconstruction'" not in message


def test_too_many_declared_outputs(bundle: Path) -> None:
    def add_output(meta: dict) -> None:
        outputs = meta["network_data_format"]["outputs"]
        outputs["extra"] = dict(outputs["pred"])

    edit_json(bundle / "configs/metadata.json", add_output)
    assert "the network returns 1 output(s), 2 are declared" in problems_of(bundle)


def test_forward_fails_on_declared_input(bundle: Path) -> None:
    edit_json(
        bundle / "configs/metadata.json",
        lambda meta: meta["network_data_format"]["inputs"]["image"].update(num_channels=3),
    )
    assert "'network_def' forward pass on the inputs of 'network_data_format' failed" in problems_of(bundle)


def test_declared_shapes_are_checked_on_the_meta_device(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights are allocated for the shape checks (the full-size MAISI networks hold ~700 M parameters)."""
    devices: list[str] = []
    original = ci.verify_bundle._forward

    def recording(net: Any, tensors: Any, names: Any) -> list[Any]:
        devices.append(ci.verify_bundle._parameter_device(net).type)
        outputs = original(net, tensors, names)
        devices.extend(output.device.type for output in outputs)
        return outputs

    monkeypatch.setattr(ci.verify_bundle, "_forward", recording)
    verify_bundle(bundle)
    assert devices == ["meta"] * (1 + 1) + ["meta"] * (1 + 3)  # network_def (1 output), autoencoder_def (3)


def test_forward_that_reads_values_runs_again_on_the_cpu(bundle: Path, built: list[str]) -> None:
    net_file = bundle / "scripts/tiny_net.py"
    reading = "hidden = self.conv_in(x) * float(x.abs().max().item() >= 0)"  # .item() cannot run on meta tensors
    net_file.write_text(net_file.read_text().replace("hidden = self.conv_in(x)", reading))
    verify_bundle(bundle)
    assert built.count("network_def") == 2  # on meta for the build check, then on the CPU for its forward
    net_file.write_text(net_file.read_text().replace("return self.conv_out(torch.relu(hidden))", "return hidden"))
    assert "output 'pred' has shape [1, 4, 8, 8], declared [1, 1, 8, 8]" in problems_of(bundle)  # the CPU's outputs


def test_data_format_without_definition(bundle: Path) -> None:
    edit_json(
        bundle / "configs/metadata.json",
        lambda meta: meta.update(diffusion_data_format=meta["network_data_format"]),
    )
    message = problems_of(bundle)
    assert "'diffusion_data_format' describes 'diffusion_def', which no config defines" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda entry: entry.update(hash_val=entry["hash_val"][:-1]), "a sha256 hash has 64"),
        (lambda entry: entry.update(hash_type="crc32"), "'hash_type' 'crc32' must be one of"),
        (lambda entry: entry.pop("url"), "'url' is missing"),
        (lambda entry: entry.update(url="ftp://example.com/model.pt"), "must be an http(s) URL"),
        (lambda entry: entry.update(path="../model.pt"), "'path' '../model.pt' must be relative"),
        (lambda entry: entry.update(path="/models/model.pt"), "'path' '/models/model.pt' must be relative"),
        (lambda entry: entry.update(hash_val=12345), "'hash_val' must be a (quoted) hex string"),
        (lambda entry: entry.pop("hash_type"), "'hash_type' None must be one of"),
    ],
)
def test_malformed_large_file_entry(bundle: Path, change: Callable[[dict], Any], expected: str) -> None:
    edit_large_files(bundle, change)
    message = problems_of(bundle)
    assert "large_files.yml: entry 0: " in message
    assert expected in message


def test_large_file_without_published_hash(bundle: Path) -> None:
    edit_large_files(bundle, lambda entry: [entry.pop("hash_val"), entry.pop("hash_type")])
    verify_bundle(bundle)


def test_large_files_duplicate_path_and_layout(bundle: Path) -> None:
    path = bundle / "large_files.yml"
    content = yaml.safe_load(path.read_text())
    content["large_files"].append(dict(content["large_files"][0]))
    path.write_text(yaml.safe_dump(content))
    assert "large_files.yml: entry 1: duplicate path 'models/model.pt'" in problems_of(bundle)
    path.write_text("files: []\n")
    assert "large_files.yml: must hold a top-level 'large_files' list" in problems_of(bundle)


def test_every_problem_is_reported_at_once(bundle: Path) -> None:
    (bundle / "LICENSE").unlink()
    edit_json(bundle / "configs/metadata.json", lambda meta: meta["changelog"].pop("0.2.0"))
    edit_large_files(bundle, lambda entry: entry.pop("url"))
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(bundle)
    assert len(info.value.problems) == 3
    assert "3 problem(s)" in str(info.value)


def test_definitions_are_built_once(bundle: Path, built: list[str]) -> None:
    verify_bundle(bundle)
    # identical in inference.json and train_autoencoder.json, also needed by the shape check
    assert built.count("autoencoder_def") == 1
    assert built.count("network_def") == 1


def test_bundles_do_not_share_scripts(bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "tiny_bundle"
    shutil.copytree(bundle, other)
    net_file = other / "scripts/tiny_net.py"
    net_file.write_text(net_file.read_text().replace("return self.conv_out(torch.relu(hidden))", "return hidden"))
    verify_bundle(bundle)
    assert "output 'pred' has shape [1, 4, 8, 8], declared [1, 1, 8, 8]" in problems_of(other)
    verify_bundle(bundle)
    assert "scripts" not in sys.modules


def test_network_definition_copies_must_match(bundle: Path) -> None:
    inference = json.loads((bundle / "configs/inference.json").read_text())
    copy = dict(inference)
    (bundle / "configs/train_copy.json").write_text(json.dumps(copy, indent=4))
    verify_bundle(bundle)  # identical copies pass

    copy["network_def"] = {**inference["network_def"], "_unused_extra": 1}
    (bundle / "configs/train_copy.json").write_text(json.dumps(copy, indent=4))
    message = problems_of(bundle)
    assert "configs/train_copy.json: 'network_def' differs from its copy in configs/inference.json" in message
