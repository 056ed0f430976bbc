"""Unit tests of the CT quality check (common/maisi/ct/quality.py) and the output intensities (core/output_intensity.py)."""

from __future__ import annotations

import functools
import importlib
import json
import logging

import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts

LIVER, SPLEEN, HEPATIC_TUMOR, RIGHT_LOWER_LOBE, LEFT_UPPER_LOBE = 1, 3, 26, 32, 28


@pytest.fixture(scope="module")
def maisi():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield tuple(importlib.import_module(f"scripts.{name}") for name in ("quality", "constants", "output_intensity"))


@pytest.fixture(scope="module")
def quality(maisi):
    return maisi[0]


@pytest.fixture(scope="module")
def constants(maisi):
    return maisi[1]


@pytest.fixture(scope="module")
def output_intensity(maisi):
    """output_intensity, shared by CT and MR (core/): the MR bundle holds the same bytes (test_shared_code)."""
    return maisi[2]


@pytest.fixture(scope="module")
def statistics(quality):
    return quality.load_ct_statistics()


def _volume(label_blocks: dict[int, float], shape=(8, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Labels with one 2-voxel-thick slab per id along x, and an image with the given HU per id (-1000 elsewhere)."""
    labels = np.zeros(shape, dtype=np.uint8)
    image = np.full(shape, -1000.0, dtype=np.float32)
    for index, (label_id, hu) in enumerate(label_blocks.items()):
        labels[2 * index : 2 * index + 2, 2:6, 2:6] = label_id
        image[2 * index : 2 * index + 2, 2:6, 2:6] = hu
    return image, labels


# ---------------------------------------------------------------------------------------------------- ranges


def test_organ_hu_ranges(quality, statistics, constants):
    assert quality.organ_hu_range(statistics["liver"], "liver") == (-21.596463547885904, 162.0)
    assert quality.organ_hu_range(statistics["lung"], "lung") == (-1088.5583843889117, -366.9500000000007)
    assert quality.organ_hu_range(statistics["brain"], "brain") == (-951.0, 369.5118535139189)
    assert quality.organ_hu_range(statistics["bone"], "bone") == (71.39901958080469, constants.CT_HU_MAX)
    assert quality.organ_hu_range(statistics["bone"]) == (71.39901958080469, 551.6350000000002)


def test_load_ct_statistics_names_the_incomplete_organ(quality, tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"liver": {"sigma_6_low": -20.0, "sigma_6_high": 150.0, "percentile_0_5": 9.0}}))
    with pytest.raises(ValueError, match=r"stats\.json: organ 'liver' lacks numeric percentile_99_5"):
        quality.load_ct_statistics(path)


# ---------------------------------------------------------------------------------------------------- check


def test_liver_in_range_passes_and_absent_organs_are_skipped(quality, statistics, constants):
    image, labels = _volume({LIVER: 60.0})
    report = quality.check_ct_quality(image, labels, statistics)
    assert report.passed
    assert report.organs == {"liver": {"median": 60.0, "low": -21.596463547885904, "high": 162.0, "voxels": 32, "passed": True}}
    assert report.skipped == [organ for organ in constants.QC_LABEL_GROUPS if organ != "liver"]
    assert report.no_statistics == []


def test_liver_out_of_range_fails_with_the_organ_named(quality, statistics):
    image, labels = _volume({LIVER: 500.0, SPLEEN: 50.0})
    report = quality.check_ct_quality(torch.as_tensor(image)[None, None], torch.as_tensor(labels)[None, None], statistics)
    assert not report.passed
    assert report.failed_organs == ["liver"]
    assert report.organs["spleen"]["passed"]
    assert "liver median 500.0 HU outside [-21.6, 162.0]" in report.summary()


@pytest.mark.parametrize("hu,passed", [(-800.0, True), (0.0, False)])
def test_lung_group_includes_the_right_lower_lobe(quality, statistics, constants, hu, passed):
    assert RIGHT_LOWER_LOBE in constants.QC_LABEL_GROUPS["lung"]
    image, labels = _volume({RIGHT_LOWER_LOBE: hu})
    report = quality.check_ct_quality(image, labels, statistics)
    assert report.organs["lung"]["voxels"] == 32
    assert report.organs["lung"]["median"] == hu
    assert report.passed is passed


def test_tumours_are_listed_without_statistics(quality, statistics):
    image, labels = _volume({LIVER: 60.0, HEPATIC_TUMOR: 900.0})
    report = quality.check_ct_quality(image, labels, statistics)
    assert report.passed
    assert report.no_statistics == ["hepatic tumor"]
    assert "no statistics: hepatic tumor" in report.summary()


def test_small_organs_and_missing_statistics(quality, statistics):
    image, labels = _volume({LIVER: 60.0, LEFT_UPPER_LOBE: 0.0})
    report = quality.check_ct_quality(image, labels, statistics, min_voxels=33)
    assert report.passed and report.organs == {} and {"liver", "lung"} <= set(report.skipped)
    without_lung = {organ: entry for organ, entry in statistics.items() if organ != "lung"}
    report = quality.check_ct_quality(image, labels, without_lung)
    assert report.passed and report.no_statistics == ["lung"] and list(report.organs) == ["liver"]
    with pytest.raises(ValueError, match="same shape"):
        quality.check_ct_quality(image[:4], labels, statistics)


def test_report_as_plain_data_for_the_run_report(quality, statistics):
    image, labels = _volume({LIVER: 500.0, SPLEEN: 50.0, HEPATIC_TUMOR: 900.0})
    report = quality.check_ct_quality(image, labels, statistics)
    data = report.to_dict()
    assert data["passed"] is False and data["attempts"] == 1 and data["failed_organs"] == ["liver"]
    assert data["organs"]["liver"] == {"median": 500.0, "low": -21.596463547885904, "high": 162.0, "voxels": 32, "passed": False}
    assert data["no_statistics"] == ["hepatic tumor"] and "spleen" not in data["skipped"] and "lung" in data["skipped"]
    assert data["summary"] == report.summary()
    assert json.loads(json.dumps(data)) == data
    data["organs"]["liver"]["passed"] = True  # a copy: the report is unchanged
    assert report.failed_organs == ["liver"]


def test_quality_check_component_reads_its_statistics(quality, statistics, tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"liver": statistics["liver"]}))
    check = quality.CTQualityCheck(path, max_attempts=2)
    assert check.max_attempts == 2 and check.statistics == {"liver": statistics["liver"]}
    image, labels = _volume({LIVER: 60.0, SPLEEN: 5000.0})  # spleen out of any range, but without statistics
    report = check(image, labels)
    assert report.passed and list(report.organs) == ["liver"] and report.no_statistics == ["spleen"]
    assert not check(*_volume({LIVER: 500.0})).passed
    path.write_text(json.dumps({"liver": {"sigma_6_low": 0.0}}))
    with pytest.raises(ValueError, match="organ 'liver' lacks numeric"):
        quality.CTQualityCheck(path)


# ---------------------------------------------------------------------------------------------------- retries


def test_retry_until_the_check_passes(quality, statistics):
    seeds = []

    def generate(attempt):
        seeds.append(attempt)
        return _volume({LIVER: 60.0 if attempt == 2 else 500.0})

    check = functools.partial(quality.check_ct_quality, statistics=statistics)
    image, labels, report, attempts = quality.generate_with_quality_check(generate, 5, check)
    assert attempts == 3 and seeds == [0, 1, 2]
    assert report.passed and report.attempts == 3
    assert float(np.median(image[labels == LIVER])) == 60.0


def test_always_failing_sample_is_returned_flagged(quality, statistics, caplog):
    calls = []

    def generate(attempt):
        calls.append(attempt)
        return _volume({LIVER: 500.0})

    check = functools.partial(quality.check_ct_quality, statistics=statistics)
    with caplog.at_level(logging.WARNING):
        _, _, report, attempts = quality.generate_with_quality_check(generate, 2, check)
    assert attempts == 2 and calls == [0, 1]
    assert not report.passed and report.attempts == 2 and report.failed_organs == ["liver"]
    assert "failed the quality check" in caplog.text
    with pytest.raises(ValueError, match="quality_check_max_attempts"):
        quality.generate_with_quality_check(generate, 0, check)


# ---------------------------------------------------------------------------------------------------- intensities


def test_ct_conversion_and_finalisation(output_intensity, constants):
    decoded = torch.tensor([0.0, 0.5, 1.0, -0.2, 1.3], dtype=torch.float16)
    hu = output_intensity.to_ct_hu(decoded)
    assert hu.dtype == torch.float32
    assert hu.tolist() == [-1000.0, 0.0, 1000.0, -1000.0, 1000.0]
    labels = torch.tensor([1, 1, 0, 1, 1])
    final = output_intensity.finalize_ct(hu, labels)
    assert final.dtype == torch.int16
    assert final.tolist() == [-1000, 0, int(constants.CT_BACKGROUND_HU), -1000, 1000]
    as_numpy = output_intensity.finalize_ct(np.array([12.4, 3000.0, -1500.0, 7.0]), np.array([1, 1, 1, 0]))
    assert as_numpy.dtype == np.int16
    assert as_numpy.tolist() == [12, 1000, -1000, int(constants.CT_BACKGROUND_HU)]


def test_mr_conversion_and_finalisation(output_intensity):
    decoded = np.array([0.0, 0.5, 1.0, -0.1, 40.0], dtype=np.float32)
    intensity = output_intensity.to_mr_intensity(decoded)
    assert intensity.tolist() == [0.0, 500.0, 1000.0, 0.0, 32767.0]
    final = output_intensity.finalize_mr(intensity, np.array([1, 1, 0, 1, 1]))
    assert final.dtype == np.int16
    assert final.tolist() == [0, 500, 0, 0, 32767]
    as_tensor = output_intensity.finalize_mr(output_intensity.to_mr_intensity(torch.tensor([0.25, 0.75])), torch.tensor([0, 1]))
    assert as_tensor.dtype == torch.int16 and as_tensor.tolist() == [0, 750]
