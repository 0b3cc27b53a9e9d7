"""A driver's per-layer formats -> the closest mixq candidates and a :class:`mixq.Plan`."""

from __future__ import annotations

from typing import Any


def _fmt(bits: Any) -> str:
    if isinstance(bits, bool) or not isinstance(bits, (int, str)):
        raise ValueError(f"a format's bits must be an integer or a format name, got {bits!r}")
    return str(bits)


def to_candidate(layer: dict[str, Any], grid: str = "same") -> str:
    """The mixq candidate closest to a driver's layer description.

    Args:
        layer: ``{"weight": {"bits", "granularity", "group_size", "symmetric", "clip"} | None,
            "act": {"bits", "symmetric"} | None}`` as written by a driver.
        grid: "same" (the tool's grid: symmetry, granularity, min/max ranges) or "mixq" (integer
            weights take mixq's asymmetric output-MSE ranges, ``+asym+omse``).

    >>> to_candidate({"weight": {"bits": 4, "granularity": "group", "group_size": 128,
    ...               "symmetric": True}, "act": None})
    'w4g128'
    >>> to_candidate({"weight": {"bits": 8, "granularity": "channel", "symmetric": True},
    ...               "act": {"bits": 8, "symmetric": True}})
    'w8-a8+sym'
    >>> to_candidate({"weight": None, "act": None})
    'float'
    """
    if grid not in ("same", "mixq"):
        raise ValueError(f"unknown grid {grid!r}; valid: same, mixq")
    w, a = layer.get("weight"), layer.get("act")
    parts = []
    if w is not None:
        s = "w" + _fmt(w["bits"])
        gran = w.get("granularity", "channel")
        if gran == "group":
            s += f"g{int(w['group_size'])}"
        elif gran not in ("channel", "tensor"):
            raise ValueError(f"unknown weight granularity {gran!r}; valid: channel, group, tensor")
        mods = ["tensor"] if gran == "tensor" else []
        is_int = isinstance(w["bits"], int)
        clip = w.get("clip", "minmax")
        if clip not in ("minmax", "mse"):
            raise ValueError(f"unknown weight clip {clip!r}; valid: minmax, mse")
        if grid == "mixq" and is_int:
            mods += ["asym", "omse"]
        else:
            mods += ["asym"] if is_int and not w.get("symmetric", True) else []
            mods += ["mse"] if clip == "mse" else []
        parts.append(s + "".join("+" + m for m in mods))
    if a is not None:
        s = "a" + _fmt(a["bits"])
        if isinstance(a["bits"], int) and a.get("symmetric", False):
            s += "+sym"
        parts.append(s)
    return "-".join(parts) if parts else "float"


def to_plan(layers: dict[str, dict[str, Any]], grid: str = "same") -> Any:
    """A mixq Plan from a driver's per-layer descriptions (float layers left out)."""
    from mixq.plan import Plan, parse_candidate

    specs = {n: parse_candidate(to_candidate(d, grid)) for n, d in layers.items()}
    return Plan({n: s for n, s in specs.items() if s.weight is not None or s.act is not None})
