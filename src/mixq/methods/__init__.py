"""Every method behind one interface: METHODS maps a name to (Config class, search function)."""

from __future__ import annotations

from mixq.methods import sensitivity_ilp, uniform

METHODS = {
    "uniform": (uniform.Config, uniform.search),
    "sensitivity-ilp": (sensitivity_ilp.Config, sensitivity_ilp.search_measured),
    "hawq": (sensitivity_ilp.Config, sensitivity_ilp.search_hawq),
}
