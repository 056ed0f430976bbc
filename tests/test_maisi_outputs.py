"""Unit tests of the MAISI output writers: volumes (writers), previews (preview), run report (report), file names (sample_store)."""

from __future__ import annotations

import importlib
import json
import os
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import BUNDLES_DIR, bundle_scripts

SHAPE = (24, 20, 16)
SPACING = (1.0, 1.5, 2.5)  # anisotropic: X' = 24, Y' = 30, Z' = 40 pixels at 1 mm
LIVER, SPLEEN, BODY, BRAIN_NCR = 1, 3, 200, 401
ITK_ONLY_EXTS = (".nrrd", ".mha")


@pytest.fixture(scope="module")
def maisi():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        names = ("writers", "preview", "report", "output_intensity", "quality", "sample_store", "settings", "checkpoint")
        yield SimpleNamespace(**{name: importlib.import_module(f"scripts.{name}") for name in names})


@pytest.fixture(scope="module")
def writers(maisi):
    return maisi.writers


@pytest.fixture(scope="module")
def preview(maisi):
    return maisi.preview


@pytest.fixture(scope="module")
def reports(maisi):
    return maisi.report


def _ct_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1001, size=SHAPE).astype(np.int16)
    image[:2] = -1000  # background
    return image


def _labels(extra_id: int | None = None) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[2:22, 2:18, 2:14] = BODY
    labels[6:14, 6:12, 5:11] = LIVER
    labels[15:19, 12:16, 9:12] = SPLEEN
    if extra_id is not None:
        labels[3:5, 3:5, 3:5] = extra_id
    return labels


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------------- geometry


def test_affine_is_diag_spacing_with_ras_axes(writers):
    affine = writers.make_affine(SPACING)
    np.testing.assert_array_equal(affine, np.diag([*SPACING, 1.0]))
    assert writers.orientation_codes(affine) == ("R", "A", "S")
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    flipped = affine.copy()
    flipped[0, 0] = -1.0
    assert writers.orientation_codes(flipped) == ("L", "A", "S")
    for bad in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), "abc"):
        with pytest.raises(ValueError, match="spacing"):
            writers.make_affine(bad)


# ---------------------------------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_image_written_as_int16_with_exact_values_and_affine(writers, tmp_path, ext):
    image = _ct_image()
    path = writers.write_volume(image, tmp_path / f"ct{ext}", SPACING, np.int16)
    assert path == tmp_path / f"ct{ext}"
    loaded = nib.load(path)
    assert loaded.get_data_dtype() == np.int16
    assert loaded.shape == SHAPE
    np.testing.assert_array_equal(np.asanyarray(loaded.dataobj), image)
    np.testing.assert_allclose(loaded.affine, np.diag([*SPACING, 1.0]))
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    assert loaded.header.get_zooms() == pytest.approx(SPACING)
    assert loaded.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(loaded.affine @ [3, 4, 5, 1], [3 * 1.0, 4 * 1.5, 5 * 2.5, 1])  # origin 0
    assert _files(tmp_path) == [f"ct{ext}"]  # no temporary left behind


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_get_umask_permissions(writers, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = writers.write_volume(_ct_image(), tmp_path / "ct.nii.gz", SPACING, np.int16)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's 0600


def test_torch_and_channel_first_inputs(writers, tmp_path):
    image = _ct_image(1)
    writers.write_volume(torch.from_numpy(image)[None], tmp_path / "t.nii.gz", SPACING, np.int16)
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "t.nii.gz").dataobj), image)
    with pytest.raises(ValueError, match="3D"):
        writers.write_volume(image[0], tmp_path / "flat.nii.gz", SPACING, np.int16)


def test_singleton_axis_stays_3d(writers, tmp_path):
    image = _ct_image()[:, :, :1]
    path = writers.write_volume(image, tmp_path / "slab.nii.gz", SPACING, np.int16)
    assert nib.load(path).shape == (SHAPE[0], SHAPE[1], 1)


