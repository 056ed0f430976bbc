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
What the CT and MR generation settings share: requests and their sample tasks, the decode knobs, the files a
run needs, request manifests, and the settings base class that serialises itself into the run report.

The bundle settings (``settings_ct.CTGenerationSettings``, ``settings_mr.MRGenerationSettings``) are built in
the configs from the user-facing ids. They check every id, every request and every file that can be checked
without loading a weight, and everything that loads weights takes the settings (or what they normalised) as
input, so no weight can load before the checks have passed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decode import BUDGET_ID
from .decode import check_decode_settings as check_decoder_knobs
from .label_io import LABEL_FILE_EXTENSIONS
from .report import jsonable
from .checks import check_bool, check_files_exist, check_int_at_least
from .value_checks import is_real

logger = logging.getLogger(__name__)

__all__ = [
    "DecodeSettings",
    "GenerationSettings",
    "RequiredFiles",
    "SampleTask",
    "check_bool",
    "check_decode_settings",
    "mask_dir_rows",
    "read_request_manifest",
    "sample_seed",
]

ATTEMPT_SEED_STRIDE = 100_003  # seed of attempt a of a sample: its seed + a * ATTEMPT_SEED_STRIDE
DEFAULT_REQUEST_ID = "sample"  # file-name prefix of the single request a run without a manifest makes
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_LIST_FIELDS = frozenset({"output_size", "spacing", "body_region", "anatomy_list", "controllable_anatomy_size"})


def sample_seed(seed: int, attempt: int = 0) -> int:
    """The seed of quality-check ``attempt`` of a sample whose first seed is ``seed``."""
    return seed + attempt * ATTEMPT_SEED_STRIDE


# ---------------------------------------------------------------------------------------------------------
# Decode knobs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """
    The decoder's memory knobs, normalised.

    Attributes
    ----------
    roi_size
        ``autoencoder_sliding_window_infer_size``: sliding-window roi in latent voxels, ``None`` = planned.
    overlap
        ``autoencoder_sliding_window_infer_overlap`` in [0, 1).
    num_splits
        ``autoencoder_tp_num_splits``: an explicit split count is honoured; ``None`` = planned (the planner
        chooses; the network config's ``num_splits`` only applies to embeddings and training).
    memory_budget_gb
        ``memory_budget_gb``: the decode budget in GB, ``None`` = the device's free memory.
    """

    roi_size: tuple[int, int, int] | None
    overlap: float
    num_splits: int | None
    memory_budget_gb: float | None


def check_decode_settings(roi_size: Any, overlap: Any, num_splits: Any, memory_budget_gb: Any) -> DecodeSettings:
    """
    Check the decoder's memory knobs; every error names the config id, the value and what is allowed.

    Returns
    -------
    DecodeSettings
        the normalised knobs.
    """
    roi, overlap, num_splits = check_decoder_knobs(roi_size, overlap, num_splits)  # the decoder's own check
    if memory_budget_gb is not None and (not is_real(memory_budget_gb) or memory_budget_gb <= 0):
        raise ValueError(f"{BUDGET_ID}={memory_budget_gb!r} is not allowed; it must be a number of GB > 0 or null.")
    return DecodeSettings(
        roi_size=roi,
        overlap=overlap,
        num_splits=num_splits,
        memory_budget_gb=None if memory_budget_gb is None else float(memory_budget_gb),
    )


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


class RequiredFiles:
    """
    The files a run reads (config id -> path), checked before anything loads.

    Parameters
    ----------
    files
        config id -> path of every file the run needs (weights, databases, masks).
    bundle_root
        the bundle folder, for the download command in messages.
    """

    def __init__(self, files: Mapping[str, str | os.PathLike], bundle_root: str | os.PathLike) -> None:
        self.files = {str(key): Path(path) for key, path in files.items()}
        self.bundle_root = Path(bundle_root)

    def __getitem__(self, config_id: str) -> Path:
        return self.files[config_id]

    def __contains__(self, config_id: object) -> bool:
        return config_id in self.files

    def missing(self) -> dict[str, Path]:
        """The needed files that do not exist (config id -> path)."""
        return {key: path for key, path in self.files.items() if not path.exists()}

    def require(self) -> None:
        """
        Refuse a run whose files are missing.

        Raises
        ------
        FileNotFoundError
            listing every missing file with its config id and the command that downloads the published ones.
        """
        check_files_exist(self.files, self.bundle_root, download_command="python -m scripts.download <the ids of this run>")

    def describe(self) -> list[dict[str, Any]]:
        """One entry per file: ``{"id", "path", "present", "size_bytes"}`` (for the dry run)."""
        entries = []
        for key, path in self.files.items():
            present = path.exists()
            size = _size_of(path) if present else None
            entries.append({"id": key, "path": str(path), "present": present, "size_bytes": size})
        return entries


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------------
# Requests and sample tasks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleTask:
    """
    One sample to generate: sample ``index`` of request ``request_id``, with its first ``seed``.

    Sample ``k`` of a request always has the same seed, whatever the number of processes, so every process
    layout writes the same files.
    """

    request_id: str
    request_index: int
    index: int
    seed: int

    @property
    def stem(self) -> str:
        """The file-name stem of the sample, e.g. ``sample_0000_seed42``."""
        return f"{self.request_id}_{self.index:04d}_seed{self.seed}"


def check_request_id(value: Any, where: str) -> str:
    """A request id usable in file names (letters, digits, ``-``, ``_``, ``.``)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value):
        raise ValueError(f"{where}: id={value!r} is not allowed; it must be a non-empty name.")
    text = str(value)
    if not set(text) <= _REQUEST_ID_CHARS or text.startswith("."):
        raise ValueError(f"{where}: id={text!r} is not allowed; use letters, digits, '-', '_' and '.' only.")
    return text


