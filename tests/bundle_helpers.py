"""Helpers shared by the bundle tests: running bundle configs in a subprocess and importing a bundle's scripts."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"


def cli_value(value: Any) -> str:
    """Format an override value the way ``python -m monai.bundle run --id value`` parses it (fire literals)."""
    return value if isinstance(value, str) else repr(value)


def run_bundle(
    bundle_dir: Path,
    config_files: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    torchrun_procs: int | None = None,
    check: bool = True,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """
    Run ``python -m monai.bundle run`` (or ``torchrun -m monai.bundle run``) with the bundle as working directory.

    Returns the completed process (stdout and stderr merged, as text). With ``check`` a failure raises an
    ``AssertionError`` that shows the end of the log.
    """
    configs = [str(Path("configs") / name) for name in config_files]
    config_arg = configs[0] if len(configs) == 1 else repr(configs)
    launcher = [sys.executable, "-m"]
    if torchrun_procs:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}", "-m"]
    command = [*launcher, "monai.bundle", "run", "--config_file", config_arg, "--meta_file", "configs/metadata.json"]
    command += ["--logging_file", "configs/logging.conf"]
    for key, value in (overrides or {}).items():
        command += [f"--{key}", cli_value(value)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=bundle_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with {result.returncode}:\n{result.stdout[-6000:]}")
    return result


@contextlib.contextmanager
def bundle_scripts(bundle_dir: Path) -> Iterator[ModuleType]:
    """Import ``<bundle_dir>/scripts`` as the package ``scripts`` for the duration of the block."""

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
