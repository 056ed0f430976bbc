"""Unit tests of the MAISI label logic (core/labels.py) and the mask generator's channel table (ct/mask_channels.py)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts

# Raw MAISI ids used below (label_dict.json).
LIVER, PANCREAS, RIGHT_KIDNEY, LEFT_KIDNEY, BRAIN, COLON = 1, 4, 5, 14, 22, 62
LUNG_TUMOR, PANCREATIC_TUMOR, HEPATIC_TUMOR, COLON_PRIMARY, BONE_LESION = 23, 24, 26, 27, 128
LEFT_UPPER_LOBE, RIGHT_UPPER_LOBE, RIGHT_LOWER_LOBE = 28, 30, 32
VERTEBRA_L3, LEFT_RIB_1, SKULL, LEFT_FEMUR, BODY = 35, 63, 120, 93, 200
LEFT_KIDNEY_CYST, RIGHT_KIDNEY_CYST = 116, 117


@pytest.fixture(scope="module")
def maisi():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield tuple(importlib.import_module(f"scripts.{name}") for name in ("labels", "constants", "mask_channels"))


@pytest.fixture(scope="module")
def labels(maisi):
    return maisi[0]


@pytest.fixture(scope="module")
def constants(maisi):
    return maisi[1]


@pytest.fixture(scope="module")
def mask_channels(maisi):
    return maisi[2]


# ---------------------------------------------------------------------------------------------------- data


def test_packaged_label_dict_agrees_with_constants(labels, constants):
    label_dict = labels.load_label_dict()
    for name, tumor_id in constants.TUMOR_LABELS.items():
        assert label_dict[name] == tumor_id
    assert label_dict["body"] == constants.BODY_LABEL
    assert labels.tumor_free_mapping() == {
        HEPATIC_TUMOR: LIVER,
        PANCREATIC_TUMOR: PANCREAS,
        COLON_PRIMARY: COLON,
        LEFT_KIDNEY_CYST: LEFT_KIDNEY,
        RIGHT_KIDNEY_CYST: RIGHT_KIDNEY,
        176: BRAIN,
        401: BRAIN,
        402: BRAIN,
        403: BRAIN,
    }


def test_load_json_errors_name_the_file(labels, tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="absent.json"):
        labels.load_json(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"liver": 1,,}')
    with pytest.raises(ValueError, match=r"broken\.json.*line 1"):
        labels.load_json(broken)
    bad_ids = tmp_path / "bad_ids.json"
    bad_ids.write_text('{"liver": "one"}')
    with pytest.raises(ValueError, match=r"label_dict_json=.*bad_ids\.json.*liver"):
        labels.load_label_dict(bad_ids)


def test_one_label_dict_reader(labels, tmp_path):
    """load_label_dict reads a file with load_name_to_code (as the modality mapping does); it only adds the packaged default."""
    custom = tmp_path / "custom.json"
    custom.write_text('{"liver": 1, "body": 200, "brain tumor core": 401}')
    expected = {"liver": 1, "body": 200, "brain tumor core": 401}
    assert labels.load_label_dict(custom) == labels.load_name_to_code(custom, "label_dict_json", minimum=1) == expected
    packaged = labels.load_label_dict()
    assert packaged == labels.load_name_to_code(labels.default_data_path(labels.LABEL_DICT_FILENAME), "label_dict_json", 1)
    packaged["liver"] = -1  # a copy: the cached packaged dictionary is unchanged
    assert labels.load_label_dict()["liver"] == 1
    with pytest.raises(ValueError, match=r"label_dict_json=.*absent\.json.*does not exist"):
        labels.load_label_dict(tmp_path / "absent.json")


def test_load_name_to_code_names_the_id_and_the_bad_entries(labels, tmp_path):
    codes = tmp_path / "codes.json"
    codes.write_text('{"unknown": 0, "ct": 1, "mri": 8}')
    assert labels.load_name_to_code(codes, "modality_mapping_json", minimum=0) == {"unknown": 0, "ct": 1, "mri": 8}
    with pytest.raises(ValueError, match=r"label_dict_json=.*codes\.json.*not integers >= 1: \{'unknown': 0\}"):
        labels.load_name_to_code(codes, "label_dict_json", minimum=1)
    for content in ("[1, 2]", "{}", '{"liver": true}', '{"liver": 1.5}'):
        codes.write_text(content)
        with pytest.raises(ValueError, match="label_dict_json="):
            labels.load_name_to_code(codes, "label_dict_json", minimum=1)


def test_format_ids_shortens_long_lists(labels):
    assert labels.format_ids([401, 402]) == "401, 402"
    assert labels.format_ids([]) == ""
    assert labels.format_ids(list(range(25))) == ", ".join(str(i) for i in range(20)) + ", ... (25 ids)"
    assert labels.format_ids(list(range(5)), limit=2) == "0, 1, ... (5 ids)"


# ---------------------------------------------------------------------------------------------------- ControlNet bits


def test_binarize_labels_round_trips_every_id(labels):
    ids = torch.arange(256, dtype=torch.uint8).reshape(2, 1, 4, 8, 4)
    planes = labels.binarize_labels(ids)
    assert planes.shape == (2, 8, 4, 8, 4)
    assert planes.dtype == torch.float32
    assert set(planes.unique().tolist()) == {0.0, 1.0}
    weights = (2 ** torch.arange(8, dtype=torch.float32)).reshape(1, 8, 1, 1, 1)
    assert torch.equal((planes * weights).sum(dim=1, keepdim=True), ids.float())
    assert torch.equal(planes[0, :, 0, 0, 1], torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))  # id 1
    assert torch.equal(labels.binarize_labels(ids.float()), planes)  # whole-number floats are accepted


def test_binarize_labels_rejects_ids_outside_the_8_bit_range(labels):
    with pytest.raises(ValueError, match=r"label ids 300 are outside \[0, 255\]"):
        labels.binarize_labels(torch.tensor([300, 5, 200]).reshape(1, 1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"label ids -1, 401"):
        labels.binarize_labels(torch.tensor([-1, 401, 2]).reshape(1, 1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        labels.binarize_labels(torch.zeros(1, 2, 3, 3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="whole-number"):
        labels.binarize_labels(torch.full((1, 1, 2, 2, 2), 1.5))


def test_remap_labels_for_controlnet(labels):
    brats = np.array([0, 401, 402, 403, BRAIN], dtype=np.int16)
    remapped = labels.remap_labels_for_controlnet(brats, {401: 150, 402: 151, "403": 152})
    np.testing.assert_array_equal(remapped, [0, 150, 151, 152, BRAIN])
    assert remapped.dtype == np.int16
    np.testing.assert_array_equal(brats, [0, 401, 402, 403, BRAIN])  # input untouched
    with pytest.raises(ValueError, match=r"label ids 402, 403 are outside \[0, 255\] and have no entry"):
        labels.remap_labels_for_controlnet(brats, {401: 150})
    with pytest.raises(ValueError, match="401: 300"):
        labels.remap_labels_for_controlnet(brats, {401: 300, 402: 151, 403: 152})
    # uint8 maps cannot hold 401: id 145 (= 401 mod 256) must not be mistaken for it
    tibia_like = torch.tensor([145, 1], dtype=torch.uint8)
    assert torch.equal(labels.remap_labels_for_controlnet(tibia_like, {401: 150}), tibia_like)


# ---------------------------------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    "present,top,bottom",
    [
        ((LIVER, LEFT_UPPER_LOBE), [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]),
        ((RIGHT_LOWER_LOBE,), [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]),
        ((SKULL, LEFT_FEMUR, LIVER), [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]),
        ((LEFT_KIDNEY, BODY), [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]),
    ],
)
def test_body_region_indices_from_mask(labels, present, top, bottom):
    mask = np.zeros((1, 1, 4, 4, 4), dtype=np.uint8)
    mask.flat[: len(present)] = present
    assert labels.body_region_indices_from_mask(mask) == (top, bottom)
    assert labels.body_region_indices_from_mask(torch.as_tensor(mask)) == (top, bottom)


def test_body_region_indices_without_region_labels_explain(labels):
    with pytest.raises(ValueError, match="none of the region labels"):
        labels.body_region_indices_from_mask(np.full((4, 4, 4), BODY, dtype=np.uint8))


def test_region_and_spacing_conditions_apply_the_scales(labels, constants):
    assert constants.REGION_INDEX_SCALE == 100.0 and constants.SPACING_SCALE == 100.0
    region = labels.region_condition([0.0, 1.0, 0.0, 0.0])
    assert region.dtype == torch.float32
    assert torch.equal(region, torch.tensor([[0.0, 100.0, 0.0, 0.0]]))
    spacing = labels.spacing_condition((1.5, 1.5, 2.0))
    assert torch.equal(spacing, torch.tensor([[150.0, 150.0, 200.0]]))
    assert torch.equal(labels.spacing_condition(np.array([[0.75, 0.75, 1.0]])), torch.tensor([[75.0, 75.0, 100.0]]))
    with pytest.raises(ValueError, match="4 entries"):
        labels.region_condition([0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        labels.spacing_condition([1.5, 0.0, 1.5])


# ---------------------------------------------------------------------------------------------------- tumour removal


def _lungs_with_tumors() -> np.ndarray:
    """Left lobe on x < 6, right lobe on x >= 6; one lung tumour inside each lobe."""
    volume = np.zeros((12, 8, 8), dtype=np.uint8)
    volume[:6, 1:7, 1:7] = LEFT_UPPER_LOBE
    volume[6:, 1:7, 1:7] = RIGHT_UPPER_LOBE
    volume[2:4, 3:5, 3:5] = LUNG_TUMOR
    volume[8:10, 3:5, 3:5] = LUNG_TUMOR
    return volume


def test_remove_tumors_replaces_each_lung_tumor_by_its_surrounding_lobe(labels):
    volume = _lungs_with_tumors()
    cleaned = labels.remove_tumors(volume)
    assert cleaned.dtype == np.uint8
    assert not (cleaned == LUNG_TUMOR).any()
    assert (cleaned[2:4, 3:5, 3:5] == LEFT_UPPER_LOBE).all()
    assert (cleaned[8:10, 3:5, 3:5] == RIGHT_UPPER_LOBE).all()
    assert (volume == LUNG_TUMOR).sum() == 16  # input untouched


def test_remove_tumors_prefers_a_lobe_over_more_frequent_neighbours(labels):
    volume = np.full((8, 8, 8), BODY, dtype=np.uint8)
    volume[:, :, 0] = RIGHT_LOWER_LOBE
    volume[3:6, 3:6, 1:4] = LUNG_TUMOR  # ring: 25 lobe voxels, 73 body voxels
    cleaned = labels.remove_tumors(volume)
    assert (cleaned[3:6, 3:6, 1:4] == RIGHT_LOWER_LOBE).all()


def test_remove_tumors_direct_host_organs(labels):
    volume = np.zeros((10, 10, 10), dtype=np.int16)
    volume[1:5, 1:5, 1:5] = LIVER
    volume[2:4, 2:4, 2:4] = HEPATIC_TUMOR
    volume[6, 6, 6] = PANCREATIC_TUMOR
    volume[6, 7, 6] = COLON_PRIMARY
    volume[6, 8, 6] = LEFT_KIDNEY_CYST
    volume[7, 8, 6] = RIGHT_KIDNEY_CYST
    volume[8, 1:4, 1] = (401, 402, 403)
    volume[8, 5, 1] = 176
    cleaned = labels.remove_tumors(volume)
    assert cleaned.dtype == np.int16
    assert (cleaned[1:5, 1:5, 1:5] == LIVER).all()
    assert cleaned[6, 6, 6] == PANCREAS and cleaned[6, 7, 6] == COLON
    assert cleaned[6, 8, 6] == LEFT_KIDNEY and cleaned[7, 8, 6] == RIGHT_KIDNEY
    assert (cleaned[8, [1, 2, 3, 5], 1] == BRAIN).all()
    assert set(np.unique(cleaned).tolist()) == {0, LIVER, PANCREAS, COLON, LEFT_KIDNEY, RIGHT_KIDNEY, BRAIN}


def test_remove_tumors_replaces_bone_lesions_by_the_surrounding_bone(labels):
    volume = np.full((10, 10, 10), BODY, dtype=np.uint8)
    volume[1:6, 1:6, 1:6] = VERTEBRA_L3
    volume[5:6, 1:6, 1:6] = LEFT_RIB_1  # a thinner neighbouring bone: the majority wins
    volume[2:5, 2:5, 3:5] = BONE_LESION
    volume[8, 8, 8] = BONE_LESION  # no bone around it: the majority neighbour (body) is used
    cleaned = labels.remove_tumors(volume)
    assert not (cleaned == BONE_LESION).any()
    assert (cleaned[2:5, 2:5, 3:5] == VERTEBRA_L3).all()
    assert cleaned[8, 8, 8] == BODY


def test_remove_tumors_keeps_batch_items_apart_and_returns_tensors(labels):
    batch = np.stack([_lungs_with_tumors(), _lungs_with_tumors()[::-1].copy()])[:, None]  # (2, 1, 12, 8, 8)
    batch[1, 0, 2:4, 3:5, 3:5] = RIGHT_UPPER_LOBE  # item 1: mirrored lobes, one tumour removed
    tensor = torch.as_tensor(batch)
    cleaned = labels.remove_tumors(tensor)
    assert isinstance(cleaned, torch.Tensor) and cleaned.dtype == torch.uint8 and cleaned.shape == tensor.shape
    assert (cleaned[0, 0, 2:4, 3:5, 3:5] == LEFT_UPPER_LOBE).all()
    assert (cleaned[0, 0, 8:10, 3:5, 3:5] == RIGHT_UPPER_LOBE).all()  # same voxels as item 1's tumour
    assert (cleaned[1, 0, 8:10, 3:5, 3:5] == LEFT_UPPER_LOBE).all()
    for tumor_id in (LUNG_TUMOR, PANCREATIC_TUMOR, HEPATIC_TUMOR, COLON_PRIMARY, BONE_LESION):
        assert not (cleaned == tumor_id).any()


# ---------------------------------------------------------------------------------------------------- outputs


def test_filter_label_map_keeps_raw_ids_and_dtype(labels):
    label_map = np.array([0, LIVER, 3, BODY, LEFT_UPPER_LOBE, HEPATIC_TUMOR], dtype=np.uint8)
    filtered = labels.filter_label_map(label_map, [LIVER, HEPATIC_TUMOR, BODY])
    np.testing.assert_array_equal(filtered, [0, LIVER, 0, BODY, 0, HEPATIC_TUMOR])
    assert filtered.dtype == np.uint8
    as_tensor = labels.filter_label_map(torch.as_tensor(label_map), {LIVER, 401})
    assert as_tensor.dtype == torch.uint8
    assert as_tensor.tolist() == [0, LIVER, 0, 0, 0, 0]


def test_label_output_dtype(labels):
    assert labels.label_output_dtype(132) == np.uint8
    assert labels.label_output_dtype(255) == np.uint8
    assert labels.label_output_dtype(256) == np.int16
    assert labels.label_output_dtype(403) == np.int16
    with pytest.raises(ValueError, match="int16"):
        labels.label_output_dtype(40000)


def test_mask_logits_to_labels_uses_the_channel_table(mask_channels):
    table = {"background": [0, 0], "liver": [1, LIVER], "body": [2, BODY]}
    winners = torch.tensor([[0, 1], [2, 1]])  # channel with the largest logit per voxel
    logits = torch.nn.functional.one_hot(winners, 3).permute(2, 0, 1).float()[None, ..., None] * 5.0 - 1.0
    expected = torch.tensor([[0, LIVER], [BODY, LIVER]])[None, None, ..., None]
    result = mask_channels.mask_logits_to_labels(logits, table)
    assert result.shape == (1, 1, 2, 2, 1)
    assert torch.equal(result, expected)
    assert torch.equal(mask_channels.mask_logits_to_labels(torch.softmax(logits, dim=1), {0: 0, 1: LIVER, 2: BODY}), expected)
    with pytest.raises(ValueError, match="missing channels 2"):
        mask_channels.mask_logits_to_labels(logits, {"background": [0, 0], "liver": [1, LIVER]})
    with pytest.raises(ValueError, match="channels beyond the output 3"):
        mask_channels.mask_logits_to_labels(logits, {0: 0, 1: LIVER, 2: BODY, 3: SKULL})
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        mask_channels.mask_logits_to_labels(torch.zeros(3, 4), table)


def test_channel_table_entries_are_checked(mask_channels):
    assert mask_channels.channel_to_label_table({"body": [2, BODY], "1": LIVER}) == {2: BODY, 1: LIVER}
    with pytest.raises(ValueError, match=r"entry 'liver' must be \[channel, label_id\]"):
        mask_channels.channel_to_label_table({"liver": [1, LIVER, 3]})
    with pytest.raises(ValueError, match="channel 1 is mapped twice"):
        mask_channels.channel_to_label_table({"liver": [1, LIVER], "spleen": [1, 3]})
    with pytest.raises(ValueError, match="non-negative"):
        mask_channels.channel_to_label_table({"liver": [-1, LIVER]})


def test_packaged_channel_table(mask_channels, tmp_path):
    table = mask_channels.load_channel_table()
    assert sorted(table) == list(range(125))
    assert table[0] == 0 and table[1] == LIVER and table[2] == 3 and table[122] == 129 and table[124] == BODY
    broken = tmp_path / "channels.json"
    broken.write_text('{"liver": [1, 1], "spleen": [1, 3]}')
    with pytest.raises(ValueError, match=r"channels\.json: channel 1 is mapped twice"):
        mask_channels.load_channel_table(broken)