@pytest.mark.parametrize(("extra_id", "dtype"), [(None, np.uint8), (255, np.uint8), (BRAIN_NCR, np.int16)])
def test_labels_keep_raw_ids_in_the_smallest_dtype(writers, tmp_path, extra_id, dtype):
    labels = _labels(extra_id)
    path = writers.write_labels(labels, tmp_path / "label.nii.gz", SPACING)
    loaded = nib.load(path)
    assert loaded.get_data_dtype() == dtype
    data = np.asanyarray(loaded.dataobj)
    np.testing.assert_array_equal(data, labels)  # no renumbering
    expected_ids = sorted({0, LIVER, SPLEEN, BODY} | ({extra_id} if extra_id else set()))
    assert np.unique(data).tolist() == expected_ids
    np.testing.assert_allclose(loaded.affine, np.diag([*SPACING, 1.0]))


def test_labels_filtered_and_refused_when_they_do_not_fit(writers, tmp_path):
    labels = _labels(BRAIN_NCR)
    path = writers.write_labels(torch.from_numpy(labels), tmp_path / "kept.nii", SPACING, keep_ids=[LIVER, BODY])
    data = np.asanyarray(nib.load(path).dataobj)
    assert nib.load(path).get_data_dtype() == np.uint8  # 401 dropped -> fits in uint8
    assert np.unique(data).tolist() == [0, LIVER, BODY]
    with pytest.raises(ValueError, match="outside"):  # casting 401 to uint8 would wrap to 145
        writers.write_volume(labels, tmp_path / "wrapped.nii.gz", SPACING, np.uint8)
    with pytest.raises(ValueError, match="non-integer"):
        writers.write_volume(np.full(SHAPE, 0.5, np.float32), tmp_path / "frac.nii.gz", SPACING, np.int16)
    with pytest.raises(ValueError, match="non-negative"):
        writers.write_labels(-labels, tmp_path / "neg.nii.gz", SPACING)
    assert not any(name.startswith(("wrapped", "frac", "neg")) for name in _files(tmp_path))


def test_finalized_ct_round_trips(writers, maisi, tmp_path):
    labels = _labels()
    image = maisi.output_intensity.finalize_ct(np.linspace(-1500, 1500, np.prod(SHAPE)).reshape(SHAPE), labels)
    path = writers.write_volume(image, tmp_path / "ct.nii.gz", SPACING, np.int16)
    data = np.asanyarray(nib.load(path).dataobj)
    assert data.dtype == np.int16 and data.min() >= -1000 and data.max() <= 1000
    np.testing.assert_array_equal(data, image)
    assert (data[labels == 0] == -1000).all()


@pytest.mark.parametrize("ext", ITK_ONLY_EXTS)
def test_itk_only_extension_without_itk_names_the_id(writers, tmp_path, monkeypatch, ext):
    monkeypatch.setattr(writers, "_backend_available", lambda module: module != "itk")  # itk "not installed"
    with pytest.raises(ValueError, match=r"image_output_ext=.*needs the 'itk' package"):
        writers.check_output_ext("image_output_ext", ext)  # what the CT/MR settings check before any weight loads
    with pytest.raises(ValueError, match=r"label_output_ext=.*itk"):
        writers.check_output_ext("label_output_ext", ext)
    with pytest.raises(ValueError, match=r"image_output_ext=.*itk"):
        writers.write_volume(_ct_image(), tmp_path / f"ct{ext}", SPACING, np.int16, config_id="image_output_ext")
    with pytest.raises(ValueError, match=r"output_ext=.*itk.*\['\.nii\.gz', '\.nii'\]"):
        writers.write_volume(_ct_image(), tmp_path / f"ct{ext}", SPACING, np.int16)
    assert _files(tmp_path) == []
    monkeypatch.undo()  # with itk back, the same write succeeds
    assert writers.write_volume(_ct_image(), tmp_path / f"ct{ext}", SPACING, np.int16).exists()


