"""Helpers shared by the bundle tests: running bundle configs in a subprocess and importing a bundle's scripts."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from demo.runner import BUNDLES_DIR, REPO_ROOT, run_bundle

__all__ = ["BUNDLES_DIR", "REPO_ROOT", "bundle_scripts", "run_bundle"]


@contextlib.contextmanager
def bundle_scripts(bundle_dir: Path) -> Iterator[ModuleType]:
    """
    Import ``<bundle_dir>/scripts`` as the package ``scripts`` for the duration of the block; for the canonical
    ``common/maisi`` the package also holds the ``common/core`` modules (``scripts.checkpoint``...), as in a bundle.
    """

    def purge() -> None:
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    purge()
    sys.path.insert(0, str(bundle_dir))
    try:
        package = importlib.import_module("scripts")
        if bundle_dir.resolve() == (REPO_ROOT / "common" / "maisi").resolve():
            package.__path__.append(str(REPO_ROOT / "common" / "core"))  # as ci/sync_shared_code.py lays out a bundle
        yield package
    finally:
        sys.path.remove(str(bundle_dir))
        purge()
