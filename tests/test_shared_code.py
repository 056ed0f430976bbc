"""Shared code has one canonical copy; the bundles' copies, their lists and .gitattributes follow the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundle_helpers import REPO_ROOT
from ci.sync_shared_code import load_manifest, planned_copies, sync_copies, sync_problems


def test_bundle_copies_match_canonical_sources():
    assert sync_problems(REPO_ROOT) == []


def test_mr_bundle_receives_no_ct_only_code():
    mr_sources = {copy.source.as_posix() for copy in planned_copies(REPO_ROOT)["maisi_mr_generative"]}
    assert not [s for s in mr_sources if s.startswith("common/maisi/ct/")]
    ct_sources = {copy.source.as_posix() for copy in planned_copies(REPO_ROOT)["maisi_ct_generative"]}
    assert not [s for s in ct_sources if s.startswith("common/maisi/mr/")]


def _tiny_repo(root: Path, bundles: dict) -> None:
    (root / "common/pkg").mkdir(parents=True)
    (root / "common/pkg/a.py").write_text("A = 1\n")
    (root / "common/pkg/b.py").write_text("B = 1\n")
    (root / "bundles/one/scripts").mkdir(parents=True)
    (root / "common/shared_code.json").write_text(json.dumps({"bundles": bundles}))


def test_missing_drifted_and_orphaned_copies_are_detected_and_synced(tmp_path: Path):
    _tiny_repo(tmp_path, {"one": {"scripts": ["pkg/*.py"]}, "absent": {"scripts": ["pkg/a.py"]}})
    problems = sync_problems(tmp_path)
    assert "bundles/one/scripts/a.py: missing copy of common/pkg/a.py" in problems
    assert "bundles/one/.generated-files: out of date" in problems
    assert ".gitattributes: the linguist-generated block is out of date" in problems
    sync_copies(tmp_path)
    assert sync_problems(tmp_path) == []
    assert (tmp_path / "bundles/one/.generated-files").read_text().splitlines()[1:] == ["scripts/a.py", "scripts/b.py"]
    assert "bundles/one/scripts/b.py linguist-generated=true" in (tmp_path / ".gitattributes").read_text()
    assert not (tmp_path / "bundles/absent").exists()

    (tmp_path / "bundles/one/scripts/a.py").write_text("A = 2\n")  # drift
    assert sync_problems(tmp_path) == ["bundles/one/scripts/a.py: differs from common/pkg/a.py"]

    (tmp_path / "common/pkg/b.py").unlink()  # its copy becomes an orphan
    problems = sync_problems(tmp_path)
    assert any(p.startswith("bundles/one/scripts/b.py: orphaned copy") for p in problems)
    sync_copies(tmp_path)
    assert not (tmp_path / "bundles/one/scripts/b.py").exists()
    assert (tmp_path / "bundles/one/scripts/a.py").read_text() == "A = 1\n"
    assert sync_problems(tmp_path) == []


def test_unlisted_stale_copies_are_detected_and_removed(tmp_path: Path):
    _tiny_repo(tmp_path, {"one": {"scripts": ["pkg/a.py"]}})
    sync_copies(tmp_path)
    (tmp_path / "bundles/one/scripts/b.py").write_text("B = 1\n")  # a copy of common/pkg/b.py no list records
    assert sync_problems(tmp_path) == ["bundles/one/scripts/b.py: a copy of a common/ file that the manifest does not give one"]
    sync_copies(tmp_path)
    assert not (tmp_path / "bundles/one/scripts/b.py").exists() and sync_problems(tmp_path) == []


def test_bundle_own_files_are_never_touched(tmp_path: Path):
    _tiny_repo(tmp_path, {"one": {"scripts": ["pkg/a.py"]}})
    (tmp_path / "bundles/one/scripts/own.py").write_text("OWN = 1\n")
    (tmp_path / ".gitattributes").write_text("*.png binary\n")
    sync_copies(tmp_path)
    assert (tmp_path / "bundles/one/scripts/own.py").read_text() == "OWN = 1\n"
    assert (tmp_path / ".gitattributes").read_text().startswith("*.png binary\n")
    assert sync_problems(tmp_path) == []


def test_name_collisions_and_empty_patterns_are_refused(tmp_path: Path):
    _tiny_repo(tmp_path, {"one": {"scripts": ["pkg/a.py", "other/a.py"]}})
    (tmp_path / "common/other").mkdir()
    (tmp_path / "common/other/a.py").write_text("A = 3\n")
    with pytest.raises(ValueError, match="would come from both"):
        planned_copies(tmp_path)
    (tmp_path / "common/shared_code.json").write_text(json.dumps({"bundles": {"one": {"scripts": ["nothing/*.py"]}}}))
    with pytest.raises(ValueError, match="matches no file"):
        planned_copies(tmp_path)


def test_manifest_shape_is_checked(tmp_path: Path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common/shared_code.json").write_text(json.dumps({"bundles": {"one": {"scripts": "pkg/*.py"}}}))
    with pytest.raises(ValueError, match="lists of glob patterns"):
        load_manifest(tmp_path)
