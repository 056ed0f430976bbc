"""
Verify that a bundle of this collection is complete, well formed and that its networks run.

Usage::

    python ci/verify_bundle.py bundles/<name> [bundles/<other name> ...]

Every check runs and every problem is collected before a single :class:`BundleVerificationError`
is raised, so one CI run reports all of a bundle's defects at once. Nothing is downloaded: the
metadata schema is read from ``ci/schemas`` and the networks are built from their configs on the ``meta``
device (shapes without weights), or on the CPU where they cannot be.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import monai
import torch
import yaml
from jsonschema import Draft7Validator
from monai.bundle import ConfigParser, verify_metadata
from monai.bundle.reference_resolver import ReferenceResolver
from monai.utils import get_equivalent_dtype

__all__ = ["BundleVerificationError", "verify_bundle", "main"]

logger = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
METADATA_FILE = "configs/metadata.json"
LARGE_FILES_FILE = "large_files.yml"
REQUIRED_FILES = (
    "LICENSE",
    METADATA_FILE,
    "configs/logging.conf",
    "docs/README.md",
    LARGE_FILES_FILE,
    "scripts/__init__.py",
)
OVERLAY_PREFIX = "multi_gpu_"
DEF_SUFFIX = "_def"
DATA_FORMAT_SUFFIX = "_data_format"
BUNDLE_PACKAGE = "scripts"
HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


class BundleVerificationError(ValueError):
    """
    Raised by :func:`verify_bundle` when a bundle has at least one problem.

    Parameters
    ----------
    bundle_dir
        the bundle directory that was verified.
    problems
        one human readable line per problem, each starting with the bundle-relative file it concerns.
    """

    def __init__(self, bundle_dir: Path, problems: Sequence[str]) -> None:
        self.bundle_dir = bundle_dir
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"bundle {bundle_dir} failed verification with {len(self.problems)} problem(s):\n{lines}")


def verify_bundle(bundle_dir: Path) -> None:
    """
    Run every check on one bundle directory.

    Parameters
    ----------
    bundle_dir
        root of the bundle, e.g. ``bundles/brats_ldm2d``.

    Raises
    ------
    BundleVerificationError
        listing every problem found, if any.
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not bundle_dir.is_dir():
        raise BundleVerificationError(bundle_dir, [f"{bundle_dir} is not a directory"])
    problems = check_required_files(bundle_dir)
    stacks, config_problems = load_configs(bundle_dir)
    problems += config_problems
    metadata = _read_json(bundle_dir / METADATA_FILE) if METADATA_FILE in stacks else None
    if metadata is not None:
        problems += check_metadata(bundle_dir, metadata)
    problems += check_large_files(bundle_dir)
    problems += check_shared_definitions(bundle_dir, stacks)
    problems += check_networks(bundle_dir, stacks, metadata)
    if problems:
        # a network that fails to build is reported once even when several checks need it
        raise BundleVerificationError(bundle_dir, list(dict.fromkeys(problems)))
    logger.info("bundle %s verified", bundle_dir)


def check_required_files(bundle_dir: Path) -> list[str]:
    """
    Report the required bundle files that are missing.

    Parameters
    ----------
    bundle_dir
        root of the bundle.

    Returns
    -------
    list of str
        one problem per missing file.
    """
    return [f"{name}: required file is missing" for name in REQUIRED_FILES if not (bundle_dir / name).is_file()]