def _read_with_itk(path) -> tuple[np.ndarray, np.ndarray, str]:
    """(X, Y, Z) data in its on-disk dtype, the RAS affine MONAI's ITKReader derives, and itk's pixel type."""
    import itk
    from monai.transforms import LoadImage

    image = itk.imread(str(path))
    on_disk = itk.array_from_image(image).transpose(2, 1, 0)  # a copy; itk arrays are (Z, Y, X)
    loaded = LoadImage(reader="ITKReader", image_only=True, dtype=None)(str(path))
    np.testing.assert_array_equal(np.asarray(loaded), on_disk)
    spacing = tuple(float(s) for s in image.GetSpacing())
    np.testing.assert_allclose(spacing, np.abs(np.diag(np.asarray(loaded.affine)[:3, :3])))
    return on_disk, np.asarray(loaded.affine, dtype=np.float64), str(itk.template(image)[1][0])


@pytest.mark.parametrize("ext", [*ITK_ONLY_EXTS, ".nii"])
def test_itk_round_trip_keeps_values_dtype_and_geometry(writers, tmp_path, ext):
    """Each extension stores exactly the NIfTI's values, dtype and geometry (diag(spacing), RAS, origin 0)."""
    image, labels, small_labels = _ct_image(2), _labels(BRAIN_NCR), _labels()
    reference = nib.load(writers.write_volume(image, tmp_path / "reference.nii.gz", SPACING, np.int16))
    written = {
        "image": (writers.write_volume(image, tmp_path / f"ct{ext}", SPACING, np.int16), image, np.int16),
        "labels": (writers.write_labels(labels, tmp_path / f"label{ext}", SPACING), labels, np.int16),
        "small": (writers.write_labels(small_labels, tmp_path / f"small{ext}", SPACING), small_labels, np.uint8),
    }
    for name, (path, expected, dtype) in written.items():
        data, affine, _ = _read_with_itk(path)
        assert data.shape == SHAPE, name
        assert data.dtype == dtype, name
        np.testing.assert_array_equal(data, expected)
        np.testing.assert_allclose(affine, reference.affine, atol=1e-6)  # same world geometry as the NIfTI
        np.testing.assert_allclose(affine, np.diag([*SPACING, 1.0]), atol=1e-6)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.unique(_read_with_itk(written["labels"][0])[0]).tolist() == [0, LIVER, SPLEEN, BODY, BRAIN_NCR]
    assert not [name for name in _files(tmp_path) if name.startswith(".")]  # no temporary left behind


