"""The shared MAISI helpers: the one datalist reader, label_id_of, and the generation engine's run (files, records, resume, report)."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import BUNDLES_DIR, bundle_scripts

COMMON = BUNDLES_DIR / "maisi_ct_generative"  # the copies of common/maisi (identical, see test_shared_code)


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(COMMON):
        yield SimpleNamespace(
            data=importlib.import_module("scripts.training_data"),
            embeddings=importlib.import_module("scripts.embeddings"),
            labels=importlib.import_module("scripts.labels"),
            generation=importlib.import_module("scripts.generation"),
            sample_store=importlib.import_module("scripts.sample_store"),
            settings=importlib.import_module("scripts.settings"),
        )


def _datalist(folder, entries, name="list.json"):
    for entry in (e for e in entries if isinstance(e, dict)):
        for key in ("image", "label"):
            if isinstance(entry.get(key), str) and not entry[key].startswith("missing"):
                (folder / entry[key]).write_bytes(b"x")
    path = folder / name
    path.write_text(json.dumps({"training": entries}))
    return path


def test_load_datalist_defaults_base_dir_and_optional_label(scripts, tmp_path):
    path = _datalist(tmp_path, [{"image": "a.nii.gz"}, {"image": "b.nii.gz", "label": "b_seg.nii.gz", "fold": 2, "note": "k"}])
    items = scripts.data.load_datalist(path)
    assert items == [
        {"image": str(tmp_path / "a.nii.gz"), "fold": 0},
        {"image": str(tmp_path / "b.nii.gz"), "label": str(tmp_path / "b_seg.nii.gz"), "fold": 2, "note": "k"},
    ]
    other = tmp_path / "lists"
    other.mkdir()
    (other / "moved.json").write_text(path.read_text())
    assert scripts.data.load_datalist(other / "moved.json", "training", tmp_path)[0]["image"] == str(tmp_path / "a.nii.gz")


@pytest.mark.parametrize(
    ("entries", "kwargs", "message"),
    [
        ([{"image": "a.nii.gz"}, {"image": "missing.nii.gz"}], {}, "entry 1 'image' file '"),
        ([{"image": "a.nii.gz"}, {"label": "a.nii.gz"}], {}, "entry 1 has no 'image' path"),
        ([{"image": "a.nii.gz", "label": "missing_seg.nii.gz"}], {}, "entry 0 'label' file '"),
        ([{"image": "a.nii.gz", "fold": -1}], {}, "entry 0 fold=-1 is not allowed"),
        ([{"image": "a.nii.gz"}], {"default_fold": None}, "entry 0 has no 'fold'"),
        (["a.nii.gz"], {}, "entry 0 must be an object"),
        ([], {}, "has no non-empty 'training' list"),
    ],
)
def test_load_datalist_errors_name_file_entry_and_key(scripts, tmp_path, entries, kwargs, message):
    path = _datalist(tmp_path, entries)
    with pytest.raises(ValueError, match=f"datalist_file={path}") as error:
        scripts.data.load_datalist(path, **kwargs)
    assert message in str(error.value)


def test_read_datalist_splits_by_fold_and_requires_it(scripts, tmp_path):
    entries = [{"image": f"{n}.nii.gz", "label": f"{n}_seg.nii.gz", "fold": f} for n, f in (("a", 0), ("b", 1), ("c", 1))]
    path = _datalist(tmp_path, entries)
    training = scripts.data.read_datalist(path, 0, "training", ("image", "label"))
    assert [item["image"] for item in training] == [str(tmp_path / "b.nii.gz"), str(tmp_path / "c.nii.gz")]
    assert [item["label"] for item in scripts.data.read_datalist(path, 0, "validation", ("image", "label"))] == [
        str(tmp_path / "a_seg.nii.gz")
    ]
    with pytest.raises(ValueError, match="no validation entries"):
        scripts.data.read_datalist(path, 5, "validation")
    with pytest.raises(ValueError, match="validation_fold=1 leaves no training items"):
        scripts.data.read_datalist(_datalist(tmp_path, entries[1:], "one_fold.json"), 1, "training")
    with pytest.raises(ValueError, match="entry 0 has no 'fold'"):
        scripts.data.read_datalist(_datalist(tmp_path, [{"image": "a.nii.gz"}], "no_fold.json"), 0, "training")


def test_label_id_of(scripts):
    assert scripts.labels.label_id_of("liver", {"liver": 1}) == 1
    assert scripts.labels.label_id_of("hepatic tumor", {}) == 26  # tumour names resolve through constants
    assert scripts.labels.label_id_of("hepatic tumor", {"hepatic tumor": 99}) == 26  # constants win
    with pytest.raises(ValueError, match="label 'nose' is missing"):
        scripts.labels.label_id_of("nose", {"liver": 1})


# ---------------------------------------------------------------------------------------------------- the generation run


def test_latent_shape_and_phase_timings(scripts, monkeypatch):
    generation = scripts.generation
    assert generation.latent_shape_of((64, 32, 16)) == (4, 16, 8, 4)
    clock = iter([10.0, 12.5, 20.0, 20.25])
    monkeypatch.setattr(generation.time, "perf_counter", lambda: next(clock))
    timings: dict[str, float] = {"mask_s": 1.0}
    for _ in range(2):
        with generation.timed(timings, "decode_s"):
            pass
    assert timings == {"mask_s": 1.0, "decode_s": 2.75}  # each block's seconds, summed per phase


OUTPUT_SIZE, SPACING = (8, 6, 4), (1.0, 1.5, 2.0)


@pytest.fixture(scope="module")
def run_settings(scripts):
    """The settings class of a one-request test run (the bundles' settings classes derive from GenerationSettings)."""
    settings = scripts.settings

    class RunSettings(settings.GenerationSettings):
        """``steps`` stands for any setting that changes what the samples look like."""

        def __init__(self, output_dir, seed=0, num_samples=3, steps=2):
            self.version, self.steps, self.progress, self.overwrite = "test", steps, False, False
            self.requests = [settings.RequestBase("sample", OUTPUT_SIZE, SPACING, num_samples, seed)]
            self.decode = settings.check_decode_settings(None, 0.25, None, None)
            self.files = settings.RequiredFiles({}, output_dir)
            self.output_dir, self.image_output_ext = output_dir, ".nii.gz"
            self.mask_check_strict, self.mask_findings = False, []

        def output_settings(self):
            return {**super().output_settings(), "steps": self.steps}

    return RunSettings


def _run(scripts, settings, handlers=None):
    """Run a generation engine whose samples are seeded noise with a fixed label box; returns the stems it generated."""
    generation = scripts.generation
    generated = []

    class Engine(generation.GenerationEngine):
        def generate(self, task, request):
            generated.append(task.stem)
            image = np.random.default_rng(task.seed).integers(-1000, 1001, request.output_size).astype(np.int16)
            labels = np.zeros(request.output_size, dtype=np.uint8)
            labels[2:6, 1:5, 1:3] = 1
            entry = generation.entry_of(task, task.seed, "generated", {"diffusion_s": 1.5})
            return {"image": image, "labels": labels, "entry": entry}

    store = scripts.sample_store.SampleStore(settings.output_dir, ".nii.gz", ".nii.gz")
    networks = generation.GenerationNetworks(torch.nn.Identity(), torch.nn.Identity(), None, 1.0, torch.device("cpu"))
    if handlers is None:
        handlers = [
            generation.SampleWriter(store),
            generation.PreviewWriter(store, (-1000, 1000)),
            generation.SampleRecordWriter(store, settings),
            generation.SampleProgress(enabled=False),
        ]
    engine = Engine(settings, networks, sampler=None, decoder=None, store=store, handlers=handlers)
    engine.run()
    return generated


def test_generation_run_writes_files_records_and_report(scripts, run_settings, tmp_path):
    settings = run_settings(tmp_path / "out", seed=5)
    generated = _run(scripts, settings)
    stems = ["sample_0000_seed5", "sample_0001_seed6", "sample_0002_seed7"]
    assert generated == stems
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert [s["seed"] for s in report["samples"]] == [5, 6, 7] and report["settings"]["missing_samples"] == []
    assert report["settings"]["version"] == "test" and report["settings"]["requests"][0]["num_samples"] == 3
    assert report["timings"]["diffusion_s"] == 4.5  # the samples' phase timings, summed
    assert set(report["timings"]) == {"diffusion_s", "total_s"}  # the engine adds each sample's wall-clock total
    assert report["timings"]["total_s"] == pytest.approx(sum(s["timings"]["total_s"] for s in report["samples"]))
    first = report["samples"][0]
    image, labels = nib.load(first["image"]), nib.load(first["label"])
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.random.default_rng(5).integers(-1000, 1001, OUTPUT_SIZE))
    assert image.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))
    assert Image.open(first["preview"]).mode == "RGB"
    expected = {f"{stem}{suffix}" for stem in stems for suffix in ("_image.nii.gz", "_label.nii.gz", "_preview.png", ".json")}
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected | {"generation_report.json"}


