"""Every method behind one interface: METHODS maps a name to (Config class, search function)."""

from __future__ import annotations

from mixq.methods import uniform

METHODS = {
    "uniform": (uniform.Config, uniform.search),
}