def load_configs(bundle_dir: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """
    Check that every ``configs/*.json`` is strict JSON and that MONAI's ``ConfigParser`` reads it.

    Strict means no duplicate keys and no ``NaN``/``Infinity`` constants, which Python's ``json``
    accepts but other JSON readers do not. A config whose ``"<id>#<key>"`` entries only merge into a
    base config (a ``multi_gpu_*`` overlay, or e.g. a diffusion config layered on an autoencoder
    config) is read on top of the first other config that makes it readable: for
    ``multi_gpu_<name>.json`` that is ``<name>.json`` if possible, else by file name.

    Parameters
    ----------
    bundle_dir
        root of the bundle.

    Returns
    -------
    tuple
        for each readable config (bundle-relative path ``configs/<name>.json``) the config files MONAI
        reads for it, its bases first and itself last; and the problems found.
    """
    readable: list[str] = []
    problems: list[str] = []
    for path in sorted((bundle_dir / "configs").glob("*.json")):
        relpath = path.relative_to(bundle_dir).as_posix()
        try:
            _read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{relpath}: not a valid JSON config: {exc}")
        else:
            readable.append(relpath)
    stacks, stack_problems = _stack_configs(bundle_dir, readable)
    return stacks, problems + stack_problems


def check_shared_definitions(bundle_dir: Path, stacks: Mapping[str, Sequence[str]]) -> list[str]:
    """
    Check that a network definition (``*_def``) written in several configs is the same in each.

    Standalone configs (training and inference) each carry the published architecture, so that a
    checkpoint written by one loads in the other; this keeps those copies identical.

    Parameters
    ----------
    bundle_dir
        root of the bundle.
    stacks
        the readable configs, as returned by :func:`load_configs`.

    Returns
    -------
    list of str
        one problem per definition whose copies differ.
    """
    first_seen: dict[str, tuple[str, Any]] = {}
    problems = []
    for relpath in sorted(stacks):
        if not _is_runnable_config(relpath):
            continue
        content = _read_json(bundle_dir / relpath)
        for net_id in _definition_ids(content):
            if net_id not in first_seen:
                first_seen[net_id] = (relpath, content[net_id])
            elif content[net_id] != first_seen[net_id][1]:
                problems.append(f"{relpath}: '{net_id}' differs from its copy in {first_seen[net_id][0]}")
    return problems


def check_metadata(bundle_dir: Path, metadata: Mapping[str, Any]) -> list[str]:
    """
    Validate ``configs/metadata.json`` against its local schema and check its version history.

    The schema is the file of ``ci/schemas`` named like the last part of the metadata's ``schema``
    URL. It is never downloaded: a missing local copy is reported as a problem.

    Parameters
    ----------
    bundle_dir
        root of the bundle.
    metadata
        the parsed content of ``configs/metadata.json``.

    Returns
    -------
    list of str
        the problems found.
    """
    url = metadata.get("schema")
    if not isinstance(url, str) or not url:
        return [f"{METADATA_FILE}: 'schema' must be the URL of the metadata schema"]
    schema_file = SCHEMA_DIR / PurePosixPath(urlparse(url).path).name
    if not schema_file.is_file():
        return [
            f"{METADATA_FILE}: schema {url!r} has no local copy {schema_file} "
            "(schemas are never downloaded; add the file to ci/schemas or fix the URL)"
        ]
    if "optional_packages_version" in metadata:
        logger.warning(
            "%s: MONAI %s replaces 'required_packages_version' with the deprecated 'optional_packages_version' "
            "when it reads the metadata; list every package in 'required_packages_version' instead",
            METADATA_FILE,
            monai.__version__,
        )
    return _schema_problems(bundle_dir / METADATA_FILE, schema_file, metadata) + _version_problems(metadata)


def check_large_files(bundle_dir: Path) -> list[str]:
    """
    Check that ``large_files.yml`` lists downloadable files in the format of ``download_large_files``.

    Parameters
    ----------
    bundle_dir
        root of the bundle.

    Returns
    -------
    list of str
        the problems found; none when the file is absent (reported by :func:`check_required_files`).
    """
    path = bundle_dir / LARGE_FILES_FILE
    if not path.is_file():
        return []
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return [f"{LARGE_FILES_FILE}: not valid YAML: {exc}"]
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        return [f"{LARGE_FILES_FILE}: must hold a top-level 'large_files' list"]
    problems = []
    seen_paths = set()
    for index, entry in enumerate(entries):
        problems += [f"{LARGE_FILES_FILE}: entry {index}: {problem}" for problem in _large_file_problems(entry)]
        path_value = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path_value, str) and path_value in seen_paths:
            problems.append(f"{LARGE_FILES_FILE}: entry {index}: duplicate path {path_value!r}")
        seen_paths.add(path_value)
    return problems


