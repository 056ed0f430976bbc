"""Unit tests of the shared MAISI output writers (common/maisi/scripts/outputs.py): volumes, previews, run report."""

from __future__ import annotations

import importlib
import json
import math
import os

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
        yield (
            importlib.import_module("scripts.outputs"),
            importlib.import_module("scripts.quality"),
            importlib.import_module("scripts.validation"),
        )


@pytest.fixture(scope="module")
def outputs(maisi):
    return maisi[0]


@pytest.fixture(scope="module")
def quality(maisi):
    return maisi[1]


@pytest.fixture(scope="module")
def validation(maisi):
    return maisi[2]


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


def test_affine_is_diag_spacing_with_ras_axes(outputs):
    affine = outputs.make_affine(SPACING)
    np.testing.assert_array_equal(affine, np.diag([*SPACING, 1.0]))
    assert outputs.orientation_codes(affine) == ("R", "A", "S")
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    flipped = affine.copy()
    flipped[0, 0] = -1.0
    assert outputs.orientation_codes(flipped) == ("L", "A", "S")
    for bad in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), "abc"):
        with pytest.raises(ValueError, match="spacing"):
            outputs.make_affine(bad)


# ---------------------------------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_image_written_as_int16_with_exact_values_and_affine(outputs, tmp_path, ext):
    image = _ct_image()
    path = outputs.write_volume(image, tmp_path / f"ct{ext}", SPACING, np.int16)
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
def test_written_files_get_umask_permissions(outputs, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = outputs.write_volume(_ct_image(), tmp_path / "ct.nii.gz", SPACING, np.int16)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's 0600


def test_torch_and_channel_first_inputs(outputs, tmp_path):
    image = _ct_image(1)
    outputs.write_volume(torch.from_numpy(image)[None], tmp_path / "t.nii.gz", SPACING, np.int16)
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "t.nii.gz").dataobj), image)
    with pytest.raises(ValueError, match="3D"):
        outputs.write_volume(image[0], tmp_path / "flat.nii.gz", SPACING, np.int16)


def test_singleton_axis_stays_3d(outputs, tmp_path):
    image = _ct_image()[:, :, :1]
    path = outputs.write_volume(image, tmp_path / "slab.nii.gz", SPACING, np.int16)
    assert nib.load(path).shape == (SHAPE[0], SHAPE[1], 1)


@pytest.mark.parametrize(("extra_id", "dtype"), [(None, np.uint8), (255, np.uint8), (BRAIN_NCR, np.int16)])
def test_labels_keep_raw_ids_in_the_smallest_dtype(outputs, tmp_path, extra_id, dtype):
    labels = _labels(extra_id)
    path = outputs.write_labels(labels, tmp_path / "label.nii.gz", SPACING)
    loaded = nib.load(path)
    assert loaded.get_data_dtype() == dtype
    data = np.asanyarray(loaded.dataobj)
    np.testing.assert_array_equal(data, labels)  # no renumbering
    expected_ids = sorted({0, LIVER, SPLEEN, BODY} | ({extra_id} if extra_id else set()))
    assert np.unique(data).tolist() == expected_ids
    np.testing.assert_allclose(loaded.affine, np.diag([*SPACING, 1.0]))


def test_labels_filtered_and_refused_when_they_do_not_fit(outputs, quality, tmp_path):
    labels = _labels(BRAIN_NCR)
    path = outputs.write_labels(torch.from_numpy(labels), tmp_path / "kept.nii", SPACING, keep_ids=[LIVER, BODY])
    data = np.asanyarray(nib.load(path).dataobj)
    assert nib.load(path).get_data_dtype() == np.uint8  # 401 dropped -> fits in uint8
    assert np.unique(data).tolist() == [0, LIVER, BODY]
    with pytest.raises(ValueError, match="outside"):  # casting 401 to uint8 would wrap to 145
        outputs.write_volume(labels, tmp_path / "wrapped.nii.gz", SPACING, np.uint8)
    with pytest.raises(ValueError, match="non-integer"):
        outputs.write_volume(np.full(SHAPE, 0.5, np.float32), tmp_path / "frac.nii.gz", SPACING, np.int16)
    with pytest.raises(ValueError, match="non-negative"):
        outputs.write_labels(-labels, tmp_path / "neg.nii.gz", SPACING)
    assert not any(name.startswith(("wrapped", "frac", "neg")) for name in _files(tmp_path))


