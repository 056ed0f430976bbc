"""
Package a bundle of this collection as a reproducible zip archive.

Usage::

    python ci/package_bundle.py bundles/<name> --out build/

writes ``build/<name>_v<version>.zip`` holding ``<name>/<file>`` for every source file of the bundle.
Generated folders (``models/``, ``eval/``, ``runs/``, ``output/``) and Python caches are left out:
weights are listed in ``large_files.yml`` and fetched by users with
``python -m monai.bundle download_large_files --bundle_path <bundle root>``.
The same sources always give the same bytes (sorted members, fixed timestamps and permissions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bundle_files", "build_bundle_zip", "main"]

logger = logging.getLogger(__name__)

METADATA_FILE = "configs/metadata.json"
EXCLUDED_NAMES = frozenset({"__pycache__", ".pytest_cache"})
EXCLUDED_FILES = frozenset({".generated-files"})  # the repository's record of copied files (ci/sync_shared_code.py)
EXCLUDED_SUFFIXES = (".pyc",)
GENERATED_DIRS = frozenset({"models", "eval", "runs", "output"})
ZIP_DATE_TIME = (2022, 5, 30, 0, 0, 0)
FILE_MODE = 0o644
COMPRESS_LEVEL = 9


def bundle_files(bundle_dir: Path) -> list[Path]:
    """
    List the files of a bundle that belong in its archive.

    Parameters
    ----------
    bundle_dir
        root of the bundle.

    Returns
    -------
    list of Path
        paths relative to ``bundle_dir``, sorted by their POSIX form; ``__pycache__``, ``.pytest_cache``,
        ``*.pyc``, ``.generated-files`` and the top-level generated folders are excluded.
    """
    files = []
    for root, dirs, names in os.walk(bundle_dir):
        relroot = Path(root).relative_to(bundle_dir)
        dirs[:] = [name for name in dirs if not _is_excluded_dir(relroot, name)]
        files += [relroot / name for name in names if not name.endswith(EXCLUDED_SUFFIXES) and name not in EXCLUDED_FILES]
    return sorted(files, key=Path.as_posix)


def build_bundle_zip(bundle_dir: Path, out_dir: Path) -> Path:
    """
    Write ``<out_dir>/<bundle name>_v<version>.zip`` deterministically.

    The bundle name is the directory name (the metadata ``name`` is a human readable title);
    the version is the metadata ``version``. Each file is stored as ``<bundle name>/<relative path>``,
    deflated at level 9, dated 2022-05-30 00:00 with mode 0644; there are no directory entries.

    Parameters
    ----------
    bundle_dir
        root of the bundle.
    out_dir
        folder for the archive, created if needed.

    Returns
    -------
    Path
        the archive written (replaced atomically if it existed).

    Raises
    ------
    ValueError
        when the metadata has no usable ``version``.
    """
    bundle_dir = Path(bundle_dir).resolve()
    name = bundle_dir.name
    zip_path = Path(out_dir) / f"{name}_v{_bundle_version(bundle_dir)}.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    files = bundle_files(bundle_dir)
    with tempfile.NamedTemporaryFile(dir=zip_path.parent, suffix=".zip.tmp", delete=False) as handle:
        tmp_path = Path(handle.name)
    try:
        with zipfile.ZipFile(tmp_path, "w") as archive:
            for relpath in files:
                archive.writestr(
                    _member_info(f"{name}/{relpath.as_posix()}"),
                    (bundle_dir / relpath).read_bytes(),
                    compress_type=zipfile.ZIP_DEFLATED,
                    compresslevel=COMPRESS_LEVEL,
                )
        tmp_path.chmod(FILE_MODE)
        os.replace(tmp_path, zip_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    logger.info("wrote %s (%d files)", zip_path, len(files))
    return zip_path


def _is_excluded_dir(relroot: Path, name: str) -> bool:
    """Whether the folder ``relroot/name`` (relative to the bundle root) is left out of the archive."""
    return name in EXCLUDED_NAMES or (relroot == Path(".") and name in GENERATED_DIRS)


def _bundle_version(bundle_dir: Path) -> str:
    """The metadata ``version``, restricted to characters that are safe in a file name."""
    version = json.loads((bundle_dir / METADATA_FILE).read_text(encoding="utf-8")).get("version")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]*", version):
        raise ValueError(f"{bundle_dir / METADATA_FILE}: 'version' must be a version string, got {version!r}")
    return version


def _member_info(arcname: str) -> zipfile.ZipInfo:
    """Archive entry with a fixed date and Unix permissions, independent of the source file."""
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE_TIME)
    info.create_system = 3  # Unix, so that external_attr holds the permissions on every platform
    info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """
    Command line entry: package one bundle.

    Parameters
    ----------
    argv
        the arguments, ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    int
        0 on success (errors are raised).
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("bundle_dir", type=Path, help="bundle directory, e.g. bundles/<name>")
    parser.add_argument("--out", type=Path, default=Path("build"), help="output folder (default: build)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_bundle_zip(args.bundle_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
