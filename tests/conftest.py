"""Shared test set-up: the repository root on sys.path, and the CPU allocator setting that the CLIs use."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_utils import misc  # noqa: E402

misc.keep_freed_cpu_memory()  # as every CLI does: large tensors without page faults (Inception, training tests)

@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors gain nothing from two, and other test processes may run beside
    it on a 2-core machine, where oversubscribed OpenMP threads make small convolutions several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