def check_networks(
    bundle_dir: Path, stacks: Mapping[str, Sequence[str]], metadata: Mapping[str, Any] | None
) -> list[str]:
    """
    Instantiate every network definition and run the forward passes that the metadata declares.

    Every top-level ``<name>_def`` with a ``_target_`` of every config (except metadata and
    ``multi_gpu_*`` overlays) is built once, and every ``<prefix>_data_format`` of the metadata is
    checked against ``<prefix>_def``.

    Parameters
    ----------
    bundle_dir
        root of the bundle, temporarily put on ``sys.path`` so configs can refer to ``scripts.*``.
    stacks
        the config files to read for each readable config, as returned by :func:`load_configs`.
    metadata
        the parsed metadata, or ``None`` when it is not readable.

    Returns
    -------
    list of str
        the problems found.
    """
    meta_file = bundle_dir / METADATA_FILE if metadata is not None else None
    problems = []
    with _importable_bundle(bundle_dir):
        parsers = {}
        for relpath, files in stacks.items():
            if not _is_runnable_config(relpath):
                continue
            try:
                parsers[relpath] = _bundle_parser(bundle_dir, files, meta_file)
            except Exception as exc:  # MONAI raises many types for unresolvable macros and ids
                problems.append(f"{relpath}: ConfigParser cannot parse it: {_root_cause(exc)}")
        builder = _NetworkBuilder()
        for relpath, parser in parsers.items():
            for net_id in _definition_ids(parser.get()):
                try:
                    builder.build(parser, net_id, relpath)
                except Exception as exc:  # any error of user code is a problem to report
                    problems.append(_build_problem(relpath, net_id, exc))
        for key, data_format in (metadata or {}).items():
            if key.endswith(DATA_FORMAT_SUFFIX):
                problems += _data_format_problems(builder, parsers, key, data_format)
    return problems


class _NetworkBuilder:
    """
    Build config items of one bundle, each distinct definition only once.

    Two definitions are the same when they have the same id and the same config content,
    including the content of every item they refer to. Items are built on the ``meta`` device, which
    allocates no weights (the full-size MAISI networks hold about 700 M parameters) and still runs every
    constructor and shape check; an item that cannot be built there is built on the CPU, whose error is
    the one reported.
    """

    def __init__(self) -> None:
        self._built: dict[tuple[str, str], Any] = {}
        self._failed: dict[tuple[str, str], Exception] = {}

    def build(self, parser: ConfigParser, net_id: str, relpath: str, device: str = "meta") -> Any:
        """
        Return the instance of ``net_id`` as defined by ``parser``, read from the config ``relpath``.

        ``device`` is where the item's tensors are created: ``"meta"`` (falling back to the CPU) or ``"cpu"``.

        Raises
        ------
        Exception
            whatever building the item on the CPU raised, again for each later request of the same definition.
        """
        key = (_fingerprint(parser, net_id), device)
        if key in self._failed:
            raise self._failed[key]
        if key not in self._built:
            logger.info("instantiating '%s' of %s on %s", net_id, relpath, device)
            try:
                with torch.device(device):  # not lazy: the parser's cached instance may live on the other device
                    self._built[key] = parser.get_parsed_content(net_id, lazy=False)
            except Exception as exc:
                if device == "cpu":
                    self._failed[key] = exc
                    raise
                self._built[key] = self.build(parser, net_id, relpath, device="cpu")
        return self._built[key]


def _read_json(path: Path) -> Any:
    """Strict JSON content of a file whose top level is an object."""
    content = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    if not isinstance(content, dict):
        raise ValueError(f"top level must be a JSON object, got {type(content).__name__}")
    return content


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that rejects duplicate keys."""
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    """``parse_constant`` for ``json.loads`` that rejects ``NaN``, ``Infinity`` and ``-Infinity``."""
    raise ValueError(f"{name} is not valid JSON")


def _read_error(bundle_dir: Path, files: Sequence[str]) -> str | None:
    """Why ``ConfigParser.read_config`` fails on ``files`` read in order, ``None`` if it does not."""
    try:
        ConfigParser().read_config(f=[str(bundle_dir / relpath) for relpath in files])
    except Exception as exc:  # MONAI raises KeyError, ValueError, ... for unreadable content
        return _root_cause(exc)
    return None


def _stack_configs(bundle_dir: Path, relpaths: Sequence[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Find the files to read for each config: itself alone, or on top of another (possibly layered) config."""
    stacks: dict[str, tuple[str, ...]] = {}
    errors: dict[str, str] = {}
    for relpath in relpaths:
        error = _read_error(bundle_dir, [relpath])
        if error is None:
            stacks[relpath] = (relpath,)
        else:
            errors[relpath] = error
    layered = True
    while errors and layered:
        layered = False
        for relpath in list(errors):
            bases = sorted(filter(_is_runnable_config, stacks), key=lambda base: _base_order(relpath, base))
            base = next((base for base in bases if _read_error(bundle_dir, [*stacks[base], relpath]) is None), None)
            if base is not None:
                stacks[relpath] = (*stacks[base], relpath)
                del errors[relpath]
                layered = True
                logger.info("%s is read on top of %s", relpath, ", ".join(stacks[base]))
    problems = [
        f"{relpath}: ConfigParser cannot read it, alone or on top of another config: {error}"
        for relpath, error in errors.items()
    ]
    return dict(sorted(stacks.items())), problems


