"""The optional settings of a run (:class:`RunOptions`) and a whole run as a recipe (:class:`Recipe`).

``mixq.run(task, method, candidates, budget, **options)`` builds a :class:`RunOptions` from its
keywords (or takes one whole, ``options=``); ``mixq run`` builds a :class:`Recipe` from a TOML
file (:meth:`Recipe.from_toml`) and the command line, and runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (pyproject declares it)
    import tomli as tomllib

from mixq.cache import Cache


@dataclass(frozen=True)
class RunOptions:
    """The optional parts of ``mixq.run``; every field is a keyword of it.

    Attributes:
        method_args: the method's own settings (fields of its Config).
        seed: random seed.
        out: a run directory to write (see :mod:`mixq.rundir`).
        ptq: PTQ steps from ``mixq.ptq.STEPS`` applied in order, e.g. ``["cle",
            "bias_correction", "adaround"]``: float-model steps (cle) before calibration and the
            method's search, plan steps after the plan is applied; recorded in ``metrics.ptq``.
        ptq_args: per-step settings, e.g. ``{"adaround": {"iters": 2000}}``.
        executor: runs the methods' sensitivity jobs: "inprocess" (the default), "ray"
            (``pip install mixq[ray]``), or an executor object (``mixq.executor``).
        executor_args: settings of a named executor, e.g. ``{"address": "HOST:PORT",
            "workers": 8}`` for "ray"; an executor built by the run is closed when it ends.
        adds: quantize both operands of every residual addition (:class:`mixq.nn.Add` modules,
            as in the zoo's ResNet and MobileNetV2) with this input spec or the input spec of
            this candidate (e.g. "a8"); recorded as the plan's ``meta["adds"]``. The method's
            search sees float additions; the returned model and its metric have them quantized.
        cache: prepared models and searched ranges to reuse (:class:`mixq.Cache`); pass one
            to every run of a sweep. None: the run uses a fresh one.
    """

    method_args: dict[str, Any] | None = None
    seed: int = 0
    out: str | Path | None = None
    ptq: list[str] | str | None = None
    ptq_args: dict[str, dict[str, Any]] | None = None
    executor: str | Any | None = None
    executor_args: dict[str, Any] | None = None
    adds: Any = None
    cache: Cache | None = None

    @classmethod
    def build(cls, options: RunOptions | None = None, **changes: Any) -> RunOptions:
        """``options`` (or the defaults) with the keyword ``changes``; an unknown keyword raises.

        >>> RunOptions.build(seed=3).seed
        3
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(changes) - set(valid))
        if unknown:
            raise ValueError(f"unknown options {unknown} of mixq.run; valid: options, {', '.join(valid)}")
        if options is not None and not isinstance(options, cls):
            raise ValueError(f"options must be a mixq.RunOptions, got {options!r}")
        opts = dataclasses.replace(options or cls(), **changes)
        if opts.method_args is not None and not isinstance(opts.method_args, dict):
            raise ValueError(f"method_args must be a dict of the method's settings, got {opts.method_args!r}")
        return opts


RECIPE_KEYS = (
    "task",
    "method",
    "candidates",
    "budget",
    "method_args",
    "seed",
    "out",
    "ptq",
    "ptq_args",
    "executor",
    "executor_args",
    "adds",
)
_RUN_KEYS = ("task", "method", "candidates", "budget")


@dataclass(frozen=True)
class Recipe:
    """A whole run: what ``mixq run`` executes, from a TOML file and the command line.

    Attributes:
        task, method, candidates, budget: as ``mixq.run`` takes them.
        options: the rest (``cache`` is not a recipe key).
        given: the keys the recipe set, in order: ``to_dict()`` writes just them.
    """

    task: str | None = None
    method: str = "uniform"
    candidates: list[str] | None = None
    budget: dict[str, float] | None = None
    options: RunOptions = field(default_factory=RunOptions)
    given: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build a recipe from keys of :data:`RECIPE_KEYS`; another key raises, naming ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a table of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; valid: {', '.join(RECIPE_KEYS)}")
        if "seed" in data:
            try:
                data = {**data, "seed": int(data["seed"])}
            except (TypeError, ValueError):
                raise ValueError(f"{source}: seed must be an integer, got {data['seed']!r}") from None
        opts = RunOptions.build(**{k: v for k, v in data.items() if k not in _RUN_KEYS})
        return cls(**{k: v for k, v in data.items() if k in _RUN_KEYS}, options=opts, given=tuple(data))

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        """Read a TOML recipe, rejecting unknown keys."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"recipe {path} is not valid TOML: {e}") from None
        return cls.from_dict(data, f"recipe {path}")

    def to_dict(self) -> dict[str, Any]:
        """The keys the recipe set and their values (``recipe.json`` of a run directory)."""
        return {k: getattr(self, k) if k in _RUN_KEYS else getattr(self.options, k) for k in self.given}

    def merged(self, changes: dict[str, Any]) -> Recipe:
        """This recipe with some keys set (e.g. from the command line), checked like a file's."""
        return Recipe.from_dict({**self.to_dict(), **changes}, "recipe")
