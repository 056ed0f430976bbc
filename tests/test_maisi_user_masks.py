"""
Masks users bring (issue 13): body envelope (scripts.body_mask), label remapping (scripts.label_remap), the
generation-time mask checks (scripts.mask_checks) and their data_prep commands, on a synthetic CT/MR with a
scanner table (demo/mask_phantom.py). Run against the CT bundle's byte copy of common/maisi (the commands'
defaults come from the bundle's configs/inference.json).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing
from scipy import ndimage

from bundle_helpers import BUNDLES_DIR, bundle_scripts
from demo.mask_phantom import ORGANS, make_phantom

CT_BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
SPACING = (4.0, 4.0, 5.0)
SHAPE = (96, 96, 48)


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(CT_BUNDLE):
        yield {name: importlib.import_module(f"scripts.{name}") for name in ("body_mask", "label_remap", "mask_checks", "data_prep", "labels")}


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, SPACING, seed=0)


@pytest.fixture(scope="module")
def label_dict(scripts):
    return scripts["labels"].load_label_dict(CT_BUNDLE / "configs" / "label_dict.json")


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# Body envelope
# ---------------------------------------------------------------------------------------------------------------


def test_ct_envelope_covers_the_body_and_leaves_the_table_out(scripts, phantom):
    envelope = scripts["body_mask"].image_envelope(phantom.ct, phantom.affine, "ct")
    assert envelope.mask.dtype == bool and envelope.mask.shape == SHAPE and envelope.threshold == -500.0
    assert _dice(envelope.mask, phantom.body) > 0.98
    assert np.count_nonzero(phantom.body & ~envelope.mask) < 0.002 * np.count_nonzero(phantom.body)
    # lungs (air inside the body) are filled; the rails, the clip and the plate beyond the contact are left out
    lungs = np.isin(phantom.maisi_labels, [29, 32])
    assert lungs.any() and envelope.mask[lungs].all()
    near_body = ndimage.binary_dilation(phantom.body, iterations=3)  # the documented band under a wide contact (<= opening_mm)
    assert not (envelope.mask & ~near_body).any()
    assert np.count_nonzero(envelope.mask & phantom.table) < 0.15 * np.count_nonzero(phantom.table)
    assert envelope.removed_voxels == np.count_nonzero((phantom.ct > -500) & ~envelope.mask)
    without_opening = scripts["body_mask"].image_envelope(phantom.ct, phantom.affine, "ct", opening_mm=0)
    assert np.count_nonzero(without_opening.mask & phantom.table) > 0.5 * np.count_nonzero(phantom.table)  # the opening is what cuts the plate


def test_mr_envelope_on_a_synthetic_mr(scripts, phantom):
    envelope = scripts["body_mask"].image_envelope(phantom.mr, phantom.affine, "mr")
    reference = np.percentile(phantom.mr, 99)
    assert envelope.threshold == pytest.approx(0.1 * reference, rel=0.02)
    assert _dice(envelope.mask, phantom.body) > 0.98
    assert envelope.mask[np.isin(phantom.maisi_labels, [29, 32])].all()  # dark lungs filled
    with pytest.raises(ValueError, match="no voxel is above the CT body threshold"):
        scripts["body_mask"].image_envelope(np.full(SHAPE, -1000.0), phantom.affine, "ct")
    with pytest.raises(ValueError, match="modality_family='pet' is not allowed"):
        scripts["body_mask"].image_envelope(phantom.mr, phantom.affine, "pet")


def test_fill_holes_slice_by_slice_includes_the_end_slices(scripts):
    ring = np.zeros((9, 9, 3), dtype=bool)
    ring[2:7, 2:7, :] = True
    ring[4, 4, :] = False  # a hole in every slice, the first and last included
    filled = scripts["body_mask"].fill_holes_per_slice(ring, axis=2)
    assert filled[4, 4, :].all() and np.count_nonzero(filled) == 75
    open_slice = ring.copy()
    open_slice[4, 2:5, 1] = False  # a channel to the border in slice 1: that slice's hole stays open
    assert scripts["body_mask"].fill_holes_per_slice(open_slice, axis=2)[4, 4].tolist() == [True, False, True]


def test_labels_envelope_is_an_approximation_with_the_documented_margin(scripts, phantom):
    bm = scripts["body_mask"]
    envelope = bm.labels_envelope(phantom.maisi_labels, phantom.affine, margin_mm=15.0, bridge_mm=30.0)
    labelled = phantom.maisi_labels > 0
    assert envelope.mask[labelled].all() and envelope.threshold is None
    # along x through the liver centre, the envelope reaches about margin_mm beyond the liver (square footprints)
    liver = phantom.maisi_labels == 1
    zc = int(np.argmax(liver.sum(axis=(0, 1))))
    row = int(np.argmax(liver[:, :, zc].sum(axis=0)))
    beyond = (np.nonzero(envelope.mask[:, row, zc])[0].max() - np.nonzero(liver[:, row, zc])[0].max()) * SPACING[0]
    assert 15.0 - SPACING[0] <= beyond <= 15.0 + SPACING[0]
    # the gap between the lungs (50 mm < 2 x bridge_mm) is bridged
    lungs = np.isin(phantom.maisi_labels, [29, 32])
    zl = int(np.argmax(lungs.sum(axis=(0, 1))))
    assert envelope.mask[SHAPE[0] // 2, int(np.argmax(lungs[:, :, zl].sum(axis=0))), zl]
    with pytest.raises(ValueError, match="margin_mm <= bridge_mm"):
        bm.labels_envelope(phantom.maisi_labels, phantom.affine, margin_mm=40.0, bridge_mm=30.0)
    with pytest.raises(ValueError, match="no labelled voxel"):
        bm.labels_envelope(np.zeros(SHAPE, np.uint8), phantom.affine)


def test_add_body_label_keeps_every_label(scripts, phantom):
    bm = scripts["body_mask"]
    envelope = phantom.body
    result = bm.add_body_label(phantom.maisi_labels, envelope)
    organs = phantom.maisi_labels > 0
    np.testing.assert_array_equal(result[organs], phantom.maisi_labels[organs])
    assert (result[envelope & ~organs] == 200).all() and (result[~envelope & ~organs] == 0).all()
    assert result.dtype == np.uint8
    assert bm.add_body_label(phantom.maisi_labels.astype(np.int8), envelope).dtype == np.int16  # int8 cannot hold 200
    only = bm.add_body_label(None, envelope)
    assert only.dtype == np.uint8 and set(np.unique(only)) == {0, 200}


def test_body_mask_command_through_fire(scripts, phantom, tmp_path, caplog):
    """The CLI: new files in a new folder (inputs unchanged), labels kept, 200 added, a report; refusals."""
    data_prep = scripts["data_prep"]
    _save(tmp_path / "img/case.nii.gz", phantom.ct, phantom.affine)
    _save(tmp_path / "lab/case.nii.gz", phantom.maisi_labels, phantom.affine)
    before = {**_digest(tmp_path / "img"), **_digest(tmp_path / "lab")}
    data_prep.main(["body_mask", str(tmp_path / "img"), str(tmp_path / "out"), "--label_dir", str(tmp_path / "lab")])
    assert {**_digest(tmp_path / "img"), **_digest(tmp_path / "lab")} == before
    written = nib.load(str(tmp_path / "out/case.nii.gz"))
    np.testing.assert_allclose(written.affine, phantom.affine)
    result = np.asarray(written.dataobj)
    organs = phantom.maisi_labels > 0
    np.testing.assert_array_equal(result[organs], phantom.maisi_labels[organs])
    body = result == 200
    assert _dice(body | organs, phantom.body) > 0.98 and np.count_nonzero(body & phantom.table) < 0.15 * np.count_nonzero(phantom.table)
    report = json.loads((tmp_path / "out/body_mask_report.json").read_text())
    entry = report["files"][0]
    voxel_ml = np.prod(SPACING) / 1000.0
    assert report["method"] == "image" and report["modality_family"] == "ct" and report["approximation"] is False
    assert entry["body_label_added_ml"] == pytest.approx(np.count_nonzero(body) * voxel_ml, abs=0.01)
    assert entry["removed_outside_body_ml"] > 0.5 * np.count_nonzero(phantom.table) * voxel_ml
    with pytest.raises(ValueError, match="already holds"):
        data_prep.body_mask(str(tmp_path / "img"), str(tmp_path / "out"), label_dir=str(tmp_path / "lab"))
    with pytest.raises(ValueError, match="is an input folder"):
        data_prep.body_mask(str(tmp_path / "img"), str(tmp_path / "lab"), label_dir=str(tmp_path / "lab"), overwrite=True)
    with pytest.raises(ValueError, match="do not give label_dir"):
        data_prep.body_mask(str(tmp_path / "lab"), str(tmp_path / "x"), label_dir=str(tmp_path / "lab"), from_labels=True)
    # envelope-only masks without labels; from labels only: an approximation, said in the log and the report
    # labels stored as float (some tools do) or int64 are read as ids and written as integers
    for dtype in (np.float32, np.int64):
        header = nib.Nifti1Header()
        header.set_data_dtype(dtype)
        nib.save(nib.Nifti1Image(phantom.maisi_labels.astype(dtype), phantom.affine, header), str(tmp_path / "lab/case.nii.gz"))
        data_prep.body_mask(str(tmp_path / "img"), str(tmp_path / f"out_{np.dtype(dtype).name}"), label_dir=str(tmp_path / "lab"))
        again = nib.load(str(tmp_path / f"out_{np.dtype(dtype).name}/case.nii.gz"))
        assert np.issubdtype(again.get_data_dtype(), np.integer) and np.array_equal(np.asarray(again.dataobj), result)
    only = data_prep.body_mask(str(tmp_path / "img"), str(tmp_path / "only"))
    assert set(np.unique(np.asarray(nib.load(str(tmp_path / "only/case.nii.gz")).dataobj))) == {0, 200} and only["files"][0]["label"] is None
    with caplog.at_level(logging.WARNING):
        approx = data_prep.body_mask(str(tmp_path / "lab"), str(tmp_path / "approx"), from_labels=True)
    assert approx["approximation"] is True and "approximation" in approx["note"] and "15 mm" in approx["note"]
    assert any("approximation" in r.message for r in caplog.records)
    from_labels = np.asarray(nib.load(str(tmp_path / "approx/case.nii.gz")).dataobj)
    np.testing.assert_array_equal(from_labels[organs], phantom.maisi_labels[organs])
    assert (from_labels[~organs] == 200).any()


def test_body_mask_mr_default_follows_the_mr_bundle(phantom, tmp_path):
    with bundle_scripts(BUNDLES_DIR / "maisi_mr_generative"):
        data_prep = importlib.import_module("scripts.data_prep")
        _save(tmp_path / "img/case.nii.gz", phantom.mr, phantom.affine)
        report = data_prep.body_mask(str(tmp_path / "img"), str(tmp_path / "out"))
    assert report["modality_family"] == "mr" and report["files"][0]["threshold"] > 0
    body = np.asarray(nib.load(str(tmp_path / "out/case.nii.gz")).dataobj) == 200
    assert _dice(body, phantom.body) > 0.98


# ---------------------------------------------------------------------------------------------------------------
# Remapping
# ---------------------------------------------------------------------------------------------------------------


def test_totalsegmentator_mask_remapped_to_maisi_ids(scripts, phantom, tmp_path):
    data_prep = scripts["data_prep"]
    _save(tmp_path / "ts/case.nii.gz", phantom.totalseg_labels, phantom.affine)
    data_prep.main(["remap", str(tmp_path / "ts"), str(tmp_path / "maisi"), "--mapping", "totalsegmentator_v2"])
    written = nib.load(str(tmp_path / "maisi/case.nii.gz"))
    np.testing.assert_array_equal(np.asarray(written.dataobj), phantom.maisi_labels)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, phantom.affine)
    report = json.loads((tmp_path / "maisi/remap_report.json").read_text())
    mapped = report["files"][0]["mapped"]
    assert mapped["5"] == {"source_name": "liver", "maisi_id": 1, "maisi_name": "liver", "voxels": int(np.count_nonzero(phantom.totalseg_labels == 5))}
    assert {int(k): v["maisi_id"] for k, v in mapped.items()} == {ts: maisi for maisi, ts, *_ in ORGANS.values()} | {31: 37}
    assert report["unmapped_total"] == {} and "v2.18.0" in report["source"]["commit"]


def test_unmapped_ids_are_reported_by_name_and_count(scripts, phantom, tmp_path, label_dict, caplog):
    remap = scripts["label_remap"]
    v1 = remap.load_mapping("totalsegmentator_v1", label_dict)
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels[0, :2] = 93  # v1 "face": no MAISI counterpart
    labels[1, :3] = 46  # v1 "heart_ventricle_left": merged into MAISI heart
    labels[2, :1] = 150  # not a v1 class at all
    result = remap.remap_labels(labels, v1)
    assert result.unmapped[93] == {"source_name": "face", "reason": "no MAISI label for the face", "voxels": 12, "set_to": 200}
    assert result.unmapped[150]["source_name"] is None and "not in mapping totalsegmentator_v1" in result.unmapped[150]["reason"]
    assert result.mapped[46]["maisi_id"] == 115 and result.mapped[46]["voxels"] == 18
    assert np.count_nonzero(result.labels == 200) == 18 and np.count_nonzero(result.labels == 115) == 18
    assert np.count_nonzero(remap.remap_labels(labels, v1, unmapped=0).labels) == 18
    # the command: user JSON by name and id, unmapped to 0, report and log name every unmapped id
    _save(tmp_path / "src/a.nii.gz", labels, np.eye(4))
    (tmp_path / "map.json").write_text(json.dumps({"93": "Liver", "46": 3}))
    with caplog.at_level(logging.WARNING):
        report = scripts["data_prep"].remap(str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "map.json"), unmapped=0)
    out = np.asarray(nib.load(str(tmp_path / "out/a.nii.gz")).dataobj)
    assert np.count_nonzero(out == 1) == 12 and np.count_nonzero(out == 3) == 18 and np.count_nonzero(out) == 30
    assert report["unmapped_total"] == {"150": {"source_name": None, "reason": f"id 150 is not in mapping {tmp_path / 'map.json'}", "voxels": 6, "files": 1}}
    assert any("source id 150" in r.message and "6 voxels" in r.message for r in caplog.records)


def test_remap_refuses_bad_mappings_naming_the_entry(scripts, tmp_path, label_dict):
    remap, data_prep = scripts["label_remap"], scripts["data_prep"]
    with pytest.raises(ValueError, match=r"neither a shipped mapping \(\['totalsegmentator_v1', 'totalsegmentator_v2', 'totalsegmentator_v2_mr'\]\)"):
        remap.load_mapping("totalsegmentator_v9", label_dict)
    for content, message in [
        ({"1": "livr"}, r"source id 1: 'livr' is not a MAISI label name.*Did you mean \['liver'\]"),
        ({"1": 999}, "source id 1: 999 is not a MAISI label id"),
        ({"one": 1}, "source id 'one' is not a non-negative integer"),
        ({"0": 1}, "source id 0 is background"),
        ({}, "holds no source id"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            remap.load_mapping(tmp_path / "bad.json", label_dict)
    with pytest.raises(ValueError, match="non-integer values"):
        remap.remap_labels(np.array([0.5, 1.0]), remap.load_mapping("totalsegmentator_v2", label_dict))
    _save(tmp_path / "lab/a.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="unmapped=7777 is not allowed"):
        data_prep.remap(str(tmp_path / "lab"), str(tmp_path / "out"), "totalsegmentator_v2", unmapped=7777)
    with pytest.raises(ValueError, match="is an input folder"):
        data_prep.remap(str(tmp_path / "lab"), str(tmp_path / "lab"), "totalsegmentator_v2")


@pytest.mark.parametrize(("name", "count", "without"), [("totalsegmentator_v2", 117, []), ("totalsegmentator_v2_mr", 50, [10, 11, 19, 20]), ("totalsegmentator_v1", 104, [49, 93])])
def test_shipped_mappings_agree_with_the_label_dict(scripts, label_dict, name, count, without):
    content = json.loads((CT_BUNDLE / "configs" / f"label_mapping_{name}.json").read_text())
    assert content["source"]["repository"] == "https://github.com/wasserth/TotalSegmentator" and content["source"]["file"] == "totalsegmentator/map_to_binary.py"
    entries = content["mapping"]
    assert sorted(int(k) for k in entries) == list(range(1, count + 1))
    assert sorted(int(k) for k, v in entries.items() if v["maisi_id"] is None) == without
    for entry in entries.values():
        if entry["maisi_id"] is not None:
            assert label_dict[entry["maisi_name"]] == entry["maisi_id"]
    mapping = scripts["label_remap"].load_mapping(name, label_dict)
    assert len(mapping.classes) == count


def test_totalsegmentator_v2_anchor_classes(scripts, label_dict):
    """Known pairs of TotalSegmentator v2 (map_to_binary.py class_map['total']) and MAISI (label_dict.json)."""
    classes = scripts["label_remap"].load_mapping("totalsegmentator_v2", label_dict).classes
    pairs = {1: ("spleen", 3), 2: ("kidney_right", 5), 5: ("liver", 1), 10: ("lung_upper_lobe_left", 28), 21: ("urinary_bladder", 15), 26: ("vertebrae_S1", 127), 51: ("heart", 115), 90: ("brain", 22), 92: ("rib_left_1", 63), 104: ("rib_right_1", 75), 117: ("costal_cartilages", 114)}
    for source, (source_name, maisi) in pairs.items():
        assert (classes[source].source_name, classes[source].maisi_id) == (source_name, maisi)


# ---------------------------------------------------------------------------------------------------------------
# Generation-time checks
# ---------------------------------------------------------------------------------------------------------------


def _request(mc, **kwargs):
    values = {"spacing": SPACING, "output_size": SHAPE, "modality_family": "ct", "strict": False, **kwargs}
    return mc.MaskRequest(**values)


@pytest.fixture(scope="module")
def good_mask(scripts, phantom):
    return scripts["body_mask"].add_body_label(phantom.maisi_labels, phantom.body)


def test_a_good_mask_has_no_finding(scripts, phantom, good_mask, label_dict):
    mc = scripts["mask_checks"]
    summary = mc.summarize_mask(good_mask, phantom.affine, "/data/masks/case.nii.gz")
    assert summary.spacing == SPACING and summary.shape == SHAPE and summary.voxel_counts[200] == np.count_nonzero(good_mask == 200)
    assert mc.check_user_mask(summary, _request(mc), label_dict) == []
    mc.raise_for_refusals([])


def test_no_body_label_warns_or_refuses_when_strict(scripts, phantom, label_dict):
    mc = scripts["mask_checks"]
    summary = mc.summarize_mask(phantom.maisi_labels, phantom.affine, "/data/masks/case.nii.gz")
    (finding,) = mc.check_body_label(summary, _request(mc))
    assert (finding.code, finding.severity) == ("no_body_label", "warn")
    assert "mask_path=/data/masks/case.nii.gz has no body label 200" in finding.message
    assert "body_mask IMAGE_DIR /data/masks_body --label_dir /data/masks" in finding.fix and "--from_labels" in finding.fix
    (strict,) = mc.check_body_label(summary, _request(mc, strict=True))
    assert strict.severity == "refuse" and strict.figures["mask_check_strict"] is True and mc.STRICT_CONFIG_ID == "mask_check_strict"
    with pytest.raises(ValueError, match=r"\[no_body_label\].*Fix: python -m scripts.data_prep body_mask"):
        mc.raise_for_refusals(mc.check_user_mask(summary, _request(mc, strict=True), label_dict))
    mr_body = np.where(phantom.body & (phantom.maisi_labels == 0), 500, phantom.maisi_labels.astype(np.int16))
    assert mc.check_body_label(mc.summarize_mask(mr_body, phantom.affine, "m.nii.gz"), _request(mc, modality_family="mr")) == []
    (ct,) = mc.check_body_label(mc.summarize_mask(mr_body, phantom.affine, "m.nii.gz"), _request(mc))  # CT: 200 only
    assert "no body label 200:" in ct.message


def test_ids_outside_maisi_are_refused_with_the_remap_command(scripts, phantom, label_dict):
    mc = scripts["mask_checks"]
    ts = scripts["body_mask"].add_body_label(phantom.totalseg_labels, phantom.body)
    findings = mc.check_user_mask(mc.summarize_mask(ts, phantom.affine, "/d/ts/case.nii.gz"), _request(mc), label_dict)
    refusal = next(f for f in findings if f.code == "unknown_label_ids")
    assert refusal.severity == "refuse" and refusal.figures["unknown_ids"] == [2]  # TotalSegmentator's right kidney is MAISI dummy1
    assert "2 (" in refusal.message and "placeholder dummy1" in refusal.message
    assert refusal.fix.startswith("python -m scripts.data_prep remap /d/ts /d/ts_maisi --mapping totalsegmentator_v2")
    with pytest.raises(ValueError, match=r"\[unknown_label_ids\]"):
        mc.raise_for_refusals(findings)
    # organ volumes of a mask in another numbering give it away too: TotalSegmentator's liver (5) is not a right kidney
    volumes = {f.figures["organ"]: f.figures["volume_ml"] for f in findings if f.code == "organ_volume_out_of_range"}
    assert volumes["right kidney"] > 557.1
    # MR accepts the BraTS ids and body 500, not other ids above 255
    weird = good_mask_with(ts.astype(np.int16), phantom, {401: 1, 300: 3})
    mr = mc.check_label_ids(mc.summarize_mask(weird, phantom.affine, "m.nii.gz"), label_dict, _request(mc, modality_family="mr"))
    assert mr[0].figures["unknown_ids"] == [2, 300]
    assert mc.placeholder_ids(label_dict) == frozenset({2, 16, 18, 20, 21})


def good_mask_with(mask, phantom, replacements):
    result = mask.copy()
    for new, old in replacements.items():
        result[phantom.totalseg_labels == old] = new
    return result


def test_organ_volumes_out_of_range_warn_with_the_figures(scripts, phantom, good_mask, label_dict):
    mc = scripts["mask_checks"]
    wrong_header = np.diag([1.0, 1.0, 1.25, 1.0])  # spacing written 4x too small per axis: volumes 64x too small
    findings = mc.check_organ_volumes(mc.summarize_mask(good_mask, wrong_header, "m.nii.gz"), label_dict, mc.load_organ_volume_reference())
    by_organ = {f.figures["organ"]: f for f in findings}
    liver_ml = np.count_nonzero(phantom.maisi_labels == 1) * 1.25 / 1000.0
    assert by_organ["liver"].figures["volume_ml"] == pytest.approx(liver_ml, abs=0.01) and by_organ["liver"].severity == "warn"
    assert "much smaller" in by_organ["liver"].message and "381" in by_organ["liver"].message
    assert {"liver", "spleen", "right kidney", "left kidney"} <= set(by_organ)
    assert "lungs" not in by_organ  # the lungs reach the top slice: cut by the field of view, not compared
    large = mc.check_organ_volumes(mc.summarize_mask(good_mask, np.diag([12.0, 12.0, 15.0, 1.0]), "m.nii.gz"), label_dict, mc.load_organ_volume_reference())
    assert any("much larger" in f.message and f.figures["organ"] == "liver" for f in large)


def test_field_of_view_outside_the_published_range_warns(scripts, phantom, good_mask):
    mc = scripts["mask_checks"]
    summary = mc.summarize_mask(good_mask, phantom.affine, "m.nii.gz")
    (finding,) = mc.check_field_of_view(summary, _request(mc, spacing=(3.0, 3.0, 4.0), output_size=(512, 512, 128)))
    assert finding.code == "field_of_view_out_of_range" and finding.figures["output_fov_mm"] == [1536.0, 1536.0, 512.0]
    assert finding.figures["axes_outside"] == ["x", "y"] and "x 1536 mm (published 256-435 mm)" in finding.message
    assert mc.check_field_of_view(summary, _request(mc, spacing=(1.5, 1.5, 2.0), output_size=(256, 256, 256))) == []
    mr = mc.check_field_of_view(summary, _request(mc, modality_family="mr", spacing=(1.0, 1.0, 1.0), output_size=(512, 512, 128)))
    assert mr[0].figures["axes_outside"] == ["x", "y"]


def test_labels_in_a_thin_slab_warn(scripts, phantom, good_mask, label_dict):
    mc = scripts["mask_checks"]
    partial = good_mask.copy()
    liver = np.nonzero((phantom.maisi_labels == 1).any(axis=(0, 1)))[0]
    keep = liver[len(liver) // 2 : len(liver) // 2 + 2]  # liver annotated on 2 slices (10 mm)
    drop = np.isin(np.arange(SHAPE[2]), keep, invert=True)
    partial[:, :, drop] = np.where(partial[:, :, drop] == 1, 200, partial[:, :, drop])
    (finding,) = mc.check_thin_slab(mc.summarize_mask(partial, phantom.affine, "m.nii.gz"), label_dict, _request(mc))
    assert finding.figures["labels"] == ["liver (1)"] and finding.figures["thickness_mm"] == [10.0]
    assert "liver (1): 2 slice(s), 10 mm along z" in finding.message and "z spacing 5 mm" in finding.message
    slab = good_mask[:, :, 20:22]
    (whole,) = mc.check_thin_slab(mc.summarize_mask(slab, phantom.affine, "m.nii.gz"), label_dict, _request(mc))
    assert whole.figures["labels"] == ["all labels"]


def test_geometry_mismatch_says_what_is_resampled_and_cut(scripts, phantom, good_mask):
    mc = scripts["mask_checks"]
    summary = mc.summarize_mask(good_mask, phantom.affine, "m.nii.gz")
    request = _request(mc, spacing=(2.0, 2.0, 2.5), output_size=(128, 128, 64))
    (finding,) = mc.check_geometry(summary, request)
    assert finding.code == "geometry_resampled" and finding.figures["resampled_shape"] == [191, 191, 95]
    # the figure matches what generation's resampling does
    tensor = MetaTensor(torch.from_numpy(good_mask[None].astype(np.float32)), affine=torch.from_numpy(phantom.affine))
    assert list(Spacing(pixdim=request.spacing, mode="nearest")(tensor).shape[1:]) == finding.figures["resampled_shape"]
    cut = finding.figures["labelled_anatomy_cut_mm"]
    assert cut["z"] == [37.5, 40.0]  # the body runs through all 95 resampled slices; the centre crop keeps 15..78
    assert cut["x"][0] == pytest.approx(32.0, abs=4.0) and cut["x"][1] == pytest.approx(32.0, abs=4.0)  # body 320 mm wide, FOV 256 mm
    assert "x cropped by 63 voxels (126 mm)" in finding.message and "z 37.5 mm at the low end, 40 mm at the high end" in finding.message
    assert finding.fix is not None
    padded = mc.check_geometry(summary, _request(mc, output_size=(128, 128, 48)))[0]
    assert "x padded by 32 voxels (128 mm) of background" in padded.message and padded.figures["labelled_anatomy_cut_mm"] == {} and padded.fix is None
    assert mc.check_geometry(summary, _request(mc, spacing=(4.02, 4.0, 5.0))) == []  # within 1%


def test_every_finding_serialises_and_codes_are_complete(scripts, phantom, label_dict):
    mc = scripts["mask_checks"]
    ts = phantom.totalseg_labels.copy()
    ts[:, :, :20] = np.where(ts[:, :, :20] == 5, 0, ts[:, :, :20])  # the "liver" (5) on two slices only: a thin slab
    ts[:, :, 22:] = np.where(ts[:, :, 22:] == 5, 0, ts[:, :, 22:])
    summary = mc.summarize_mask(ts, np.diag([4.0, 4.0, 5.0, 1.0]), "/x/ts.nii.gz")
    findings = mc.check_user_mask(summary, _request(mc, spacing=(3.0, 3.0, 2.0), output_size=(512, 512, 256)), label_dict)
    assert {f.code for f in findings} == set(mc.FINDING_CODES)
    report = json.loads(json.dumps([f.to_dict() for f in findings]))
    assert all(set(entry) == {"code", "severity", "message", "fix", "figures"} for entry in report)
    assert all("/x/ts.nii.gz" in entry["message"] for entry in report)


def test_summarize_refuses_what_is_not_a_label_map(scripts, phantom):
    mc = scripts["mask_checks"]
    with pytest.raises(ValueError, match="non-integer"):
        mc.summarize_mask(np.full((4, 4, 4), 0.5), np.eye(4), "m.nii.gz")
    with pytest.raises(ValueError, match="negative"):
        mc.summarize_mask(-np.ones((4, 4, 4), np.int16), np.eye(4), "m.nii.gz")
    with pytest.raises(ValueError, match="no foreground label"):
        mc.summarize_mask(np.zeros((4, 4, 4), np.uint8), np.eye(4), "m.nii.gz")
    # what generation holds: a (1, X, Y, Z) MetaTensor with its affine (label_io.load_label_file)
    loaded = MetaTensor(torch.from_numpy(phantom.maisi_labels[None].astype(np.int16)), affine=torch.from_numpy(phantom.affine))
    one_channel = mc.summarize_mask(loaded, loaded.affine, "m.nii.gz")
    assert one_channel.shape == SHAPE and one_channel.spacing == SPACING and one_channel.voxel_counts[1] == np.count_nonzero(phantom.maisi_labels == 1)


def test_check_mask_and_organ_volumes_commands(scripts, phantom, good_mask, tmp_path):
    data_prep = scripts["data_prep"]
    scales = [0.8, 0.9, 1.0, 1.1, 1.2]
    for index, scale in enumerate(scales):
        _save(tmp_path / f"db/m{index}.nii.gz", good_mask, np.diag([4.0 * scale, 4.0, 5.0, 1.0]))
    data_prep.main(["organ_volumes", str(tmp_path / "db"), str(tmp_path / "ref.json")])
    reference = json.loads((tmp_path / "ref.json").read_text())
    liver = np.count_nonzero(phantom.maisi_labels == 1) * 80.0 / 1000.0
    assert reference["organs"]["liver"]["typical_ml"] == pytest.approx(liver, abs=0.01)
    assert reference["organs"]["liver"]["low_ml"] == pytest.approx(np.percentile(np.array(scales) * liver, 5) / 2, abs=0.01)
    assert "right lung lower lobe" not in reference["organs"] and "body" not in reference["organs"]  # cut by the FOV / not an organ
    data_prep.main(["check_mask", str(tmp_path / "db/m2.nii.gz"), "--organ_volume_reference_json", str(tmp_path / "ref.json"), "--report", str(tmp_path / "r.json")])
    findings = json.loads((tmp_path / "r.json").read_text())["findings"]
    assert [f["code"] for f in findings] == ["geometry_resampled"]  # bundle default spacing/output_size differ from the mask
    assert findings[0]["figures"]["spacing"] == [1.5, 1.5, 2.0] and findings[0]["figures"]["output_size"] == [256, 256, 256]


# ---------------------------------------------------------------------------------------------------------------
# The whole path: another tool's mask without a body label -> remap -> body_mask -> check -> generation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_totalsegmentator_mask_remapped_enveloped_checked_and_generated(scripts, phantom, label_dict, tmp_path):
    """Issue 13's "done when": the three documented commands, then a (tiny-network) generation from the result."""
    from monai.bundle import run
    from test_maisi_ct_generation_e2e import TINY, _tiny_weights

    data_prep, mc = scripts["data_prep"], scripts["mask_checks"]
    geometry = {"spacing": [1.5, 1.5, 2.0], "output_size": [256, 256, 128]}
    _save(tmp_path / "ct/case.nii.gz", phantom.ct, phantom.affine)
    _save(tmp_path / "seg/case.nii.gz", phantom.totalseg_labels, phantom.affine)
    before = data_prep.check_mask(str(tmp_path / "seg/case.nii.gz"), report=str(tmp_path / "before.json"), **geometry)
    assert {f["code"] for f in before if f["severity"] == "refuse"} == {"unknown_label_ids"} and "no_body_label" in {f["code"] for f in before}
    data_prep.main(["remap", str(tmp_path / "seg"), str(tmp_path / "seg_maisi"), "--mapping", "totalsegmentator_v2"])
    data_prep.main(["body_mask", str(tmp_path / "ct"), str(tmp_path / "seg_body"), "--label_dir", str(tmp_path / "seg_maisi")])
    mask_path = tmp_path / "seg_body/case.nii.gz"
    after = data_prep.check_mask(str(mask_path), report=str(tmp_path / "after.json"), **geometry)
    assert [f["code"] for f in after] == ["geometry_resampled"]  # only the resampling note is left
    mc.raise_for_refusals([])
    (tmp_path / "models").mkdir()
    overrides = {
        "bundle_root": str(CT_BUNDLE),
        "output_dir": str(tmp_path / "out"),
        "mask_path": str(mask_path),
        "num_inference_steps": 1,
        "quality_check_max_attempts": 1,
        "progress": False,
        **geometry,
        **TINY,
        **_tiny_weights(tmp_path / "models", "rflow-ct"),
    }
    run(config_file=str(CT_BUNDLE / "configs" / "inference.json"), **overrides)  # in-process, on the fixture's scripts
    sample = json.loads((tmp_path / "out/generation_report.json").read_text())["samples"][0]
    assert sample["mask_source"] == f"user:{mask_path}"
    image, labels = nib.load(sample["image"]), np.asarray(nib.load(sample["label"]).dataobj)
    assert image.shape == labels.shape == (256, 256, 128)
    maisi_ids = {maisi for maisi, *_ in ORGANS.values()} | {37, 200}
    assert set(np.unique(labels)) - {0} == maisi_ids  # MAISI ids and the body label, none of TotalSegmentator's
    assert np.isfinite(np.asarray(image.dataobj)).all()
