"""The measured outcome of one run (``Result.metrics``, a run directory's ``metrics.json``).

:class:`Metrics` holds the known values as typed fields and anything else (values a method or
a caller adds, e.g. ``recorded_metric`` of a rebuilt run) in ``extra``. ``to_dict()`` gives the
JSON object of ``metrics.json`` key for key: a field that is None is absent (``evaluate`` has no
budget, seed or search time), ``within`` is written as one ``within_<budget>`` flag per budget,
and ``extra`` comes last. ``from_dict`` reads it back, old run directories included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

WITHIN = "within_"  # the prefix of the budget flags in metrics.json


@dataclass
class Metrics:
    """What a run measured, in the order ``metrics.json`` lists it.

    Attributes:
        task, method: the task's and the method's names.
        method_args: the method's Config as a dict; candidates: candidate names; budget: the
            checked budget; seed: the random seed (absent when a plan was only evaluated).
        metric_name, metric, fp_metric: the task's metric of the quantized and the float model.
        avg_weight_bits, size_bytes, size_ratio, bops: the cost model's numbers of the plan.
        seconds: the method's time (preparation and search); eval_seconds: the metric's time.
        layers: quantizable layers; adds: the residual additions' operand spec, if quantized.
        float_layers: every parameter tensor with two or more dimensions that stays float, by
            name, with its reason (:func:`mixq.wrap.float_layers`); counted in ``size_bytes``
            at 32 bits per element.
        within: per budget, whether the plan meets it (``within_<budget>`` in the file).
        history: the method's search record; ptq: the records of the PTQ steps.
        extra: any other value, by name.
    """

    task: str
    method: str
    method_args: dict[str, Any] | None = None
    candidates: list[str] | None = None
    budget: dict[str, float] | None = None
    seed: int | None = None
    metric_name: str | None = None
    metric: float | None = None
    fp_metric: float | None = None
    avg_weight_bits: float | None = None
    size_bytes: float | None = None
    size_ratio: float | None = None
    bops: float | None = None
    seconds: float | None = None
    eval_seconds: float | None = None
    layers: int | None = None
    adds: str | None = None
    float_layers: dict[str, str] | None = None
    within: dict[str, bool] | None = None
    history: list[dict[str, Any]] | None = None
    ptq: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``metrics.json``: set fields in order, ``within_*`` flags, then ``extra``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            if f.name == "within":
                out.update({f"{WITHIN}{k}": v for k, v in value.items()})
            else:
                out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        """Read a ``metrics.json`` object; unknown keys go to ``extra``.

        >>> m = Metrics.from_dict({"task": "t", "method": "m", "metric": 1.0, "within_bops": True, "x": 2})
        >>> (m.metric, m.within, m.extra)
        (1.0, {'bops': True}, {'x': 2})
        >>> m.to_dict()
        {'task': 't', 'method': 'm', 'metric': 1.0, 'within_bops': True, 'x': 2}
        """
        if not isinstance(d, dict):
            raise ValueError(f"metrics must be a dict, got {type(d).__name__}")
        missing = [k for k in ("task", "method") if k not in d]
        if missing:
            raise ValueError(f"metrics lack {missing}; every run's metrics name its task and method")
        known = {f.name for f in dataclasses.fields(cls)} - {"within", "extra"}
        kw: dict[str, Any] = {"extra": {}}
        within: dict[str, bool] = {}
        for k, v in d.items():
            if k in known:
                kw[k] = v
            elif k.startswith(WITHIN):
                within[k[len(WITHIN) :]] = v
            else:
                kw["extra"][k] = v
        return cls(**kw, within=within or None)

    def replace(self, **changes: Any) -> Metrics:
        """A copy with some fields changed (``extra`` merged, not replaced)."""
        extra = {**self.extra, **changes.pop("extra", {})}
        return dataclasses.replace(self, **changes, extra=extra)
