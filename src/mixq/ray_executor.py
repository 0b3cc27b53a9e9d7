"""Run the same jobs as :class:`~mixq.executor.InProcessExecutor` on a Ray cluster.

``RayExecutor().map(jobs, context, store)`` puts the context (the wrapped model and the
batches) into Ray's object store once, sends the jobs to the workers in chunks (one Ray task
per chunk, so the per-task overhead is shared by several jobs), and writes each chunk's results
into the store the moment the chunk finishes. Each worker deserializes the context once and
keeps it for every later chunk of the same map.

Fault tolerance:

* a worker that dies (killed, out of memory, node lost) costs only the chunk it was running:
  Ray resubmits that task (``max_retries``), every other chunk's results are kept;
* a driver that dies loses only the chunks in flight: finished ones are in the store, and the
  next run with the same model, data and store skips them.

Ray is an optional extra (``pip install mixq[ray]``) and is imported only when a map runs.
``address=None`` starts a local cluster on first use (``workers`` CPUs) and stops it on
:meth:`RayExecutor.close`; ``address="HOST:PORT"`` (or ``"auto"``) joins a running one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mixq.jobs import Job, JobStore, split_stored
from mixq.progress import Bar

log = logging.getLogger(__name__)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "the Ray executor needs Ray: pip install 'mixq[ray]' (or choose executor='inprocess')"
        ) from e
    return ray


class WorkerContext:
    """The context of the current map in one Ray worker, fetched once for all its chunks.

    Each :class:`RayExecutor` ships one of these inside its remote function (see
    :func:`chunk_runner`); a worker deserializes that function once, so the object lives as
    long as the worker and holds the context of one map at a time (the model of the current
    map, not every model it ever received), and a :class:`mixq.Cache` for the searched ranges
    of the jobs that run there.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: Any = None
        self.cache: Any = None

    def get(self, ref: Any) -> Any:
        """The context behind ``ref``: fetched and deserialized on first use, then kept."""
        import ray

        from mixq.cache import Cache

        if ref.hex() != self.key:
            self.key, self.value = None, None  # free the previous map's context before the next
            self.value, self.key = ray.get(ref), ref.hex()
            self.cache = Cache()
        return self.value


def chunk_runner() -> Any:
    """A fresh function ``run(refs, jobs, threads, raise_errors)`` holding its own :class:`WorkerContext`."""
    held = WorkerContext()

    def run(
        refs: list[Any], jobs: list[tuple[str, Any, tuple]], threads: int, raise_errors: bool = False
    ) -> Any:
        return run_chunk(refs, jobs, threads, raise_errors, held)

    return run


def run_chunk(
    refs: list[Any],
    jobs: list[tuple[str, Any, tuple]],
    threads: int,
    raise_errors: bool = False,
    held: WorkerContext | None = None,
) -> tuple[list[tuple[str, Any, float, float]], BaseException | None]:
    """Run one chunk of jobs in a Ray worker.

    ``refs`` wraps the context's ObjectRef in a list so Ray does not resolve it per task: the
    worker fetches and deserializes it once into ``held`` and keeps it for the chunks that
    follow (without ``held``, every call fetches it).

    Returns:
        ``(key, result, seconds, cpu_seconds)`` of each job that finished, and the exception
        of the job that raised (the chunk stops there), or None. With ``raise_errors`` the
        exception is raised instead, so that Ray retries the chunk.
    """
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    held = held if held is not None else WorkerContext()
    context = held.get(refs[0])
    out = []
    with held.cache.active():
        for job_key, fn, args in jobs:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                value = fn(context, *args)
            except Exception as e:
                if raise_errors:
                    raise
                return out, _portable(e, job_key)
            out.append((job_key, value, time.perf_counter() - t0, time.process_time() - c0))
    return out, None


def _portable(e: Exception, job_key: str) -> Exception:
    """The exception of a job, with the job and the worker's traceback in a note; picklable."""
    text = "".join(traceback.format_exception(e))
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        e = RuntimeError(f"{type(e).__name__}: {e}")
    if hasattr(e, "add_note"):
        e.add_note(f"in job {job_key!r} on a Ray worker:\n{text}")
    return e