def _base_order(relpath: str, base: str) -> tuple[bool, str]:
    """Sort key of candidate bases: ``<name>.json`` first for ``multi_gpu_<name>.json``, then by name."""
    name = PurePosixPath(relpath).name
    return PurePosixPath(base).name != name.removeprefix(OVERLAY_PREFIX), base


def _bundle_parser(bundle_dir: Path, files: Sequence[str], meta_file: Path | None) -> ConfigParser:
    """A parsed ``ConfigParser`` of ``files`` with ``bundle_root`` set to ``bundle_dir``."""
    parser = ConfigParser()
    parser.read_config(f=[str(bundle_dir / relpath) for relpath in files])
    if meta_file is not None:
        parser.read_meta(f=str(meta_file))
    parser["bundle_root"] = str(bundle_dir)
    parser.parse()
    return parser


def _schema_problems(meta_file: Path, schema_file: Path, metadata: Mapping[str, Any]) -> list[str]:
    """Validate with MONAI's ``verify_metadata``; on failure list every schema violation, not only the first."""
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema_file))
    except ValueError as exc:
        schema = json.loads(schema_file.read_text(encoding="utf-8"))
        errors = sorted(Draft7Validator(schema).iter_errors(metadata), key=lambda error: error.json_path)
        return [f"{METADATA_FILE}: {error.json_path}: {error.message}" for error in errors] or [
            f"{METADATA_FILE}: {exc}"
        ]
    return []


def _version_key(version: str) -> tuple[int, int, int, int] | None:
    """Orderable key of a semantic version (a pre-release sorts before its release), ``None`` if not one."""
    match = SEMVER.fullmatch(version)
    if match is None:
        return None
    major, minor, patch, prerelease = match.group(1, 2, 3, 4)
    return int(major), int(minor), int(patch), 0 if prerelease else 1


def _version_problems(metadata: Mapping[str, Any]) -> list[str]:
    """Check that ``version`` is a key of ``changelog`` and the newest one; the schema checks the formats."""
    version = metadata.get("version")
    changelog = metadata.get("changelog")
    if not isinstance(version, str) or not isinstance(changelog, dict):
        return []
    problems = []
    if version not in changelog:
        problems.append(f"{METADATA_FILE}: version {version!r} is not a key of 'changelog'")
    current = _version_key(version)
    newest = max((key for key in changelog if _version_key(key) is not None), key=_version_key, default=None)
    if current is not None and newest is not None and _version_key(newest) > current:
        problems.append(f"{METADATA_FILE}: version {version!r} is not the newest in 'changelog' ({newest!r} is newer)")
    return problems


def _large_file_problems(entry: Any) -> list[str]:
    """Problems of one ``large_files`` entry."""
    if not isinstance(entry, dict):
        return ["must be a mapping with path, url and, where one is published, hash_val and hash_type"]
    problems = []
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        problems.append("'path' is missing")
    elif path.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", path):
        problems.append(f"'path' {path!r} must be relative to the bundle root, without '..'")
    url = entry.get("url")
    if not isinstance(url, str) or not url:
        problems.append("'url' is missing")
    elif urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        problems.append(f"'url' {url!r} must be an http(s) URL")
    if "hash_val" not in entry and "hash_type" not in entry:
        return problems  # no checksum is published for this file
    hash_type = entry.get("hash_type")
    if hash_type not in HASH_LENGTHS:
        problems.append(f"'hash_type' {hash_type!r} must be one of {sorted(HASH_LENGTHS)}")
    hash_val = entry.get("hash_val")
    if not isinstance(hash_val, str):
        problems.append(f"'hash_val' must be a (quoted) hex string, got {hash_val!r}")
    elif not re.fullmatch(r"[0-9a-fA-F]+", hash_val):
        problems.append(f"'hash_val' {hash_val!r} is not a hex string")
    elif hash_type in HASH_LENGTHS and len(hash_val) != HASH_LENGTHS[hash_type]:
        problems.append(
            f"'hash_val' has {len(hash_val)} hex digits, a {hash_type} hash has {HASH_LENGTHS[hash_type]}"
        )
    return problems


