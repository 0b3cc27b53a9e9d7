"""Progress bars for long stages, quiet when stderr is not a terminal.

Every long loop in mixq (sensitivity jobs, training epochs and steps, budget sweeps, PTQ
steps) goes through :func:`progress`. A bar is drawn only when stderr is a terminal, tqdm is
installed (the ``progress`` extra) and ``MIXQ_PROGRESS`` is not ``0``; otherwise the iterable
is returned unchanged, so logs and CI output stay clean.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal, tqdm is installed, MIXQ_PROGRESS != 0."""
    if os.environ.get("MIXQ_PROGRESS", "1") == "0":
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and importlib.util.find_spec("tqdm") is not None


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", show: bool = True
) -> Iterable[T]:
    """Wrap ``items`` in a progress bar when :func:`enabled` (and ``show``); else return them.

    Args:
        items: what to iterate over.
        desc: the bar's label, e.g. "sensitivity" or "epoch 3/8".
        total: the number of items when ``items`` has no length.
        unit: the unit shown after the rate.
        show: False silences this bar whatever the terminal.
    """
    if not (show and enabled()):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


class Bar:
    """A manual bar for loops that are not a single iterable: ``with Bar(n, "x") as b: b.update()``.

    Draws nothing when :func:`enabled` is False; ``update`` and ``set`` are then no-ops.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", show: bool = True) -> None:
        self._bar: Any = None
        if show and enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Advance the bar by ``n``."""
        if self._bar is not None:
            self._bar.update(n)

    def set(self, **values: Any) -> None:
        """Show ``values`` (e.g. loss=0.12) after the bar."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