@dataclass(eq=False)
class RayExecutor:
    """Run jobs on a Ray cluster, in chunks, streaming results into the store.

    Args:
        address: a running cluster to join ("HOST:PORT" or "auto"); None starts a local
            cluster with ``workers`` CPUs on first use (or uses the one this process already
            initialized).
        workers: CPUs of the local cluster (default: this machine's cores); on a joined
            cluster it only sets the default chunk size (default: the cluster's CPUs).
        chunk_size: jobs per Ray task; by default the jobs to run are cut into about
            ``chunks_per_worker`` chunks per worker.
        chunks_per_worker: see ``chunk_size``; more, smaller chunks lose less work to a dead
            worker and balance better, fewer pay less per-task overhead.
        max_retries: times a chunk is resubmitted after its worker died.
        retry_exceptions: also retry chunks whose job raised (False: the error is raised).
        threads: torch threads in each worker (one CPU is reserved per task per thread).
        desc: the progress bar's label.
        init_args: more keyword arguments of ``ray.init`` (e.g. ``runtime_env``).

    After each :meth:`map`, ``stats`` holds the numbers of jobs (total, stored, run), chunks,
    the wall time of the map and the summed wall-clock and CPU seconds the jobs took inside
    the workers.
    """

    address: str | None = None
    workers: int | None = None
    chunk_size: int | None = None
    chunks_per_worker: int = 4
    max_retries: int = 3
    retry_exceptions: bool = False
    threads: int = 1
    desc: str = "jobs"
    init_args: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)
    _remote: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        workers, chunk_size, threads = self.workers, self.chunk_size, self.threads
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if self.chunks_per_worker < 1:
            raise ValueError(f"chunks_per_worker must be at least 1, got {self.chunks_per_worker!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.init_args = dict(self.init_args or {})

    # -- cluster -------------------------------------------------------------------------------

    def _ray(self) -> Any:
        """Import Ray and connect to (or start) the cluster on first use."""
        ray = _import_ray()
        if not ray.is_initialized():
            args: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            if self.address is None:
                args["num_cpus"] = self.workers or os.cpu_count() or 1
                args["object_store_memory"] = 1 << 30
            else:
                args["address"] = self.address
            args.update(self.init_args)
            log.info("starting Ray: %s", {k: v for k, v in args.items() if k != "runtime_env"})
            ray.init(**args)
            self._started = True
        if self._remote is None:
            self._remote = ray.remote(chunk_runner())
        return ray

    def cluster_cpus(self) -> int:
        """Return the CPUs of the cluster (connecting to it first)."""
        ray = self._ray()
        return int(ray.cluster_resources().get("CPU", 1))

    def close(self) -> None:
        """Disconnect from Ray if this executor connected: a local cluster it started stops, a
        joined one keeps running, a connection made before (``ray.init`` by the caller) stays."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        self._remote = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ----------------------------------------------------------------------------------

    def chunks(self, jobs: Sequence[Job], n_workers: int) -> list[list[Job]]:
        """Cut ``jobs`` into consecutive chunks: ``chunk_size`` each, or about
        ``chunks_per_worker`` per worker."""
        size = self.chunk_size or max(1, math.ceil(len(jobs) / (n_workers * self.chunks_per_worker)))
        return [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]

    def map(
        self, jobs: Sequence[Job], context: Any, store: JobStore | None = None, progress: bool = True
    ) -> dict[str, Any]:
        """Run the jobs whose keys are not in ``store`` on the cluster; return every result by key.

        Same contract as :meth:`mixq.executor.InProcessExecutor.map`: ``{job.key: result}`` in
        the order of ``jobs``; with a store, results are JSON round trips and each is written
        as soon as its chunk finishes. A job that raises stops the map with its exception (with
        ``retry_exceptions``, after its chunk was retried ``max_retries`` times): the jobs before
        it in its chunk and the chunks finished earlier are stored, chunks not started are
        cancelled.
        """
        t0 = time.perf_counter()
        results, todo = split_stored(jobs, store)
        self.stats = {
            "jobs": len(jobs),
            "stored": len(results),
            "ran": len(todo),
            "chunks": 0,
            "seconds": 0.0,
            "job_seconds": 0.0,
            "job_cpu_seconds": 0.0,
        }
        log.info("%d jobs: %d stored, %d to run", len(jobs), len(results), len(todo))
        if todo:
            ray = self._ray()
            n_workers = self.workers or max(1, self.cluster_cpus() // self.threads)
            chunks = self.chunks(todo, n_workers)
            self.stats["chunks"] = len(chunks)
            remote = self._remote.options(
                num_cpus=self.threads, max_retries=self.max_retries, retry_exceptions=self.retry_exceptions
            )
            ctx_ref = ray.put(context)
            pending = [
                remote.remote(
                    [ctx_ref], [(j.key, j.fn, j.args) for j in c], self.threads, self.retry_exceptions
                )
                for c in chunks
            ]
            try:
                with Bar(len(todo), self.desc, unit="job", show=progress) as bar:
                    while pending:
                        done, pending = ray.wait(pending, num_returns=1)
                        finished, error = ray.get(done[0])
                        for key, value, seconds, cpu in finished:
                            if store is not None:
                                store.put(key, value)
                                value = json.loads(json.dumps(value))
                            results[key] = value
                            self.stats["job_seconds"] += seconds
                            self.stats["job_cpu_seconds"] += cpu
                            bar.update()
                        if error is not None:  # the jobs before it in its chunk are stored
                            raise error
            except BaseException:
                for ref in pending:
                    ray.cancel(ref)
                raise
            finally:
                del ctx_ref
        self.stats["seconds"] = time.perf_counter() - t0
        if todo:
            log.info(
                "%d jobs ran on Ray in %.2f s (%d chunks)",
                len(todo),
                self.stats["seconds"],
                self.stats["chunks"],
            )
        return {j.key: results[j.key] for j in jobs}
