"""Test-suite settings shared by every module."""

import importlib
import signal
import subprocess
import time

import pytest
import torch
from hypothesis import settings

# Property tests are derandomized so every run checks the same cases.
settings.register_profile("mixq", derandomize=True, database=None)
settings.load_profile("mixq")


@pytest.fixture(scope="session")
def load_bench():
    """Import the module ``bench.<name>`` (e.g. "deploy", "peers.drivers.aimet_driver") when a test
    needs it: some bench modules import optional packages (onnxruntime) at the top."""

    def load(name: str):
        return importlib.import_module(f"bench.{name}")

    return load


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run single-threaded: on a busy 2-core machine tiny multi-threaded ops stall for ~10 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sigkill_when():
    """Start a child process, SIGKILL it once ``ready()`` holds; return what it printed to stderr.

    The tests of resumable runs kill a child part way (after it stored a few jobs) and check
    that a rerun computes exactly what is missing.
    """

    def run(cmd: list[str], ready, what: str, timeout: float = 120.0) -> str:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, f"the child {what} in time"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        return proc.stderr.read().decode()

    return run
