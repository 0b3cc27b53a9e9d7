"""Time `make demo` (``python -m mixq demo``) on this machine, quiet or under a made load.

Writes bench/results/demo.json: per condition ("quiet", "loaded") the command, its wall-clock
seconds, the load average before and after, the cores, the made load (busy processes) and the
provenance; a run of one condition keeps the other's entry. The demo's duration is measured
here, never asserted in a test.

    python -m bench.demo                    # as the machine is (label "quiet")
    python -m bench.demo --load 2           # two busy processes beside it (label "loaded")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, provenance

BUSY = "while True: pass"


def measure(load: int, out: Path) -> dict[str, Any]:
    """Run the demo once with ``load`` busy processes beside it; return its record."""
    cmd = [sys.executable, "-m", "mixq", "demo", "--out", str(out)]
    before = os.getloadavg()  # other work on the machine, before the load made here
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the demo failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cores = os.cpu_count() or 1
    note = (
        f"other work kept the machine busy (load average {before[0]:.1f} on {cores} cores before the "
        "run): an upper bound for this condition"
        if before[0] > 0.5 * cores
        else "the machine was idle before the run (apart from the load made here)"
    )
    return {
        "note": note,
        "command": "make demo (" + " ".join(["python", *cmd[1:4]]) + " --out DIR)",
        "seconds": round(seconds, 1),
        "busy_processes": load,
        "loadavg_before": [round(x, 2) for x in before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cores": cores,
        "last_lines": done.stdout.strip().splitlines()[-4:],
        "provenance": provenance(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load", type=int, default=0, help="busy processes to run beside the demo (0)")
    ap.add_argument("--label", help="the condition's name (default: quiet without --load, else loaded)")
    args = ap.parse_args(argv)
    label = args.label or ("loaded" if args.load else "quiet")
    with tempfile.TemporaryDirectory() as tmp:
        record = measure(args.load, Path(tmp) / "demo")
    path = RESULTS / "demo.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    doc["runs"][label] = record
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{label}: {record['seconds']} s (load average before {record['loadavg_before'][0]}); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
