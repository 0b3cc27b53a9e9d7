"""Every method behind one interface: METHODS maps a name to (Config class, search function)."""

from __future__ import annotations

from mixq.methods import clado, ddq, fliqs, multipoint, sensitivity_ilp, sparq, uniform

METHODS = {
    "uniform": (uniform.Config, uniform.search),
    "sensitivity-ilp": (sensitivity_ilp.Config, sensitivity_ilp.search_measured),
    "hawq": (sensitivity_ilp.Config, sensitivity_ilp.search_hawq),
    "sparq": (sparq.Config, sparq.search),
    "ddq": (ddq.Config, ddq.search_ddq),
    "clado": (clado.Config, clado.search_clado),
    "clado-naive": (clado.Config, clado.search_naive),
    "multipoint": (multipoint.Config, multipoint.search),
    "fliqs": (fliqs.Config, fliqs.search_fliqs),
}
