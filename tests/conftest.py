"""Shared test set-up: the repository root on sys.path, and the CPU allocator setting that the CLIs use."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from torch_utils import misc  # noqa: E402

misc.keep_freed_cpu_memory()  # as every CLI does: large tensors without page faults (Inception, training tests)
