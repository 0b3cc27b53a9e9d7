"""Run lists of independent jobs through one small interface, resuming from a result store.

A :class:`Job` names a plain module-level function and simple, picklable arguments; the
executor calls ``job.fn(context, *job.args)`` with one shared context object (the wrapped
model, the task, the batches). Because jobs carry no closures, a distributed executor (Ray,
an optional extra) can ship the same functions unchanged; :class:`InProcessExecutor` runs them
one after the other in this process.

With a store, keys already stored are not recomputed, and each result is written the moment
its job finishes, so a run killed part way loses at most the job it was computing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from mixq.jobs import Executor, Job, JobStore, split_stored
from mixq.progress import progress as _progress

__all__ = ["EXECUTORS", "Executor", "InProcessExecutor", "Job", "JobStore", "close", "make", "split_stored"]

log = logging.getLogger(__name__)


class InProcessExecutor:
    """Run jobs one after the other in this process.

    Args:
        desc: the label of the progress bar.
    """

    def __init__(self, desc: str = "jobs") -> None:
        self.desc = desc

    def map(
        self, jobs: Sequence[Job], context: Any, store: JobStore | None = None, progress: bool = True
    ) -> dict[str, Any]:
        """Run the jobs whose keys are not in ``store``; return every job's result by key.

        Args:
            jobs: jobs with unique keys.
            context: the shared object passed as each job function's first argument.
            store: finished results; new ones are written (and committed) as each job ends.
            progress: show a progress bar when stderr is a terminal.

        Returns:
            ``{job.key: result}`` in the order of ``jobs``. With a store, every result is
            returned as its JSON round trip, so fresh and stored results look alike.
        """
        results, todo = split_stored(jobs, store)
        log.info("%d jobs: %d stored, %d to run", len(jobs), len(jobs) - len(todo), len(todo))
        t0 = time.perf_counter()
        for job in _progress(todo, self.desc, unit="job", show=progress and bool(todo)):
            value = job.fn(context, *job.args)
            if store is not None:
                store.put(job.key, value)
                value = json.loads(json.dumps(value))
            results[job.key] = value
            log.debug("job %s done", job.key)
        if todo:
            log.info("%d jobs ran in %.2f s", len(todo), time.perf_counter() - t0)
        return {j.key: results[j.key] for j in jobs}


EXECUTORS = ("inprocess", "ray")


def make(name: str, **kwargs: Any) -> Executor:
    """Build an executor by name: "inprocess" or "ray" (the ``ray`` extra: ``pip install mixq[ray]``).

    Args:
        name: one of :data:`EXECUTORS`.
        kwargs: the executor's settings, e.g. ``address``, ``workers``, ``chunk_size`` for "ray"
            (see :class:`mixq.ray_executor.RayExecutor`); ``desc`` for "inprocess".

    >>> make("inprocess").desc
    'jobs'
    """
    import inspect

    if name == "inprocess":
        cls: Any = InProcessExecutor
    elif name == "ray":
        from mixq.ray_executor import RayExecutor

        cls = RayExecutor
    else:
        raise ValueError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for executor {name!r}; valid: {', '.join(valid)}")
    return cls(**kwargs)


def close(executor: Any) -> None:
    """Release what an executor holds (a Ray cluster it started); a no-op for others."""
    fn = getattr(executor, "close", None)
    if callable(fn):
        fn()
