"""Feedback on long stages: a bar on a terminal, one line per unit of work in logs.

Every long loop in mixq (sensitivity jobs, training steps, budget sweeps, PTQ steps and
layers, benchmark runs) goes through :func:`progress` or :class:`Bar`:

* on a terminal with tqdm installed (the ``progress`` extra), a bar with its own estimate;
* otherwise (a log file, CI, a pipe, no tqdm), one INFO line per unit of work on the
  ``mixq.progress`` logger, with the time left estimated from the units done, e.g.
  ``adaround: layer 2/5 (40%), 1 min 10 s elapsed, about 1 min 45 s left``. A stage that ends
  within ``QUIET_S`` seconds prints nothing. ``mixq`` shows these lines; a library user sees them
  by configuring logging (``logging.basicConfig(level=logging.INFO)``);
* either way, a stage whose estimated time (from its first units) is far above a quick run
  (``SLOW_S``) says so once, near its start, as a WARNING with the caller's hint (e.g. how to
  make it shorter).

``MIXQ_PROGRESS=0`` silences the bars and the lines (not the warnings).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("mixq.progress")

QUIET_S = 2.0  # a stage that has run less than this prints no lines (quick loops stay silent)
SLOW_S = 120.0  # a stage estimated to take longer than this says so at its start
PROBE_S = 1.0  # the estimate for the warning is made after this much of the stage


def _active() -> bool:
    return os.environ.get("MIXQ_PROGRESS", "1") != "0"


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal, tqdm is installed, MIXQ_PROGRESS != 0."""
    if not _active():
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and importlib.util.find_spec("tqdm") is not None


def duration(seconds: float) -> str:
    """A short human duration, minutes and seconds truncated: ``duration(4000)`` is '1 h 06 min'.

    >>> duration(4000), duration(95), duration(3.2)
    ('1 h 06 min', '1 min 35 s', '3 s')
    """
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", show: bool = True
) -> Iterable[T]:
    """Iterate over ``items`` with a bar on a terminal, else one log line per item.

    Args:
        items: what to iterate over.
        desc: the stage's label, e.g. "sensitivity" or "epoch 3/8".
        total: the number of items when ``items`` has no length.
        unit: what one item is ("job", "layer", "run").
        show: False silences this stage whatever the output.
    """
    if not (show and _active()):
        return items
    if enabled():
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return _lines(items, Bar(total, desc, unit))


def _lines(items: Iterable[T], bar: Bar) -> Iterator[T]:
    with bar:
        for item in items:
            yield item
            bar.update()


class Bar:
    """A stage counted by hand: ``with Bar(n, "x") as b: ... b.update()``.

    On a terminal it draws a tqdm bar; otherwise it logs a line each ``per_line`` updates (one
    unit of work, named ``line_unit``: e.g. an AdaRound layer of ``iters`` steps). Either way a
    stage estimated, after ``PROBE_S`` seconds, to run longer than ``SLOW_S`` logs one WARNING
    (with ``hint``) before going on.

    Args:
        total: updates in the whole stage (None: unknown, no estimate).
        desc: the stage's label.
        unit: what one update is.
        show: False draws and logs nothing (the slow-stage warning stays).
        per_line: updates per logged line.
        line_unit: what ``per_line`` updates are (default ``unit``).
        hint: appended to the slow-stage warning, e.g. "--ptq-arg adaround.iters=2000 is 10x quicker".
        start: updates already done (a resumed stage); the estimate counts only later ones.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        show: bool = True,
        per_line: int = 1,
        line_unit: str | None = None,
        hint: str = "",
        start: int = 0,
    ) -> None:
        self._bar: Any = None
        self.total, self.desc, self.unit, self.hint = total, desc, unit, hint
        self.per_line, self.line_unit = max(1, int(per_line)), line_unit or unit
        self.done = self._base = start  # _base: updates before the clock started
        self._start = time.perf_counter()
        self._warned = False
        self._lines = show and _active() and not enabled()
        if show and enabled():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, initial=start
            )

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` updates."""
        if self._bar is not None:
            self._bar.update(n)
        before, self.done = self.done, self.done + n
        elapsed = time.perf_counter() - self._start
        if not self._warned and self.total and elapsed >= PROBE_S:
            self._check_slow(elapsed)
        if self._lines and (self.done // self.per_line > before // self.per_line or self.done == self.total):
            if elapsed >= QUIET_S:
                log.info("%s", self.line(elapsed))

    def remaining(self, elapsed: float) -> float | None:
        """Seconds left, extrapolated from the updates since the clock started."""
        done = self.done - self._base
        if not self.total or done <= 0:
            return None
        return elapsed / done * max(0, self.total - self.done)

    def line(self, elapsed: float) -> str:
        """The log line: unit count, percent, elapsed and estimated time left."""
        if self.total:
            units = -(-self.total // self.per_line)
            at = min(units, -(-self.done // self.per_line))
            text = f"{self.desc}: {self.line_unit} {at}/{units} ({100 * self.done / self.total:.0f}%)"
        else:
            text = f"{self.desc}: {self.line_unit} {self.done // self.per_line}"
        text += f", {duration(elapsed)} elapsed"
        left = self.remaining(elapsed)
        if left is not None and self.done < (self.total or 0):
            text += f", about {duration(left)} left"
        return text

    def _check_slow(self, elapsed: float) -> None:
        self._warned = True
        left = self.remaining(elapsed)
        if left is not None and elapsed + left > SLOW_S:
            hint = f"; {self.hint}" if self.hint else ""
            log.warning(
                "%s will take about %s (%d %ss, estimated from the first %d)%s",
                self.desc,
                duration(elapsed + left),
                self.total,
                self.unit,
                self.done - self._base,
                hint,
            )

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
