"""Tests of the MAISI value checks and generation settings (settings, settings_ct, settings_mr, value_checks) and of the label constants."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from bundle_helpers import BUNDLES_DIR, REPO_ROOT, bundle_scripts

DATA = REPO_ROOT / "common" / "maisi" / "data"
LABEL_DICT_JSON = DATA / "label_dict.json"
MODALITY_JSON = DATA / "modality_mapping.json"

# A tiny synthetic candidate-mask database: liver/spleen masks over the abdomen, a colon tumour in
# abdomen-pelvis, a brain mask in the head, and a chest mask holding a lung tumour.
CANDIDATES = [
    {"label_list": [1, 3, 62], "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 1, 0]},
    {"label_list": [1, 27, 62, 93], "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 0, 1]},
    {"label_list": [22, 120], "top_region_index": [1, 0, 0, 0], "bottom_region_index": [1, 0, 0, 0]},
    {"label_list": [23, 28, 115], "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 1, 0, 0]},
]


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative") as package:
        yield package


_CHECK_MODULES = ("value_checks", "labels", "modality", "writers", "settings", "settings_ct", "mask_generation", "mask_database")


@pytest.fixture(scope="module")
def v(scripts):
    """The checks of every settings module in one namespace (they lived in one validation module before)."""
    namespace = {}
    for name in _CHECK_MODULES:
        module = importlib.import_module(f"scripts.{name}")
        namespace.update({k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    return SimpleNamespace(**namespace)


@pytest.fixture(scope="module")
def mr_settings():
    with bundle_scripts(BUNDLES_DIR / "maisi_mr_generative"):
        yield importlib.import_module("scripts.settings_mr")


@pytest.fixture(scope="module")
def constants(scripts):
    return importlib.import_module("scripts.constants")


@pytest.fixture(scope="module")
def label_dict(v):
    return v.load_label_dict(LABEL_DICT_JSON)


@pytest.fixture(scope="module")
def modality_mapping(v):
    return v.load_modality_mapping(MODALITY_JSON)


def _raises(*fragments: str):
    """``pytest.raises(ValueError)`` whose message must contain every fragment (literal text)."""
    return pytest.raises(ValueError, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --------------------------------------------------------------------------------------------------
# constants vs label_dict.json
# --------------------------------------------------------------------------------------------------


def test_constant_label_ids_exist_in_label_dict(constants, label_dict):
    ids = set(label_dict.values())
    dummy_ids = {label for name, label in label_dict.items() if name.startswith("dummy")}
    used = set(constants.TUMOR_LABELS.values())
    used |= {label for labels in constants.REGION_LABELS.values() for label in labels}
    used |= {label for labels in constants.QC_LABEL_GROUPS.values() for label in labels}
    used.add(constants.BODY_LABEL)
    assert used - ids == set()
    # REGION_LABELS' abdomen set keeps upstream's id 2, which is the placeholder "dummy1" in this label
    # dict ("kidney" in NV's CT-MR dict): it never occurs in a 132-label mask, so it is harmless.
    assert used & dummy_ids <= {2}
    assert max(ids) <= constants.MAX_CONTROLNET_LABEL
    assert label_dict["body"] == constants.BODY_LABEL


def test_constant_names_map_to_the_same_ids(constants, label_dict):
    for name, label in constants.TUMOR_LABELS.items():
        assert label_dict[name] == label, name
    assert set(constants.CONTROLLABLE_ANATOMIES) <= set(label_dict)
    assert set(constants.TUMOR_LABELS) <= set(constants.CONTROLLABLE_ANATOMIES)
    # single-organ QC groups are named after their label; the multi-label ones hold the expected names.
    for name, labels in constants.QC_LABEL_GROUPS.items():
        if len(labels) == 1:
            assert label_dict[name] == labels[0], name
    names = {label: name for name, label in label_dict.items()}
    assert {names[i] for i in constants.QC_LABEL_GROUPS["kidney"]} == {"left kidney", "right kidney"}
    assert all("lung" in names[i] and "lobe" in names[i] for i in constants.QC_LABEL_GROUPS["lung"])
    bone_words = ("vertebrae", "rib", "humerus", "scapula", "clavicula", "femur", "hip", "sacrum", "skull", "sternum")
    assert all(any(w in names[i] for w in bone_words) for i in constants.QC_LABEL_GROUPS["bone"])
    assert {names[i] for i in constants.REGION_LABELS[0]} == {"brain", "skull"}
    assert {names[i] for i in constants.REGION_LABELS[3]} == {"left femur", "right femur"}


def test_body_region_aliases_cover_the_regions(constants):
    assert sorted(set(constants.BODY_REGION_ALIASES.values())) == list(range(len(constants.BODY_REGIONS)))
    for index, name in enumerate(constants.BODY_REGIONS):
        assert constants.BODY_REGION_ALIASES[name] == index


# --------------------------------------------------------------------------------------------------
# data files
# --------------------------------------------------------------------------------------------------


def test_load_label_dict(v, label_dict, tmp_path):
    assert label_dict["liver"] == 1 and label_dict["body"] == 200 and len(label_dict) == 133
    with _raises("label_dict_json=", "missing.json", "does not exist"):
        v.load_label_dict(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with _raises("label_dict_json=", "bad.json", "not a readable JSON"):
        v.load_label_dict(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with _raises("label_dict_json=", "JSON object"):
        v.load_label_dict(tmp_path / "list.json")
    (tmp_path / "values.json").write_text(json.dumps({"liver": "1", "spleen": True}))
    with _raises("label_dict_json=", "'liver': '1'", "integers >= 1"):
        v.load_label_dict(tmp_path / "values.json")


def test_load_modality_mapping(v, modality_mapping):
    assert modality_mapping["unknown"] == 0 and modality_mapping["ct"] == 1 and modality_mapping["mri_t1"] == 9


# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------


def test_output_size_ct(v):
    assert v.check_output_size_ct([512, 512, 768]) == (512, 512, 768)
    assert v.check_output_size_ct((256, 256, 128)) == (256, 256, 128)
    with _raises("output_size=[256, 256, 177]", "z=177", "[128, 256, 384, 512, 640, 768]"):
        v.check_output_size_ct([256, 256, 177])
    with _raises("output_size=[256, 128, 256]", "x (256) and y (128) must be equal", "[256, 384, 512]"):
        v.check_output_size_ct([256, 128, 256])
    with _raises("output_size=[320, 320, 256]", "x/y=320", "[256, 384, 512]"):
        v.check_output_size_ct([320, 320, 256])  # a multiple of 16 is not enough
    for bad in ([256, 256], [256, 256, 256.0], "256", [256, True, 256], None):
        with _raises("output_size=", "3 integers"):
            v.check_output_size_ct(bad)


def test_spacing_ct(v):
    assert v.check_spacing_ct([1.5, 1.5, 2], [256, 256, 256]) == (1.5, 1.5, 2.0)
    assert v.check_spacing_ct([0.5, 0.5, 0.5], [512, 512, 512]) == (0.5, 0.5, 0.5)  # FOV exactly 256 mm
    with _raises("spacing=[1.0, 1.5, 1.0]", "x (1.0) and y (1.5) must be equal"):
        v.check_spacing_ct([1.0, 1.5, 1.0], [256, 256, 256])
    with _raises("spacing=[3.5, 3.5, 1.0]", "x/y=3.5", "[0.5, 3.0]"):
        v.check_spacing_ct([3.5, 3.5, 1.0], [256, 256, 256])
    with _raises("spacing=[0.4, 0.4, 1.0]", "x/y=0.4", "[0.5, 3.0]"):
        v.check_spacing_ct([0.4, 0.4, 1.0], [512, 512, 512])
    with _raises("spacing=[1.0, 1.0, 5.5]", "z=5.5", "[0.5, 5.0]"):
        v.check_spacing_ct([1.0, 1.0, 5.5], [256, 256, 256])
    with _raises("spacing=[1.0, 1.0, 0]", "finite numbers > 0"):
        v.check_spacing_ct([1.0, 1.0, 0], [256, 256, 256])
    with _raises("spacing=[1.0, 1.0, nan]", "finite numbers > 0"):
        v.check_spacing_ct([1.0, 1.0, float("nan")], [256, 256, 256])


def test_spacing_ct_field_of_view(v):
    with _raises("spacing=[0.75, 0.75, 1.0]", "output_size=[256, 256, 256]", "192 mm", "at least 256 mm", ">= 1 mm"):
        v.check_spacing_ct([0.75, 0.75, 1.0], [256, 256, 256])
    with _raises("field of view of 249.6 mm", ">= 0.6667 mm"):
        v.check_spacing_ct([0.65, 0.65, 1.0], [384, 384, 256])
    assert v.check_spacing_ct([0.6667, 0.6667, 1.0], [384, 384, 256])[0] == 0.6667


def test_output_size_mr(mr_settings):
    v = mr_settings
    for size in ([128, 128, 128], [512, 512, 128], [128, 256, 256], [256, 128, 256], [256, 256, 256]):
        assert v.check_output_size_mr(size) == tuple(size)
    with _raises("output_size=[256, 256, 192]", "z=192", "z=128:", "z=256:"):
        v.check_output_size_mr([256, 256, 192])
    with _raises("output_size=[512, 512, 256]", "x/y=[512, 512]", "[256, 256, 256]"):
        v.check_output_size_mr([512, 512, 256])
    with _raises("output_size=[128, 256, 128]", "x/y=[128, 256]"):
        v.check_output_size_mr([128, 256, 128])


def test_spacing_mr(mr_settings):
    v = mr_settings
    assert v.check_spacing_mr([1.25, 1.0, 1.0]) == (1.25, 1.0, 1.0)  # anisotropic x/y is fine for MR
    assert v.check_spacing_mr([0.4, 5.0, 0.4]) == (0.4, 5.0, 0.4)
    with _raises("spacing=[0.3, 1.0, 1.0]", "x=0.3", "[0.4, 5.0]"):
        v.check_spacing_mr([0.3, 1.0, 1.0])
    with _raises("spacing=[1.0, 1.0, 6]", "z=6.0", "[0.4, 5.0]"):
        v.check_spacing_mr([1.0, 1.0, 6])


# --------------------------------------------------------------------------------------------------
# body regions and anatomies
# --------------------------------------------------------------------------------------------------


def test_body_region(v):
    assert v.check_body_region(["abdomen"]) == [2]
    assert v.check_body_region(["Chest/Thorax", "pelvis/lower"]) == [1, 3]  # rejected by the model zoo
    assert v.check_body_region(["THORAX", "chest", " lower ", "head"]) == [0, 1, 3]
    assert v.check_body_region("abdomen") == [2]
    assert v.check_body_region([]) == []
    with _raises("body_region=['abdomn']", "'abdomn'", "Did you mean 'abdomen'?", "'chest/thorax'", "'pelvis/lower'"):
        v.check_body_region(["abdomn"])
    with _raises("body_region=['head_typo']", "Did you mean 'head'?"):
        v.check_body_region(["head_typo"])
    with _raises("body_region=['abdomen', 2]", "2 is not a body region"):
        v.check_body_region(["abdomen", 2])
    with _raises("body_region=", "must be a list"):
        v.check_body_region({"abdomen": 1})


def test_anatomy_list(v, label_dict):
    assert v.check_anatomy_list(["brain", "liver"], label_dict) == [22, 1]  # order kept
    assert v.check_anatomy_list(["Liver", "VERTEBRAE L5", 128], label_dict) == [1, 33, 128]
    assert v.check_anatomy_list([], label_dict) == []
    assert v.check_anatomy_list([129], label_dict) == [129]  # a placeholder id may carry a fine-tuned class
    with _raises("anatomy_list=['livr']", "'livr'", "Did you mean 'liver'?", "label_dict_json"):
        v.check_anatomy_list(["livr"], label_dict)
    with _raises("anatomy_list=['brain_typo']", "Did you mean 'brain'?"):
        v.check_anatomy_list(["brain_typo"], label_dict)
    with _raises("anatomy_list=['dummy1']", "'dummy1' is not an anatomy"):
        v.check_anatomy_list(["dummy1"], label_dict)
    with _raises("anatomy_list=[1, 999]", "999 is not a label id", "allowed ids"):
        v.check_anatomy_list([1, 999], label_dict)
    with _raises("anatomy_list=['liver', 'spleen', 'Liver']", "'Liver' repeats 'liver' (label 1)"):
        v.check_anatomy_list(["liver", "spleen", "Liver"], label_dict)
    with _raises("anatomy_list=['liver', 1]", "1 repeats 'liver'"):
        v.check_anatomy_list(["liver", 1], label_dict)
    with _raises("anatomy_list=[1.5]", "neither an anatomy name nor an integer id"):
        v.check_anatomy_list([1.5], label_dict)


def _candidates(v, entries):
    return [
        v.Candidate(
            filename=f"mask{i}.nii.gz",
            folder=Path("masks"),
            spacing=(1.5, 1.5, 2.0),
            dim=(256, 256, 128),
            label_ids=frozenset(e["label_list"]),
            top_region=v._one_hot_index(e.get("top_region_index"), "top_region_index", i),
            bottom_region=v._one_hot_index(e.get("bottom_region_index"), "bottom_region_index", i),
        )
        for i, e in enumerate(entries)
    ]


def test_anatomy_in_database(v, label_dict):
    names = {label: name for name, label in label_dict.items()}
    candidates = _candidates(v, CANDIDATES)
    # the second liver mask holds a colon tumour (27) that is not requested, so it is not used
    assert v.filter_candidates(candidates, [1], [2]) == candidates[:1]
    assert v.filter_candidates(candidates, [1, 27], [2, 3]) == [candidates[1]]
    v.check_anatomy_in_database([1], [2], candidates, names)
    v.check_anatomy_in_database([], [0], candidates, names)
    # anatomy not in the requested region: the message says where the database has it
    with _raises("anatomy_list=['colon cancer primaries']", "body_region=['head']", "'colon cancer primaries' (27): abdomen, pelvis"):
        v.check_anatomy_in_database([27], [0], candidates, names)
    # each anatomy exists, but never together in one mask over the chest
    with _raises("anatomy_list=['spleen', 'heart']", "body_region=['chest']", "'spleen' (3): abdomen", "'heart' (115): no mask at all"):
        v.check_anatomy_in_database([3, 115], [1], candidates, names)
    # the only chest mask holds a lung tumour that was not requested: it is skipped
    with _raises("anatomy_list=[28]", "body_region=['chest']", "tumour that is not in anatomy_list", "28: no mask at all"):
        v.check_anatomy_in_database([28], [1], candidates, {})
    v.check_anatomy_in_database([28, 23], [1], candidates, names)
    # an entry without region information is not filtered on regions, and is named as such
    no_regions = _candidates(v, [{"label_list": [1, 3]}])
    v.check_anatomy_in_database([3], [0, 1, 2, 3], no_regions, names)
    with _raises("'spleen' (3): no mask at all (and masks without region information)"):
        v.check_anatomy_in_database([3, 27], [2], no_regions, names)
    # reversed top/bottom still spans the regions in between
    reversed_span = _candidates(v, [{"label_list": [1], "top_region_index": [0, 0, 0, 1], "bottom_region_index": [0, 1, 0, 0]}])
    v.check_anatomy_in_database([1], [2], reversed_span, names)
    with _raises("candidate-mask database entry 0", "top_region_index"):
        _candidates(v, [{"label_list": [1], "top_region_index": [0, 0, 0, 0], "bottom_region_index": [0, 0, 1, 0]}])


def test_controllable_anatomy_size(v):
    assert v.check_controllable_anatomy_size([]) == []
    assert v.check_controllable_anatomy_size([["Liver", 0.5], ["hepatic tumor", 0.3], ["colon", -1], ["stomach", 1]]) == [
        ("liver", 0.5),
        ("hepatic tumor", 0.3),
        ("colon", -1.0),
        ("stomach", 1.0),
    ]
    with _raises("controllable_anatomy_size=", "2 tumours", "'hepatic tumor'", "'lung tumor'", "at most one"):
        v.check_controllable_anatomy_size([["hepatic tumor", 0.3], ["liver", 0.5], ["lung tumor", 0.2]])
    eleven = [[name, 0.5] for name in ["liver"] * 11]
    with _raises("controllable_anatomy_size has 11 entries", "at most 10"):
        v.check_controllable_anatomy_size(eleven)
    with _raises("'livr' is not a controllable anatomy", "Did you mean 'liver'?", "'gallbladder'"):
        v.check_controllable_anatomy_size([["livr", 0.5]])
    with _raises("'spleen' is not a controllable anatomy", "Allowed:"):
        v.check_controllable_anatomy_size([["spleen", 0.5]])
    for size in (1.5, -0.5, float("nan"), "0.5", True):
        with _raises("controllable_anatomy_size=", "must be in [0, 1] or exactly -1"):
            v.check_controllable_anatomy_size([["liver", size]])
    with _raises("'liver' is given twice"):
        v.check_controllable_anatomy_size([["liver", 0.5], ["LIVER", 0.2]])
    with _raises("must be a [name, size] pair"):
        v.check_controllable_anatomy_size([["liver", 0.5, 1]])


# --------------------------------------------------------------------------------------------------
# modality, knobs, outputs
# --------------------------------------------------------------------------------------------------


def test_resolve_modality(v, modality_mapping):
    assert v.resolve_modality("ct", modality_mapping, "ct") == 1
    assert v.resolve_modality("CT_Contrast", modality_mapping, "ct") == 3
    assert v.resolve_modality(2, modality_mapping, "ct") == 2
    assert v.resolve_modality("mri_t1", modality_mapping, "mr") == 9
    assert v.resolve_modality(33, modality_mapping, "mr") == 33
    assert v.resolve_modality("9", modality_mapping, "mr") == 9


def test_modality_ct_vs_mr(v, modality_mapping):
    with _raises("modality='mri_t1' (mri_t1, code 9) is an MR modality", "CT generation", "maisi_mr_generative", "ct (1)"):
        v.resolve_modality("mri_t1", modality_mapping, "ct")
    with _raises("modality=10", "is an MR modality", "ct_wo_contrast (2)"):
        v.resolve_modality(10, modality_mapping, "ct")
    with _raises("modality='ct' (ct, code 1) is a CT modality", "MR generation", "maisi_ct_generative", "mri_t1 (9)"):
        v.resolve_modality("ct", modality_mapping, "mr")
    with _raises("modality=3", "is a CT modality", "mri_flair (11)"):
        v.resolve_modality(3, modality_mapping, "mr")
    with _raises("modality='unknown'", "code 0", "unconditional"):
        v.resolve_modality("unknown", modality_mapping, "ct")
    with _raises("modality=0", "code 0"):
        v.resolve_modality(0, modality_mapping, "mr")
    with _raises("modality='mri_t11'", "Did you mean 'mri_t1'?", "Allowed (MR)"):
        v.resolve_modality("mri_t11", modality_mapping, "mr")
    with _raises("modality=5", "not a code", "allowed (CT): ct (1)"):
        v.resolve_modality(5, modality_mapping, "ct")
    with _raises("modality=1.0", "name or an integer code"):
        v.resolve_modality(1.0, modality_mapping, "ct")
    with _raises("allowed='xr'"):
        v.resolve_modality("ct", modality_mapping, "xr")


def test_cfg_and_steps(v):
    assert v.check_cfg_guidance_scale(0) == 0.0 and v.check_cfg_guidance_scale(15) == 15.0
    for bad in (-0.1, float("inf"), "2", None):
        with _raises("cfg_guidance_scale=", ">= 0"):
            v.check_cfg_guidance_scale(bad)
    assert v.check_num_steps("num_inference_steps", 30, 1000) == 30
    for bad in (0, 1001, 30.0, True, None):
        with _raises("num_inference_steps=", "[1, 1000]"):
            v.check_num_steps("num_inference_steps", bad, 1000)


def test_decode_settings(v):
    assert v.check_decode_settings([48, 48, 64], 0.6666, 4, 2.5) == v.DecodeSettings((48, 48, 64), 0.6666, 4, 2.5)
    assert v.check_decode_settings(None, 0, None, None) == v.DecodeSettings(None, 0.0, None, None)
    with _raises("autoencoder_sliding_window_infer_size=[48, 48]", "3 integers"):
        v.check_decode_settings([48, 48], 0.5, 4, None)
    with _raises("autoencoder_sliding_window_infer_size=[48, 0, 48]"):
        v.check_decode_settings([48, 0, 48], 0.5, 4, None)
    for overlap in (1.0, -0.1, None):
        with _raises("autoencoder_sliding_window_infer_overlap=", "[0, 1)"):
            v.check_decode_settings([48, 48, 48], overlap, 4, None)
    for splits in (0, 2.0, "4"):
        with _raises("autoencoder_tp_num_splits=", "integer >= 1", "or null"):
            v.check_decode_settings([48, 48, 48], 0.5, splits, None)
    for budget in (0, -1, "2", float("nan")):
        with _raises("memory_budget_gb=", "> 0 or null"):
            v.check_decode_settings(None, 0.5, None, budget)


def test_output_ext(v, monkeypatch):
    assert v.check_output_ext("image_output_ext", ".nii.gz") == ".nii.gz"
    assert v.check_output_ext("image_output_ext", "NII") == ".nii"
    for bad in (".png", ".jpg", "", None, ".seg"):
        with _raises("image_output_ext=", "'.nii.gz'", "'.nrrd': 'itk'"):
            v.check_output_ext("image_output_ext", bad)
    writers = importlib.import_module("scripts.writers")
    monkeypatch.setattr(writers, "_backend_available", lambda module: module == "nibabel")
    with _raises("label_output_ext='.nrrd'", "'itk' package", "not installed", "['.nii.gz', '.nii']"):
        writers.check_output_ext("label_output_ext", ".nrrd")
    with _raises("label_output_ext='.mha'", "'itk' package"):
        writers.check_output_ext("label_output_ext", ".mha")
    monkeypatch.setattr(writers, "_backend_available", lambda module: True)
    assert writers.check_output_ext("label_output_ext", ".nrrd") == ".nrrd"
    assert writers.check_output_ext("label_output_ext", "MHA") == ".mha"
    assert writers.check_output_ext("image_output_ext", "DCM") == ".dcm"  # a DICOM series (dicom.py)
    monkeypatch.setattr(writers, "_backend_available", lambda module: module != "highdicom")
    with _raises("image_output_ext='.dcm'", "needs highdicom", "pip install highdicom"):
        writers.check_output_ext("image_output_ext", ".dcm")


def test_output_ext_matches_monai_writers(v):
    """Every allowed extension is one MONAI's SaveImage resolves to a 3D-capable writer."""
    from monai.data import image_writer

    if not image_writer.SUPPORTED_WRITERS:
        image_writer.init()
    three_d = {image_writer.NibabelWriter, image_writer.ITKWriter}
    for ext in v.OUTPUT_EXT_BACKENDS:
        key = ext.lstrip(".")
        writers = image_writer.SUPPORTED_WRITERS.get(key) or image_writer.SUPPORTED_WRITERS[image_writer.EXT_WILDCARD]
        assert set(writers) & three_d, ext
