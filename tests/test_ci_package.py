"""Tests of ci/package_bundle.py: reproducible archives that MONAI's downloader installs and runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import torch

from ci.package_bundle import bundle_files, build_bundle_zip, main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_bundle"
NAME = "tiny_bundle"
VERSION = "0.2.0"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A copy of the tiny bundle with the generated files that packaging must leave out."""
    target = tmp_path / "src" / NAME
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("__pycache__"))
    for relpath in ("models/model.pt", "eval/metrics.json", "runs/events.out", "output/prediction.pt"):
        (target / relpath).parent.mkdir(parents=True, exist_ok=True)
        (target / relpath).write_bytes(b"generated")
    (target / "scripts/__pycache__").mkdir()
    (target / "scripts/__pycache__/tiny_net.cpython-311.pyc").write_bytes(b"cache")
    (target / "scripts/stale.pyc").write_bytes(b"cache")
    (target / ".pytest_cache").mkdir()
    (target / ".pytest_cache/README.md").write_text("cache")
    (target / "docs/models").mkdir()
    (target / "docs/models/architecture.md").write_text("not generated: only top-level folders are")
    return target


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_build_is_reproducible(bundle: Path, tmp_path: Path) -> None:
    first = build_bundle_zip(bundle, tmp_path / "out1")
    os.utime(bundle / "LICENSE", (0, 0))
    (bundle / "configs/inference.json").chmod(0o600)
    second = build_bundle_zip(bundle, tmp_path / "out2")
    assert first.name == second.name == f"{NAME}_v{VERSION}.zip"
    assert first.read_bytes() == second.read_bytes()
    assert sha1(first) == sha1(second)


def test_archive_members(bundle: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(build_bundle_zip(bundle, tmp_path / "out")) as archive:
        infos = archive.infolist()
        assert archive.testzip() is None
    names = [info.filename for info in infos]
    assert names == sorted(names)
    assert all(name.startswith(f"{NAME}/") for name in names)
    assert f"{NAME}/scripts/tiny_net.py" in names
    assert f"{NAME}/configs/metadata.json" in names
    assert f"{NAME}/docs/models/architecture.md" in names
    relpaths = [PurePosixPath(name).relative_to(NAME) for name in names]
    assert not {path.parts[0] for path in relpaths} & {"models", "eval", "runs", "output", ".pytest_cache"}
    assert not any("__pycache__" in path.parts or path.suffix == ".pyc" for path in relpaths)
    for info in infos:
        assert info.date_time == (2022, 5, 30, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        assert info.compress_type == zipfile.ZIP_DEFLATED


def test_bundle_files_and_cli(bundle: Path, tmp_path: Path) -> None:
    files = bundle_files(bundle)
    assert Path("large_files.yml") in files
    assert not any(path.parts[0] in {"models", "eval", "runs", "output"} for path in files)
    assert main([str(bundle), "--out", str(tmp_path / "cli")]) == 0
    with zipfile.ZipFile(tmp_path / "cli" / f"{NAME}_v{VERSION}.zip") as archive:
        assert [info.filename for info in archive.infolist()] == [f"{NAME}/{path.as_posix()}" for path in files]


def test_missing_version_is_an_error(bundle: Path, tmp_path: Path) -> None:
    meta = bundle / "configs/metadata.json"
    meta.write_text(meta.read_text().replace('"version": "0.2.0",', ""))
    with pytest.raises(ValueError, match="'version' must be a version string"):
        build_bundle_zip(bundle, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run this Python with ``args`` in ``cwd``; on failure show its output."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_monai_download_installs_and_runs_the_archive(bundle: Path, tmp_path: Path) -> None:
    zip_path = build_bundle_zip(bundle, tmp_path / "out")
    install_dir = tmp_path / "installed"
    work_dir = tmp_path / "work"  # no `scripts` here, so only the unpacked bundle's can be imported
    work_dir.mkdir()
    download = ["download", "--name", NAME, "--url", zip_path.as_uri(), "--bundle_dir", str(install_dir)]
    run_python(["-m", "monai.bundle", *download], cwd=work_dir)
    unpacked = install_dir / NAME
    installed = sorted(path.relative_to(unpacked) for path in unpacked.rglob("*") if path.is_file())
    assert installed == sorted(bundle_files(bundle))
    for relpath in installed:
        assert (unpacked / relpath).read_bytes() == (bundle / relpath).read_bytes(), relpath

    inference = ["run", "--config_file", str(unpacked / "configs/inference.json"), "--bundle_root", str(unpacked)]
    run_python(["-m", "monai.bundle", *inference], cwd=work_dir)
    prediction = torch.load(unpacked / "output/prediction.pt")
    assert prediction.shape == (1, 1, 8, 8)
    assert prediction.dtype == torch.float32
