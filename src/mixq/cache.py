"""What repeated runs in one process may reuse: prepared models and searched weight ranges.

Preparing a model (copy, wrap, calibrate, probe) and searching clipping ranges ("mse", "omse")
are deterministic and slow on a large model, and a budget sweep or a comparison of methods does
both again and again on the same model. A :class:`Cache` keeps their results; a caller that
runs many budgets passes one to every run (``mixq.run(..., cache=cache)``), otherwise each run
gets a fresh one. Reusing a cache never changes a result: entries are keyed by the contents of
what they were computed from.

While a run uses a cache it is *active* (:meth:`Cache.active`): the quantization sites reach it
through :func:`current` when they quantize a weight, without a module-level store of results.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from mixq.store import fingerprint_data

RANGES = 4096  # searched weight ranges kept by default

_ACTIVE: ContextVar[Cache | None] = ContextVar("mixq_cache", default=None)


class Cache:
    """Prepared models (the last one) and searched weight ranges (the last ``ranges``), by content.

    Args:
        ranges: how many searched ranges to keep (least recently used dropped first).
        models: keep a copy of the last prepared model (False: prepare anew each time; what a
            run's own cache does, as it prepares once: no idle copy of a large model).

    >>> cache = Cache()
    >>> w = torch.ones(2, 3)
    >>> calls = []
    >>> first = cache.searched(w, None, "spec", lambda: calls.append(1) or (w, w))
    >>> again = cache.searched(w.clone(), None, "spec", lambda: calls.append(1) or (w, w))
    >>> len(calls), len(cache)
    (1, 1)
    """

    def __init__(self, ranges: int = RANGES, models: bool = True) -> None:
        if not isinstance(ranges, int) or ranges < 0:
            raise ValueError(f"ranges must be a non-negative integer, got {ranges!r}")
        self.max_ranges = ranges
        self.models = bool(models)
        self._ranges: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._prepared: tuple[tuple, Any] | None = None

    def __len__(self) -> int:
        return len(self._ranges)

    def searched(
        self,
        rows: torch.Tensor,
        gram: torch.Tensor | None,
        spec: Any,
        search: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero point) ``search()`` returns for these weight rows, Gram matrix and spec.

        A range search ("mse", "omse") is deterministic: a result found before for equal
        contents is returned instead of searching again.
        """
        key = (fingerprint_data([rows]), fingerprint_data([gram]) if gram is not None else None, spec)
        if key in self._ranges:
            self._ranges.move_to_end(key)
            return self._ranges[key]
        value = search()
        self._ranges[key] = value
        while len(self._ranges) > self.max_ranges:
            self._ranges.popitem(last=False)
        return value

    def prepared(self, key: tuple, build: Callable[[], Any]) -> Any:
        """What ``build()`` returns for ``key``: built once (a copy kept), then a deep copy of it.

        Only the last key's result is kept (a prepared model may be large); none with ``models=False``.
        """
        if self._prepared is not None and self._prepared[0] == key:
            return copy.deepcopy(self._prepared[1])
        value = build()
        if not self.models:
            return value
        self._prepared = (key, copy.deepcopy(value))
        return value

    def clear(self) -> None:
        """Forget everything (the next runs prepare and search again)."""
        self._ranges.clear()
        self._prepared = None

    @contextmanager
    def active(self) -> Iterator[Cache]:
        """Make this the cache :func:`current` returns inside the ``with`` block (a run)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def current() -> Cache | None:
    """The cache of the run in progress in this thread or task, or None outside a run."""
    return _ACTIVE.get()