def _is_runnable_config(relpath: str) -> bool:
    """Whether a config's networks are built and it may be a base: not the metadata, not a ``multi_gpu_*`` overlay."""
    return relpath != METADATA_FILE and not PurePosixPath(relpath).name.startswith(OVERLAY_PREFIX)


def _definition_ids(content: Mapping[str, Any]) -> list[str]:
    """Top-level ids named ``*_def`` whose value is an instantiable component."""
    return [
        key
        for key, value in content.items()
        if key.endswith(DEF_SUFFIX) and isinstance(value, dict) and "_target_" in value
    ]


@contextlib.contextmanager
def _importable_bundle(bundle_dir: Path) -> Iterator[None]:
    """Make ``scripts`` import from ``bundle_dir``, and forget it afterwards so bundles do not collide."""
    _forget_bundle_package()
    sys.path.insert(0, str(bundle_dir))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(bundle_dir))
        _forget_bundle_package()


def _forget_bundle_package() -> None:
    """Remove the ``scripts`` package and its submodules from ``sys.modules``."""
    for name in [name for name in sys.modules if name == BUNDLE_PACKAGE or name.startswith(f"{BUNDLE_PACKAGE}.")]:
        del sys.modules[name]


def _fingerprint(parser: ConfigParser, net_id: str) -> str:
    """Serialized content of ``net_id`` and, transitively, of every item it refers to."""
    pending = [net_id]
    closure: dict[str, Any] = {}
    while pending:
        item_id = pending.pop()
        if item_id not in closure:
            closure[item_id] = parser.get(item_id)
            pending += ReferenceResolver.find_refs_in_config(closure[item_id], item_id)
    return json.dumps(closure, sort_keys=True, default=repr)