def test_finalized_ct_round_trips(outputs, quality, tmp_path):
    labels = _labels()
    image = quality.finalize_ct(np.linspace(-1500, 1500, np.prod(SHAPE)).reshape(SHAPE), labels)
    path = outputs.write_volume(image, tmp_path / "ct.nii.gz", SPACING, np.int16)
    data = np.asanyarray(nib.load(path).dataobj)
    assert data.dtype == np.int16 and data.min() >= -1000 and data.max() <= 1000
    np.testing.assert_array_equal(data, image)
    assert (data[labels == 0] == -1000).all()


@pytest.mark.parametrize("ext", ITK_ONLY_EXTS)
def test_itk_only_extension_without_itk_names_the_id(outputs, validation, tmp_path, monkeypatch, ext):
    monkeypatch.setattr(validation, "_backend_available", lambda module: module != "itk")  # itk "not installed"
    with pytest.raises(ValueError, match=r"image_output_ext=.*needs the 'itk' package"):
        outputs.sample_filenames(tmp_path, 0, 1, ext, ".nii.gz")
    with pytest.raises(ValueError, match=r"label_output_ext=.*itk"):
        outputs.sample_filenames(tmp_path, 0, 1, ".nii.gz", ext)
    with pytest.raises(ValueError, match=r"image_output_ext=.*itk"):
        outputs.write_volume(_ct_image(), tmp_path / f"ct{ext}", SPACING, np.int16, config_id="image_output_ext")
    with pytest.raises(ValueError, match=r"output_ext=.*itk.*\['\.nii\.gz', '\.nii'\]"):
        outputs.write_volume(_ct_image(), tmp_path / f"ct{ext}", SPACING, np.int16)
    assert _files(tmp_path) == []
    monkeypatch.undo()  # with itk back, the same write succeeds
    assert outputs.write_volume(_ct_image(), tmp_path / f"ct{ext}", SPACING, np.int16).exists()


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
def test_itk_round_trip_keeps_values_dtype_and_geometry(outputs, tmp_path, ext):
    """Each extension stores exactly the NIfTI's values, dtype and geometry (diag(spacing), RAS, origin 0)."""
    image, labels, small_labels = _ct_image(2), _labels(BRAIN_NCR), _labels()
    reference = nib.load(outputs.write_volume(image, tmp_path / "reference.nii.gz", SPACING, np.int16))
    written = {
        "image": (outputs.write_volume(image, tmp_path / f"ct{ext}", SPACING, np.int16), image, np.int16),
        "labels": (outputs.write_labels(labels, tmp_path / f"label{ext}", SPACING), labels, np.int16),
        "small": (outputs.write_labels(small_labels, tmp_path / f"small{ext}", SPACING), small_labels, np.uint8),
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


def test_itk_file_stores_lps_direction_and_zero_origin(outputs, tmp_path):
    """ITK's own header: LPS direction diag(-1, -1, 1) (= RAS identity), spacing in mm, origin 0."""
    import itk

    image = itk.imread(str(outputs.write_volume(_ct_image(), tmp_path / "ct.nrrd", SPACING, np.int16)))
    np.testing.assert_allclose(np.asarray(image.GetDirection()), np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(tuple(image.GetSpacing()), SPACING)
    np.testing.assert_allclose(tuple(image.GetOrigin()), (0.0, 0.0, 0.0))


def test_dicom_extension_refused_with_its_reason(outputs, tmp_path):
    for ext in (".dcm", "DCM"):
        with pytest.raises(ValueError, match=rf"image_output_ext='{ext}' is not allowed: .*DICOM.*'\.nrrd'"):
            outputs.sample_filenames(tmp_path, 0, 1, ext, ".nii.gz")
    with pytest.raises(ValueError, match=r"label_output_ext='.dcm' is not allowed"):
        outputs.write_labels(_labels(), tmp_path / "label.dcm", SPACING)
    assert _files(tmp_path) == []


def test_non_volume_extension_refused(outputs, tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        outputs.write_volume(_ct_image(), tmp_path / "ct.png", SPACING, np.int16)
    with pytest.raises(ValueError, match="image_output_ext"):
        outputs.sample_filenames(tmp_path, 0, 1, ".png", ".nii.gz")


def test_one_atomic_write_for_volumes_reports_and_checkpoints(outputs, tmp_path):
    """outputs and atomic_torch_save write through common/core's atomic_write: hidden temporary, then rename."""
    checkpoint = importlib.import_module("scripts.checkpoint")
    assert outputs.atomic_write is checkpoint.atomic_write
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


def test_failed_write_keeps_old_file_and_leaves_no_temporary(outputs, tmp_path, monkeypatch):
    path = outputs.write_volume(_ct_image(0), tmp_path / "ct.nii.gz", SPACING, np.int16)
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

    monkeypatch.setattr(outputs, "_writer_class", lambda ext, config_id: FailingWriter)
    with pytest.raises(OSError, match="disk full"):
        outputs.write_volume(_ct_image(1), path, SPACING, np.int16)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ct.nii.gz"]
    monkeypatch.undo()

    preview = outputs.preview_png(_ct_image(), _labels(), tmp_path / "p.png", spacing=SPACING)
    preview_bytes = preview.read_bytes()

    def failing_save(self, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        outputs.preview_png(_ct_image(2), _labels(), preview, spacing=SPACING)
    assert preview.read_bytes() == preview_bytes
    assert _files(tmp_path) == ["ct.nii.gz", "p.png"]


# ---------------------------------------------------------------------------------------------------- names


def test_sample_filenames_are_predictable(outputs, tmp_path):
    names = outputs.sample_filenames(tmp_path, 0, 42, ".nii.gz", "NII")
    assert names == {
        "image": tmp_path / "sample_0000_seed42_image.nii.gz",
        "label": tmp_path / "sample_0000_seed42_label.nii",
        "preview": tmp_path / "sample_0000_seed42_preview.png",
    }
    names = outputs.sample_filenames(tmp_path, 12, 7, ".nii", ".nii", prefix="ct")
    assert names["image"].name == "ct_0012_seed7_image.nii"
    for bad in ({"index": -1}, {"index": True}, {"seed": 1.5}, {"prefix": "a/b"}, {"prefix": ""}):
        kwargs = {"index": 0, "seed": 1, "prefix": "sample", **bad}
        with pytest.raises(ValueError):
            outputs.sample_filenames(
                tmp_path, kwargs["index"], kwargs["seed"], ".nii.gz", ".nii.gz", prefix=kwargs["prefix"]
            )


# ---------------------------------------------------------------------------------------------------- preview


def test_preview_has_three_square_pixel_panels(outputs, tmp_path):
    path = outputs.preview_png(_ct_image(), _labels(), tmp_path / "p.png", spacing=SPACING)
    width, height = Image.open(path).size
    x, y, z = 24, 30, 40  # extents in mm at the finest spacing (1 mm)
    assert (width, height) == (x + x + y + 2 * outputs.PREVIEW_GAP, max(y, z))
    views = outputs.orthogonal_views(_ct_image(), _labels(), spacing=SPACING)
    assert {name: v.shape for name, v in views.items()} == {
        "axial": (y, x, 3),
        "coronal": (z, x, 3),
        "sagittal": (z, y, 3),
    }
    small = outputs.orthogonal_views(_ct_image(), None, spacing=SPACING, max_panel_size=20)  # 2 mm pixels
    assert {name: v.shape[:2] for name, v in small.items()} == {
        "axial": (15, 12),
        "coronal": (20, 12),
        "sagittal": (20, 15),
    }
    assert _files(tmp_path) == ["p.png"]
    with pytest.raises(ValueError, match=".png"):
        outputs.preview_png(_ct_image(), _labels(), tmp_path / "p.jpg", spacing=SPACING)
    with pytest.raises(ValueError, match="window"):
        outputs.preview_png(_ct_image(), _labels(), tmp_path / "w.png", (100, -100), spacing=SPACING)
    with pytest.raises(ValueError, match="same shape"):
        outputs.preview_png(_ct_image(), _labels()[:-1], tmp_path / "s.png", spacing=SPACING)
    assert _files(tmp_path) == ["p.png"]


def test_preview_overlay_colours_and_radiological_orientation(outputs):
    image = np.zeros(SHAPE, dtype=np.int16)  # 0 HU -> grey 127.5 in the [-1000, 1000] window
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[12:24, 10:20, 4:12] = BODY  # excluded from the overlay by default
    labels[16:22, 12:18, 6:10] = LIVER  # toward patient right (high x), anterior (high y), slices through it
    views = outputs.orthogonal_views(image, labels, spacing=(1.0, 1.0, 1.0))
    colour = outputs.label_colors([LIVER])[0].astype(float)
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

    tinted = outputs.orthogonal_views(image, labels, spacing=(1.0, 1.0, 1.0), exclude_ids=())["axial"]
    assert np.count_nonzero(~np.all(tinted == 128, axis=-1)) == 12 * 10  # the body too when not excluded


def test_preview_bytes_are_deterministic(outputs, tmp_path):
    first = outputs.preview_png(_ct_image(), _labels(BRAIN_NCR), tmp_path / "a.png", spacing=SPACING).read_bytes()
    second = outputs.preview_png(_ct_image(), _labels(BRAIN_NCR), tmp_path / "b.png", spacing=SPACING).read_bytes()
    assert first == second
    other = outputs.preview_png(_ct_image(5), _labels(BRAIN_NCR), tmp_path / "c.png", spacing=SPACING).read_bytes()
    assert other != first
    colours = outputs.label_colors(range(1, 256))
    assert len({tuple(c) for c in colours}) == 255  # distinct colour per id
    np.testing.assert_array_equal(outputs.label_colors([BRAIN_NCR, LIVER])[1], colours[LIVER - 1])
    np.testing.assert_array_equal(outputs.label_colors([BRAIN_NCR]), outputs.label_colors(np.array([BRAIN_NCR])))


def test_preview_mr_percentile_window(outputs, tmp_path):
    image = np.tile(np.arange(SHAPE[0], dtype=np.int16)[:, None, None] * 40, (1, *SHAPE[1:]))
    views = outputs.orthogonal_views(image, None, spacing=SPACING, window=None)
    axial = views["axial"][..., 0]
    assert axial.min() == 0 and axial.max() == 255
    path = outputs.preview_png(torch.from_numpy(image), None, tmp_path / "mr.png", None, spacing=SPACING)
    assert Image.open(path).size == (86, 40)


# ---------------------------------------------------------------------------------------------------- report


def _reject_constants(name):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_run_report_round_trips_with_versions_timings_and_null_nans(outputs, quality, tmp_path):
    report = quality.QualityReport(
        passed=False,
        organs={
            "liver": {"median": 60.0, "low": -21.6, "high": 162.0, "voxels": 288, "passed": True},
            "spleen": {"median": float("nan"), "low": 0.0, "high": 100.0, "voxels": 48, "passed": False},
        },
        skipped=["lung", "brain"],
        no_statistics=["hepatic tumor"],
        attempts=3,
    )
    names = outputs.sample_filenames(tmp_path, 0, 42, ".nii.gz", ".nii.gz")
    files = {kind: names[kind] for kind in ("image", "label", "preview")}
    samples = [
        {"index": 0, "seed": 42, "mask_source": "database:s0001.nii.gz (exact)", "quality_check": report, **files},
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
    path = outputs.write_run_report(tmp_path / "generation_report.json", settings, samples, timings)
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
    assert second["quality_check"] is None

    loaded = outputs.load_run_report(path)
    assert loaded.to_dict() == data
    assert json.loads(loaded.to_json()) == data
    assert all(math.isfinite(v) for v in (data["timings"]["mask_s"], data["timings"]["diffusion_s"]))


def test_run_report_requires_seed_and_mask_source(outputs, tmp_path):
    with pytest.raises(ValueError, match=r"samples\[0\] lacks mask_source"):
        outputs.write_run_report(tmp_path / "r.json", {}, [{"seed": 1}], {})
    with pytest.raises(ValueError, match="timings"):
        outputs.write_run_report(tmp_path / "r.json", {}, [], [1.0])
    assert _files(tmp_path) == []
    path = outputs.write_run_report(tmp_path / "r.json", {}, [], {}, device="cuda:3", versions={"torch": "x"})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["versions"] == {"torch": "x"} and data["device"].startswith("cuda:3")


def test_preview_cuts_through_the_organs_not_the_body_centre(outputs):
    image = np.zeros(SHAPE, dtype=np.int16)
    labels = np.full(SHAPE, BODY, dtype=np.uint8)  # the body fills the volume; its centre misses the liver
    labels[:4, :4, :3] = LIVER
    views = outputs.orthogonal_views(image, labels, spacing=(1.0, 1.0, 1.0))
    expected = np.round((1 - 0.35) * 127.5 + 0.35 * outputs.label_colors([LIVER])[0].astype(float)).astype(np.uint8)
    for name in ("axial", "coronal", "sagittal"):
        assert np.all(views[name] == expected, axis=-1).any(), f"the {name} view misses the liver"
