"""Unit tests of the shared MAISI intensity mapping and latent-embedding files (common/maisi/core)."""

from __future__ import annotations

import importlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, REPO_ROOT, bundle_scripts

MODALITY_MAPPING = json.loads((REPO_ROOT / "common" / "maisi" / "data" / "modality_mapping.json").read_text())


@pytest.fixture(scope="module")
def modules():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield importlib.import_module("scripts.intensity"), importlib.import_module("scripts.embeddings")


@pytest.fixture(scope="module")
def intensity(modules):
    return modules[0]


@pytest.fixture(scope="module")
def embeddings(modules):
    return modules[1]


# ---------------------------------------------------------------------------------------------------
# intensity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["ct", "CT", 1, "1", 3, "ct_contrast"])
def test_ct_window_maps_hu_to_unit_range_with_clipping(intensity, modality):
    (transform,) = intensity.intensity_transforms("image", modality, MODALITY_MAPPING)
    hu = torch.tensor([[-3000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]])
    out = transform({"image": hu})["image"]
    np.testing.assert_allclose(np.asarray(out), [[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("modality", ["mr", "mri", "mri_t1", 9, "17", "MRI_FLAIR"])
def test_mr_percentiles_map_zero_to_zero_and_p995_to_one_without_clipping(intensity, modality):
    (transform,) = intensity.intensity_transforms(["image"], modality, MODALITY_MAPPING)
    values = torch.arange(0, 1001, dtype=torch.float32)[None]  # 0..1000
    out = np.asarray(transform({"image": values})["image"])[0]
    p995 = np.percentile(np.arange(0, 1001), 99.5)
    assert out[0] == pytest.approx(0.0, abs=1e-6)
    assert out[int(p995)] == pytest.approx(int(p995) / p995, rel=1e-4)
    assert out.max() == pytest.approx(1000 / p995, rel=1e-4) and out.max() > 1.0  # tail kept (clip=False)


def test_intensity_does_not_touch_other_keys(intensity):
    (transform,) = intensity.intensity_transforms("image", "ct")
    label = torch.tensor([[0, 1, 200]])
    out = transform({"image": torch.zeros(1, 3), "label": label})
    assert torch.equal(out["label"], label)


@pytest.mark.parametrize(
    ("modality", "message"),
    [(0, "code 0"), ("unknown", "code 0"), ("xray", "modality_mapping"), (None, "modality=None"), (True, "modality=True")],
)
def test_intensity_refuses_bad_modality(intensity, modality, message):
    with pytest.raises(ValueError, match=message):
        intensity.intensity_transforms("image", modality, MODALITY_MAPPING)


def test_modality_family_without_mapping_uses_prefix(intensity):
    assert intensity.modality_family("ct_wo_contrast") == "ct"
    assert intensity.modality_family("mri_t2") == "mr"
    with pytest.raises(ValueError, match="pet"):
        intensity.modality_family("pet")


# ---------------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------------


def _sidecar(**changes):
    sidecar = {
        "dim": [32, 24, 16],
        "spacing": [1.5, 1.5, 2.0],
        "modality": 1,
        "top_region_index": [0, 1, 0, 0],
        "bottom_region_index": [0, 0, 1, 0],
    }
    sidecar.update(changes)
    return sidecar


def test_write_read_latent_round_trip_channel_last_on_disk(embeddings, tmp_path):
    latent = torch.randn(4, 8, 6, 4)
    path = embeddings.write_latent(tmp_path / "case_emb.nii.gz", latent, (1.5, 1.5, 2.0), _sidecar())
    image = nib.load(str(path))
    assert image.shape == (8, 6, 4, 4)
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.diag(image.affine), [6.0, 6.0, 8.0, 1.0])
    back = embeddings.read_latent(path)
    assert back.dtype == torch.float32 and back.shape == (4, 8, 6, 4)
    assert torch.equal(back, latent)
    sidecar = json.loads((tmp_path / "case_emb.nii.gz.json").read_text())
    assert sidecar == _sidecar()
    assert embeddings.read_sidecar(path) == _sidecar()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_emb.nii.gz", "case_emb.nii.gz.json"]  # no temp files


def test_write_latent_accepts_batched_latent_and_defaults_regions(embeddings, tmp_path):
    sidecar = _sidecar()
    del sidecar["top_region_index"], sidecar["bottom_region_index"]
    path = embeddings.write_latent(tmp_path / "a_emb.nii.gz", np.zeros((1, 4, 2, 2, 2)), (1, 1, 1), sidecar)
    assert embeddings.read_sidecar(path)["top_region_index"] == [0, 0, 0, 0]
    assert embeddings.read_latent(path).shape == (4, 2, 2, 2)


@pytest.mark.parametrize(
    ("latent", "sidecar", "message"),
    [
        (np.zeros((3, 2, 2, 2)), _sidecar(), r"\(4, X, Y, Z\)"),
        (np.full((4, 2, 2, 2), np.nan), _sidecar(), "NaN"),
        (np.zeros((4, 2, 2, 2)), _sidecar(modality=-1), "modality"),
        (np.zeros((4, 2, 2, 2)), _sidecar(modality=1.5), "modality"),
        (np.zeros((4, 2, 2, 2)), _sidecar(top_region_index=[1, 1, 0, 0]), "top_region_index"),
        (np.zeros((4, 2, 2, 2)), _sidecar(bottom_region_index=[0, 1]), "bottom_region_index"),
        (np.zeros((4, 2, 2, 2)), _sidecar(spacing=[1, 0, 1]), "spacing"),
        (np.zeros((4, 2, 2, 2)), _sidecar(dim=[4, 4]), "dim"),
    ],
)
def test_write_latent_refuses_bad_input(embeddings, tmp_path, latent, sidecar, message):
    with pytest.raises(ValueError, match=message):
        embeddings.write_latent(tmp_path / "x_emb.nii.gz", latent, (1, 1, 1), sidecar)
    assert not list(tmp_path.iterdir())


def test_read_sidecar_errors_name_the_file(embeddings, tmp_path):
    latent = tmp_path / "b_emb.nii.gz"
    with pytest.raises(ValueError, match="b_emb.nii.gz.json' does not exist"):
        embeddings.read_sidecar(latent)
    (tmp_path / "b_emb.nii.gz.json").write_text("{not json")
    with pytest.raises(ValueError, match="b_emb.nii.gz.json' cannot be read"):
        embeddings.read_sidecar(latent)
    (tmp_path / "b_emb.nii.gz.json").write_text(json.dumps({"dim": [4, 4, 4], "spacing": [1, 1, 1]}))
    with pytest.raises(ValueError, match="lacks \\['modality'\\]"):
        embeddings.read_sidecar(latent)
    assert embeddings.read_sidecar(latent, default_modality=1)["modality"] == 1  # published notebook sidecars
    with pytest.raises(ValueError, match="does not exist"):
        embeddings.read_latent(latent)


def test_load_latentd_builds_training_sample(embeddings, tmp_path):
    latent = torch.randn(4, 4, 4, 2)
    path = embeddings.write_latent(tmp_path / "c_emb.nii.gz", latent, (1.5, 1.5, 2.0), _sidecar(modality=9))
    sample = embeddings.LoadLatentd("image")({"image": str(path), "fold": 0})
    assert torch.equal(sample["image"], latent)
    assert sample["spacing"].dtype == torch.float32 and sample["spacing"].tolist() == [1.5, 1.5, 2.0]
    assert sample["modality"].dtype == torch.long and sample["modality"].item() == 9
    assert sample["top_region_index"].tolist() == [0, 1, 0, 0]
    assert sample["bottom_region_index"].tolist() == [0, 0, 1, 0]
    assert sample["dim"].tolist() == [32, 24, 16]
    assert sample["fold"] == 0


def test_latent_path_for_strips_image_extension(embeddings, tmp_path):
    assert embeddings.latent_path_for("/data/case_001.nii.gz", tmp_path) == tmp_path / "case_001_emb.nii.gz"
    assert embeddings.latent_path_for("case.nii", tmp_path).name == "case_emb.nii.gz"


def test_two_images_with_one_latent_name_are_refused(embeddings, tmp_path):
    items = [{"image": "/data/a/case_1.nii.gz"}, {"image": "/data/b/case_2.nii.gz"}]
    embeddings.check_latent_names(items, tmp_path)
    with pytest.raises(ValueError, match=r"'/data/a/case_1.nii.gz' and '/data/b/case_1.nii' would both be encoded to .*case_1_emb.nii.gz'"):
        embeddings.check_latent_names([*items, {"image": "/data/b/case_1.nii"}], tmp_path)


def test_shard_items_deals_every_item_to_one_rank(embeddings):
    items = [{"image": str(i)} for i in range(5)]
    shares = [embeddings.shard_items(items, rank, 2) for rank in (0, 1)]
    assert [[item["image"] for item in share] for share in shares] == [["0", "2", "4"], ["1", "3"]]
    assert embeddings.shard_items(items, 0, 1) == items
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank=|world_size="):
            embeddings.shard_items(items, rank, world_size)
