"""The MAISI code's seams: what each bundle carries, which way imports point, and no file reads at import time."""

from __future__ import annotations

import ast
import builtins
import importlib
import pathlib
import sys

import pytest

from bundle_helpers import BUNDLES_DIR, REPO_ROOT, bundle_scripts

COMMON = REPO_ROOT / "common" / "maisi"
SETTINGS_LAYER = {"settings", "settings_ct", "settings_mr", "mask_sources", "generation", "generation_ct", "generation_mr", "dry_run", "download", "listing"}
DOMAIN = ("labels", "label_io", "constants", "sampler", "decode", "output_intensity", "writers", "preview", "report", "modality", "value_checks",
          "mask_database", "mask_augmentation", "mask_generation", "mask_channels", "quality", "intensity", "embeddings")  # fmt: skip


def _relative_imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_domain_modules_never_import_the_settings_layer():
    sources = {p.stem: p for folder in ("core", "ct", "mr") for p in (COMMON / folder).glob("*.py")}
    offenders = {name: sorted(_relative_imports(sources[name]) & SETTINGS_LAYER) for name in DOMAIN if name in sources}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_mr_bundle_carries_no_ct_only_module_or_data_file():
    mr = BUNDLES_DIR / "maisi_mr_generative"
    same_name = {p.name for p in (COMMON / "mr").glob("*.py")}  # e.g. listing.py: one command name in both bundles
    ct_only = {p.name for p in (COMMON / "ct").glob("*.py")} - same_name
    assert "mask_database.py" in ct_only and not ct_only & {p.name for p in (mr / "scripts").glob("*.py")}
    assert (mr / "scripts" / "listing.py").read_bytes() == (COMMON / "mr" / "listing.py").read_bytes()
    assert not (mr / "configs" / "label_dict_124_to_132.json").exists()
    assert not (mr / "configs" / "image_median_statistics_ct.json").exists()


@pytest.mark.parametrize("bundle", ["maisi_ct_generative", "maisi_mr_generative"])
def test_no_module_reads_a_file_at_import_time(bundle, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a file was read at import time: {args[:1]}")

    with bundle_scripts(BUNDLES_DIR / bundle) as package:
        names = sorted(p.stem for p in (BUNDLES_DIR / bundle / "scripts").glob("*.py") if p.stem != "__init__")
        importlib.import_module("monai.bundle")  # third-party imports may read their own files; load them first
        for name in names:
            for dependency in _third_party(BUNDLES_DIR / bundle / "scripts" / f"{name}.py"):
                importlib.import_module(dependency)
        with monkeypatch.context() as patch:
            patch.setattr(builtins, "open", refuse)
            patch.setattr(pathlib.Path, "read_text", refuse)
            patch.setattr(pathlib.Path, "read_bytes", refuse)
            for name in names:
                importlib.import_module(f"{package.__name__}.{name}")
        assert all(f"scripts.{name}" in sys.modules for name in names)


def _third_party(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules
