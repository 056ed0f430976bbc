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
The output folder of a generation run: file names, one record per finished sample, resume and the run report.

Every sample's files are written atomically, and its record (``<stem>.json``, holding the sample's report entry
and the fingerprint of its settings) is written last. A sample is complete when its record matches the
run's fingerprint and every file it lists exists, so a run killed mid-sample loses only that sample and a
restart on the same settings and ``output_dir`` regenerates only what is missing.

An ``output_dir`` that holds samples of another run (other settings, other weights, or samples this run does
not make) is refused before any weight loads, unless ``overwrite`` is true; then those earlier outputs are
deleted before generation starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write
from .report import jsonable, write_run_report
from .settings import SampleTask
from .writers import DICOM_EXT

logger = logging.getLogger(__name__)

__all__ = ["REPORT_NAME", "SampleStore"]

REPORT_NAME = "generation_report.json"
RECORD_FORMAT = "maisi-sample-record/1"
_FILE_KEYS = ("image", "label", "preview")


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, ``None`` for a JSON file that is not a sample record (or is unreadable)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(content, dict) or content.get("format") != RECORD_FORMAT:
        return None
    return content


class SampleStore:
    """
    The files of a run in ``output_dir``.

    Parameters
    ----------
    output_dir
        the output folder (config id ``output_dir``); created when generation starts.
    image_ext
        the image extension (``image_output_ext``).
    label_ext
        the label extension (``label_output_ext``), ``None`` when the run writes no label maps.
    overwrite
        replace an earlier run's outputs (``overwrite``) instead of refusing.
    """

    def __init__(self, output_dir: str | os.PathLike, image_ext: str, label_ext: str | None = None, overwrite: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.image_ext = image_ext
        self.label_ext = label_ext
        self.overwrite = overwrite

    # names ------------------------------------------------------------------------------------------

    def paths(self, task: SampleTask) -> dict[str, Path]:
        """``{"image", "label", "preview", "record"}`` of ``task`` (``label`` only when labels are written)."""
        stem = self.output_dir / task.stem
        image_suffix = "" if self.image_ext == DICOM_EXT else self.image_ext  # a DICOM series is a folder
        paths = {
            "image": stem.with_name(f"{task.stem}_image{image_suffix}"),
            "preview": stem.with_name(f"{task.stem}_preview.png"),
            "record": stem.with_name(f"{task.stem}.json"),
        }
        if self.label_ext is not None:
            paths["label"] = stem.with_name(f"{task.stem}_label{self.label_ext}")
        return paths

    @property
    def report_path(self) -> Path:
        """``<output_dir>/generation_report.json``, the merged run report."""
        return self.output_dir / REPORT_NAME

    # records ----------------------------------------------------------------------------------------

    def records(self) -> dict[str, dict[str, Any]]:
        """Every sample record in ``output_dir`` (stem -> record)."""
        if not self.output_dir.is_dir():
            return {}
        found = {}
        for path in sorted(self.output_dir.glob("*.json")):
            record = _read_record(path)
            if record is not None:
                found[str(record.get("stem", path.stem))] = record
        return found

    def conflicts(self, expected: Mapping[str, str]) -> list[str]:
        """
        What in ``output_dir`` belongs to another run.

        Parameters
        ----------
        expected
            stem -> fingerprint of every sample this run makes.

        Returns
        -------
        list[str]
            one line per conflicting sample (at most the first few are listed by the caller).
        """
        problems = []
        for stem, record in self.records().items():
            if stem not in expected:
                problems.append(f"{stem} (a sample this run does not make)")
            elif record.get("fingerprint") != expected[stem]:
                problems.append(f"{stem} (made with other settings or weights)")
        if self.report_path.is_file() and not self.records():
            problems.append(f"{REPORT_NAME} of a run without sample records")
        return problems

    def check_output_dir(self, expected: Mapping[str, str]) -> None:
        """
        Refuse an ``output_dir`` that holds another run's samples, unless ``overwrite``.

        Raises
        ------
        ValueError
            naming ``output_dir``, the conflicting samples and the two ways out.
        """
        problems = self.conflicts(expected)
        if problems and not self.overwrite:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            raise ValueError(
                f"output_dir={str(self.output_dir)!r} holds the outputs of another run: {shown}. Nothing is "
                "overwritten silently: choose another output_dir, or set overwrite=true to delete those outputs "
                "first. (A run restarted with the same settings resumes instead: it skips its finished samples.)"
            )

    def remove_conflicts(self, expected: Mapping[str, str]) -> list[Path]:
        """With ``overwrite``: delete the files and records of the conflicting samples and the old report."""
        removed = []
        for stem, record in self.records().items():
            if expected.get(stem) == record.get("fingerprint"):
                continue
            for key in _FILE_KEYS:
                name = record.get("entry", {}).get(key)
                target = self.output_dir / Path(name).name if name else None
                if target is not None and target.is_dir():
                    shutil.rmtree(target)
                elif target is not None and target.is_file():
                    target.unlink()
                else:
                    continue
                removed.append(target)
            record_path = self.output_dir / f"{stem}.json"
            record_path.unlink(missing_ok=True)
            removed.append(record_path)
        if self.report_path.is_file():
            self.report_path.unlink()
            removed.append(self.report_path)
        if removed:
            logger.info("overwrite=true: removed %d files of an earlier run from %s.", len(removed), self.output_dir)
        return removed

    def is_complete(self, task: SampleTask, fingerprint: str) -> bool:
        """Whether ``task`` was finished by a run with the same fingerprint and all its files exist."""
        record = _read_record(self.paths(task)["record"])
        if record is None or record.get("fingerprint") != fingerprint:
            return False
        entry = record.get("entry", {})
        return all((self.output_dir / Path(entry[key]).name).exists() for key in _FILE_KEYS if entry.get(key))

    def write_record(self, task: SampleTask, fingerprint: str, entry: Mapping[str, Any]) -> Path:
        """Write the record of a finished sample (last, atomically): its report entry and fingerprint."""
        content = {"format": RECORD_FORMAT, "stem": task.stem, "fingerprint": fingerprint, "entry": jsonable(entry)}
        text = json.dumps(content, indent=2, allow_nan=False) + "\n"
        path = self.paths(task)["record"]
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")

    def merge_report(
        self, tasks: Sequence[SampleTask], settings: Mapping[str, Any], device: Any = None
    ) -> dict[str, Any]:
        """
        Write ``generation_report.json`` from the records of ``tasks`` (in task order) and return it.

        Run timings are the sums of the samples' timings; samples without a record (not finished) are listed
        under ``missing``.
        """
        records = self.records()
        samples, missing = [], []
        for task in tasks:
            record = records.get(task.stem)
            if record is None:
                missing.append(task.stem)
            else:
                samples.append(record["entry"])
        timings = _summed_timings(sample.get("timings", {}) for sample in samples)
        report_settings = {**settings, "missing_samples": missing}
        write_run_report(self.report_path, report_settings, samples, timings, device=device)
        return {"settings": report_settings, "samples": samples, "timings": timings}


def _summed_timings(per_sample: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for timings in per_sample:
        for key, value in timings.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total
