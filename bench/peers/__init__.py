"""The peer-tool comparison (``python -m bench.compare_peers``), by job.

* ``jobs``: the peer tools (how each installs, its driver, its budget knob) and the default jobs;
* ``venvs``: each tool's virtual environment under ``.peers/`` (and the torchvision patch);
* ``runner``: runs a job's driver in its tool's venv and reads the JSON it writes;
* ``translate``: a driver's per-layer formats -> mixq candidates and a :class:`mixq.Plan`;
* ``measure``: charges and re-measures a peer result with mixq (cost, metric, mixq's own search);
* ``points``: mixq's own results in the other bench/results JSONs, and its best at a size;
* ``render``: the verdict, ``peers.md`` and the ``peers`` block of ``summary.md``;
* ``drivers/``: the driver scripts, run inside each tool's venv (mixq's source on ``PYTHONPATH``).
"""
