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
    Import ``<bundle_dir>/scripts`` as the package ``scripts`` for the duration of the block.

    Tests of the canonical ``common/`` code import a bundle's copy of it (identical bytes: ``test_shared_code``).
    """

    def purge() -> None:
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    purge()
    sys.path.insert(0, str(bundle_dir))
    try:
        yield importlib.import_module("scripts")
    finally:
        sys.path.remove(str(bundle_dir))
        purge()
