"""Helpers shared by the bundle tests: running bundle configs (in a subprocess or in-process) and importing a bundle's scripts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo.runner import BUNDLES_DIR, REPO_ROOT, bundle_scripts, run_bundle

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = [
    "BUNDLES_DIR",
    "REPO_ROOT",
    "bundle_scripts",
    "error_chain",
    "install_packaged_bundle",
    "parse_bundle_config",
    "run_bundle",
    "run_in_process",
]


def parse_bundle_config(bundle_dir: Path, config_files: Sequence[str], overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """A ``ConfigParser`` of ``config_files`` (relative to ``configs/``, stacked, with the metadata) with ``overrides``."""
    from monai.bundle import ConfigParser  # imported here: the other helpers do not need MONAI

    parser = ConfigParser()
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser.read_config([str(bundle_dir / "configs" / name) for name in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def run_in_process(bundle_dir: Path, config_files: Sequence[str], overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """
    Run ``config_files`` (relative to ``configs/``) with ``overrides`` in this process, as ``python -m monai.bundle run``
    runs them: ``initialize``, ``run``, then ``finalize``, with the bundle's ``scripts`` importable.

    For tests in which the command line proves nothing extra; each path keeps one ``run_bundle`` (subprocess or
    ``torchrun``) test for the command line itself. Returns the parser, so that the objects the run built (networks,
    trainer) can be inspected.
    """
    with bundle_scripts(bundle_dir):
        parser = parse_bundle_config(bundle_dir, config_files, overrides)
        for section in ("initialize", "run", "finalize"):
            parser.get_parsed_content(section)
    return parser


def error_chain(error: BaseException) -> str:
    """The messages of ``error`` and of every exception it was raised from, one per line."""
    messages = []
    while error is not None:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def install_packaged_bundle(bundle_dir: Path, work_dir: Path) -> Path:
    """
    Build the bundle's zip (``ci/package_bundle.py``) and install it as users do, with
    ``python -m monai.bundle download --url file://...``; returns the installed bundle folder, which holds
    exactly the packaged files (no weights, no outputs).
    """
    from ci.package_bundle import build_bundle_zip

    archive = build_bundle_zip(bundle_dir, work_dir / "dist")
    install_dir = work_dir / "installed"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", bundle_dir.name, "--url", archive.as_uri(),
         "--bundle_dir", str(install_dir)],
        check=True, capture_output=True, text=True, cwd=work_dir,
    )  # fmt: skip
    return install_dir / bundle_dir.name
