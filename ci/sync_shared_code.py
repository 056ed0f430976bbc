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
"""
Keep the bundles' copies of shared code identical to its canonical source.

Each bundle zip must be self-contained, so code shared by several bundles lives once under
``common/`` and is copied into every bundle that uses it. ``python ci/sync_shared_code.py`` writes
the copies; ``--check`` only reports copies that are missing or differ (the test suite runs it).
Bundles that do not exist yet are skipped.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MAISI_BUNDLES = ("maisi_ct_generative", "maisi_mr_generative")


@dataclass(frozen=True)
class SharedSource:
    """Files matching ``pattern`` in ``source`` are copied into ``<bundle>/<target>`` for every bundle listed."""

    source: str
    pattern: str
    bundles: tuple[str, ...]
    target: str


SHARED_SOURCES = (
    SharedSource("common/core", "*.py", ("brats_ldm2d", *MAISI_BUNDLES), "scripts"),
    SharedSource("common/maisi/scripts", "*.py", MAISI_BUNDLES, "scripts"),
    SharedSource("common/maisi/data", "*.json", MAISI_BUNDLES, "configs"),
    # modality-neutral training configs, layered on each bundle's own inference.json
    SharedSource("common/maisi/configs", "*.json", MAISI_BUNDLES, "configs"),
)


def planned_copies(repo_root: Path, sources: Sequence[SharedSource] = SHARED_SOURCES) -> list[tuple[Path, Path]]:
    """Every (canonical file, copy) pair for the bundles that exist under ``repo_root/bundles``."""
    pairs = []
    for shared in sources:
        files = sorted((repo_root / shared.source).glob(shared.pattern))
        for bundle in shared.bundles:
            bundle_dir = repo_root / "bundles" / bundle
            if bundle_dir.is_dir():
                pairs += [(f, bundle_dir / shared.target / f.name) for f in files]
    return pairs


def drifted_copies(repo_root: Path, sources: Sequence[SharedSource] = SHARED_SOURCES) -> list[str]:
    """Describe every copy that is missing or differs from its canonical file."""
    problems = []
    for canonical, copy in planned_copies(repo_root, sources):
        if not copy.is_file():
            problems.append(f"{copy.relative_to(repo_root)}: missing copy of {canonical.relative_to(repo_root)}")
        elif copy.read_bytes() != canonical.read_bytes():
            problems.append(f"{copy.relative_to(repo_root)}: differs from {canonical.relative_to(repo_root)}")
    return problems


def sync_copies(repo_root: Path, sources: Sequence[SharedSource] = SHARED_SOURCES) -> list[Path]:
    """Write every missing or outdated copy; return the files written."""
    written = []
    for canonical, copy in planned_copies(repo_root, sources):
        if not copy.is_file() or copy.read_bytes() != canonical.read_bytes():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(canonical, copy)
            written.append(copy)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of writing copies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        problems = drifted_copies(REPO_ROOT)
        for problem in problems:
            logger.error(problem)
        if problems:
            logger.error("run `python ci/sync_shared_code.py` and commit the copies (never edit a copy by hand)")
        return 1 if problems else 0
    for path in sync_copies(REPO_ROOT):
        logger.info("wrote %s", path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
