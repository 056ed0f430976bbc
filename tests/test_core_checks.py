"""The id checks every bundle shares (common/core/checks.py, copied into each bundle's scripts/)."""

from __future__ import annotations

import importlib

import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts


@pytest.fixture(scope="module")
def checks():
    with bundle_scripts(BUNDLES_DIR / "brats_ldm2d"):  # common/core is copied into every bundle
        yield importlib.import_module("scripts.checks")


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "2", None])
def test_positive_int_refuses_and_names_the_id(checks, value):
    with pytest.raises(ValueError, match=rf"^num_output_samples={value!r} is not allowed; it must be an integer >= 1\.$"):
        checks.check_positive_int("num_output_samples", value)


def test_positive_int_and_number_return_the_value(checks):
    assert checks.check_positive_int("max_epochs", 3) == 3
    assert checks.check_positive_number("lr", 1) == 1.0 and isinstance(checks.check_positive_number("lr", 1), float)
    for value in (0, -1e-5, float("inf"), float("nan"), False, "1e-4"):
        with pytest.raises(ValueError, match=rf"lr={value!r} is not allowed; it must be a finite number > 0"):
            checks.check_positive_number("lr", value)


def test_non_negative_names_the_first_bad_entry(checks):
    checks.check_non_negative({"kl_weight": 0, "adv_weight": 0.1})
    with pytest.raises(ValueError, match=r"^adv_weight=-0.5 is not allowed; it must be a finite number >= 0\.$"):
        checks.check_non_negative({"kl_weight": 0.0, "adv_weight": -0.5, "perceptual_weight": -1})


@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_bool_refuses_numbers_and_strings(checks, value):
    assert checks.check_bool("resume", True) is True and checks.check_bool("resume", False) is False
    with pytest.raises(ValueError, match=rf"^resume={value!r} is not allowed; it must be true or false\.$"):
        checks.check_bool("resume", value)


def test_amp_needs_a_boolean_and_cuda(checks):
    assert checks.check_amp(False, "cpu") is False
    with pytest.raises(ValueError, match=r"amp=True is not allowed on device=cpu; mixed precision needs a CUDA device"):
        checks.check_amp(True, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"amp=1 is not allowed; it must be true or false"):
        checks.check_amp(1, "cuda")
    assert checks.check_amp(True, "cuda:0") is True  # decided from the device name, no GPU needed


def test_export_path_never_overwrites_a_file_the_run_reads(checks, tmp_path):
    weights = tmp_path / "models" / "published.pt"
    assert checks.check_export_path("exported_path", tmp_path / "runs/out.pt", {"trained_path": weights, "unused": None}) == (tmp_path / "runs/out.pt").resolve()
    with pytest.raises(ValueError, match=r"exported_path=.*published.pt is not allowed: it is trained_path; choose another file"):
        checks.check_export_path("exported_path", tmp_path / "models/../models/published.pt", {"trained_path": weights})
    with pytest.raises(ValueError, match=r"exported_path='' is not allowed; it must be a file path"):
        checks.check_export_path("exported_path", "", {})


def test_files_exist_lists_every_missing_file_with_its_id_and_the_download_command(checks, tmp_path):
    present = tmp_path / "present.pt"
    present.write_bytes(b"x")
    (tmp_path / "masks").mkdir()
    checks.check_files_exist({"a_path": present, "mask_dir": tmp_path / "masks", "unused_path": None}, tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        checks.check_files_exist({"a_path": present, "b_path": tmp_path / "b.pt", "c_path": tmp_path / "c.pt"}, tmp_path)
    message = str(error.value)
    assert f"b_path={tmp_path / 'b.pt'}" in message and f"c_path={tmp_path / 'c.pt'}" in message and "a_path" not in message
    assert f"python -m monai.bundle download_large_files --bundle_path {tmp_path}" in message
    assert str(tmp_path / "large_files.yml") in message


def test_brats_uses_the_shared_checks(tmp_path):
    """brats_ldm2d's config-facing check names keep working on top of the shared checks."""
    with bundle_scripts(BUNDLES_DIR / "brats_ldm2d"):
        import scripts.data as data

        with pytest.raises(FileNotFoundError, match=r"load_autoencoder_path=.*missing.pt.*download_large_files --bundle_path"):
            data.check_weights_file("load_autoencoder_path", tmp_path / "missing.pt", tmp_path)
        (tmp_path / "weights.pt").write_bytes(b"x")
        assert data.check_weights_file("load_autoencoder_path", tmp_path / "weights.pt", tmp_path) == tmp_path / "weights.pt"
        with pytest.raises(ValueError, match="num_inference_steps=0 is not allowed"):
            data.check_positive_int("num_inference_steps", 0)
        with pytest.raises(ValueError, match="amp=True is not allowed on device=cpu"):
            data.check_amp(True, torch.device("cpu"))
