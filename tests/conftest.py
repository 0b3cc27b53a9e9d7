"""Test-suite settings shared by every module."""

import pytest
import torch
from hypothesis import settings

# Property tests are derandomized so every run checks the same cases.
settings.register_profile("mixq", derandomize=True, database=None)
settings.load_profile("mixq")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run single-threaded: on a busy 2-core machine tiny multi-threaded ops stall for ~10 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
