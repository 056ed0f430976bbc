"""The shared MAISI helpers that replaced duplicated code: the one datalist reader, label_id_of, the generation run."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts

COMMON = BUNDLES_DIR / "maisi_ct_generative"  # the copies of common/maisi (identical, see test_shared_code)


@pytest.fixture(scope="module")
def scripts():
    with bundle_scripts(COMMON):
        yield SimpleNamespace(
            data=importlib.import_module("scripts.training_data"),
            embeddings=importlib.import_module("scripts.embeddings"),
            labels=importlib.import_module("scripts.labels"),
            mask_generation=importlib.import_module("scripts.mask_generation"),
            generation=importlib.import_module("scripts.generation"),
        )


def _datalist(folder, entries, name="list.json"):
    for entry in (e for e in entries if isinstance(e, dict)):
        for key in ("image", "label"):
            if isinstance(entry.get(key), str) and not entry[key].startswith("missing"):
                (folder / entry[key]).write_bytes(b"x")
    path = folder / name
    path.write_text(json.dumps({"training": entries}))
    return path


def test_one_datalist_reader_for_embeddings_and_training(scripts):
    assert scripts.embeddings.load_datalist is scripts.data.load_datalist
    assert scripts.embeddings.select_folds is scripts.data.select_folds


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


def test_label_id_of_is_shared(scripts):
    assert scripts.mask_generation.label_id_of is scripts.labels.label_id_of
    assert scripts.labels.label_id_of("liver", {"liver": 1}) == 1
    assert scripts.labels.label_id_of("hepatic tumor", {}) == 26  # tumour names resolve through constants
    with pytest.raises(ValueError, match="label 'nose' is missing"):
        scripts.labels.label_id_of("nose", {"liver": 1})


def test_generation_run_setup_timing_and_report(scripts, tmp_path):
    generation = scripts.generation
    assert generation.latent_shape_of((64, 32, 16)) == (4, 16, 8, 4)
    timings: dict[str, float] = {}
    for _ in range(2):
        with generation.timed(timings, "decode_s"):
            pass
    assert set(timings) == {"decode_s"} and timings["decode_s"] >= 0.0
    inputs = SimpleNamespace(
        output_size=(32, 32, 16),
        autoencoder_sliding_window_infer_size=[16, 16, 16],
        autoencoder_sliding_window_infer_overlap=0.25,
        autoencoder_tp_num_splits=1,
    )
    run = generation.start_generation_run(inputs, tmp_path / "out", "cpu")
    assert run.output_dir.is_dir() and run.device == torch.device("cpu") and run.timings == {}
    report = run.finish({"random_seed": 3}, [{"index": 0, "seed": 3, "mask_source": "none (image only)"}])
    written = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert report["settings"] == {"random_seed": 3, "decode_plan": run.decode_plan.describe()}
    assert written["samples"][0]["seed"] == 3 and written["settings"]["random_seed"] == 3
