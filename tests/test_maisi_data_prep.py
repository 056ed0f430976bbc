"""
Unit tests of the MAISI data-preparation CLI (canonical: common/maisi/core/data_prep.py), in-process plus one
`fire` call. They import the CT bundle's byte copy (tests/test_shared_code.py checks it is identical), because the
defaults come from the bundle's configs/inference.json; the defaults of both bundles are tested at the end.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from bundle_helpers import BUNDLES_DIR, bundle_scripts


CT_BUNDLE, MR_BUNDLE = BUNDLES_DIR / "maisi_ct_generative", BUNDLES_DIR / "maisi_mr_generative"


@pytest.fixture(scope="module")
def modules():
    with bundle_scripts(CT_BUNDLE):
        yield importlib.import_module("scripts.data_prep"), importlib.import_module("scripts.embeddings")


@pytest.fixture(scope="module")
def data_prep(modules):
    return modules[0]


def _write(path, data, spacing=(1.0, 1.0, 1.0), affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0]) if affine is None else affine), str(path))
    return path


def _ct(shape=(20, 16, 12), value=40):
    data = np.full(shape, -1000, dtype=np.int16)
    data[4:-4, 4:-4, 2:-2] = value
    return data


def test_check_reports_consistent_folder(data_prep, tmp_path):
    for name in ("a", "b"):
        _write(tmp_path / "img" / f"{name}.nii.gz", _ct(), (1.5, 1.5, 2.0))
    report = data_prep.check(str(tmp_path / "img"), report=str(tmp_path / "report.json"))
    assert report["consistent"] and report["num_images"] == 2 and report["warnings"] == []
    assert report["summary"]["spacing"] == [[1.5, 1.5, 2.0]] and report["summary"]["orientation"] == ["RAS"]
    assert report["suggested_shape"] == [32, 32, 32] and report["suggested_spacing"] == [1.5, 1.5, 2.0]
    assert report["images"][0]["intensity"]["min"] == -1000.0 and report["images"][0]["intensity"]["max"] == 40.0
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_check_flags_mixed_geometry_and_non_hu_ct(data_prep, tmp_path):
    _write(tmp_path / "img/a.nii.gz", _ct(), (1.5, 1.5, 2.0))
    _write(tmp_path / "img/b.nii.gz", np.random.default_rng(0).random((24, 16, 12)).astype(np.float32), (0.8, 0.8, 2.0))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    _write(tmp_path / "img/c.nii.gz", _ct(), affine=flipped)
    report = data_prep.check(str(tmp_path / "img"))
    assert not report["consistent"]
    assert sorted(report["summary"]["orientation"]) == ["LAS", "RAS"]
    assert len(report["summary"]["shape"]) == 2 and len(report["summary"]["spacing"]) == 3
    assert any("b.nii.gz" in w and "Hounsfield" in w for w in report["warnings"])
    assert any("resample" in w for w in report["warnings"])
    assert (tmp_path / "img/data_check_report.json").is_file()


def test_check_refuses_bad_folders_naming_the_file(data_prep, tmp_path):
    with pytest.raises(ValueError, match="holds no NIfTI images"):
        data_prep.check(str(tmp_path))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz' cannot be read"):
        data_prep.check(str(tmp_path))
    (tmp_path / "broken.nii.gz").unlink()
    _write(tmp_path / "one.nii.gz", _ct())
    _write(tmp_path / "two.nii.gz", np.zeros((8, 8, 8, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"different channel counts.*1 channel\(s\): '.*one.nii.gz'.*2 channel\(s\): '.*two.nii.gz'"):
        data_prep.check(str(tmp_path))
    with pytest.raises(ValueError, match="different channel counts"):
        data_prep.datalist(str(tmp_path), str(tmp_path / "datalist.json"))


def test_resample_to_spacing_and_shape_images_linear_labels_nearest(data_prep, tmp_path):
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS input
    _write(tmp_path / "img/a.nii.gz", _ct((20, 20, 10), 100), affine=affine)
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[4:-4, 4:-4, 2:-2] = 200
    labels[6:10, 6:10, 3:6] = 1
    _write(tmp_path / "lab/a.nii.gz", labels, affine=affine)
    written = data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[2.0, 2.0, 2.0], shape=[16, 16, 8], label_dir=str(tmp_path / "lab"))
    assert written == [str(tmp_path / "out/images/a.nii.gz")]
    image, label = nib.load(written[0]), nib.load(str(tmp_path / "out/labels/a.nii.gz"))
    for volume in (image, label):
        assert volume.shape == (16, 16, 8)
        np.testing.assert_allclose(volume.header.get_zooms()[:3], [2.0, 2.0, 2.0])
        assert "".join(nib.aff2axcodes(volume.affine)) == "RAS"
    np.testing.assert_allclose(image.affine, label.affine)
    data = np.asarray(image.dataobj)
    assert image.get_data_dtype() == np.int16 and data.min() == -1000 and data.max() <= 100
    assert data[0, 0, 0] == -1000  # padded with air (the resampled field of view is 10 x 10 x 10 voxels)
    assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(label.dataobj))) == {0, 1, 200}


def test_resample_refuses_bad_inputs(data_prep, tmp_path):
    _write(tmp_path / "img/a.nii.gz", _ct())
    with pytest.raises(ValueError, match="spacing=\\[1.0, 0\\] is not allowed"):
        data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[1.0, 0])
    with pytest.raises(ValueError, match="has no label 'a.nii.gz'"):
        data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[1, 1, 1], label_dir=str(tmp_path / "missing"))
    _write(tmp_path / "lab/a.nii.gz", np.zeros((8, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="does not share the grid"):
        data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[1, 1, 1], label_dir=str(tmp_path / "lab"))
    assert not (tmp_path / "out").exists()


def test_datalist_folds_modality_and_regions(data_prep, tmp_path):
    for index in range(5):
        _write(tmp_path / "img" / f"case{index}.nii.gz", _ct())
    output = tmp_path / "lists/datalist.json"
    content = data_prep.datalist(str(tmp_path / "img"), str(output), num_folds=2, modality="mri_t1", top_region="chest", bottom_region="pelvis")
    items = content["training"]
    assert json.loads(output.read_text()) == content
    assert [item["image"] for item in items] == [f"../img/case{i}.nii.gz" for i in range(5)]
    assert sorted(item["fold"] for item in items) == [0, 0, 0, 1, 1]
    assert {item["modality"] for item in items} == {9}
    assert items[0]["top_region_index"] == [0, 1, 0, 0] and items[0]["bottom_region_index"] == [0, 0, 0, 1]
    again = data_prep.datalist(str(tmp_path / "img"), str(tmp_path / "again.json"), num_folds=2, modality="mri_t1")
    assert [i["fold"] for i in again["training"]] == [i["fold"] for i in items]  # deterministic under the seed
    with pytest.raises(ValueError, match="'belly' is not a body region"):
        data_prep.datalist(str(tmp_path / "img"), str(output), top_region="belly", bottom_region="pelvis")
    with pytest.raises(ValueError, match="num_folds=0"):
        data_prep.datalist(str(tmp_path / "img"), str(output), num_folds=0)
    with pytest.raises(ValueError, match="code 0"):
        data_prep.datalist(str(tmp_path / "img"), str(output), modality="unknown")


def test_datalist_regions_from_labels(data_prep, tmp_path):
    _write(tmp_path / "img/a.nii.gz", _ct())
    labels = np.zeros((20, 16, 12), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 28  # lung lobe: chest
    labels[8:10, 8:10, 8:10] = 1  # liver: abdomen
    _write(tmp_path / "lab/a.nii.gz", labels)
    content = data_prep.datalist(str(tmp_path / "img"), str(tmp_path / "d.json"), label_dir=str(tmp_path / "lab"), regions_from_labels=True)
    item = content["training"][0]
    assert item["label"] == "lab/a.nii.gz"
    assert item["top_region_index"] == [0, 1, 0, 0] and item["bottom_region_index"] == [0, 0, 1, 0]
    _write(tmp_path / "lab/a.nii.gz", np.zeros((20, 16, 12), dtype=np.uint8))
    with pytest.raises(ValueError, match="lab/a.nii.gz"):
        data_prep.datalist(str(tmp_path / "img"), str(tmp_path / "d.json"), label_dir=str(tmp_path / "lab"), regions_from_labels=True)


def test_sidecars_for_latents_from_other_tools(modules, tmp_path):
    data_prep, embeddings = modules
    latent = np.zeros((8, 6, 4, 4), dtype=np.float32)
    _write(tmp_path / "case_emb.nii.gz", latent, (6.0, 6.0, 8.0))
    written = data_prep.sidecars(str(tmp_path), modality="ct", top_region="chest", bottom_region="abdomen")
    assert written == [str(tmp_path / "case_emb.nii.gz.json")]
    assert embeddings.read_sidecar(tmp_path / "case_emb.nii.gz") == {
        "dim": [32, 24, 16],
        "spacing": [1.5, 1.5, 2.0],
        "modality": 1,
        "top_region_index": [0, 1, 0, 0],
        "bottom_region_index": [0, 0, 1, 0],
    }
    assert data_prep.sidecars(str(tmp_path)) == []  # existing sidecars are kept
    with pytest.raises(ValueError, match="holds no \\*_emb.nii.gz latents"):
        data_prep.sidecars(str(tmp_path / "empty"))


def test_fire_cli_from_the_bundle(tmp_path):
    _write(tmp_path / "img/a.nii.gz", _ct())
    command = [sys.executable, "-m", "scripts.data_prep", "check", str(tmp_path / "img"), "--report", str(tmp_path / "r.json"), "--intensity", "False"]
    result = subprocess.run(command, cwd=BUNDLES_DIR / "maisi_ct_generative", capture_output=True, text=True, check=True)
    assert "consistent=True" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 1
    missing = subprocess.run([*command[:4], str(tmp_path / "nothing")], cwd=BUNDLES_DIR / "maisi_ct_generative", capture_output=True, text=True)
    assert missing.returncode != 0 and "is not a folder" in missing.stderr


@pytest.mark.parametrize(("bundle", "modality", "pad", "code"), [(CT_BUNDLE, "ct", -1000, 1), (MR_BUNDLE, "mri_t1", 0, 9)])
def test_defaults_follow_the_bundle_modality(bundle, modality, pad, code, tmp_path):
    """Issue 9: every data_prep default follows the bundle's modality (configs/inference.json), e.g. the resample pad."""
    image = np.zeros((20, 16, 12), dtype=np.float32)  # MR-like: 0 background, 1 mm
    image[4:-4, 4:-4, 2:-2] = 300.0
    _write(tmp_path / "img/a.nii.gz", image)
    with bundle_scripts(bundle):
        data_prep = importlib.import_module("scripts.data_prep")
        assert data_prep.bundle_default("modality") == modality
        assert json.loads((bundle / "configs" / "inference.json").read_text())["modality"] == modality
        data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[1.0, 1.0, 1.0], shape=[24, 24, 12])
        content = data_prep.datalist(str(tmp_path / "img"), str(tmp_path / "d.json"), num_folds=1)
        check = data_prep.check(str(tmp_path / "img"), report=str(tmp_path / "r.json"))
    resampled = np.asarray(nib.load(str(tmp_path / "out/images/a.nii.gz")).dataobj)
    assert resampled[0, 0, 0] == pad and resampled[12, 12, 6] == 300.0
    assert content["training"][0]["modality"] == code
    # an image without air below -500 HU looks wrong only as CT
    assert any("Hounsfield" in w for w in check["warnings"]) == (modality == "ct")


def test_defaults_outside_a_bundle_name_the_missing_config(tmp_path):
    shutil.copytree(CT_BUNDLE / "scripts", tmp_path / "no_bundle" / "scripts")  # the scripts without a bundle around them
    with bundle_scripts(tmp_path / "no_bundle"):
        data_prep = importlib.import_module("scripts.data_prep")
        _write(tmp_path / "img/a.nii.gz", _ct())
        with pytest.raises(ValueError, match=r"modality is not given and .*configs/inference.json does not exist.*give --modality"):
            data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[1, 1, 1])
        data_prep.resample(str(tmp_path / "img"), str(tmp_path / "out"), spacing=[1, 1, 1], modality="mri")  # explicit works
        (tmp_path / "b/configs").mkdir(parents=True)
        (tmp_path / "b/configs/inference.json").write_text(json.dumps({"modality": "$@something"}))
        with pytest.raises(ValueError, match="holds no plain value"):
            data_prep.bundle_default("modality", bundle_root=tmp_path / "b")
    assert nib.load(str(tmp_path / "out/images/a.nii.gz")).shape == (20, 16, 12)
