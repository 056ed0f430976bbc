"""Tests of the CT candidate-mask database (Path B: mask_database) and mask augmentation (mask_augmentation), on a synthetic database."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle_helpers import BUNDLES_DIR, bundle_scripts

LIVER, SPLEEN, BONE = 1, 3, 33
LUNGS = (28, 29, 30, 31, 32)
HEPATIC_TUMOR, LUNG_TUMOR, BONE_LESION = 26, 23, 128
SIZE, SPACING = (32, 32, 32), (1.5, 1.5, 1.5)
CHEST_TO_ABDOMEN = {"top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]}


@pytest.fixture(scope="module")
def maisi():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield tuple(importlib.import_module(f"scripts.{name}") for name in ("mask_database", "mask_augmentation", "label_io"))


@pytest.fixture(scope="module")
def masks(maisi):
    """The candidate-mask database: reading, unpacking, filtering, ranking, retrieval."""
    return maisi[0]


@pytest.fixture(scope="module")
def augmentation(maisi):
    return maisi[1]


@pytest.fixture(scope="module")
def label_io(maisi):
    """Label files (core): loading in RAS as integer ids, spacing, resampling."""
    return maisi[2]


# ----------------------------------------------------------------------------------------------------------
# A synthetic database
# ----------------------------------------------------------------------------------------------------------


def _box(volume: np.ndarray, label: int, low: tuple[float, ...], high: tuple[float, ...]) -> None:
    """Fill the box between fractional corners ``low`` and ``high`` with ``label``."""
    shape = np.array(volume.shape)
    a, b = np.floor(np.array(low) * shape).astype(int), np.ceil(np.array(high) * shape).astype(int)
    volume[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = label


def _torso(dim: tuple[int, int, int], shift: float = 0.0, spleen: bool = True) -> np.ndarray:
    """Liver, spleen, vertebral column and five lung lobes (superior = high z), placed by fractions of ``dim``."""
    volume = np.zeros(dim, dtype=np.int16)
    _box(volume, BONE, (0.45, 0.75, 0.1), (0.55, 0.9, 0.9))
    _box(volume, LIVER, (0.2 + shift, 0.3, 0.25), (0.5 + shift, 0.7, 0.5))
    if spleen:
        _box(volume, SPLEEN, (0.6, 0.3, 0.3), (0.75, 0.6, 0.45))
    for i, lobe in enumerate(LUNGS):
        _box(volume, lobe, (0.15 + 0.14 * i, 0.2, 0.6), (0.27 + 0.14 * i, 0.6, 0.9))
    return volume


def _entry(folder: Path, name: str, volume: np.ndarray, spacing, regions=CHEST_TO_ABDOMEN) -> dict:
    nib.save(nib.Nifti1Image(volume, np.diag([*spacing, 1.0])), folder / name)
    labels = sorted(int(v) for v in np.unique(volume) if v)
    return {"pseudo_label_filename": name, "spacing": list(spacing), "dim": list(volume.shape), "label_list": labels, **regions}


def _write_database(root: Path) -> tuple[Path, Path]:
    folder = root / "all_masks"
    (folder / "sub").mkdir(parents=True)  # entries may name files in subfolders
    liver_tumor = _torso(SIZE)
    liver_tumor[10:13, 12:15, 10:13] = HEPATIC_TUMOR
    lesion = _torso(SIZE)
    lesion[15:17, 25:27, 12:15] = BONE_LESION
    loses_spleen = _torso((36, 32, 32), spleen=False)
    loses_spleen[0:2, 10:14, 10:14] = SPLEEN  # cropped away when resized to 32 voxels along x
    entries = [
        _entry(folder, "exact_a.nii.gz", _torso(SIZE), SPACING),
        _entry(folder, "exact_b.nii.gz", _torso(SIZE, shift=0.05), SPACING),
        _entry(folder, "near.nii.gz", _torso((40, 40, 40)), (1.2, 1.2, 1.2)),
        _entry(folder, "sub/loses_spleen.nii.gz", loses_spleen, SPACING),
        _entry(folder, "head_only.nii.gz", _torso(SIZE), SPACING, {"top_region_index": [1, 0, 0, 0], "bottom_region_index": [1, 0, 0, 0]}),
        _entry(folder, "liver_tumor.nii.gz", liver_tumor, SPACING),
        _entry(folder, "bone_lesion.nii.gz", lesion, SPACING),
    ]
    database = root / "candidates.json"
    database.write_text(json.dumps(entries))
    return database, folder


@pytest.fixture(scope="module")
def database(tmp_path_factory, masks):
    json_path, folder = _write_database(tmp_path_factory.mktemp("db"))
    return masks.load_candidate_database(json_path, folder)


def _names(candidates) -> list[str]:
    return [c.filename for c in candidates]


def _spacing(mask: MetaTensor) -> np.ndarray:
    return np.sqrt((np.asarray(mask.affine)[:3, :3] ** 2).sum(0))


# ----------------------------------------------------------------------------------------------------------
# Database, filtering and ranking
# ----------------------------------------------------------------------------------------------------------


def test_database_is_parsed(masks, database):
    first = database[0]
    assert first.filename == "exact_a.nii.gz" and first.path.is_file()
    assert first.dim == SIZE and first.spacing == SPACING
    assert first.label_ids == frozenset({LIVER, SPLEEN, BONE, *LUNGS})
    assert (first.top_region, first.bottom_region) == (1, 2) and list(first.region_span) == [1, 2]


def test_filter_by_anatomy_region_and_unrequested_tumor(masks, database):
    plain = ["exact_a.nii.gz", "exact_b.nii.gz", "near.nii.gz", "sub/loses_spleen.nii.gz"]
    assert _names(masks.filter_candidates(database, [LIVER, SPLEEN], [2])) == plain
    assert _names(masks.filter_candidates(database, [LIVER], [1, 2])) == plain
    assert _names(masks.filter_candidates(database, [LIVER], [0])) == ["head_only.nii.gz"]  # region span
    assert masks.filter_candidates(database, [LIVER], [3]) == []
    assert masks.filter_candidates(database, [LIVER, 999], [2]) == []  # anatomy
    assert _names(masks.filter_candidates(database, [HEPATIC_TUMOR], [2])) == ["liver_tumor.nii.gz"]
    assert _names(masks.filter_candidates(database, [BONE_LESION], [])) == ["bone_lesion.nii.gz"]
    with pytest.raises(ValueError, match="body_region"):
        masks.filter_candidates(database, [LIVER], [4])


def _candidate(masks, name, dim, spacing):
    return masks.Candidate(filename=name, folder=Path("."), spacing=spacing, dim=dim, label_ids=frozenset({1}))


def test_exact_matches_tolerate_1e_3(masks):
    candidates = [
        _candidate(masks, "a", (256, 256, 256), (1.5, 1.5, 1.5004)),
        _candidate(masks, "b", (256, 256, 256), (1.5, 1.5, 1.502)),
        _candidate(masks, "c", (256, 256, 128), (1.5, 1.5, 1.5)),
    ]
    assert _names(masks.exact_matches(candidates, (256, 256, 256), (1.5, 1.5, 1.5))) == ["a"]


def test_rank_by_geometry_scores_excludes_small_and_breaks_ties_by_name(masks):
    target_size, target_spacing = (256, 256, 256), (1.5, 1.5, 1.5)
    candidates = [
        _candidate(masks, "too_small", (128, 256, 256), (1.5, 1.5, 1.5)),  # 128 <= 256 - 128
        _candidate(masks, "z_twin", (300, 300, 300), (1.0, 1.0, 1.0)),
        _candidate(masks, "a_twin", (300, 300, 300), (1.0, 1.0, 1.0)),
        _candidate(masks, "just_large_enough", (129, 256, 256), (1.5, 1.5, 1.5)),
        _candidate(masks, "exact", (256, 256, 256), (1.5, 1.5, 1.5)),
    ]
    # just_large_enough: |193.5 - 384| / 10 + 127 / 100 = 20.32; twins: 3 * (84 / 10 + 44 / 100 + 0.5) = 28.02
    ranked = masks.rank_by_geometry(candidates, target_size, target_spacing)
    assert _names(ranked) == ["exact", "just_large_enough", "a_twin", "z_twin"]
    assert masks.rank_by_geometry([], target_size, target_spacing) == []


# ----------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def count_resampling(masks, monkeypatch):
    calls = []
    original = masks.resample_mask

    def counting(mask, target_spacing, output_size):
        calls.append(tuple(mask.shape))
        return original(mask, target_spacing, output_size)

    monkeypatch.setattr(masks, "resample_mask", counting)
    return calls


def test_exact_matches_are_used_unresampled(masks, database, count_resampling):
    found = masks.retrieve_masks(database, [LIVER, SPLEEN], [2], SIZE, SPACING, 2, np.random.default_rng(0))
    assert sorted(m.source for m in found) == ["exact_a.nii.gz", "exact_b.nii.gz"]
    assert count_resampling == []
    for m in found:
        assert not m.resampled and m.candidate.filename == m.source
        assert isinstance(m.mask, MetaTensor) and m.mask.shape == (1, *SIZE) and m.mask.dtype == torch.int16
        np.testing.assert_allclose(_spacing(m.mask), SPACING, atol=1e-6)
        assert {LIVER, SPLEEN} <= set(torch.unique(m.mask).tolist())


def test_closest_masks_are_resampled_once_and_must_keep_every_label(masks, database, count_resampling):
    found = masks.retrieve_masks(database, [LIVER, SPLEEN], [2], SIZE, SPACING, 3, np.random.default_rng(0))
    assert sorted(m.source for m in found) == ["exact_a.nii.gz", "exact_b.nii.gz", "near.nii.gz"]
    # loses_spleen ranks first (closer field of view) but loses the spleen: tried, skipped; near is kept.
    assert count_resampling == [(1, 36, 32, 32), (1, 40, 40, 40)]
    near = next(m for m in found if m.source == "near.nii.gz")
    assert near.resampled and near.mask.shape == (1, *SIZE)
    np.testing.assert_allclose(_spacing(near.mask), SPACING, atol=1e-6)
    assert {LIVER, SPLEEN, BONE, *LUNGS} <= set(torch.unique(near.mask).tolist())  # raw ids, no renumbering


def test_pool_is_shuffled_reproducibly_and_cycled(masks, database):
    def sources(seed):
        return [m.source for m in masks.retrieve_masks(database, [LIVER, SPLEEN], [2], SIZE, SPACING, 7, np.random.default_rng(seed))]

    first = sources(1)
    assert first == sources(1)
    assert set(first) == {"exact_a.nii.gz", "exact_b.nii.gz", "near.nii.gz"}
    assert first[3:6] == first[:3] and first[6] == first[0]
    assert any(sources(seed)[:3] != first[:3] for seed in range(2, 8))


def test_resampling_budget_is_respected(masks, database, count_resampling):
    found = masks.retrieve_masks(database, [LIVER, SPLEEN], [2], SIZE, SPACING, 3, np.random.default_rng(0), max_resample_candidates=1)
    assert len(count_resampling) == 1
    assert sorted({m.source for m in found}) == ["exact_a.nii.gz", "exact_b.nii.gz"]


def test_errors_name_the_request(masks, database):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="anatomy_list") as info:
        masks.retrieve_masks(database, [LIVER, 999], [2], SIZE, SPACING, 1, rng)
    for name in ("body_region", "output_size", "spacing", "abdomen"):
        assert name in str(info.value)
    loses_spleen = [c for c in database if c.filename == "sub/loses_spleen.nii.gz"]
    with pytest.raises(ValueError, match="none keeps every requested label") as info:
        masks.retrieve_masks(loses_spleen, [LIVER, SPLEEN], [2], SIZE, SPACING, 1, rng)
    for name in ("anatomy_list", "body_region", "output_size", "spacing"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="num_masks"):
        masks.retrieve_masks(database, [LIVER], [2], SIZE, SPACING, 0, rng)


def test_requested_tumor_mask_is_retrieved(masks, database):
    (found,) = masks.retrieve_masks(database, [LIVER, HEPATIC_TUMOR], [2], SIZE, SPACING, 1, np.random.default_rng(0))
    assert found.source == "liver_tumor.nii.gz" and bool((found.mask == HEPATIC_TUMOR).any())


def test_label_files_load_in_ras_as_integer_ids(label_io, tmp_path):
    volume = np.zeros((4, 3, 2), dtype=np.float32)
    volume[0, 1, 1], volume[3, 2, 0] = LIVER, 401.0  # ids above 255 are kept (MR masks)
    nib.save(nib.Nifti1Image(volume, np.diag([-1.5, 2.0, 2.5, 1.0])), tmp_path / "las.nii.gz")  # x grows to the left
    mask = label_io.load_label_file(tmp_path / "las.nii.gz", strict=True)
    assert isinstance(mask, MetaTensor) and mask.dtype == label_io.MASK_DTYPE and mask.shape == (1, 4, 3, 2)
    np.testing.assert_array_equal(mask[0].numpy(), volume[::-1].astype(np.int16))  # flipped to RAS
    assert label_io.mask_spacing(mask) == pytest.approx((1.5, 2.0, 2.5)) and np.asarray(mask.affine)[0, 0] > 0
    assert label_io.has_geometry(mask, (4, 3, 2), (1.5, 2.0, 2.5 + 0.9e-3))
    assert not label_io.has_geometry(mask, (4, 3, 2), (1.5, 2.0, 2.5 + 2e-3)) and not label_io.has_geometry(mask, (4, 3, 3), (1.5, 2.0, 2.5))
    for bad, name in ((0.5, "fraction"), (-1.0, "negative")):
        volume[1, 1, 1] = bad
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / f"{name}.nii.gz")
        with pytest.raises(ValueError, match="non-integer or negative values"):
            label_io.load_label_file(tmp_path / f"{name}.nii.gz", strict=True)
    assert label_io.load_label_file(tmp_path / "fraction.nii.gz")[0, 1, 1, 1] == 0  # rounded without strict
    resampled = label_io.resample_mask(mask, (3.0, 2.0, 2.5), (2, 5, 2))
    assert resampled.shape == (1, 2, 5, 2) and resampled.dtype == label_io.MASK_DTYPE
    assert label_io.mask_spacing(resampled) == pytest.approx((3.0, 2.0, 2.5))
    assert set(torch.unique(resampled).tolist()) <= {0, LIVER, 401}  # nearest neighbour: no new ids


# ----------------------------------------------------------------------------------------------------------
# Missing files and zip extraction
# ----------------------------------------------------------------------------------------------------------


def test_missing_database_or_folder_names_the_config_ids(masks, tmp_path):
    (tmp_path / "db.json").write_text("[]")
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="all_mask_files_json") as info:
        masks.load_candidate_database(tmp_path / "missing.json", tmp_path / "masks")
    assert "python -m monai.bundle download_large_files --bundle_path" in str(info.value)
    with pytest.raises(FileNotFoundError, match="all_mask_files_base_dir") as info:
        masks.load_candidate_database(tmp_path / "db.json", tmp_path / "missing")
    assert "download_large_files" in str(info.value) and "missing.zip" in str(info.value)
    (tmp_path / "dict.json").write_text('{"candidates": []}')
    with pytest.raises(ValueError, match="JSON list"):
        masks.load_candidate_database(tmp_path / "dict.json", tmp_path / "masks")


def _zip_masks(folder: Path, archive: Path, nested: bool) -> Path:
    """``<archive>.zip`` of the mask folder: holding the folder itself (nested) or its files directly."""
    if nested:
        return Path(shutil.make_archive(str(archive), "zip", root_dir=folder.parent, base_dir=folder.name))
    return Path(shutil.make_archive(str(archive), "zip", root_dir=folder))


@pytest.fixture
def count_extraction(monkeypatch):
    calls = []
    original = zipfile.ZipFile.extract
    monkeypatch.setattr(zipfile.ZipFile, "extract", lambda self, member, *a, **k: calls.append(member) or original(self, member, *a, **k))
    return calls


@pytest.mark.parametrize("nested", [True, False])
def test_mask_folder_is_extracted_once_from_its_zip(masks, tmp_path, count_extraction, nested):
    json_path, folder = _write_database(tmp_path / "src")
    archive = _zip_masks(folder, tmp_path / "all_masks", nested)
    target = tmp_path / "all_masks"
    assert masks.mask_archive(target) == archive
    first = masks.load_candidate_database(json_path, target, progress=False)
    members = len(count_extraction)
    assert members == len(zipfile.ZipFile(archive).infolist())  # every member, once
    second = masks.load_candidate_database(json_path, target, progress=False)
    assert len(count_extraction) == members  # the folder exists: nothing is unpacked again
    assert all(c.path.is_file() for c in first) and len(first) == len(second) == 7
    assert (target / "sub" / "loses_spleen.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all_masks", "all_masks.zip", "src"]  # no staging left


def test_interrupted_unpacking_leaves_no_mask_folder(masks, tmp_path, monkeypatch):
    _, folder = _write_database(tmp_path / "src")
    archive = _zip_masks(folder, tmp_path / "all_masks", nested=True)
    target = tmp_path / "all_masks"
    original, extracted = zipfile.ZipFile.extract, []

    def interrupted(self, member, *args, **kwargs):
        if len(extracted) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a long unpacking
        extracted.append(member)
        return original(self, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        masks.prepare_mask_folder(target, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all_masks.zip", "src"]  # no half-filled folder, no staging
    monkeypatch.undo()
    assert masks.prepare_mask_folder(target, progress=False) == target  # the next run unpacks it all
    assert masks.missing_mask_files(masks.parse_database(json.loads((tmp_path / "src" / "candidates.json").read_text()), target), target) == []
    assert archive.is_file()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("nested", [True, False])
def test_unpacked_mask_folder_gets_umask_permissions(masks, tmp_path, nested):
    _, folder = _write_database(tmp_path / "src")
    _zip_masks(folder, tmp_path / "all_masks", nested)
    umask = os.umask(0o022)
    os.umask(umask)
    target = masks.prepare_mask_folder(tmp_path / "all_masks", progress=False)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others like any folder, not mkdtemp's 0700


@pytest.mark.parametrize("nested", [True, False])
def test_missing_mask_files_reads_the_zip_member_list_without_unpacking(masks, tmp_path, count_extraction, nested):
    json_path, folder = _write_database(tmp_path / "src")
    _zip_masks(folder, tmp_path / "all_masks", nested)
    target = tmp_path / "all_masks"
    entries = masks.read_database_entries(json_path)
    other_release = [*entries, {**entries[0], "pseudo_label_filename": "sub/not_in_this_release.nii.gz"}]
    candidates = masks.parse_database(other_release, target)
    assert masks.missing_mask_files(candidates, target) == ["sub/not_in_this_release.nii.gz"]
    assert count_extraction == [] and not target.exists()  # checked against the archive's names only
    masks.prepare_mask_folder(target, progress=False)
    (target / "exact_b.nii.gz").unlink()
    assert masks.missing_mask_files(candidates, target) == ["exact_b.nii.gz", "sub/not_in_this_release.nii.gz"]
    with pytest.raises(FileNotFoundError, match="all_mask_files_base_dir=.*nowhere.*nowhere.zip"):
        masks.missing_mask_files(candidates, tmp_path / "nowhere")


def test_database_entries_are_checked(masks, tmp_path):
    entry = {"pseudo_label_filename": "a.nii.gz", "spacing": [1, 1, 1], "dim": [8, 8, 8], "label_list": [1]}
    (candidate,) = masks.parse_database([entry], tmp_path)
    assert candidate.region_span is None and candidate.path == tmp_path / "a.nii.gz"
    with pytest.raises(ValueError, match=r"entry 1 lacks \['dim'\]"):
        masks.parse_database([entry, {k: v for k, v in entry.items() if k != "dim"}], tmp_path)
    with pytest.raises(ValueError, match="entry 0: `spacing` and `dim` need 3 values"):
        masks.parse_database([{**entry, "spacing": [1, 1]}], tmp_path)
    with pytest.raises(ValueError, match="entry 0: `top_region_index` .* has no non-zero entry"):
        masks.parse_database([{**entry, "top_region_index": [0, 0, 0, 0]}], tmp_path)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="all_mask_files_json=.*broken.json.*not a readable JSON file"):
        masks.read_database_entries(tmp_path / "broken.json")


def test_regions_by_anatomy_leaves_out_masks_with_excluded_tumors(masks, database):
    regions = masks.regions_by_anatomy(database)
    assert regions[LIVER] == frozenset({0, 1, 2}) and regions[HEPATIC_TUMOR] == frozenset({1, 2})
    without_tumors = masks.regions_by_anatomy(database, exclude_tumors=[HEPATIC_TUMOR, BONE_LESION])
    assert HEPATIC_TUMOR not in without_tumors and BONE_LESION not in without_tumors
    (unknown,) = masks.parse_database([{"pseudo_label_filename": "a", "spacing": [1] * 3, "dim": [8] * 3, "label_list": [5]}], ".")
    assert masks.regions_by_anatomy([unknown]) == {5: frozenset({None})}


# ----------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------


def _sphere(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return ((grid - np.asarray(centre).reshape(3, 1, 1, 1)) ** 2).sum(0) <= radius**2


def _meta(volume: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(volume[None], dtype=torch.int16), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))


def _liver_with_tumor() -> MetaTensor:
    volume = np.zeros((48, 48, 48), dtype=np.int16)
    volume[6:42, 8:40, 10:38] = LIVER
    volume[_sphere(volume.shape, (24, 24, 24), 4)] = HEPATIC_TUMOR
    volume[44:47, 2:46, 2:46] = BONE
    return _meta(volume)


def test_hepatic_tumor_moves_inside_the_liver_reproducibly(augmentation):
    mask = _liver_with_tumor()
    before = mask.clone()
    out, result = augmentation.augment_tumor(mask, HEPATIC_TUMOR, np.random.default_rng(3), device="cpu")
    again, _ = augmentation.augment_tumor(mask, HEPATIC_TUMOR, np.random.default_rng(3), device="cpu")
    other, _ = augmentation.augment_tumor(mask, HEPATIC_TUMOR, np.random.default_rng(4), device="cpu")

    assert torch.equal(mask, before)  # input untouched
    assert result.augmented and result.kind == "tumor" and result.tumor_id == HEPATIC_TUMOR and 1 <= result.attempts <= 40
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not torch.equal(out, mask)
    assert isinstance(out, MetaTensor) and out.dtype == torch.int16 and torch.equal(out.affine, mask.affine)
    moved = out == HEPATIC_TUMOR
    assert bool(torch.isin(mask[moved], torch.tensor([LIVER, HEPATIC_TUMOR], dtype=torch.int16)).all())  # inside the liver
    assert moved.sum() >= 0.8 * (mask == HEPATIC_TUMOR).sum() and result.size_ratio >= 0.8
    assert set(torch.unique(out).tolist()) == {0, LIVER, HEPATIC_TUMOR, BONE}  # raw ids
    assert torch.equal(out == BONE, mask == BONE)  # other organs untouched


def _bone_with_lesion() -> MetaTensor:
    volume = np.zeros((48, 48, 48), dtype=np.int16)
    volume[14:34, 14:34, 4:44] = BONE
    volume[20:26, 20:26, 20:25] = BONE_LESION
    return _meta(volume)


def test_bone_lesion_stays_in_bone_and_its_spot_is_refilled(augmentation):
    mask = _bone_with_lesion()
    out, result = augmentation.augment_tumor(mask, BONE_LESION, np.random.default_rng(0), device="cpu")
    assert result.augmented
    lesion = out == BONE_LESION
    assert bool(torch.isin(mask[lesion], torch.tensor([BONE, BONE_LESION], dtype=torch.int16)).all())
    assert lesion.sum() >= 0.8 * (mask == BONE_LESION).sum()
    vacated = (mask == BONE_LESION) & ~lesion
    assert bool((out[vacated] == BONE).all())
    assert bool((out[:, :, :, 44:] == 0).all())  # RandAffine has no z motion for bone lesions


def test_lung_tumor_spot_is_refilled_with_the_surrounding_lobe(augmentation):
    volume = np.zeros((48, 48, 48), dtype=np.int16)
    volume[4:24, 6:42, 6:42] = 28
    volume[24:44, 6:42, 6:42] = 30
    volume[_sphere(volume.shape, (34, 24, 24), 4)] = LUNG_TUMOR
    mask = _meta(volume)
    out, result = augmentation.augment_tumor(mask, LUNG_TUMOR, np.random.default_rng(1), device="cpu")
    assert result.augmented and result.size_ratio >= 0.85
    tumor = out == LUNG_TUMOR
    vacated = (mask == LUNG_TUMOR) & ~tumor
    assert vacated.any() and bool((out[vacated] == 30).all())
    assert bool(torch.isin(mask[tumor], torch.tensor([28, 30, LUNG_TUMOR], dtype=torch.int16)).all())


def test_impossible_augmentation_gives_up_unchanged(augmentation):
    volume = np.zeros((48, 48, 48), dtype=np.int16)
    tumor = _sphere(volume.shape, (24, 24, 24), 4)
    volume[_sphere(volume.shape, (24, 24, 24), 5)] = LIVER  # a liver barely larger than its tumour
    volume[tumor] = HEPATIC_TUMOR
    mask = _meta(volume)
    out, result = augmentation.augment_tumor(mask, HEPATIC_TUMOR, np.random.default_rng(0), device="cpu", max_attempts=4)
    assert not result.augmented and result.attempts == 4 and torch.equal(out, mask)
    assert result.size_ratio < 0.8 and "4 attempts" in result.message

    no_liver = _meta(np.where(tumor, HEPATIC_TUMOR, 0).astype(np.int16))
    out, result = augmentation.augment_tumor(no_liver, HEPATIC_TUMOR, np.random.default_rng(0))
    assert not result.augmented and result.attempts == 0 and torch.equal(out, no_liver)
    with pytest.raises(ValueError, match="supported ids"):
        augmentation.augment_tumor(mask, LIVER, np.random.default_rng(0))


def test_augment_mask_dispatches(augmentation):
    mask = _bone_with_lesion()
    out, reports = augmentation.augment_mask(mask, np.random.default_rng(3), device="cpu")
    expected, _ = augmentation.augment_tumor(mask, BONE_LESION, np.random.default_rng(3), device="cpu")
    assert [r.tumor_id for r in reports] == [BONE_LESION] and torch.equal(out, expected)

    both = _liver_with_tumor()
    both[0, 45, 20:23, 20:23] = BONE_LESION  # inside the bone slab
    _, reports = augmentation.augment_mask(both, np.random.default_rng(0), device="cpu", max_attempts=2)
    assert [r.tumor_id for r in reports] == [BONE_LESION, HEPATIC_TUMOR]  # one step per tumour, in the fixed order

    tumor_free = _meta(_torso((48, 48, 48)))
    zoomed, (report,) = augmentation.augment_mask(tumor_free, np.random.default_rng(0))
    again, _ = augmentation.augment_mask(tumor_free, np.random.default_rng(0))
    assert report.kind == "zoom" and report.augmented and torch.equal(zoomed, again)
    assert zoomed.shape == tumor_free.shape and torch.equal(zoomed.affine, tumor_free.affine)
    assert set(torch.unique(zoomed).tolist()) == set(torch.unique(tumor_free).tolist())
    same, (report,) = augmentation.augment_mask(tumor_free, np.random.default_rng(0), zoom=False)
    assert not report.augmented and same is tumor_free


def test_close_labels_fills_holes_without_growing_at_the_border(augmentation):
    volume = np.zeros((20, 20, 20), dtype=np.int16)
    volume[0:8, 0:8, 0:8] = LIVER  # touches the volume border
    volume[3, 3, 3] = 0  # a hole
    volume[12:18, 12:18, 12:18] = SPLEEN
    volume[15, 15, 15] = 0
    closed = augmentation.close_labels(volume, [LIVER, SPLEEN])
    expected = volume.copy()
    expected[3, 3, 3], expected[15, 15, 15] = LIVER, SPLEEN
    np.testing.assert_array_equal(closed, expected)
    np.testing.assert_array_equal(augmentation.close_labels(volume, []), volume)
