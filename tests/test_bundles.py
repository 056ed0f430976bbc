"""Every bundle of the collection passes the CI verifier."""

from __future__ import annotations

import pytest

from bundle_helpers import BUNDLES_DIR
from ci.verify_bundle import verify_bundle

BUNDLE_NAMES = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs").is_dir())


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_bundle_verifies(name: str) -> None:
    verify_bundle(BUNDLES_DIR / name)