def _root_cause(exc: BaseException) -> str:
    """The innermost chained exception, as ``Type: message``."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _build_problem(relpath: str, net_id: str, exc: Exception) -> str:
    """Problem line for a config item that fails to build."""
    return f"{relpath}: '{net_id}' failed to instantiate: {_root_cause(exc)}"


def _data_format_problems(
    builder: _NetworkBuilder, parsers: Mapping[str, ConfigParser], key: str, data_format: Any
) -> list[str]:
    """Run ``<prefix>_def`` on dummy inputs built from ``<prefix>_data_format`` and compare its outputs."""
    net_id = key[: -len(DATA_FORMAT_SUFFIX)] + DEF_SUFFIX
    defining = sorted((relpath for relpath, parser in parsers.items() if net_id in parser.get()), key=_config_priority)
    if not defining:
        return [f"{METADATA_FILE}: '{key}' describes '{net_id}', which no config defines (overlays are not searched)"]
    try:
        inputs = dict(data_format["inputs"])
        outputs = dict(data_format["outputs"])
        tensors = [_dummy_input(name, spec) for name, spec in inputs.items()]
        expected = [(name, _tensor_shape(spec), _dtype(spec)) for name, spec in outputs.items()]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{METADATA_FILE}: '{key}' cannot be checked: {type(exc).__name__}: {exc}"]
    relpath = defining[0]
    try:
        net = builder.build(parsers[relpath], net_id, relpath)
    except Exception as exc:  # any error of user code is a problem to report
        return [_build_problem(relpath, net_id, exc)]
    if not isinstance(net, torch.nn.Module):
        return [f"{relpath}: '{net_id}' is a {type(net).__name__}, not a torch.nn.Module"]
    try:
        produced = _forward_on_meta_or_cpu(builder, parsers[relpath], net_id, relpath, tensors, list(inputs))
    except Exception as exc:  # any error of user code is a problem to report
        return [f"{relpath}: '{net_id}' forward pass on the inputs of '{key}' failed: {_root_cause(exc)}"]
    return _output_problems(f"{relpath}: '{net_id}' vs {METADATA_FILE} '{key}'", produced, expected)


def _config_priority(relpath: str) -> tuple[bool, str]:
    """Sort key preferring ``inference.json`` (as MONAI's ``verify_net_in_out`` does), then by name."""
    return PurePosixPath(relpath).name != "inference.json", relpath


def _tensor_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """``[1, num_channels, *spatial_shape]``, without the channel dimension when ``num_channels`` is 0."""
    channels = spec["num_channels"]
    spatial = list(spec["spatial_shape"])
    if not all(isinstance(size, int) and size > 0 for size in [*spatial, channels or 1]):
        raise ValueError(f"num_channels {channels!r} and spatial_shape {spatial!r} must be positive integers")
    return (1, *([channels] if channels else []), *spatial)


def _dtype(spec: Mapping[str, Any]) -> torch.dtype:
    """The torch dtype named by a tensor's ``dtype``."""
    return get_equivalent_dtype(spec["dtype"], torch.Tensor)


def _dummy_input(name: str, spec: Mapping[str, Any]) -> torch.Tensor:
    """
    A reproducible tensor of the declared shape and dtype, inside ``value_range`` when it has two numbers.

    Integer tensors (e.g. timesteps) are filled with the lower bound of the range, or 0.
    """
    shape = _tensor_shape(spec)
    dtype = _dtype(spec)
    bounds = [value for value in spec.get("value_range", []) if isinstance(value, (int, float))]
    low, high = (bounds[0], bounds[1]) if len(bounds) == 2 else (0, 1)
    if dtype.is_floating_point:
        generator = torch.Generator().manual_seed(sum(map(ord, name)))
        return (low + (high - low) * torch.rand(shape, generator=generator)).to(dtype)
    return torch.full(shape, int(low), dtype=dtype)


def _forward_on_meta_or_cpu(
    builder: _NetworkBuilder,
    parser: ConfigParser,
    net_id: str,
    relpath: str,
    tensors: Sequence[torch.Tensor],
    names: Sequence[str],
) -> list[Any]:
    """
    The outputs of ``net_id`` on ``tensors``: on the meta device where the network runs there, else on the CPU.

    A forward that reads values (``.item()``, a data-dependent branch) cannot run on meta tensors; it, and a
    broken forward, run again on the CPU, so that a reported failure is the real one.
    """
    net = builder.build(parser, net_id, relpath)
    if _parameter_device(net).type == "meta":
        try:
            return _forward(net, tensors, names)
        except Exception:  # run again on the CPU below, which raises the real error if there is one
            net = builder.build(parser, net_id, relpath, device="cpu")
    return _forward(net, tensors, names)


def _parameter_device(net: torch.nn.Module) -> torch.device:
    """The device of the first parameter of ``net`` (the CPU for a network without parameters)."""
    return next((parameter.device for parameter in net.parameters()), torch.device("cpu"))


def _forward(net: torch.nn.Module, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> list[Any]:
    """
    Evaluate ``net`` on the device of its parameters: first tensor positional, the others by name; outputs as a list.

    On the ``meta`` device only shapes and dtypes are computed, which is all the declared outputs are compared on.
    """
    device = _parameter_device(net)
    net.eval()
    with torch.no_grad():
        moved = [tensor.to(device) for tensor in tensors]
        output = net(moved[0], **dict(zip(names[1:], moved[1:])))
    return list(output) if isinstance(output, (tuple, list)) else [output]


def _dtype_family(dtype: torch.dtype) -> str:
    """``float``, ``complex``, ``bool`` or ``int``."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def _output_problems(
    label: str, produced: Sequence[Any], expected: Sequence[tuple[str, tuple[int, ...], torch.dtype]]
) -> list[str]:
    """Compare produced outputs, in order, with the declared ``(name, shape, dtype)`` outputs."""
    if len(produced) < len(expected):
        return [f"{label}: the network returns {len(produced)} output(s), {len(expected)} are declared"]
    problems = []
    for output, (name, shape, dtype) in zip(produced, expected):
        if not isinstance(output, torch.Tensor):
            problems.append(f"{label}: output '{name}' is a {type(output).__name__}, not a tensor")
            continue
        if tuple(output.shape) != shape:
            problems.append(f"{label}: output '{name}' has shape {list(output.shape)}, declared {list(shape)}")
        if _dtype_family(output.dtype) != _dtype_family(dtype):
            problems.append(f"{label}: output '{name}' has dtype {output.dtype}, declared {dtype}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """
    Command line entry: verify each bundle directory given.

    Parameters
    ----------
    argv
        the arguments, ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    int
        0 when every bundle passes, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("bundle_dirs", nargs="+", type=Path, help="bundle directories, e.g. bundles/<name>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = []
    for bundle_dir in args.bundle_dirs:
        try:
            verify_bundle(bundle_dir)
        except BundleVerificationError as exc:
            logger.error("%s", exc)
            failed.append(bundle_dir)
    if failed:
        logger.error("%d of %d bundle(s) failed verification", len(failed), len(args.bundle_dirs))
        return 1
    logger.info("all %d bundle(s) verified", len(args.bundle_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
