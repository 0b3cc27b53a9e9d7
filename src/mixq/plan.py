"""Quantization specs, per-layer specs, plans, and the one parser of short candidate names.

A candidate name is parsed here and nowhere else. Grammar (``N`` an integer)::

    candidate := wpart [ "-" ] [ apart ]  |  apart
    wpart     := "w" FMT [ "g" N ] { "+" MOD }      weight spec
    apart     := "a" FMT { "+" MOD }                input-activation spec
    FMT       := N (= intN) | a format name (int4, uint8, fp8_e4m3fn, mxfp4_e2m1, ...)
    MOD       := "sym" | "asym" | "fzero" | "minmax" | "mse" | "omse" | "pNN.N" (percentile) | "tensor"
                 | "channel"

Examples: ``w4a8``, ``w2``, ``w4g128``, ``w2+asym+mse-a8``, ``wfp8_e4m3fn-afp8_e4m3fn``,
``wmxfp4_e2m1``, ``w4g32+fzero`` (asymmetric with a float offset per group instead of an
integer zero point: ``w^ = s q + m``, the GGUF Q4_1 grid). Defaults: weights symmetric, per
output channel, min/max range; activations asymmetric, per tensor, min/max range over the
calibration data.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixq import formats
from mixq.formats import Format, Int
from mixq.kinds.base import kind_of, kind_of_format

GRANULARITIES = ("tensor", "channel", "group", "block")
CLIPS = ("minmax", "mse", "omse", "percentile")
SCHEMA = 1
MODIFIERS = "sym, asym, fzero, minmax, mse, omse, p<percentile> (e.g. p99.9), tensor, channel"
FMT_RULE = (
    "a format is a bit count 2..8 or a format name such as int4, fp8_e4m3fn or mxfp4_e2m1 "
    "(an MX name may end in _b<block>)"
)
SEE_GRAMMAR = "(the candidate grammar: `mixq list`)"
GRAMMAR = (
    "candidate := w<FMT>[g<N>][+MOD...][-][a<FMT>[+MOD...]]; FMT is a bit count (2..8, "
    f"meaning intN) or one of {', '.join(formats.FORMAT_NAMES)}; MOD is one of sym, asym, "
    "fzero, minmax, mse, omse, p<percentile> (e.g. p99.9), tensor, channel; an MX name may end in _b<block> "
    "(e.g. mxfp4_e2m1_b16). Examples: w4a8, w2, w4g128, "
    "w2+asym+mse-a8, wfp8_e4m3fn-afp8_e4m3fn, wmxfp4_e2m1; activations only: "
    f"{', '.join(formats.ACT_FORMAT_NAMES)} (e.g. w8-asparq4_5opt_v)"
)


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    Attributes:
        fmt: element format.
        granularity: "tensor", "channel" (weights: output channel), "group" (weights: groups of
            ``group_size`` along the input dimension) or "block" (MX formats, implied).
        group_size: elements per group for "group".
        symmetric: symmetric range around zero; False adds a zero point (integer formats only).
        clip: range calibration: "minmax", "mse" (search of the clipping range minimizing the
            squared weight error), "omse" (weights only: minimizing the squared error of the
            layer's output on the calibration inputs) or "percentile".
        percentile: the percentile of |x| used by clip="percentile".
        points: multipoint weights (mixq.quant.multipoint): points per output channel, each a
            signed ``fmt`` vector with its own step (the first one keeps the zero point of an
            asymmetric grid); None for ordinary
            quantization. Then granularity "channel" or "tensor" is the first point's scale and
            clip "minmax" (a = max|r|) or "mse" (least-squares a) how each point is searched.
        float_zero: (integer weights, asymmetric only) the zero point is a float offset ``m``
            stored like the scale (float16 per group, else float32): ``w^ = s q + m`` with
            codes q in 0 .. 2^b - 1 (modifier ``+fzero``; docs/methods.md §6.1).
    """

    fmt: Format
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    clip: str = "minmax"
    percentile: float = 99.99
    points: tuple[int, ...] | None = None
    float_zero: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.clip not in CLIPS:
            raise ValueError(f"unknown clip {self.clip!r}; valid: {', '.join(CLIPS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.float_zero and (self.symmetric or not isinstance(self.fmt, Int) or self.points is not None):
            raise ValueError(
                f"a float zero point (fzero) needs an asymmetric integer format without points, got "
                f"{self.fmt} symmetric={self.symmetric} points={self.points}"
            )
        kind_of(self).check(self)

    @property
    def bits(self) -> int:
        """Storage bits of one element."""
        return kind_of(self).elem_bits(self.fmt)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        d: dict[str, Any] = {"fmt": str(self.fmt), "granularity": self.granularity}
        if self.group_size is not None:
            d["group_size"] = self.group_size
        d["symmetric"] = self.symmetric
        d["clip"] = self.clip
        if self.clip == "percentile":
            d["percentile"] = self.percentile
        if self.points is not None:
            d["points"] = list(self.points)
        if self.float_zero:
            d["float_zero"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QSpec:
        """Build from the JSON form, rejecting unknown keys."""
        if not isinstance(d, dict):
            raise ValueError(f"a quantization spec must be a JSON object, got {d!r}")
        valid = {
            "fmt",
            "granularity",
            "group_size",
            "symmetric",
            "clip",
            "percentile",
            "points",
            "float_zero",
        }
        unknown = set(d) - valid
        if unknown:
            raise ValueError(f"unknown spec keys {sorted(unknown)}; valid: {sorted(valid)}")
        if "fmt" not in d:
            raise ValueError(f"spec {d!r} has no 'fmt'")
        types = {
            "fmt": (str,),
            "granularity": (str,),
            "group_size": (int, type(None)),
            "symmetric": (bool,),
            "clip": (str,),
            "percentile": (int, float),
            "points": (list,),
            "float_zero": (bool,),
        }
        for k, v in d.items():
            if not isinstance(v, types[k]) or (isinstance(v, bool) and bool not in types[k]):
                raise ValueError(f"spec key {k!r} has a value of the wrong type: {v!r}")
        return cls(
            fmt=formats.parse(d["fmt"]),
            granularity=d.get("granularity", "channel"),
            group_size=d.get("group_size"),
            symmetric=d.get("symmetric", True),
            clip=d.get("clip", "minmax"),
            percentile=float(d.get("percentile", 99.99)),
            points=tuple(d["points"]) if "points" in d else None,
            float_zero=d.get("float_zero", False),
        )


@dataclass(frozen=True)
class LayerSpec:
    """The weight and input-activation specs of one layer; None means float."""

    weight: QSpec | None = None
    act: QSpec | None = None

    @property
    def name(self) -> str:
        """Return the canonical short candidate name (``parse_candidate(s.name) == s``)."""
        w = _part_name("w", self.weight, WEIGHT_DEFAULTS) if self.weight else ""
        a = _part_name("a", self.act, ACT_DEFAULTS) if self.act else ""
        if not w and not a:
            return "float"
        sep = "" if (not w or not a or re.fullmatch(r"w\d+(g\d+)?", w)) else "-"
        return w + sep + a

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        """Build from the JSON form, rejecting unknown keys."""
        if not isinstance(d, dict):
            raise ValueError(f"a layer spec must be a JSON object, got {d!r}")
        unknown = set(d) - {"weight", "act"}
        if unknown:
            raise ValueError(f"unknown layer-spec keys {sorted(unknown)}; valid: ['act', 'weight']")
        w, a = d.get("weight"), d.get("act")
        spec = cls(QSpec.from_dict(w) if w else None, QSpec.from_dict(a) if a else None)
        if spec.act is not None and spec.act.float_zero:
            raise ValueError("a float zero point (float_zero) applies to weight specs only")
        if spec.weight is not None and kind_of(spec.weight).act_only:
            raise ValueError(f"{spec.weight.fmt} is an activation format; a weight spec cannot use it")
        return spec


WEIGHT_DEFAULTS = {"granularity": "channel", "symmetric": True, "clip": "minmax"}
ACT_DEFAULTS = {"granularity": "tensor", "symmetric": False, "clip": "minmax"}
FLOAT = LayerSpec()


def _fmt_token(fmt: Format) -> str:
    if isinstance(fmt, Int) and fmt.signed:
        return str(fmt.bits)
    return str(fmt)


def _part_name(prefix: str, spec: QSpec, defaults: dict[str, Any]) -> str:
    s = prefix + _fmt_token(spec.fmt)
    if spec.granularity == "group":
        s += f"g{spec.group_size}"
    mods = []
    if spec.float_zero:
        mods.append("fzero")
    elif kind_of_format(spec.fmt).zero_points and spec.symmetric != defaults["symmetric"]:
        mods.append("sym" if spec.symmetric else "asym")
    if spec.granularity in ("tensor", "channel") and spec.granularity != defaults["granularity"]:
        mods.append(spec.granularity)
    if spec.clip == "percentile":
        p = f"{spec.percentile:g}"
        mods.append("p" + (p if float(p) == spec.percentile else repr(spec.percentile)))
    elif spec.clip != defaults["clip"]:
        mods.append(spec.clip)
    mods += kind_of(spec).name_mods(spec)
    return s + "".join("+" + m for m in mods)


_MODS = r"(?:\+[a-z0-9.]+)*"


def _fmt_pattern(names: tuple[str, ...]) -> str:
    """The regex of FMT: a bit count or one of ``names`` (an MX name may end in _b<block>)."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return "(?:(?:" + alternatives + r")(?:_b\d+)?|\d+)"


@functools.cache
def _candidate_re(names: tuple[str, ...]) -> re.Pattern[str]:
    """The candidate grammar's regex over the format names ``names`` (registered ones too)."""
    fmt = _fmt_pattern(names)
    weight = rf"(?:w(?P<wf>{fmt})(?:g(?P<g>\d+))?(?P<wm>{_MODS}))?"
    return re.compile(rf"{weight}-?(?:a(?P<af>{fmt})(?P<am>{_MODS}))?")


def _parse_fmt(token: str, text: str) -> Format:
    if token.isdigit():
        bits = int(token)
        if not 2 <= bits <= 8:
            raise ValueError(f"bits out of range in candidate {text!r}: {bits}; valid: 2..8")
        return Int(bits)
    try:
        return formats.parse(token)
    except ValueError:
        raise ValueError(f"candidate {text!r}: {token!r} is not a format; {FMT_RULE}") from None


_MOD_SETS = {
    **dict.fromkeys(("sym", "asym", "fzero"), "symmetric"),
    **dict.fromkeys(("minmax", "mse", "omse"), "clip"),
    **dict.fromkeys(("tensor", "channel"), "granularity"),
}


def _parse_part(fmt_token: str, group: str | None, mods: str, defaults: dict, text: str) -> QSpec:
    fmt = _parse_fmt(fmt_token, text)
    kw: dict[str, Any] = dict(defaults)
    kw.update(kind_of_format(fmt).parse_defaults())  # e.g. MX: "block"; only integers take a zero point
    if group is not None:
        kw["granularity"], kw["group_size"] = "group", int(group)
    given: dict[str, str] = {}  # what each modifier sets: symmetric, clip or granularity, once
    for mod in filter(None, mods.split("+")):
        what = _MOD_SETS.get(mod, "clip" if re.fullmatch(r"p\d+(\.\d+)?", mod) else None)
        if what in given:
            raise ValueError(
                f"candidate {text!r} sets the {what} twice (+{given[what]}+{mod}); give one of them"
            )
        if what is not None:
            given[what] = mod
        if mod in ("sym", "asym"):
            kw["symmetric"] = mod == "sym"
        elif mod == "fzero":
            kw["symmetric"], kw["float_zero"] = False, True
        elif mod in ("minmax", "mse", "omse"):
            kw["clip"] = mod
        elif mod in ("tensor", "channel"):
            kw["granularity"] = mod
        elif re.fullmatch(r"p\d+(\.\d+)?", mod):
            kw["clip"], kw["percentile"] = "percentile", float(mod[1:])
        else:
            raise ValueError(f"candidate {text!r}: unknown modifier {mod!r} after '+'; valid: {MODIFIERS}")
    try:
        return QSpec(fmt=fmt, **kw)
    except ValueError as e:
        raise ValueError(f"candidate {text!r}: {e}") from None


def parse_candidate(text: str) -> LayerSpec:
    """Parse a short candidate name such as ``w4a8`` or ``wfp8_e4m3fn-afp8_e4m3fn``.

    >>> parse_candidate("w4a8").name
    'w4a8'
    >>> parse_candidate("w2+asym+mse-a8").weight.symmetric
    False
    """
    if not isinstance(text, str):
        raise ValueError(f"a candidate name must be a string, got {text!r}")
    if text == "float":
        return FLOAT
    m = _candidate_re(_all_names()).fullmatch(text.strip())
    if m is None or not text.strip().startswith(("w", "a")) or (m["wf"] is None and m["af"] is None):
        raise ValueError(f"candidate {text!r}: {_diagnose(text)} {SEE_GRAMMAR}")
    try:
        w = _parse_part(m["wf"], m["g"], m["wm"], WEIGHT_DEFAULTS, text) if m["wf"] else None
        a = _parse_part(m["af"], None, m["am"], ACT_DEFAULTS, text) if m["af"] else None
        if a is not None and a.granularity not in ("tensor", "block"):
            raise ValueError(f"candidate {text!r}: activations are quantized per tensor or per block")
        if a is not None and a.clip == "omse":
            raise ValueError(f"candidate {text!r}: omse ranges apply to weights only")
        if a is not None and a.float_zero:
            raise ValueError(f"candidate {text!r}: fzero (a float zero point) applies to weights only")
        if w is not None and kind_of(w).act_only:
            raise ValueError(f"candidate {text!r}: {w.fmt} is an activation format (use a{w.fmt})")
    except ValueError as e:
        raise ValueError(f"{e} {SEE_GRAMMAR}") from None
    return LayerSpec(w, a)


def _all_names() -> tuple[str, ...]:
    return (*formats.names(), *formats.names(act_only=True))


def _diagnose(text: str) -> str:
    """The first token of a candidate name that breaks the grammar, and the rule it breaks."""
    t = text.strip()
    if not t:
        return "the name is empty; a candidate looks like w4a8, w2+asym+mse-a8 or a8"
    if t != t.lower():
        return f"{t!r} has capitals; names are lower case (did you mean {t.lower()!r}?)"
    if t[0] not in "wa":
        return f"{t[0]!r} starts it; a candidate starts with 'w' (weights) or 'a' (input activations)"
    fmt_re = re.compile(_fmt_pattern(_all_names()))
    pos = 0
    for part in ("w", "a"):
        if not t.startswith(part, pos):
            continue
        pos += 1
        f = fmt_re.match(t, pos)
        if f is None:
            bad = re.match(r"[\w.]*", t[pos:])[0] or t[pos : pos + 1]  # type: ignore[index]
            return (
                f"{bad!r} after {t[:pos]!r} is not a format; {FMT_RULE}"
                if bad
                else f"no format after {t!r}; {FMT_RULE}"
            )
        pos = f.end()
        if part == "w" and t.startswith("g", pos):
            g = re.match(r"g(\d+)", t[pos:])
            if g is None:
                bad = re.match(r"g[^+]*", t[pos:])[0]  # type: ignore[index]
                return f"{bad!r}: a group size after 'g' is a positive integer, e.g. w4g128"
            pos += g.end()
        while t.startswith("+", pos):
            mod = re.match(r"\+([a-z0-9.]+)", t[pos:])
            if mod is None:
                return f"{t[pos:]!r}: a modifier follows '+'; valid: {MODIFIERS}"
            pos += mod.end()
        if part == "w" and t.startswith("-a", pos):
            pos += 1
    rest = t[pos:]
    if rest.startswith("-") and pos == 0:
        return f"{rest!r}: '-' separates a weight part from an activation part (w4-a8, or just a8)"
    return f"{rest!r} after {t[:pos]!r}: a candidate ends there, or goes on with an activation part -a<FMT>"


def as_layer_spec(c: str | LayerSpec) -> LayerSpec:
    """Return ``c`` as a LayerSpec, parsing it if it is a name."""
    return c if isinstance(c, LayerSpec) else parse_candidate(c)


@dataclass
class Plan:
    """The precision of every layer: exact module name -> LayerSpec; absent layers stay float."""

    layers: dict[str, LayerSpec]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {
            "schema": SCHEMA,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any, layer_names: list[str] | None = None) -> Plan:
        """Build from the JSON form; reject unknown keys and layers not in ``layer_names``."""
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"schema", "layers", "meta"}
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; valid: layers, meta, schema")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"unsupported plan schema {d.get('schema')!r}; this mixq reads {SCHEMA}")
        layers = d.get("layers")
        if not isinstance(layers, dict):
            raise ValueError("a plan needs a 'layers' object mapping layer names to specs")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"a plan's 'meta' must be a JSON object, got {meta!r}")
        plan = cls({k: LayerSpec.from_dict(v) for k, v in layers.items()}, dict(meta))
        if layer_names is not None:
            plan.check_layers(layer_names)
        return plan

    def check_layers(self, layer_names: list[str]) -> None:
        """Raise if the plan names a layer that the model does not have."""
        missing = [k for k in self.layers if k not in set(layer_names)]
        if missing:
            raise ValueError(
                f"plan names layers the model does not have: {missing[:5]}; the model's "
                f"quantizable layers are: {layer_names[:20]}{' ...' if len(layer_names) > 20 else ''}"
            )

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, layer_names: list[str] | None = None) -> Plan:
        """Read a plan written by :meth:`save`; a corrupt file raises a ValueError naming it."""
        try:
            d = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"plan file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d, layer_names)
        except ValueError as e:
            raise ValueError(f"plan file {path}: {e}") from None

    def summary(self) -> dict[str, int]:
        """Count layers per candidate name."""
        out: dict[str, int] = {}
        for spec in self.layers.values():
            out[spec.name] = out.get(spec.name, 0) + 1
        return out
