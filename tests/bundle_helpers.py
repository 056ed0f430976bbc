"""Helpers shared by the bundle tests: running bundle configs in a subprocess or in-process, importing a bundle's scripts."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from monai.bundle import ConfigWorkflow

from demo.runner import BUNDLES_DIR, REPO_ROOT, run_bundle

__all__ = ["BUNDLES_DIR", "REPO_ROOT", "bundle_scripts", "error_chain", "run_bundle", "run_workflow"]


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


def run_workflow(
    bundle_dir: Path,
    config_files: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    workflow_type: str | None = None,
) -> ConfigWorkflow:
    """
    Run bundle configs in this process, as ``python -m monai.bundle run`` does (initialize, run, finalize),
    through ``monai.bundle.ConfigWorkflow``; for the paths where a subprocess proves nothing extra.

    ``overrides`` are config ids to Python values (nested ids with ``#``). The bundle's ``logging.conf`` is
    not applied, so pytest keeps capturing the logs. Errors propagate as raised by MONAI's config
    evaluation; the original exception is in the ``__cause__`` chain (see ``error_chain``).
    """
    configs = [str(Path(bundle_dir) / "configs" / name) for name in config_files]
    with bundle_scripts(Path(bundle_dir)):
        path_before = list(sys.path)
        try:
            workflow = ConfigWorkflow(
                config_file=configs if len(configs) > 1 else configs[0],
                meta_file=str(Path(bundle_dir) / "configs" / "metadata.json"),
                logging_file=False,
                workflow_type=workflow_type,
                **dict(overrides or {}),
            )
            workflow.initialize()
            try:
                workflow.run()
            finally:
                workflow.finalize()
        finally:
            sys.path[:] = path_before  # ConfigWorkflow.run() puts the bundle folder on sys.path for good
    return workflow


def error_chain(error: BaseException) -> str:
    """The messages of ``error`` and of every exception it was raised from, one per line."""
    messages = []
    while error is not None:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(messages)