def test_itk_file_stores_lps_direction_and_zero_origin(writers, tmp_path):
    """ITK's own header: LPS direction diag(-1, -1, 1) (= RAS identity), spacing in mm, origin 0."""
    import itk

    image = itk.imread(str(writers.write_volume(_ct_image(), tmp_path / "ct.nrrd", SPACING, np.int16)))
    np.testing.assert_allclose(np.asarray(image.GetDirection()), np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(tuple(image.GetSpacing()), SPACING)
    np.testing.assert_allclose(tuple(image.GetOrigin()), (0.0, 0.0, 0.0))


def test_dicom_is_no_volume_file(writers, tmp_path, monkeypatch):
    """'.dcm' outputs are DICOM series/Segmentations (dicom.py): the volume writers refuse them, naming the id."""
    with pytest.raises(ValueError, match=r"image_output_ext: .*ct\.dcm' is DICOM, which is written as a series"):
        writers.write_volume(_ct_image(), tmp_path / "ct.dcm", SPACING, np.int16, config_id="image_output_ext")
    with pytest.raises(ValueError, match=r"label_output_ext: .*label\.dcm' is DICOM"):
        writers.write_labels(_labels(), tmp_path / "label.dcm", SPACING)
    monkeypatch.setattr(writers, "_backend_available", lambda module: module != "highdicom")
    for ext in (".dcm", "DCM"):
        with pytest.raises(ValueError, match=rf"image_output_ext='{ext}' needs highdicom, which is not installed"):
            writers.check_output_ext("image_output_ext", ext)
    assert _files(tmp_path) == []


def test_non_volume_extension_refused(writers, tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        writers.write_volume(_ct_image(), tmp_path / "ct.png", SPACING, np.int16)
    with pytest.raises(ValueError, match="image_output_ext"):
        writers.check_output_ext("image_output_ext", ".png")


def test_atomic_write_renames_a_hidden_temporary_and_cleans_up(maisi, tmp_path):
    """common/core's atomic_write: a hidden temporary with the destination's ending, then a rename."""
    checkpoint = maisi.checkpoint
    seen = []

    def write(tmp_name):
        seen.append(os.path.basename(tmp_name))
        with open(tmp_name, "w") as handle:
            handle.write("new")

    assert checkpoint.atomic_write(tmp_path / "sub" / "a.nii.gz", write) == tmp_path / "sub" / "a.nii.gz"
    assert seen[-1].startswith(".a.") and seen[-1].endswith(".tmp.nii.gz")  # writers pick the format by the ending
    checkpoint.atomic_write(tmp_path / "sub" / "a.nii.gz", write, suffix=".json")
    assert seen[-1].startswith(".a.nii.gz.") and seen[-1].endswith(".tmp.json")

    def interrupted(tmp_name):
        write(tmp_name)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoint.atomic_write(tmp_path / "sub" / "a.nii.gz", interrupted)
    assert _files(tmp_path / "sub") == ["a.nii.gz"]
    checkpoint.atomic_torch_save({"epoch": 3}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True) == {"epoch": 3}
    assert "ckpt.pt" in _files(tmp_path) and not [n for n in _files(tmp_path) if n.startswith(".")]


def test_every_output_file_is_renamed_into_place(maisi, writers, preview, reports, tmp_path, monkeypatch):
    """Volumes, label maps, previews, sample records and the run report all appear by one rename of a hidden sibling."""
    renames = []
    real_replace = os.replace

    def recording_replace(source, destination):
        renames.append((os.fspath(source), os.fspath(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    task = maisi.settings.SampleTask("ct", 0, 0, 42)
    store = maisi.sample_store.SampleStore(tmp_path, ".nii.gz", ".nrrd")
    paths = store.paths(task)
    written = [
        writers.write_volume(_ct_image(), paths["image"], SPACING, np.int16),
        writers.write_labels(_labels(), paths["label"], SPACING),
        preview.preview_png(_ct_image(), _labels(), paths["preview"], spacing=SPACING),
        store.write_record(task, "fingerprint", {"seed": 42, "mask_source": "generated"}),
        reports.write_run_report(store.report_path, {}, [], {}),
    ]
    assert [destination for _, destination in renames] == [str(path) for path in written]
    for source, destination in renames:
        name = os.path.basename(destination)
        ending = next(e for e in (".nii.gz", ".nrrd", ".png", ".json") if name.endswith(e))
        assert os.path.dirname(source) == os.path.dirname(destination)  # a rename, never a copy across folders
        assert os.path.basename(source).startswith(".") and source.endswith(f".tmp{ending}")
    assert _files(tmp_path) == sorted(path.name for path in written)


def test_failed_write_keeps_old_file_and_leaves_no_temporary(writers, preview, tmp_path, monkeypatch):
    path = writers.write_volume(_ct_image(0), tmp_path / "ct.nii.gz", SPACING, np.int16)
    before = path.read_bytes()

    class FailingWriter:
        def __init__(self, output_dtype=None):
            self.data_obj, self.affine = None, None

        def set_data_array(self, data_array, **kwargs):
            self.data_obj = data_array

        def write(self, filename, verbose=False, **kwargs):
            with open(filename, "wb") as handle:
                handle.write(b"half-written")
            raise OSError("disk full")

    monkeypatch.setattr(writers, "_writer_class", lambda ext, config_id: FailingWriter)
    with pytest.raises(OSError, match="disk full"):
        writers.write_volume(_ct_image(1), path, SPACING, np.int16)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ct.nii.gz"]
    monkeypatch.undo()

    png = preview.preview_png(_ct_image(), _labels(), tmp_path / "p.png", spacing=SPACING)
    png_bytes = png.read_bytes()

    def failing_save(self, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        preview.preview_png(_ct_image(2), _labels(), png, spacing=SPACING)
    assert png.read_bytes() == png_bytes
    assert _files(tmp_path) == ["ct.nii.gz", "p.png"]


# ---------------------------------------------------------------------------------------------------- names


def test_sample_file_names_are_predictable(maisi, tmp_path):
    SampleTask, SampleStore = maisi.settings.SampleTask, maisi.sample_store.SampleStore
    task = SampleTask(request_id="sample", request_index=0, index=0, seed=42)
    assert SampleStore(tmp_path, ".nii.gz", ".nii").paths(task) == {
        "image": tmp_path / "sample_0000_seed42_image.nii.gz",
        "label": tmp_path / "sample_0000_seed42_label.nii",
        "preview": tmp_path / "sample_0000_seed42_preview.png",
        "record": tmp_path / "sample_0000_seed42.json",
    }
    image_only = SampleStore(tmp_path, ".nii").paths(SampleTask("ct", 3, 12, 7))
    assert image_only["image"].name == "ct_0012_seed7_image.nii" and "label" not in image_only
    assert SampleStore(tmp_path, ".nii.gz").report_path == tmp_path / "generation_report.json"
    check_request_id = maisi.settings.check_request_id
    assert check_request_id("liver_1.5mm", "request_manifest row 0") == "liver_1.5mm"
    assert check_request_id(7, "request_manifest row 0") == "7"
    for bad in ("a/b", "", ".hidden", "a b", True, None):  # request ids become file-name prefixes
        with pytest.raises(ValueError, match=r"request_manifest row 2: id="):
            check_request_id(bad, "request_manifest row 2")


# ---------------------------------------------------------------------------------------------------- preview


def test_preview_has_three_square_pixel_panels(preview, tmp_path):
    path = preview.preview_png(_ct_image(), _labels(), tmp_path / "p.png", spacing=SPACING)
    width, height = Image.open(path).size
    x, y, z = 24, 30, 40  # extents in mm at the finest spacing (1 mm)
    assert (width, height) == (x + x + y + 2 * preview.PREVIEW_GAP, max(y, z))
    views = preview.orthogonal_views(_ct_image(), _labels(), spacing=SPACING)
    assert {name: v.shape for name, v in views.items()} == {
        "axial": (y, x, 3),
        "coronal": (z, x, 3),
        "sagittal": (z, y, 3),
    }
    small = preview.orthogonal_views(_ct_image(), None, spacing=SPACING, max_panel_size=20)  # 2 mm pixels
    assert {name: v.shape[:2] for name, v in small.items()} == {
        "axial": (15, 12),
        "coronal": (20, 12),
        "sagittal": (20, 15),
    }
    assert _files(tmp_path) == ["p.png"]
    with pytest.raises(ValueError, match=".png"):
        preview.preview_png(_ct_image(), _labels(), tmp_path / "p.jpg", spacing=SPACING)
    with pytest.raises(ValueError, match="window"):
        preview.preview_png(_ct_image(), _labels(), tmp_path / "w.png", (100, -100), spacing=SPACING)
    with pytest.raises(ValueError, match="same shape"):
        preview.preview_png(_ct_image(), _labels()[:-1], tmp_path / "s.png", spacing=SPACING)
    assert _files(tmp_path) == ["p.png"]


def test_preview_overlay_colours_and_radiological_orientation(preview):
    image = np.zeros(SHAPE, dtype=np.int16)  # 0 HU -> grey 127.5 in the [-1000, 1000] window
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[12:24, 10:20, 4:12] = BODY  # excluded from the overlay by default
    labels[16:22, 12:18, 6:10] = LIVER  # toward patient right (high x), anterior (high y), slices through it
    views = preview.orthogonal_views(image, labels, spacing=(1.0, 1.0, 1.0))
    colour = preview.label_colors([LIVER])[0].astype(float)
    expected = np.round((1 - 0.35) * 127.5 + 0.35 * colour).astype(np.uint8)
    assert not (expected == expected[0]).all()  # a colour, not a grey

    axial = views["axial"]  # rows: anterior at the top; columns: patient right on the left
    overlay = np.all(axial == expected, axis=-1)
    rows, cols = np.nonzero(overlay)
    assert overlay.sum() == 6 * 6
    assert rows.max() < SHAPE[1] // 2 and cols.max() < SHAPE[0] // 2  # upper left quadrant
    assert (axial[~overlay] == 128).all()  # body not tinted, background plain grey
    coronal = views["coronal"]  # superior at the top, patient right on the left
    rows, cols = np.nonzero(np.all(coronal == expected, axis=-1))
    assert rows.size == 6 * 4 and cols.max() < SHAPE[0] // 2
    assert (rows.min(), rows.max()) == (SHAPE[2] - 10, SHAPE[2] - 7)  # z 6..9 counted from the top
    sagittal = views["sagittal"]  # anterior on the left
    rows, cols = np.nonzero(np.all(sagittal == expected, axis=-1))
    assert rows.size == 6 * 4 and cols.max() < SHAPE[1] // 2

    tinted = preview.orthogonal_views(image, labels, spacing=(1.0, 1.0, 1.0), exclude_ids=())["axial"]
    assert np.count_nonzero(~np.all(tinted == 128, axis=-1)) == 12 * 10  # the body too when not excluded


def test_preview_bytes_are_deterministic(preview, tmp_path):
    first = preview.preview_png(_ct_image(), _labels(BRAIN_NCR), tmp_path / "a.png", spacing=SPACING).read_bytes()
    second = preview.preview_png(_ct_image(), _labels(BRAIN_NCR), tmp_path / "b.png", spacing=SPACING).read_bytes()
    assert first == second
    other = preview.preview_png(_ct_image(5), _labels(BRAIN_NCR), tmp_path / "c.png", spacing=SPACING).read_bytes()
    assert other != first
    colours = preview.label_colors(range(1, 256))
    assert len({tuple(c) for c in colours}) == 255  # distinct colour per id
    np.testing.assert_array_equal(preview.label_colors([BRAIN_NCR, LIVER])[1], colours[LIVER - 1])
    np.testing.assert_array_equal(preview.label_colors([BRAIN_NCR]), preview.label_colors(np.array([BRAIN_NCR])))


def test_preview_mr_percentile_window(preview, tmp_path):
    image = np.tile(np.arange(SHAPE[0], dtype=np.int16)[:, None, None] * 40, (1, *SHAPE[1:]))
    views = preview.orthogonal_views(image, None, spacing=SPACING, window=None)
    axial = views["axial"][..., 0]
    assert axial.min() == 0 and axial.max() == 255
    path = preview.preview_png(torch.from_numpy(image), None, tmp_path / "mr.png", None, spacing=SPACING)
    assert Image.open(path).size == (86, 40)


# ---------------------------------------------------------------------------------------------------- report


def _reject_constants(name):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_run_report_round_trips_with_versions_timings_and_null_nans(maisi, reports, tmp_path):
    quality_report = maisi.quality.QualityReport(
        passed=False,
        organs={
            "liver": {"median": 60.0, "low": -21.6, "high": 162.0, "voxels": 288, "passed": True},
            "spleen": {"median": float("nan"), "low": 0.0, "high": 100.0, "voxels": 48, "passed": False},
        },
        skipped=["lung", "brain"],
        no_statistics=["hepatic tumor"],
        attempts=3,
    )
    names = maisi.sample_store.SampleStore(tmp_path, ".nii.gz", ".nii.gz").paths(maisi.settings.SampleTask("sample", 0, 0, 42))
    files = {kind: names[kind] for kind in ("image", "label", "preview")}  # Path values
    samples = [
        {"index": 0, "seed": 42, "mask_source": "database:s0001.nii.gz (exact)", "quality_check": quality_report, **files},
        {"index": 1, "seed": np.int64(43), "mask_source": "user:/data/mask.nii.gz", "quality_check": None},
    ]
    settings = {
        "version": "rflow-ct",
        "spacing": (1.0, 1.5, 2.5),
        "output_size": np.array([256, 256, 128]),
        "memory_budget_gb": float("inf"),
        "device": "cpu",
        "anatomy_list": ["liver"],
    }
    timings = {"mask_s": 0.5, "diffusion_s": np.float32(2.25), "decode_s": float("nan")}
    path = reports.write_run_report(tmp_path / "generation_report.json", settings, samples, timings)
    assert _files(tmp_path) == ["generation_report.json"]
    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constants)

    assert {"torch", "monai", "numpy"} <= data["versions"].keys()
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["numpy"] == np.__version__
    assert data["device"].startswith("cpu")
    assert data["timings"] == {"mask_s": 0.5, "diffusion_s": 2.25, "decode_s": None}
    assert data["settings"]["spacing"] == [1.0, 1.5, 2.5] and data["settings"]["output_size"] == [256, 256, 128]
    assert data["settings"]["memory_budget_gb"] is None
    first, second = data["samples"]
    assert (first["seed"], second["seed"]) == (42, 43)
    assert first["mask_source"].startswith("database:") and second["mask_source"] == "user:/data/mask.nii.gz"
    assert first["image"] == str(names["image"]) and first["preview"].endswith("_preview.png")
    qc = first["quality_check"]
    assert qc["passed"] is False and qc["attempts"] == 3 and qc["failed_organs"] == ["spleen"]
    assert qc["organs"]["spleen"]["median"] is None and qc["organs"]["liver"]["median"] == 60.0
    assert qc["skipped"] == ["lung", "brain"] and qc["no_statistics"] == ["hepatic tumor"]
    assert qc["summary"] == quality_report.summary() and "spleen median nan HU outside [0.0, 100.0]" in qc["summary"]
    assert second["quality_check"] is None

    loaded = reports.load_run_report(path)
    assert loaded.to_dict() == data
    assert json.loads(loaded.to_json()) == data


def test_jsonable_gives_plain_json_data(reports):
    class WithToDict:
        def to_dict(self):
            return {"median": float("nan"), "ids": (1, np.int16(2))}

    value = {
        1: WithToDict(),
        "tensor": torch.tensor([[1.5, 2.0]]),
        "scalar": torch.tensor(3),
        "flag": np.bool_(True),
        "ids": {3, 1, 2},
        "device": torch.device("cpu"),
        "dtype": np.dtype(np.int16),
        "inf": np.float64("-inf"),
        "other": object,
    }
    assert reports.jsonable(value) == {
        "1": {"median": None, "ids": [1, 2]},
        "tensor": [[1.5, 2.0]],
        "scalar": 3,
        "flag": True,
        "ids": [1, 2, 3],
        "device": "cpu",
        "dtype": "int16",
        "inf": None,
        "other": str(object),
    }
    assert json.loads(json.dumps(reports.jsonable(value), allow_nan=False))["1"]["ids"] == [1, 2]


def test_run_report_requires_seed_and_mask_source(reports, tmp_path):
    with pytest.raises(ValueError, match=r"samples\[0\] lacks mask_source"):
        reports.write_run_report(tmp_path / "r.json", {}, [{"seed": 1}], {})
    with pytest.raises(ValueError, match="timings"):
        reports.write_run_report(tmp_path / "r.json", {}, [], [1.0])
    assert _files(tmp_path) == []
    path = reports.write_run_report(tmp_path / "r.json", {}, [], {}, device="cuda:3", versions={"torch": "x"})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["versions"] == {"torch": "x"} and data["device"].startswith("cuda:3")


def test_preview_cuts_through_the_organs_not_the_body_centre(preview):
    image = np.zeros(SHAPE, dtype=np.int16)
    labels = np.full(SHAPE, BODY, dtype=np.uint8)  # the body fills the volume; its centre misses the liver
    labels[:4, :4, :3] = LIVER
    views = preview.orthogonal_views(image, labels, spacing=(1.0, 1.0, 1.0))
    expected = np.round((1 - 0.35) * 127.5 + 0.35 * preview.label_colors([LIVER])[0].astype(float)).astype(np.uint8)
    for name in ("axial", "coronal", "sagittal"):
        assert np.all(views[name] == expected, axis=-1).any(), f"the {name} view misses the liver"
