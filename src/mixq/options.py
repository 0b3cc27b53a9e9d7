"""The optional settings of a run (:class:`RunOptions`) and a whole run as a recipe (:class:`Recipe`).

``mixq.run(task, method, candidates, budget, **options)`` builds a :class:`RunOptions` from its
keywords (or takes one whole, ``options=``); ``mixq run`` builds a :class:`Recipe` from a TOML
file (:meth:`Recipe.from_toml`) and the command line, and runs it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (pyproject declares it)
    import tomli as tomllib

from mixq.cache import Cache

# -- typed settings ------------------------------------------------------------------------------


def type_name(hint: Any) -> str:
    """A readable name of a type annotation: ``int``, ``float``, ``list[str] or None``.

    >>> type_name(int | None), type_name(dict[str, float]), type_name(Literal["a", "b"])
    ('int or None', 'dict[str, float]', "one of 'a', 'b'")
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is float:  # an int is a float (the numeric tower); a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not understand (a TypeVar, a Callable): not checked


def _convert(value: Any, hint: Any) -> Any:
    """A conforming value in the annotation's own type where that is plain: int -> float, list -> tuple."""
    if hint is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check ``values`` against the field annotations of the dataclass ``cls``; return them converted.

    Only the keys given are checked (unknown keys are the caller's to reject). A value of the
    wrong type raises a ValueError naming ``where``, the key, the expected type and the value:

    >>> @dataclass
    ... class C:
    ...     steps: int = 1
    >>> check_types(C, {"steps": "abc"}, "method_args of 'x'")
    Traceback (most recent call last):
    ...
    ValueError: method_args of 'x': steps must be int, got 'abc' (str)
    """
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that names what the module does not import
        hints = {}
    out = dict(values)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if not _conforms(value, hint):
            raise ValueError(
                f"{where}: {key} must be {type_name(hint)}, got {value!r} ({type(value).__name__})"
            )
        out[key] = _convert(value, hint)
    return out


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
        fold_bn: fold every batch norm that follows a conv or linear layer into it, on the
            run's copy of the model, before anything else (:func:`mixq.fold.fold_model`);
            recorded in ``metrics.extra["fold_bn"]`` when the model has batch norm.
        embeddings: quantize nn.Embedding weights too (weight-only, per row; see
            :func:`mixq.wrap.wrap`); without it they stay float, listed in
            ``metrics.float_layers``.
        exclude: layers to keep float, as fnmatch patterns on qualified layer names (e.g.
            ``["lm_head", "*.embed_tokens"]``); listed in ``metrics.float_layers`` and counted
            at 32 bits in every budget. A pattern that matches no layer raises.
        overwrite: clear ``out`` when it holds another run (else such a directory is refused;
            one of the same configuration is resumed: see :mod:`mixq.rundir`).
        target: the runtime the plan is deployed to: "onnx" (ONNX Runtime's integer kernels)
            ends ``ptq`` with the ``int32_bias`` step unless it lists it, so that the simulated
            metric is the deployed one (``mixq.ptq.TARGETS``); None (the default): no runtime.
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
    fold_bn: bool = True
    embeddings: bool = False
    exclude: list[str] | None = None
    overwrite: bool = False
    target: str | None = None

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
        values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(cls)}
        return dataclasses.replace(opts, **check_types(cls, values, "mixq.run"))


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
    "fold_bn",
    "embeddings",
    "exclude",
    "target",
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
    candidates: list[str] | str | None = None
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
        run = check_types(cls, {k: v for k, v in data.items() if k in _RUN_KEYS}, source)
        opts = check_types(RunOptions, {k: v for k, v in data.items() if k not in _RUN_KEYS}, source)
        return cls(**run, options=RunOptions.build(**opts), given=tuple(data))

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
