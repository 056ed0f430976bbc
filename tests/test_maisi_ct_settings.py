"""CT generation settings: every request checked before any weight loads (torch.load raises in these tests)."""

from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
OUTPUT_SIZE = [256, 256, 128]
SPACING = [1.5, 1.5, 2.0]


def _write_mask(path, labelled_boxes, shape=OUTPUT_SIZE, spacing=SPACING, dtype=np.uint8):
    mask = np.zeros(shape, dtype=dtype)
    for label, box in labelled_boxes:
        mask[box] = label
    nib.save(nib.Nifti1Image(mask, np.diag([*spacing, 1.0])), str(path))


BODY_LIVER_SPLEEN = [(200, np.s_[20:-20, 20:-20, :]), (1, np.s_[60:120, 60:120, 30:90]), (3, np.s_[140:190, 60:120, 30:60])]


@pytest.fixture
def workspace(tmp_path):
    """A database of one abdomen mask (liver, spleen, body), zipped, and weight files that must never be read."""
    masks = tmp_path / "masks"
    masks.mkdir()
    _write_mask(masks / "case0.nii.gz", BODY_LIVER_SPLEEN)
    entry = {"pseudo_label_filename": "case0.nii.gz", "spacing": SPACING, "dim": OUTPUT_SIZE, "label_list": [1, 3, 200],
             "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 1, 0]}  # fmt: skip
    (tmp_path / "database.json").write_text(json.dumps([entry]))
    for name in ("autoencoder.pt", "unet.pt", "controlnet.pt"):
        (tmp_path / name).write_bytes(b"never read")
    return tmp_path


def _overrides(root, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "output_dir": str(root / "out"),
        "output_size": OUTPUT_SIZE,
        "spacing": SPACING,
        "all_mask_files_json": str(root / "database.json"),
        "all_mask_files_base_dir": str(root / "masks"),
        "trained_autoencoder_path": str(root / "autoencoder.pt"),
        "trained_diffusion_path": str(root / "unet.pt"),
        "trained_controlnet_path": str(root / "controlnet.pt"),
        "progress": False,
        **extra,
    }


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: the checks must all come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a weight file was opened before the checks finished")

    monkeypatch.setattr(torch, "load", refuse)


def _initialize(overrides, configs=("inference.json",)):
    with bundle_scripts(BUNDLE):
        parser = parse_bundle_config(BUNDLE, list(configs), overrides)
        parser.get_parsed_content("initialize")
        return parser.get_parsed_content("settings")


def _chain(error):
    """An exception and its causes (MONAI wraps what a config component raises in a RuntimeError)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _refused(overrides, *fragments, configs=("inference.json",), error=ValueError):
    with pytest.raises(Exception) as raised:
        _initialize(overrides, configs)
    assert any(isinstance(e, error) for e in _chain(raised.value)), raised.value
    text = "\n".join(str(e) for e in _chain(raised.value))
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert "torch.load was called" not in text
    return text


def test_database_request_checked_and_normalised(workspace, no_weights):
    settings = _initialize(_overrides(workspace, body_region=["Abdomen"], anatomy_list=["liver", "Spleen"]))
    (request,) = settings.requests
    assert request.mask_source == "database" and request.region_indices == (2,) and request.anatomy_ids == (1, 3)
    assert request.request_id == "sample" and request.seed == 0 and request.num_samples == 1
    assert settings.modality == 1 and settings.num_inference_steps == 30 and settings.decode.num_splits is None
    assert set(settings.files.files) == {
        "trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path", "real_img_median_statistics",
        "all_mask_files_json", "all_mask_files_base_dir",
    }  # fmt: skip
    report = settings.to_dict()
    assert report["requests"][0]["anatomy_ids"] == [1, 3] and report["version"] == "rflow-ct"
    assert json.loads(json.dumps(report)) == report  # plain JSON


def test_no_candidate_mask_for_anatomy_and_region(workspace, no_weights):
    _refused(
        _overrides(workspace, body_region=["chest"], anatomy_list=["liver"]),
        "anatomy_list=['liver']", "body_region=['chest']", "'liver' (1): abdomen",
    )


def test_missing_mask_folder_and_zip(workspace, no_weights):
    _refused(
        _overrides(workspace, all_mask_files_base_dir=str(workspace / "absent_masks")),
        "all_mask_files_base_dir=", "absent_masks", "python -m scripts.download", error=FileNotFoundError,
    )


def test_zipped_mask_folder_is_checked_then_unpacked_before_weights(workspace, no_weights, caplog):
    with zipfile.ZipFile(workspace / "zipped.zip", "w") as archive:
        archive.write(workspace / "masks" / "case0.nii.gz", "zipped/case0.nii.gz")
    with caplog.at_level("WARNING"):
        _initialize(_overrides(workspace, all_mask_files_base_dir=str(workspace / "zipped")))
    assert "will be unpacked from" in caplog.text
    assert (workspace / "zipped" / "case0.nii.gz").is_file()  # unpacked by initialize, no weight loaded


def test_database_and_mask_folder_of_different_releases(workspace, no_weights):
    entries = json.loads((workspace / "database.json").read_text())
    entries.append({**entries[0], "pseudo_label_filename": "case_from_3000.nii.gz"})
    (workspace / "database_3000.json").write_text(json.dumps(entries))
    _refused(
        _overrides(workspace, all_mask_files_json=str(workspace / "database_3000.json")),
        "all_mask_files_json=", "1 mask file(s)", "case_from_3000.nii.gz", "different releases",
    )
    with zipfile.ZipFile(workspace / "masks_zip.zip", "w") as archive:  # checked against the zip's members alone
        archive.write(workspace / "masks" / "case0.nii.gz", "case0.nii.gz")
    _refused(
        _overrides(workspace, all_mask_files_json=str(workspace / "database_3000.json"), all_mask_files_base_dir=str(workspace / "masks_zip")),
        "case_from_3000.nii.gz",
    )
    assert not (workspace / "masks_zip").exists()  # refused without unpacking


def test_user_mask_ids_above_255(workspace, no_weights):
    _write_mask(workspace / "mask300.nii.gz", [*BODY_LIVER_SPLEEN, (300, np.s_[100:110, 100:110, 100:110])], dtype=np.int16)
    _refused(
        _overrides(workspace, mask_path=str(workspace / "mask300.nii.gz")),
        "mask_path=", "mask300.nii.gz", "label ids above 255: 300", "scripts.data_prep remap",
    )


def test_ddpm_user_mask_without_region_labels(workspace, no_weights):
    _write_mask(workspace / "no_regions.nii.gz", [(200, np.s_[20:-20, 20:-20, :]), (62, np.s_[140:190, 60:120, 30:60])])  # body, colon
    overrides = _overrides(workspace, mask_path=str(workspace / "no_regions.nii.gz"))
    _refused(overrides, "mask_path=", "version='ddpm-ct'", "body regions", configs=("inference.json", "inference_ddpm_ct.json"))
    _initialize(overrides)  # rflow-ct needs no region labels


def test_user_mask_without_foreground_at_the_geometry(workspace, no_weights):
    _write_mask(workspace / "empty.nii.gz", [])
    _refused(_overrides(workspace, mask_path=str(workspace / "empty.nii.gz")), "mask_path=", "no foreground label")


def test_missing_weights_listed_with_the_download_command(workspace, no_weights):
    _refused(
        _overrides(workspace, trained_controlnet_path=str(workspace / "absent.pt")),
        "trained_controlnet_path=", "absent.pt", "python -m scripts.download", error=FileNotFoundError,
    )
    text = _refused(
        {"bundle_root": str(BUNDLE), "model_dir": str(workspace / "no_models"), "dataset_dir": str(workspace / "no_data"), "output_dir": str(workspace / "out")},
        "missing file(s): trained_autoencoder_path=", error=FileNotFoundError,
    )
    assert "trained_controlnet_path=" in text and "all_mask_files_json=" in text and "all_mask_files_base_dir=" in text


def test_user_mask_files_are_checked(workspace, no_weights):
    fractional = np.zeros((8, 8, 8), dtype=np.float32)
    fractional[2:4, 2:4, 2:4] = 1.5
    nib.save(nib.Nifti1Image(fractional, np.eye(4)), str(workspace / "fractional.nii.gz"))
    _refused(_overrides(workspace, mask_path=str(workspace / "fractional.nii.gz")), "mask_path=", "non-integer or negative values")
    _refused(_overrides(workspace, mask_path=str(workspace / "absent.nii.gz")), "mask_path=", "does not exist")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ({"version": "rflow-cr"}, ["version='rflow-cr'", "Did you mean 'rflow-ct'?"]),
        ({"output_size": [256, 384, 256]}, ["output_size=[256, 384, 256]", "must be equal"]),
        ({"spacing": [1.5, 1.5, 9.0]}, ["spacing=[1.5, 1.5, 9.0]", "z=9.0"]),
        ({"controllable_anatomy_size": [["hepatic tumor", 0.3], ["bone lesion", 0.2]]}, ["2 tumours"]),
        ({"controllable_anatomy_size": [["liver", 0.5]] * 11}, ["controllable_anatomy_size has 11 entries"]),
        ({"controllable_anatomy_size": [["liver", 1.5]]}, ["must be in [0, 1] or exactly -1"]),
        ({"output_size": [256, 256, 177]}, ["output_size=[256, 256, 177]", "z=177"]),
        ({"spacing": [0.75, 0.75, 1.0]}, ["spacing=[0.75, 0.75, 1.0]", "field of view"]),
        ({"body_region": ["abdomn"]}, ["body_region=['abdomn']", "Did you mean 'abdomen'?"]),
        ({"anatomy_list": ["livr"]}, ["anatomy_list=['livr']", "Did you mean 'liver'?"]),
        ({"modality": "mri_t2"}, ["modality='mri_t2'", "an MR modality", "maisi_mr_generative"]),
        ({"num_inference_steps": 0}, ["num_inference_steps=0", "[1, 1000]"]),
        ({"cfg_guidance_scale": -1}, ["cfg_guidance_scale=-1"]),
        ({"autoencoder_tp_num_splits": 0}, ["autoencoder_tp_num_splits=0", "or null to let the planner choose"]),
        ({"memory_budget_gb": 0}, ["memory_budget_gb=0"]),
        ({"quality_check_max_attempts": 0}, ["quality_check_max_attempts=0"]),
        ({"num_output_samples": 0}, ["num_output_samples=0"]),
        ({"random_seed": -1}, ["random_seed=-1"]),
        ({"image_output_ext": ".png"}, ["image_output_ext='.png'"]),
        ({"overwrite": "yes"}, ["overwrite='yes'", "true or false"]),
        ({"controllable_anatomy_size": [["livr", 0.5]]}, ["'livr' is not a controllable anatomy"]),
        ({"image_only": True, "mask_path": "x.nii.gz"}, ["mask_path='x.nii.gz' is not allowed with image_only=true"]),
        ({"request_manifest": "m.json", "mask_dir": "d"}, ["request_manifest and mask_dir are both set"]),
    ],
)
def test_bad_ids_refused_before_weights(workspace, no_weights, extra, fragments):
    _refused(_overrides(workspace, **{"body_region": ["abdomen"], "anatomy_list": ["liver"], **extra}), *fragments)


def test_ddpm_image_only_refused(workspace, no_weights):
    _refused(_overrides(workspace, image_only=True), "image_only=true is not allowed with version='ddpm-ct'",
             configs=("inference.json", "inference_ddpm_ct.json"))  # fmt: skip


def test_manifest_rows_are_checked_with_row_and_field(workspace, no_weights):
    _write_mask(workspace / "user.nii.gz", BODY_LIVER_SPLEEN)
    rows = [
        {"id": "db", "body_region": ["abdomen"], "anatomy_list": ["spleen"], "num_samples": 2},
        {"id": "user", "mask_path": str(workspace / "user.nii.gz"), "seed": 7},
        {"controllable_anatomy_size": [["liver", 0.5]], "output_size": [512, 512, 256], "spacing": [1.0, 1.0, 1.5]},
    ]
    (workspace / "manifest.json").write_text(json.dumps(rows))
    extra = {
        "trained_mask_generation_autoencoder_path": str(workspace / "autoencoder.pt"),
        "trained_mask_generation_diffusion_path": str(workspace / "unet.pt"),
        "all_anatomy_size_condtions_json": str(workspace / "database.json"),
    }
    settings = _initialize(_overrides(workspace, request_manifest=str(workspace / "manifest.json"), random_seed=10, **extra))
    assert [r.request_id for r in settings.requests] == ["db", "user", "request002"]
    assert [r.mask_source for r in settings.requests] == ["database", "user", "generated"]
    assert [r.seed for r in settings.requests] == [10, 7, 13]  # default: random_seed + the samples before the row
    assert [t.stem for t in settings.tasks()] == ["db_0000_seed10", "db_0001_seed11", "user_0000_seed7", "request002_0000_seed13"]
    assert settings.requests[2].output_size == (512, 512, 256)

    rows[1]["mask_path"] = str(workspace / "missing.nii.gz")
    (workspace / "bad.json").write_text(json.dumps(rows))
    _refused(_overrides(workspace, request_manifest=str(workspace / "bad.json"), **extra), "request_manifest row 1", "mask_path=", "missing.nii.gz")
    (workspace / "typo.json").write_text(json.dumps([{"ouput_size": [256, 256, 128]}]))
    _refused(_overrides(workspace, request_manifest=str(workspace / "typo.json")), "request_manifest row 0", "unknown field(s) ['ouput_size']")
    (workspace / "bad_size.csv").write_text("id,output_size,body_region,anatomy_list\nfirst,\"[256,256,128]\",abdomen,liver\nsecond,\"[256,256,100]\",abdomen,liver\n")
    _refused(_overrides(workspace, request_manifest=str(workspace / "bad_size.csv")), "request_manifest row 1", "output_size=[256, 256, 100]")


def test_csv_manifest_and_mask_dir(workspace, no_weights):
    (workspace / "manifest.csv").write_text(
        "id,body_region,anatomy_list,num_samples,seed\nliver_spleen,abdomen,liver;spleen,3,\nliver,abdomen,liver,,100\n"
    )
    settings = _initialize(_overrides(workspace, request_manifest=str(workspace / "manifest.csv")))
    assert [(r.request_id, r.anatomy_ids, r.num_samples, r.seed) for r in settings.requests] == [("liver_spleen", (1, 3), 3, 0), ("liver", (1,), 1, 100)]
    folder = workspace / "user_masks"
    folder.mkdir()
    for name in ("b case.nii.gz", "a.nii"):
        _write_mask(folder / name, BODY_LIVER_SPLEEN)
    (folder / "notes.txt").write_text("not a mask")
    settings = _initialize(_overrides(workspace, mask_dir=str(folder), num_output_samples=2))
    assert [(r.request_id, r.mask_source, r.num_samples) for r in settings.requests] == [("a", "user", 2), ("b_case", "user", 2)]
    assert "all_mask_files_json" not in settings.files  # no database request, no database file needed


def test_output_dir_of_another_run_is_refused(workspace, no_weights):
    overrides = _overrides(workspace, body_region=["abdomen"], anatomy_list=["liver"])
    settings = _initialize(overrides)
    task = settings.tasks()[0]
    settings.store.output_dir.mkdir(parents=True)
    settings.store.write_record(task, settings.fingerprint(settings.requests[0]), {"seed": 0, "mask_source": "x"})
    _initialize(overrides)  # the same settings: a restart resumes
    _refused({**overrides, "num_inference_steps": 5}, "output_dir=", "holds the outputs of another run", "made with other settings", "overwrite=true")
    _refused({**overrides, "random_seed": 3}, "sample_0000_seed0 (a sample this run does not make)")
    _initialize({**overrides, "num_inference_steps": 5, "overwrite": True})  # refused no longer; the run deletes them first
