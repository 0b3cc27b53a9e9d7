"""What every executor shares: a :class:`Job`, the store and executor interfaces, stored results.

:mod:`mixq.executor` (the in-process engine and the registry) and :mod:`mixq.ray_executor`
both build on this module, so neither imports the other's module for these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(context, *args)`` -> a JSON-serializable result.

    Attributes:
        key: unique name of the job within a run, the key of its result in the store.
        fn: a module-level function (picklable by reference).
        args: simple, picklable arguments after the context.
    """

    key: str
    fn: Callable[..., Any]
    args: tuple = ()


class JobStore(Protocol):
    """What an executor needs of a store: a :class:`mixq.store.Scope` fits."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def keys(self) -> list[str]: ...


class Executor(Protocol):
    """The executor interface shared by the in-process and distributed engines."""

    def map(
        self, jobs: Sequence[Job], context: Any, store: JobStore | None = None, progress: bool = True
    ) -> dict[str, Any]: ...


def split_stored(jobs: Sequence[Job], store: JobStore | None) -> tuple[dict[str, Any], list[Job]]:
    """Check that job keys are unique; return the stored results by key and the jobs still to run."""
    counts = Counter(j.key for j in jobs)
    if len(counts) != len(jobs):
        dup = sorted(k for k, n in counts.items() if n > 1)
        raise ValueError(f"job keys must be unique; repeated: {dup[:5]}")
    results: dict[str, Any] = {}
    if store is not None:
        stored = set(store.keys())
        results = {j.key: store.get(j.key) for j in jobs if j.key in stored}
    return results, [j for j in jobs if j.key not in results]
