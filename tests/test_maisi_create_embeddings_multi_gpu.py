"""
configs/multi_gpu_create_embeddings.json: the embedding items split over torchrun ranks (gloo on the CPU) give
byte-identical latents, sidecars and latent datalist to one process; the datalist is written once, by rank 0.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_bundle
from demo.maisi_presets import MAISI_TINY, MAISI_TINY_DIVISIBLE_K, simulate_ct_dataset, write_datalist, write_initial_weights

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
CONFIGS = ["inference.json", "create_embeddings.json"]
NUM_IMAGES = 5  # odd: rank 0 encodes 3, rank 1 encodes 2
REGIONS = ([0, 1, 0, 0], [0, 0, 1, 0])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parser(config_files, overrides):
    return parse_bundle_config(BUNDLE, config_files, overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings_multi_gpu")
    pairs = simulate_ct_dataset(root / "data", NUM_IMAGES)
    items = [
        {"image": str(image), "label": str(label), "fold": index % 2, "top_region_index": REGIONS[index % 2], "bottom_region_index": REGIONS[1]}
        for index, (image, label) in enumerate(pairs)
    ]
    datalist = write_datalist(root / "data/datalist.json", items)
    weights = write_initial_weights(BUNDLE, ["inference.json"], MAISI_TINY, root / "models", {"autoencoder_def": None})
    overrides = {
        "bundle_root": str(BUNDLE),
        "datalist_file": str(datalist),
        "trained_autoencoder_path": weights["autoencoder_def"],
        "embedding_divisible_k": MAISI_TINY_DIVISIBLE_K,
        "progress": False,
        **MAISI_TINY,
    }
    return root, overrides


def _files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_overlay_gives_each_rank_its_share(dataset, monkeypatch):
    root, overrides = dataset
    shares = {}
    with bundle_scripts(BUNDLE):
        for rank in (0, 1):
            monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
            monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
            parser = _parser([*CONFIGS, "multi_gpu_create_embeddings.json"], {**overrides, "embedding_output_dir": str(root / "unused")})
            shares[rank] = [item["image"] for item in parser.get_parsed_content("embedding_shard")]
        all_items = [item["image"] for item in parser.get_parsed_content("embedding_items")]
    assert [len(shares[0]), len(shares[1])] == [3, 2]
    assert sorted(shares[0] + shares[1]) == sorted(all_items) and len(set(all_items)) == NUM_IMAGES  # each item once


def test_latent_datalist_is_written_once_after_a_barrier(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    items = [{"image": str(root / "data/images/sim_000.nii.gz"), "fold": 1}]
    barriers = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barriers.append(True))
    with bundle_scripts(BUNDLE):
        import scripts.embeddings as embeddings

        monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
        embeddings.write_latent_datalist(items, tmp_path / "embeddings", tmp_path / "datalist.json")
        assert barriers == [True] and not (tmp_path / "datalist.json").exists()  # rank 1 waits, never writes
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
        embeddings.write_latent_datalist(items, tmp_path / "embeddings", tmp_path / "datalist.json")
    assert barriers == [True, True]
    assert json.loads((tmp_path / "datalist.json").read_text()) == {"training": [{"image": "embeddings/sim_000_emb.nii.gz", "fold": 1}]}


def test_two_processes_write_the_same_files_as_one(dataset, installed_ct_bundle):
    """One process from the source bundle; two torchrun processes from the installed packaged zip."""
    root, overrides = dataset
    single, multi = root / "single", root / "multi"
    with bundle_scripts(BUNDLE):  # one process, in-process as `monai.bundle run` runs it
        parser = _parser(CONFIGS, {**overrides, "embedding_output_dir": str(single)})
        for section in ("initialize", "run", "finalize"):
            parser.get_parsed_content(section)
    installed = {**overrides, "bundle_root": str(installed_ct_bundle), "embedding_output_dir": str(multi)}
    run_bundle(installed_ct_bundle, [*CONFIGS, "multi_gpu_create_embeddings.json"], installed, torchrun_procs=2)

    one, two = _files(single), _files(multi)
    names = sorted(f"embeddings/sim_{i:03d}_emb.nii.gz{ext}" for i in range(NUM_IMAGES) for ext in ("", ".json"))
    assert sorted(one) == sorted(two) == sorted([*names, "datalist_latents.json"]), sorted(two)
    assert [name for name in one if one[name] != two[name]] == []  # byte-identical
    datalist = json.loads(one["datalist_latents.json"])["training"]
    assert [entry["image"] for entry in datalist] == [f"embeddings/sim_{i:03d}_emb.nii.gz" for i in range(NUM_IMAGES)]
    assert [entry["fold"] for entry in datalist] == [i % 2 for i in range(NUM_IMAGES)]
    assert all(entry["label"].endswith(f"sim_{i:03d}.nii.gz") for i, entry in enumerate(datalist))
    sidecar = json.loads(one["embeddings/sim_001_emb.nii.gz.json"])
    assert sidecar["top_region_index"] == REGIONS[1] and sidecar["dim"] == [32, 32, 32] and sidecar["modality"] == 1
    latents = [np.asarray(nib.load(str(single / "embeddings" / f"sim_{i:03d}_emb.nii.gz")).dataobj) for i in range(NUM_IMAGES)]
    assert all(latent.shape == (8, 8, 8, 4) and np.isfinite(latent).all() and latent.std() > 0 for latent in latents)
    assert not np.array_equal(latents[0], latents[1])  # each image its own latent
