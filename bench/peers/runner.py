"""Run a job's driver in its tool's venv (a subprocess) and read the JSON it writes."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import time
from typing import Any

from bench.common import ROOT
from bench.peers.jobs import PEERS, Job
from bench.peers.venvs import VENVS, tool_venv

DRIVERS = "bench.peers.drivers"  # the drivers' package, run as modules from ROOT

log = logging.getLogger("peers")


def driver_env() -> dict[str, str]:
    """Environment of a driver: one thread, offline, every cache inside .peers/.

    ``PYTHONPATH`` holds mixq's source tree and the repository root: the tool's venv has neither
    installed, and the driver runs as the module ``bench.peers.drivers.<tool>_driver``.
    """
    home = VENVS / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "MKL_NUM_THREADS": "1",
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "MPLCONFIGDIR": str(home / "mpl"),
            "TORCH_EXTENSIONS_DIR": str(home / "torch_extensions"),
            "AR_AUTO_SCHEME_CACHE": str(home / "ar"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
    )
    return env


def run_driver(job: Job, val: int, timeout: float) -> dict[str, Any]:
    """Run a job's driver in its tool's venv and return its JSON."""
    venv = tool_venv(job.tool)
    out_dir = VENVS / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", job.key) + ".json")
    out.unlink(missing_ok=True)
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        f"{DRIVERS}.{PEERS[job.tool].driver}",
        "--task",
        job.task,
        "--budget",
        str(job.budget),
        "--out",
        str(out),
        "--val",
        str(val),
        "--settings",
        json.dumps(job.settings),
    ]
    log.info("%s", " ".join(cmd))
    work = VENVS / "work" / job.tool  # tools write files to their working folder (NNCF 2.19: graphs)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=work, env=driver_env(), capture_output=True, text=True, timeout=timeout
        )
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        tail = f"timed out after {timeout:.0f} s\n{(e.stderr or b'')[-2000:]!r}"
    wall = time.perf_counter() - t0
    if not out.exists():
        return {"ok": False, "error": "the driver wrote no result", "log_tail": tail, "wall_seconds": wall}
    res = json.loads(out.read_text())
    res["wall_seconds"] = wall
    if not res.get("ok"):
        res["log_tail"] = tail
    return res


def claim_job(job: Job) -> Any:
    """Hold a lock file for a job while it runs, so two sessions never run the same job; None if taken."""
    claims = VENVS / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    f = open(claims / (re.sub(r"[^A-Za-z0-9_.-]+", "_", job.key) + ".lock"), "w")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f
