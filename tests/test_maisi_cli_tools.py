"""The MAISI bundles' helper commands: dry run, listing of valid values, download of what a run needs."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import json
import threading
from pathlib import Path

import pytest
import torch

from bundle_helpers import BUNDLES_DIR, bundle_scripts, parse_bundle_config, run_bundle

CT_BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
MR_BUNDLE = BUNDLES_DIR / "maisi_mr_generative"


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_dry_run_reports_files_plans_and_samples_without_weights(tmp_path, no_weights, capsys):
    overrides = {"bundle_root": str(CT_BUNDLE), "model_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out"),
                 "mask_path": None, "image_only": True, "num_output_samples": 3, "output_size": [512, 512, 256],
                 "spacing": [1.0, 1.0, 1.5], "memory_budget_gb": 4}  # fmt: skip
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "autoencoder_v1.pt").write_bytes(b"x" * 1234)
    with bundle_scripts(CT_BUNDLE):
        parser = parse_bundle_config(CT_BUNDLE, ["inference.json", "dry_run.json"], overrides)
        parser.get_parsed_content("initialize")
        (description,) = parser.get_parsed_content("run")
    printed = json.loads(capsys.readouterr().out)
    assert printed == description
    files = {f["id"]: f for f in description["files"]}
    assert files["trained_autoencoder_path"]["present"] and files["trained_autoencoder_path"]["size_bytes"] == 1234
    assert description["missing_files"] == ["trained_diffusion_path"]  # image-only: no ControlNet, no database
    assert description["samples"] == {"count": 3, "first": ["sample_0000_seed0", "sample_0001_seed1", "sample_0002_seed2"]}
    (plan,) = description["decode_plans"].values()
    assert "128x128x64" in description["decode_plans"] and "of 4.00 GB budget" in plan
    assert description["settings"]["requests"][0]["output_size"] == [512, 512, 256]
    (estimate,) = description["resource_estimates"].values()  # image only: the UNet and the decoder
    assert list(description["resource_estimates"]) == ["128x128x64"] and "latent (128, 128, 64), 30 steps" in estimate[0]
    assert [line.split(":")[0].strip() for line in estimate[1:]] == ["unet", "decoder", "whole generation"]
    assert not (tmp_path / "out").exists()


def test_dry_run_from_the_command_line_exits_zero(tmp_path):
    result = run_bundle(MR_BUNDLE, ["inference.json", "dry_run.json"], {"model_dir": str(tmp_path), "output_dir": str(tmp_path / "out")})
    description = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert description["missing_files"] == ["trained_autoencoder_path", "trained_diffusion_path"]
    assert description["settings"]["requests"][0]["modality"] == 9
    assert "whole generation: peak ~" in description["resource_estimates"]["32x64x64"][-1]  # image only (no mask_path)


def test_listing_commands():
    with bundle_scripts(CT_BUNDLE):
        listing = importlib.import_module("scripts.listing")
        anatomies = listing.anatomies()
        assert anatomies["liver"] == 1 and anatomies["body"] == 200 and not [n for n in anatomies if n.startswith("dummy")]
        assert listing.regions()["chest"] == ["chest", "thorax", "chest/thorax"]
        assert listing.modalities() == {"ct": 1, "ct_wo_contrast": 2, "ct_contrast": 3}
        assert "hepatic tumor" in listing.controllable()["tumours (at most one per request)"]
        assert "[256, 384, 512]" in listing.geometry()["output_size"]
    with bundle_scripts(MR_BUNDLE):
        listing = importlib.import_module("scripts.listing")
        assert listing.modalities()["mri_t1"] == 9 and "ct" not in listing.modalities()
        assert listing.label_mapping() == {401: 129, 402: 130, 403: 131, 500: 200}
        assert listing.geometry()["output_size"]["z=256"] == [[128, 256, 256], [256, 128, 256], [256, 256, 256]]


def test_listing_the_database_per_region(tmp_path):
    entries = [
        {"pseudo_label_filename": "a.nii.gz", "spacing": [1, 1, 1], "dim": [256, 256, 256], "label_list": [1, 3, 200], "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]},
        {"pseudo_label_filename": "b.nii.gz", "spacing": [1, 1, 1], "dim": [256, 256, 256], "label_list": [22]},
    ]  # fmt: skip
    (tmp_path / "db.json").write_text(json.dumps(entries))
    with bundle_scripts(CT_BUNDLE):
        by_region = importlib.import_module("scripts.listing").database(tmp_path / "db.json")
    assert by_region == {"chest": ["body", "liver", "spleen"], "abdomen": ["body", "liver", "spleen"], "no region information": ["brain"]}


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP range requests, as the weight hosts do."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(head=True)

    def do_GET(self):  # noqa: N802
        self._serve(head=False)

    def _serve(self, head):
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not head:
            self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *args, **kwargs: _RangeHandler(*args, directory=str(served), **kwargs)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_fetches_only_what_the_run_needs_and_resumes(tmp_path, server):
    served, url = server
    payloads = {name: bytes(range(256)) * (40 + i) for i, name in enumerate(("ae.pt", "unet.pt", "controlnet.pt", "db.json", "masks.zip"))}
    for name, data in payloads.items():
        (served / name).write_bytes(data)
    bundle = tmp_path / "bundle"
    entries = [
        {"path": "models/autoencoder_v1.pt", "url": f"{url}/ae.pt", "hash_val": hashlib.md5(payloads["ae.pt"]).hexdigest(), "hash_type": "md5"},
        {"path": "models/diff_unet_3d_rflow-ct.pt", "url": f"{url}/unet.pt"},
        {"path": "models/controlnet_3d_rflow-ct.pt", "url": f"{url}/controlnet.pt"},
        {"path": "datasets/candidate_masks_flexible_size_and_spacing_4000.json", "url": f"{url}/db.json"},
        {"path": "datasets/all_masks_flexible_size_and_spacing_4000.zip", "url": f"{url}/masks.zip"},
    ]
    bundle.mkdir()
    import yaml

    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    (bundle / "models").mkdir()
    (bundle / "models/diff_unet_3d_rflow-ct.pt.part").write_bytes(payloads["unet.pt"][:1000])  # an interrupted download
    with bundle_scripts(CT_BUNDLE):
        download = importlib.import_module("scripts.download")
        settings = importlib.import_module("scripts.settings")
        user_mask_run = settings.RequiredFiles(
            {k: bundle / e["path"] for k, e in zip(("trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path"), entries)},
            bundle,
        )
        planned = download.fetch(user_mask_run, bundle, bundle / "large_files.yml", dry_run=True, progress=False)
        assert [d.config_id for d in planned] == ["trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path"]
        assert not (bundle / "models/autoencoder_v1.pt").exists()  # a dry run downloads nothing
        download.fetch(user_mask_run, bundle, bundle / "large_files.yml", progress=False)
        for name, entry in zip(("ae.pt", "unet.pt", "controlnet.pt"), entries):
            assert (bundle / entry["path"]).read_bytes() == payloads[name]
        assert not (bundle / "datasets").exists()  # a user-mask run needs no candidate-mask database
        assert not list((bundle / "models").glob("*.part"))

        database_run = settings.RequiredFiles({"all_mask_files_base_dir": bundle / "datasets/all_masks_flexible_size_and_spacing_4000"}, bundle)
        (planned,) = download.fetch(database_run, bundle, bundle / "large_files.yml", progress=False)
        assert planned.path.name == "all_masks_flexible_size_and_spacing_4000.zip"  # a missing folder comes as its zip
        assert planned.path.read_bytes() == payloads["masks.zip"]

        (bundle / "models/autoencoder_v1.pt").unlink()
        (served / "ae.pt").write_bytes(b"tampered")
        with pytest.raises(ValueError, match="md5 is .* not the published"):
            download.fetch(user_mask_run, bundle, bundle / "large_files.yml", progress=False)
        assert not (bundle / "models/autoencoder_v1.pt").exists() and not (bundle / "models/autoencoder_v1.pt.part").exists()
        own = settings.RequiredFiles({"mask_path": tmp_path / "my_mask.nii.gz"}, bundle)
        with pytest.raises(FileNotFoundError, match="mask_path=.*not published"):
            download.fetch(own, bundle, bundle / "large_files.yml", progress=False)
