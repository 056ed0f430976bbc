"""The DICOM writers (scripts/dicom.py) on small volumes: geometry, values, segments, determinism, refusals."""

from __future__ import annotations

import importlib

import numpy as np
import pydicom
import pytest

from bundle_helpers import BUNDLES_DIR, bundle_scripts

SPACING = (1.0, 1.5, 2.0)


@pytest.fixture(scope="module")
def dicom():
    with bundle_scripts(BUNDLES_DIR / "maisi_mr_generative"):  # the MR bundle carries it too (core)
        yield importlib.import_module("scripts.dicom")


def _volumes():
    image = np.arange(8 * 6 * 4, dtype=np.int16).reshape(8, 6, 4) - 1000
    labels = np.zeros((8, 6, 4), np.uint8)
    labels[1:3, 2:4, 1] = 1
    labels[5, 1, 2:4] = 3
    return image, labels


def _read_series(folder):
    slices = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    volume = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=-1)
    return slices, volume.transpose(1, 0, 2)[::-1, ::-1]  # rows -y, columns -x: back to RAS (X, Y, Z)


def test_series_geometry_values_and_identity(dicom, tmp_path):
    image, _ = _volumes()
    dicom.write_dicom_series(image, tmp_path / "ct", SPACING, "CT", "case-1")
    slices, volume = _read_series(tmp_path / "ct")
    np.testing.assert_array_equal(volume, image)
    first = slices[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.RescaleIntercept == -1024 and first.PixelRepresentation == 0
    assert [float(v) for v in first.PixelSpacing] == [1.5, 1.0] and float(first.SliceThickness) == 2.0
    assert [float(v) for v in first.ImagePositionPatient] == [-7.0, -7.5, 0.0]  # voxel (X-1, Y-1, 0) in LPS
    assert first.PatientName == "SYNTHETIC^MAISI" and first.PatientIdentityRemoved == "YES" and "StudyDate" in first and not first.StudyDate
    assert len({d.SeriesInstanceUID for d in slices}) == 1 and len({d.SOPInstanceUID for d in slices}) == 4
    dicom.write_dicom_series(np.abs(image), tmp_path / "mr", SPACING, "MR", "case-1")
    mr_slices, mr_volume = _read_series(tmp_path / "mr")
    assert mr_slices[0].SOPClassUID == pydicom.uid.MRImageStorage and mr_slices[0].RescaleIntercept == 0
    np.testing.assert_array_equal(mr_volume, np.abs(image))
    with pytest.raises(ValueError, match="16-bit DICOM pixels"):
        dicom.write_dicom_series(np.full((2, 2, 2), -2000, np.int16), tmp_path / "bad", SPACING, "CT", "case-1")
    assert not (tmp_path / "bad").exists()


def test_segmentation_segments_and_same_bytes_every_time(dicom, tmp_path):
    image, labels = _volumes()
    written = []
    for run in ("a", "b"):
        dicom.write_dicom_series(image, tmp_path / run / "ct", SPACING, "CT", "case-1")
        written.append(dicom.write_dicom_segmentation(labels, tmp_path / run / "seg.dcm", tmp_path / run / "ct", {1: "liver", 3: "spleen"}, "case-1"))
    assert written[0].read_bytes() == written[1].read_bytes()
    assert all((tmp_path / "a/ct" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "b/ct").iterdir())
    seg = pydicom.dcmread(written[0])
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert names == {1: "liver", 2: "spleen"}
    rebuilt = {n: np.zeros(labels.shape, bool) for n in names}
    for frame, groups in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        z = int(round(float(groups.PlanePositionSequence[0].ImagePositionPatient[2]) / SPACING[2]))
        rebuilt[int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)][:, :, z] = frame.T[::-1, ::-1]
    np.testing.assert_array_equal(rebuilt[1], labels == 1)
    np.testing.assert_array_equal(rebuilt[2], labels == 3)
