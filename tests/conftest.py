import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle_helpers import BUNDLES_DIR, install_packaged_bundle  # noqa: E402  (needs the repository root on sys.path)


def pytest_configure(config: pytest.Config) -> None:
    """
    Under ``pytest -n N`` (pytest-xdist) give each of the N workers its share of the cores, here and in the runs it starts.

    Without this every worker and every bundle run it starts would use all cores, and on a 2-core machine the
    oversubscribed threads spin-wait.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """
    Run a test module's tiny networks on one thread, here and in the bundle runs it starts.

    Tiny networks gain nothing from threads, and on a busy 2-core machine two threads spin-wait (up to 10x
    slower). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the bundle runs in subprocesses
        yield
    torch.set_num_threads(previous)



@pytest.fixture(scope="session")
def installed_ct_bundle(tmp_path_factory):
    """maisi_ct_generative as a user gets it: its packaged zip, installed with ``monai.bundle download``."""
    installed = install_packaged_bundle(BUNDLES_DIR / "maisi_ct_generative", tmp_path_factory.mktemp("ct_zip"))
    assert not (installed / "models").exists() and not (installed / ".generated-files").exists()
    return installed
