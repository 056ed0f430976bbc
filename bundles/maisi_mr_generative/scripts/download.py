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
Download only what a generation run needs: ``python -m scripts.download [--config_file ...] [--<id> <value> ...]``.

The run's own settings decide what is needed (the same ids as ``monai.bundle run``: e.g. ``--mask_path`` needs no
candidate-mask database, ``--version ddpm-ct`` via the ddpm overlay needs the ddpm weights). The command lists
the files with their sizes first, then downloads the missing ones from the URLs of ``large_files.yml``, resuming
an interrupted download (``<file>.part`` with an HTTP range request), verifying the published hash where there is
one, and moving each file into place only when it is complete. ``--dry_run True`` stops after the listing.

MONAI's ``download_large_files`` fetches every file of ``large_files.yml`` (about 10 GB for CT), and its
``large_file_name`` option crashes in MONAI 1.6.1, so this command does not use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from .settings import RequiredFiles

logger = logging.getLogger(__name__)

__all__ = ["Download", "download_file", "main", "plan_downloads", "remote_size"]

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Download:
    """One file to fetch: the config id that needs it, the target path, the URL and the published hash (if any)."""

    config_id: str
    path: Path
    url: str
    hash_val: str | None = None
    hash_type: str = "md5"


def _large_files(large_files_yml: str | os.PathLike) -> list[dict[str, Any]]:
    content = yaml.safe_load(Path(large_files_yml).read_text(encoding="utf-8"))
    return list(content.get("large_files", [])) if isinstance(content, dict) else []


def plan_downloads(files: RequiredFiles, bundle_root: str | os.PathLike, large_files_yml: str | os.PathLike) -> tuple[list[Download], list[str]]:
    """
    The missing files of ``files`` that ``large_files.yml`` can fetch, and the ids of those it cannot.

    A missing folder (``all_mask_files_base_dir``) is fetched as its ``<folder>.zip``.
    """
    by_path = {(Path(bundle_root) / entry["path"]).resolve(): entry for entry in _large_files(large_files_yml)}
    downloads, unlisted = [], []
    for config_id, path in files.missing().items():
        candidates = [Path(path).resolve(), Path(path).resolve().with_name(Path(path).name + ".zip")]
        entry = next((by_path[c] for c in candidates if c in by_path), None)
        if entry is None:
            unlisted.append(config_id)
            continue
        target = next(c for c in candidates if c in by_path)
        downloads.append(Download(config_id, target, entry["url"], entry.get("hash_val") or None, entry.get("hash_type") or "md5"))
    return downloads, unlisted


def remote_size(url: str) -> int | None:
    """The ``Content-Length`` of ``url`` (an HTTP HEAD request), ``None`` when the server does not say or is unreachable."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _digest(path: Path, hash_type: str) -> str:
    digest = hashlib.new(hash_type)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(download: Download, progress: bool = True) -> Path:
    """
    Fetch ``download.url`` to ``download.path``, resuming ``<path>.part``, verifying the hash, then renaming.

    Raises
    ------
    ValueError
        the downloaded file does not have the published hash (the partial file is deleted).
    urllib.error.URLError
        the server cannot be reached (the partial file is kept for the next attempt).
    """
    target = download.path
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(download.url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if offset and response.status != 206:  # the server ignored the range: start again
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with partial.open("ab" if offset else "wb") as handle, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=target.name, disable=not progress
        ) as bar:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                handle.write(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    if download.hash_val is not None:
        actual = _digest(partial, download.hash_type)
        if actual != download.hash_val.lower():
            partial.unlink()
            raise ValueError(
                f"{download.config_id}: {download.url} gave a file whose {download.hash_type} is {actual}, not the "
                f"published {download.hash_val}; it was deleted. Run the command again."
            )
    os.replace(partial, target)
    logger.info("downloaded %s", target)
    return target


def _human(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def fetch(
    files: RequiredFiles, bundle_root: str | os.PathLike, large_files_yml: str | os.PathLike, dry_run: bool = False, progress: bool = True
) -> list[Download]:
    """
    List (with sizes) and fetch the missing files a run needs; returns what was (or, in a dry run, would be) fetched.

    Raises
    ------
    FileNotFoundError
        a missing file that ``large_files.yml`` does not list (a user file: give its path).
    """
    downloads, unlisted = plan_downloads(files, bundle_root, large_files_yml)
    if unlisted:
        listing = ", ".join(f"{key}={str(files[key])!r}" for key in unlisted)
        raise FileNotFoundError(f"{listing}: not published in {large_files_yml}; point these ids at your own files.")
    present = [key for key in files.files if key not in files.missing()]
    sizes = [remote_size(d.url) for d in downloads]
    for key in present:
        logger.info("present      %s = %s", key, files[key])
    for download, size in zip(downloads, sizes):
        logger.info("to download  %s = %s (%s) from %s", download.config_id, download.path, _human(size), download.url)
    known = [s for s in sizes if s is not None]
    logger.info("%d file(s) to download, %s in all%s.", len(downloads), _human(sum(known)), "" if len(known) == len(sizes) else " (some sizes unknown)")
    if not dry_run:
        for download in downloads:
            download_file(download, progress)
    return downloads


def main(config_file: str | Sequence[str] = "configs/inference.json", bundle_root: str = ".", dry_run: bool = False, **overrides: Any) -> None:
    """
    Fetch what the run of ``config_file`` with ``overrides`` (the same ids as ``monai.bundle run``) needs.

    Run it from the bundle folder: ``python -m scripts.download --mask_path my_mask.nii.gz``.
    """
    from monai.bundle import ConfigParser

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = ConfigParser()
    parser.read_config(config_file if isinstance(config_file, str) else list(config_file))
    parser["bundle_root"] = bundle_root
    for key, value in overrides.items():
        parser[key] = value
    settings = parser.get_parsed_content("settings")
    fetch(settings.files, bundle_root, Path(bundle_root) / "large_files.yml", dry_run=dry_run, progress=settings.progress)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
