"""Helpers shared by the bundle tests: running bundle configs in a subprocess and importing a bundle's scripts."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from demo.runner import BUNDLES_DIR, REPO_ROOT, run_bundle

__all__ = ["BUNDLES_DIR", "REPO_ROOT", "bundle_scripts", "parse_bundle_config", "run_bundle", "run_in_process"]


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


def parse_bundle_config(bundle_dir: Path, config_files: list[str], overrides: dict | None = None):
    """A ``ConfigParser`` of ``config_files`` (relative to ``configs/``, stacked) with ``overrides`` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / name) for name in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def run_in_process(bundle_dir: Path, config_files: list[str], overrides: dict | None = None):
    """
    Run ``initialize``, ``run`` and ``finalize`` of the stacked configs in this process, as ``monai.bundle run``
    does (the bundle's ``scripts`` imported for the duration); returns the parser for further inspection.
    """
    with bundle_scripts(bundle_dir):
        parser = parse_bundle_config(bundle_dir, config_files, overrides)
        for section in ("initialize", "run", "finalize"):
            parser.get_parsed_content(section)
        return parser
