"""Shared code has one canonical copy; the bundles' copies must be identical to it."""

from __future__ import annotations

from pathlib import Path

from bundle_helpers import REPO_ROOT
from ci.sync_shared_code import SharedSource, drifted_copies, sync_copies


def test_bundle_copies_match_canonical_sources():
    assert drifted_copies(REPO_ROOT) == []


def test_drift_is_detected_and_synced(tmp_path: Path):
    (tmp_path / "common/pkg").mkdir(parents=True)
    (tmp_path / "common/pkg/a.py").write_text("A = 1\n")
    (tmp_path / "bundles/one/scripts").mkdir(parents=True)
    sources = [SharedSource("common/pkg", "*.py", ("one", "absent"), "scripts")]

    assert drifted_copies(tmp_path, sources) == ["bundles/one/scripts/a.py: missing copy of common/pkg/a.py"]
    assert sync_copies(tmp_path, sources) == [tmp_path / "bundles/one/scripts/a.py"]
    assert drifted_copies(tmp_path, sources) == []

    (tmp_path / "bundles/one/scripts/a.py").write_text("A = 2\n")
    assert drifted_copies(tmp_path, sources) == ["bundles/one/scripts/a.py: differs from common/pkg/a.py"]
    sync_copies(tmp_path, sources)
    assert (tmp_path / "bundles/one/scripts/a.py").read_text() == "A = 1\n"
    assert not (tmp_path / "bundles/absent").exists()
