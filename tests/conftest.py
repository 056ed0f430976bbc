import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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