def _parse_csv_cell(name: str, text: str) -> Any:
    """A CSV cell: JSON for lists and numbers (``[256, 256, 128]``, ``2``), ``;``-separated names for name lists."""
    text = text.strip()
    if text == "":
        return None
    if text[0] in "[{" or text.lower() in ("true", "false", "null"):
        return json.loads(text)
    if name in _LIST_FIELDS:
        items = [item.strip() for item in text.split(";") if item.strip()]
        return [json.loads(item) if item.lstrip("-").replace(".", "", 1).isdigit() else item for item in items]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_request_manifest(path: str | os.PathLike, allowed_fields: Iterable[str]) -> list[dict[str, Any]]:
    """
    Read a request manifest (config id ``request_manifest``): a JSON list of objects, or a CSV file with a header.

    In a CSV file, list cells are JSON (``"[256, 256, 128]"``) or ``;``-separated names (``liver;spleen``);
    empty cells mean "use the run's default".

    Parameters
    ----------
    path
        the manifest file (``.json`` or ``.csv``).
    allowed_fields
        the fields a row may have; any other is refused, naming the row and the field.

    Returns
    -------
    list[dict[str, Any]]
        one dict per row (``None`` values dropped), in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"request_manifest={str(path)!r} does not exist or is not a file.")
    allowed = set(allowed_fields)
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [{k.strip(): _parse_csv_cell(k.strip(), v or "") for k, v in row.items() if k} for row in csv.DictReader(handle)]
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise ValueError(f"request_manifest={str(path)!r} is not a readable JSON or CSV file ({error}).") from error
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"request_manifest={str(path)!r} must hold a non-empty list of requests.")
    checked = []
    for number, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"request_manifest row {number}: must be an object with request fields, got {row!r}.")
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise ValueError(
                f"request_manifest row {number}: unknown field(s) {unknown}; allowed fields: {sorted(allowed)}."
            )
        checked.append({key: value for key, value in row.items() if value is not None})
    return checked


def mask_dir_rows(mask_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """
    One request row per label file of ``mask_dir`` (config id ``mask_dir``), sorted by name, id = file stem.

    Raises
    ------
    ValueError
        the folder does not exist or holds no label file.
    """
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise ValueError(f"mask_dir={str(folder)!r} does not exist or is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(LABEL_FILE_EXTENSIONS))
    if not files:
        raise ValueError(f"mask_dir={str(folder)!r} holds no label file ({', '.join(LABEL_FILE_EXTENSIONS)}).")
    rows = []
    for path in files:
        stem = path.name[: -len(next(e for e in LABEL_FILE_EXTENSIONS if path.name.lower().endswith(e)))]
        rows.append({"id": "".join(c if c in _REQUEST_ID_CHARS else "_" for c in stem), "mask_path": str(path)})
    return rows


def first_seeds(random_seed: int, sample_counts: Sequence[int], explicit: Sequence[int | None]) -> list[int]:
    """
    The first seed of every request: its explicit ``seed``, else ``random_seed`` + the number of samples of the
    requests before it (so a run without a manifest gives sample ``k`` the seed ``random_seed + k``).
    """
    seeds, offset = [], 0
    for count, seed in zip(sample_counts, explicit):
        seeds.append(random_seed + offset if seed is None else int(seed))
        offset += count
    return seeds


# ---------------------------------------------------------------------------------------------------------
# The settings base class
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestBase:
    """
    What every generation request has. Bundle requests add their own fields.

    Attributes
    ----------
    request_id
        the file-name prefix of its samples.
    output_size
        (x, y, z) voxels.
    spacing
        (x, y, z) mm.
    num_samples
        how many samples to generate.
    seed
        the seed of sample 0 (sample ``k`` uses ``seed + k``).
    """

    request_id: str
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_samples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """The request as plain data (for the report and the fingerprint)."""
        return jsonable({f: getattr(self, f) for f in self.__dataclass_fields__})


class GenerationSettings:
    """
    The normalised settings of a generation run; the bundle classes check the ids and set these attributes.

    Attributes
    ----------
    version
        the model version.
    requests
        the checked requests (:class:`RequestBase` subclasses), in order.
    decode
        the decoder's memory knobs.
    files
        the files the run reads.
    output_dir
        where samples and the report go.
    overwrite
        replace the outputs of an earlier, different run in ``output_dir`` instead of refusing.
    image_output_ext
        image file extension.
    progress
        show progress bars.
    mask_check_strict
        refuse user masks without a body label instead of warning.
    mask_findings
        request id -> the findings of its user mask (for the report).
    """

    version: str
    requests: list[Any]
    decode: DecodeSettings
    files: RequiredFiles
    output_dir: Path
    overwrite: bool
    image_output_ext: str
    progress: bool
    mask_check_strict: bool
    mask_findings: dict[str, list[dict[str, Any]]]

    def _check_output_ids(self, output_dir: Any, overwrite: Any, progress: Any, mask_check_strict: Any, bundle_root: Any) -> None:
        """Check and set the ids of the output folder, progress, mask strictness and the bundle folder."""
        self.output_dir = Path(str(output_dir))
        self.overwrite = check_bool("overwrite", overwrite)
        self.progress = check_bool("progress", progress)
        self.mask_check_strict = check_bool("mask_check_strict", mask_check_strict)
        self.bundle_root = Path(str(bundle_root))
        self.mask_findings: dict[str, list[dict[str, Any]]] = {}

    def _build_requests(self, rows: list[tuple[dict[str, Any], str]], source: str, defaults: Mapping[str, Any], num_samples: int, seed: int) -> None:
        """
        The requests of ``rows`` (``request_rows``), with their sample counts and first seeds; ids must be unique.

        ``defaults`` are the top-level ids a row may leave out; :meth:`_request` builds one request.
        """
        counts = [row_int(row, "num_samples", num_samples, 1, where) for row, where in rows]
        seeds = first_seeds(seed, counts, [row_int(row, "seed", None, 0, where) for row, where in rows])
        self.request_source = source
        self.request_places = [where for _, where in rows]
        self.requests = [
            self._request(row, defaults, where, position, count, first)
            for position, ((row, where), count, first) in enumerate(zip(rows, counts, seeds))
        ]
        seen: set[str] = set()
        for request in self.requests:
            if request.request_id in seen:
                raise ValueError(f"{source}: request id {request.request_id!r} is used twice; ids name the output files.")
            seen.add(request.request_id)

    def _request(self, row: Mapping[str, Any], defaults: Mapping[str, Any], where: str, position: int, count: int, seed: int) -> Any:
        """One request from a row (bundle-specific)."""
        raise NotImplementedError

    def _open_output_dir(self, label_ext: str | None) -> None:
        """The output folder of the run (``self.store``), refused when it holds another run's samples."""
        from .sample_store import SampleStore  # the store imports SampleTask from this module

        self.store = SampleStore(self.output_dir, self.image_output_ext, label_ext, self.overwrite)
        self.store.check_output_dir({t.stem: self.fingerprint(self.requests[t.request_index]) for t in self.tasks()})

    def _record_mask_findings(self, request: Any, where: str, findings: list[Any]) -> None:
        """Log a user mask's findings (the refusals were raised) and keep them for the run report."""
        for finding in findings:
            logger.warning("%s%s", f"{where}: " if where else "", finding.message)
        self.mask_findings[request.request_id] = [f.to_dict() for f in findings]

    def tasks(self) -> list[SampleTask]:
        """Every sample of every request, in request order."""
        return [
            SampleTask(request.request_id, position, index, request.seed + index)
            for position, request in enumerate(self.requests)
            for index in range(request.num_samples)
        ]

    def uses_controlnet(self, request: RequestBase) -> bool:
        """Whether generating ``request`` runs the ControlNet (it does when the run reads its weights)."""
        return "trained_controlnet_path" in self.files.files

    def output_settings(self) -> dict[str, Any]:
        """The run-wide settings that change what a sample looks like (bundles extend it)."""
        return {"version": self.version, "image_output_ext": self.image_output_ext, "weights": self.weight_signature()}

    def weight_signature(self) -> dict[str, Any]:
        """Path and size of every needed weight file: a run with other weights is another run."""
        return {
            key: {"path": str(path), "size": path.stat().st_size if path.is_file() else None}
            for key, path in self.files.files.items()
            if key.startswith("trained_")
        }

    def fingerprint(self, request: Any) -> str:
        """A hash of everything that determines the samples of ``request`` (resume only reuses matching ones)."""
        content = {"run": self.output_settings(), "request": request.to_dict()}
        return hashlib.sha256(json.dumps(jsonable(content), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The normalised settings as plain data, for the run report and the dry run."""
        return jsonable(
            {
                **self.output_settings(),
                "requests": [request.to_dict() for request in self.requests],
                "decode": self.decode,
                "files": {key: str(path) for key, path in self.files.files.items()},
                "output_dir": self.output_dir,
                "overwrite": self.overwrite,
                "mask_check_strict": self.mask_check_strict,
                "mask_findings": self.mask_findings,
            }
        )


def check_run_ids(num_output_samples: Any, random_seed: Any) -> tuple[int, int]:
    """Check ``num_output_samples`` (>= 1) and ``random_seed`` (>= 0)."""
    return check_int_at_least("num_output_samples", num_output_samples, 1), check_int_at_least("random_seed", random_seed, 0)


def request_rows(
    request_manifest: Any, mask_dir: Any, mask_path: Any, fields: Iterable[str]
) -> tuple[list[tuple[dict[str, Any], str]], str]:
    """
    The request rows of a run with the place of each for messages, and the id they came from.

    One row per ``request_manifest`` row or ``mask_dir`` file; without either, one empty row (the top-level ids
    make the single request, and messages name the ids alone).
    """
    given = [name for name, value in (("request_manifest", request_manifest), ("mask_dir", mask_dir)) if value is not None]
    if len(given) > 1:
        raise ValueError("request_manifest and mask_dir are both set; set one of them (mask_dir is a shortcut for a manifest of masks).")
    if given and mask_path is not None:
        raise ValueError(f"mask_path={mask_path!r} is not allowed with {given[0]}; give the masks in the {given[0]}.")
    if request_manifest is not None:
        rows = read_request_manifest(request_manifest, fields)
        return [(row, f"request_manifest row {i}") for i, row in enumerate(rows)], "request_manifest"
    if mask_dir is not None:
        return [(row, f"mask_dir row {i}") for i, row in enumerate(mask_dir_rows(mask_dir))], "mask_dir"
    return [({}, "")], ""


def in_row(where: str, error: Exception) -> ValueError:
    """``error`` prefixed with its manifest row (``where``; empty for the top-level ids)."""
    return ValueError(f"{where}: {error}" if where else str(error))


def row_int(row: Mapping[str, Any], key: str, default: int | None, minimum: int, where: str) -> int | None:
    """A row's integer field ``key`` (>= ``minimum``), or ``default`` when the row does not set it."""
    if key not in row:
        return default
    try:
        return check_int_at_least(key, row[key], minimum)
    except ValueError as error:
        raise in_row(where, error) from error


def request_id_of(row: Mapping[str, Any], where: str, position: int) -> str:
    """A row's ``id``, else ``request<position>`` (manifest rows) or ``sample`` (the single request)."""
    return check_request_id(row.get("id", f"request{position:03d}" if where else DEFAULT_REQUEST_ID), where or "request")


def row_value(row: Mapping[str, Any], key: str, default: Any) -> Any:
    """A request row's ``key``, or the run-wide ``default`` when the row does not set it."""
    return row[key] if key in row else default

