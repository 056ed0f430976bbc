"""maisi_ct_generative at dataset scale: manifests, resume after an interruption, processes and nodes, image-only, DICOM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from ignite.engine import Events

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_in_process
from demo.runner import bundle_command
from test_maisi_ct_generation_e2e import OUTPUT_SIZE, SPACING, _body_with_organs, _crafted_mask_generator, _overrides, _write_mask, build_workspace

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("maisi_ct_datasets"))


class SimulatedKill(Exception):
    """What the run dies of in the interruption test."""


class StopAfterSamples:
    """Stands in for a killed run: raises after ``count`` samples were recorded."""

    def __init__(self, count: int) -> None:
        self.count = count

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        if engine.state.iteration >= self.count:
            raise SimulatedKill("interrupted by the test")


def _manifest(root, rows, name="manifest.json"):
    path = root / name
    path.write_text(json.dumps(rows))
    return str(path)


def _report(output_dir):
    return json.loads((output_dir / "generation_report.json").read_text())


def _files(output_dir, suffixes=(".nii.gz", ".png")):
    return {p.name: p.read_bytes() for p in sorted(output_dir.iterdir()) if p.name.endswith(suffixes)}


def test_mixed_manifest_in_one_run(workspace, tmp_path):
    root, weights = workspace
    _write_mask(tmp_path / "user.nii.gz", [64, 64, 32], [6.0, 6.0, 8.0], _body_with_organs([64, 64, 32]))
    generator = _crafted_mask_generator(tmp_path)
    rows = [
        {"id": "db", "body_region": ["abdomen"], "anatomy_list": ["liver", "spleen"], "num_samples": 2},
        {"id": "mine", "mask_path": str(tmp_path / "user.nii.gz"), "seed": 42},
        {"id": "gen", "controllable_anatomy_size": [["pancreas", 0.4]]},
    ]
    overrides = _overrides(root, weights["rflow-ct"], tmp_path / "out", request_manifest=_manifest(tmp_path, rows), **generator)
    run_in_process(BUNDLE, ["inference.json"], overrides)
    report = _report(tmp_path / "out")
    samples = report["samples"]
    assert [(s["request_id"], s["index"], s["seed"]) for s in samples] == [("db", 0, 0), ("db", 1, 1), ("mine", 0, 42), ("gen", 0, 3)]
    assert [s["mask_source"].split(":")[0] for s in samples] == ["database", "database", "user", "generated"]
    assert [r["request_id"] for r in report["settings"]["requests"]] == ["db", "mine", "gen"]
    assert report["settings"]["missing_samples"] == []
    for sample in samples:
        assert "_".join((sample["request_id"], f"{sample['index']:04d}", f"seed{sample['seed']}")) in sample["image"]
        assert sample["quality_check"]["attempts"] == 1 and {"diffusion_s", "decode_s", "total_s"} <= set(sample["timings"])
        image = np.asarray(nib.load(sample["image"]).dataobj)
        labels = np.asarray(nib.load(sample["label"]).dataobj)
        assert image.shape == labels.shape == tuple(OUTPUT_SIZE) and image.dtype == np.int16
        assert (image[labels == 0] == -1000).all()
    assert set(np.unique(nib.load(samples[3]["label"]).dataobj)) == {0, 4, 200}  # the crafted generator's mask
    assert report["timings"]["total_s"] == pytest.approx(sum(s["timings"]["total_s"] for s in samples))


def test_interrupted_run_resumes_without_regenerating(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(root, weights["rflow-ct"], tmp_path / "out", num_output_samples=3)
    with bundle_scripts(BUNDLE):
        parser = parse_bundle_config(BUNDLE, ["inference.json"], overrides)
        parser["handlers"] = [*parser["handlers"], {"_target_": "test_maisi_ct_datasets.StopAfterSamples", "count": 2}]
        parser.get_parsed_content("initialize")
        with pytest.raises(Exception) as stopped:
            parser.get_parsed_content("run")
    causes = [stopped.value]
    while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
    assert any(isinstance(cause, SimulatedKill) for cause in causes)
    out = tmp_path / "out"
    finished = sorted(p.name for p in out.glob("*.json"))
    assert finished == ["sample_0000_seed0.json", "sample_0001_seed1.json"]  # the third never started; no report yet
    (out / "sample_0001_seed1.json").unlink()  # as if killed between the volumes and the record of sample 1
    kept = {name: (out / name).stat().st_mtime_ns for name in ("sample_0000_seed0_image.nii.gz", "sample_0000_seed0.json")}
    first_bytes = (out / "sample_0001_seed1_image.nii.gz").read_bytes()

    run_in_process(BUNDLE, ["inference.json"], overrides)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # sample 0 was not regenerated
    assert (out / "sample_0001_seed1_image.nii.gz").read_bytes() == first_bytes  # sample 1 again, the same bytes
    report = _report(out)
    assert [s["seed"] for s in report["samples"]] == [0, 1, 2] and report["settings"]["missing_samples"] == []
    run_in_process(BUNDLE, ["inference.json"], overrides)  # nothing left to do: the report is rewritten, nothing else
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_write_the_same_bytes_as_one_process(workspace, tmp_path):
    """torchrun --nnodes 2 (one launch per node rank, c10d rendezvous on 127.0.0.1) == a single process."""
    root, weights = workspace
    rows = [{"id": "a", "body_region": ["abdomen"], "anatomy_list": ["liver"], "num_samples": 2}, {"id": "b", "body_region": ["abdomen"], "anatomy_list": ["spleen"]}]
    manifest = _manifest(tmp_path, rows)
    single = _overrides(root, weights["rflow-ct"], tmp_path / "single", request_manifest=manifest)
    run_in_process(BUNDLE, ["inference.json"], single)

    multi = _overrides(root, weights["rflow-ct"], tmp_path / "nodes", request_manifest=manifest)
    command = bundle_command(["inference.json", "multi_gpu_inference.json"], multi)
    port = _free_port()
    launches = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for node_rank in (0, 1):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=maisi-test", "-m", *command[2:]]  # fmt: skip
        launches.append(subprocess.Popen(torchrun, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [launch.communicate(timeout=900)[0] for launch in launches]
    assert all(launch.returncode == 0 for launch in launches), outputs[0][-3000:] + outputs[1][-3000:]
    assert _files(tmp_path / "nodes") == _files(tmp_path / "single")  # images, labels, previews: the same bytes
    merged, reference = _report(tmp_path / "nodes"), _report(tmp_path / "single")
    strip = ("image", "label", "preview", "timings", "decode_plan")  # the plan's budget is each process's free memory
    assert [{k: v for k, v in s.items() if k not in strip} for s in merged["samples"]] == [
        {k: v for k, v in s.items() if k not in strip} for s in reference["samples"]
    ]
    records = sorted(p.name for p in (tmp_path / "nodes").glob("*.json"))
    assert records == ["a_0000_seed0.json", "a_0001_seed1.json", "b_0000_seed2.json", "generation_report.json"]


def test_image_only_ct(workspace, tmp_path, installed_ct_bundle):
    """From the installed packaged zip, as a user runs it."""
    root, weights = workspace
    overrides = {**_overrides(root, weights["rflow-ct"], tmp_path / "out"), "bundle_root": str(installed_ct_bundle)}
    run_in_process(installed_ct_bundle, ["inference.json", "inference_image_only.json"], overrides)
    report = _report(tmp_path / "out")
    (sample,) = report["samples"]
    assert sample["mask_source"] == "none (image only)" and sample["quality_check"] is None and "label" not in sample
    assert set(report["settings"]["files"]) == {"trained_autoencoder_path", "trained_diffusion_path"}  # no ControlNet, no database
    image = nib.load(sample["image"])
    data = np.asarray(image.dataobj)
    assert data.shape == tuple(OUTPUT_SIZE) and data.dtype == np.int16 and -1000 <= data.min() <= data.max() <= 1000
    np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))
    assert not list((tmp_path / "out").glob("*_label*"))


def test_dicom_series_and_segmentation_read_back(workspace, tmp_path):
    import pydicom

    root, weights = workspace
    run_in_process(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "nifti"))
    run_in_process(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "dicom", image_output_ext=".dcm", label_output_ext=".dcm"))
    (reference,) = _report(tmp_path / "nifti")["samples"]
    (sample,) = _report(tmp_path / "dicom")["samples"]
    expected_image = np.asarray(nib.load(reference["image"]).dataobj)
    expected_labels = np.asarray(nib.load(reference["label"]).dataobj)

    slices = sorted((pydicom.dcmread(p) for p in (tmp_path / "dicom" / "sample_0000_seed0_image").glob("*.dcm")), key=lambda d: d.InstanceNumber)
    assert len(slices) == OUTPUT_SIZE[2] and len({d.SeriesInstanceUID for d in slices}) == 1
    first = slices[0]
    assert first.Modality == "CT" and first.PatientName == "SYNTHETIC^MAISI" and first.PatientIdentityRemoved == "YES"
    assert [float(v) for v in first.PixelSpacing] == [SPACING[1], SPACING[0]] and float(first.SliceThickness) == SPACING[2]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    volume = np.stack([d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=-1)
    volume = volume.transpose(1, 0, 2)[::-1, ::-1]  # rows are -y, columns -x (LPS display): back to RAS (X, Y, Z)
    np.testing.assert_array_equal(volume, expected_image)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in slices])
    np.testing.assert_allclose(positions[:, 2], np.arange(OUTPUT_SIZE[2]) * SPACING[2])  # z steps by the spacing
    np.testing.assert_allclose(positions[0, :2], [-(OUTPUT_SIZE[0] - 1) * SPACING[0], -(OUTPUT_SIZE[1] - 1) * SPACING[1]])

    import itk  # a second reader: ITK's GDCM series reader gives the same voxels and geometry

    names = itk.GDCMSeriesFileNames.New(Directory=str(tmp_path / "dicom" / "sample_0000_seed0_image")).GetInputFileNames()
    itk_image = itk.imread(names)
    itk_array = itk.array_from_image(itk_image).transpose(2, 1, 0)[::-1, ::-1]  # (Z, Y, X) in LPS -> RAS (X, Y, Z)
    np.testing.assert_array_equal(itk_array, expected_image)
    np.testing.assert_allclose(tuple(itk_image.GetSpacing()), SPACING)

    seg = pydicom.dcmread(sample["label"])
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert sorted(names.values()) == ["body", "liver", "spleen"]
    frames = seg.pixel_array  # (frames, rows, columns); each frame says its segment and position
    label_ids = {"liver": 1, "spleen": 3, "body": 200}
    rebuilt = {number: np.zeros(OUTPUT_SIZE, dtype=bool) for number in names}
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = float(groups.PlanePositionSequence[0].ImagePositionPatient[2])
        rebuilt[number][:, :, int(round(z / SPACING[2]))] = frame.T[::-1, ::-1].astype(bool)  # rows -y, columns -x
    for number, name in names.items():
        np.testing.assert_array_equal(rebuilt[number], expected_labels == label_ids[name])