def test_generation_run_resumes_only_missing_samples(scripts, run_settings, tmp_path):
    settings = run_settings(tmp_path / "out")
    _run(scripts, settings)
    first_label = (tmp_path / "out" / "sample_0000_seed0_label.nii.gz").read_bytes()
    (tmp_path / "out" / "sample_0001_seed1_image.nii.gz").unlink()  # killed before its record was rewritten
    (tmp_path / "out" / "sample_0002_seed2.json").unlink()  # killed before its record was written
    generated = _run(scripts, settings)
    assert generated == ["sample_0001_seed1", "sample_0002_seed2"]
    assert (tmp_path / "out" / "sample_0000_seed0_label.nii.gz").read_bytes() == first_label
    generated = _run(scripts, settings)
    assert generated == []  # everything finished: nothing is regenerated, the report is rewritten
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert [s["seed"] for s in report["samples"]] == [0, 1, 2]
    generated = _run(scripts, run_settings(tmp_path / "out", steps=3))
    assert len(generated) == 3  # other settings: another fingerprint, no sample counts as finished


def test_report_lists_unfinished_samples_and_store_spots_other_runs(scripts, run_settings, tmp_path):
    settings = run_settings(tmp_path / "out", num_samples=2)
    store = scripts.sample_store.SampleStore(tmp_path / "out", ".nii.gz", ".nii.gz")
    tasks = settings.tasks()
    fingerprint = settings.fingerprint(settings.requests[0])
    store.write_record(tasks[1], fingerprint, {"seed": 1, "mask_source": "generated", "timings": {"decode_s": 2.0}})
    report = store.merge_report(tasks, settings.to_dict())
    assert report["settings"]["missing_samples"] == ["sample_0000_seed0"] and report["timings"] == {"decode_s": 2.0}
    assert not store.is_complete(tasks[0], fingerprint) and store.is_complete(tasks[1], fingerprint)
    assert not store.is_complete(tasks[1], "another fingerprint")
    expected = {task.stem: fingerprint for task in tasks}
    assert store.conflicts(expected) == []
    other = run_settings(tmp_path / "out", num_samples=2, steps=9)
    assert store.conflicts({t.stem: other.fingerprint(other.requests[0]) for t in tasks}) == [
        "sample_0001_seed1 (made with other settings or weights)"
    ]
    assert store.conflicts({"sample_0000_seed0": fingerprint}) == ["sample_0001_seed1 (a sample this run does not make)"]
    with pytest.raises(ValueError, match="output_dir=.*holds the outputs of another run.*overwrite=true"):
        store.check_output_dir({"sample_0000_seed0": fingerprint})
    overwriting = scripts.sample_store.SampleStore(tmp_path / "out", ".nii.gz", ".nii.gz", overwrite=True)
    overwriting.check_output_dir({"sample_0000_seed0": fingerprint})  # allowed: the run removes them first
    removed = overwriting.remove_conflicts({"sample_0000_seed0": fingerprint})
    assert sorted(p.name for p in removed) == ["generation_report.json", "sample_0001_seed1.json"]
    assert list((tmp_path / "out").iterdir()) == []


def test_record_writer_must_follow_the_sample_writer(scripts, run_settings, tmp_path):
    settings = run_settings(tmp_path / "out", num_samples=1)
    store = scripts.sample_store.SampleStore(tmp_path / "out", ".nii.gz", ".nii.gz")
    with pytest.raises(RuntimeError, match="attached after SampleWriter"):
        _run(scripts, settings, handlers=[scripts.generation.SampleRecordWriter(store, settings)])
    assert not (tmp_path / "out" / "sample_0000_seed0.json").exists()  # a sample without files is never marked done
