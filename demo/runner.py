# Copyright (c) MONAI generative bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Run a bundle's configs the way a user does: ``python -m monai.bundle run`` from the bundle folder."""

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
    """Format an override value the way ``python -m monai.bundle run --id value`` parses it (fire literals, no spaces)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(repr(v) if isinstance(v, str) else cli_value(v) for v in value) + "]"
    return value if isinstance(value, str) else repr(value)


def display_command(command: Sequence[str]) -> str:
    """A shell-ready rendering of ``command`` that quotes arguments with brackets or spaces in double quotes."""
    return " ".join(f'"{arg}"' if any(c in arg for c in " []'#") else arg for arg in command)


def bundle_command(
    config_files: Sequence[str], overrides: Mapping[str, Any] | None = None, torchrun_procs: int | None = None
) -> list[str]:
    """The command line that runs ``config_files`` (relative to ``configs/``) with ``overrides``."""
    configs = [str(Path("configs") / name) for name in config_files]
    config_arg = configs[0] if len(configs) == 1 else cli_value(configs)
    launcher = [sys.executable, "-m"]
    if torchrun_procs:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}", "-m"]
    command = [*launcher, "monai.bundle", "run", "--config_file", config_arg, "--meta_file", "configs/metadata.json"]
    command += ["--logging_file", "configs/logging.conf"]
    for key, value in (overrides or {}).items():
        command += [f"--{key}", cli_value(value)]
    return command


def run_bundle(
    bundle_dir: Path,
    config_files: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    torchrun_procs: int | None = None,
    check: bool = True,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """
    Run ``python -m monai.bundle run`` (or ``torchrun -m monai.bundle run``) with the bundle as working directory.

    Returns the completed process (stdout and stderr merged, as text). With ``check`` a failure raises an
    ``AssertionError`` that shows the end of the log.
    """
    command = bundle_command(config_files, overrides, torchrun_procs)
    threads = "1" if torchrun_procs else str(os.cpu_count() or 1)  # one thread per process under torchrun
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    result = subprocess.run(
        command, cwd=bundle_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with {result.returncode}:\n{result.stdout[-6000:]}")
    return result


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
