"""Every method behind one interface: METHODS maps a name to its :class:`Method` record."""

from __future__ import annotations

from mixq.methods import clado, ddq, fliqs, multipoint, sensitivity_ilp, sparq, uniform
from mixq.methods.common import Method

__all__ = ["METHODS", "Method"]

# demo_args keep `make demo` to minutes on 2 cores; the training methods train short runs.
METHODS: dict[str, Method] = {
    "uniform": Method(uniform.Config, uniform.search),
    "sensitivity-ilp": Method(sensitivity_ilp.Config, sensitivity_ilp.search_measured),
    "hawq": Method(sensitivity_ilp.Config, sensitivity_ilp.search_hawq, demo_args={"hutchinson_samples": 16}),
    "sparq": Method(sparq.Config, sparq.search),
    "ddq": Method(ddq.Config, ddq.search_ddq, trains=True, demo_args={"steps": 40}),
    "clado": Method(clado.Config, clado.search_clado),
    "clado-naive": Method(clado.Config, clado.search_naive),
    "multipoint": Method(multipoint.Config, multipoint.search),
    "fliqs": Method(fliqs.Config, fliqs.search_fliqs, trains=True, demo_args={"steps": 40}),
}
