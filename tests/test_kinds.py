"""Format kinds: the registry, and a toy kind defined here alone run through all of mixq.

The toy kind stores signed powers of two (``pot4``: a sign bit and a 3-bit exponent code, the
value ``±2^(m-7)`` for ``m`` in 1..7 or zero for ``m = 0``) times a float32 scale per output
channel. Nothing outside this file knows it: registering it is enough for candidate names, the
cost model, ``apply`` (fake quantization), the packed safetensors file and the ONNX writer.
"""

from __future__ import annotations

import copy
import doctest
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import mixq
from mixq import cost, export, formats, kinds, tasks
from mixq.cost import LayerInfo
from mixq.kinds import Kind, kind_of
from mixq.plan import LayerSpec, Plan, QSpec, parse_candidate
from mixq.quant import fake
from mixq.quant.codes import Encoded
from mixq.quant.packing import pack_bits, unpack_bits
from mixq.wrap import recording_grams


@dataclass(frozen=True)
class Pot:
    """Signed power-of-two elements: 1 sign bit and ``bits - 1`` bits of exponent code."""

    bits: int = 4

    def __str__(self) -> str:
        return f"pot{self.bits}"


@dataclass(frozen=True)
class _Named:
    """A format value that only has a name."""

    name: str

    def __str__(self) -> str:
        return self.name


EXPONENTS = 7  # exponent codes 1..7: 2^-6 .. 2^0; code 0: zero
TABLE = torch.tensor(
    [0.0 if m == 0 else (-1.0 if s else 1.0) * 2.0 ** (m - EXPONENTS) for s in (0, 1) for m in range(8)]
)


def pot_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (sign << 3 | m) and the float32 scale per output channel (max |w|)."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    s = flat.abs().amax(1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    y = flat / s[:, None]
    e = torch.round(torch.log2(y.abs())).clamp(1 - EXPONENTS, 0)
    m = torch.where(y.abs() < 2.0**-EXPONENTS, 0, (e + EXPONENTS).long())
    codes = ((y < 0).long() << 3) | m
    return codes.reshape(w.shape), s


def pot_decode(codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``TABLE[code] * s``: the one float operation the ONNX graph repeats (Gather, Mul)."""
    flat = TABLE[codes.reshape(codes.shape[0], -1)]
    return (flat * s[:, None]).reshape(codes.shape)


class PotKind(Kind):
    """Weights only: signed powers of two times a scale per output channel."""

    name = "pot"
    formats = (Pot,)

    def elem_bits(self, fmt: Any) -> int:
        return fmt.bits

    def check(self, spec: QSpec) -> None:
        super().check(spec)
        if spec.granularity != "channel" or spec.clip != "minmax":
            raise ValueError(f"{spec.fmt} takes a scale per channel and min/max ranges only")

    def weight_bits(self, spec: QSpec, info: Any) -> float:
        return float(info.numel * spec.fmt.bits + info.out_channels * 32)

    def quantize_weight(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:
        return self.decode(self.encode(w, spec, gram, None)).to(w.dtype)

    def encode(self, w: torch.Tensor, spec: QSpec, gram: Any, wq: Any) -> Encoded:
        codes, s = pot_encode(w)
        return Encoded(spec, tuple(w.shape), codes, s, None)

    def decode(self, enc: Encoded) -> torch.Tensor:
        return pot_decode(enc.codes, enc.scale)

    def weight_tensors(self, enc: Encoded, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.codes": pack_bits(enc.codes, 4), f"{prefix}.scale": enc.scale.float()}

    def read_weight(
        self, spec: QSpec, shape: tuple[int, ...], take: Callable[[str], torch.Tensor], prefix: str
    ) -> Encoded:
        codes = unpack_bits(take(f"{prefix}.codes"), 4, math.prod(shape)).reshape(shape)
        return Encoded(spec, shape, codes, take(f"{prefix}.scale").float(), None)

    def weight_nodes(self, g: Any, lx: Any, out: str, as_float: bool) -> list[Any]:
        """``Gather(TABLE, codes) * scale``, the scale broadcast along the output channels."""
        if as_float:
            return g.weight_nodes(lx, out, None)
        enc, helper, p = lx.weight, g.onnx.helper, f"{lx.name}.weight"
        linear = lx.kind == "linear"  # exported as MatMul(x, W^T): output channels last
        codes = enc.codes.t() if linear else enc.codes
        shape = [1, -1] if linear else [-1] + [1] * (len(enc.shape) - 1)
        table = g.tensor(f"{p}.table", g.tp.FLOAT, TABLE)
        idx = g.tensor(f"{p}.codes", g.tp.INT64, codes, share=False)
        scale = g.tensor(f"{p}.scale", g.tp.FLOAT, enc.scale.reshape(shape))
        return [
            helper.make_node("Gather", [table, idx], [f"{p}.values"], name=f"{p}_gather", axis=0),
            helper.make_node("Mul", [f"{p}.values", scale], [out], name=f"{p}_scale"),
        ]


@pytest.fixture
def pot() -> Iterator[PotKind]:
    kind = PotKind()
    formats.register(Pot(4))
    kinds.register(kind)
    try:
        yield kind
    finally:
        kinds.unregister(kind)
        formats.unregister(Pot(4))


@pytest.fixture
def cnn() -> tuple[tasks.Task, torch.nn.Module]:
    task = tasks.get("synthetic-cnn")
    qmodel = mixq.wrap(copy.deepcopy(task.model).eval())
    mixq.calibrate(qmodel, task.calib[:2])
    return task, qmodel


def pot_plan(task: tasks.Task, qmodel: torch.nn.Module, cand: str = "wpot4-a8") -> Plan:
    spec = parse_candidate(cand)
    return Plan({n: spec for n in mixq.sites(qmodel)}, {"task": task.name})


# -- the registry ------------------------------------------------------------------------------


def test_builtin_kinds_answer_for_their_specs() -> None:
    names = {
        c: kind_of(parse_candidate(c).weight or parse_candidate(c).act).name
        for c in ("w4", "wfp8_e4m3fn", "wmxfp4_e2m1", "a8", "asparq4_5opt")
    }
    assert names == {
        "w4": "integer",
        "wfp8_e4m3fn": "minifloat",
        "wmxfp4_e2m1": "mx",
        "a8": "integer",
        "asparq4_5opt": "sparq",
    }
    assert kind_of(QSpec(formats.Int(4), points=(1, 2))).name == "multipoint"
    assert doctest.testmod(kinds).failed == 0


def test_unknown_names_and_kinds_raise_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown format 'pot4'.*valid names: int2"):
        formats.parse("pot4")
    with pytest.raises(TypeError, match="no format kind.*kinds: \\['integer'"):
        QSpec(Pot(4))
    with pytest.raises(TypeError, match="expected a mixq.kinds.Kind"):
        kinds.register(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name 'int4' is taken"):
        formats.register(_Named("int4"))


def test_registered_names_parse_and_leave_again(pot: PotKind) -> None:
    spec = parse_candidate("wpot4-a8")
    assert spec.weight == QSpec(Pot(4)) and spec.name == "wpot4-a8" and kind_of(spec.weight) is pot
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="per channel and min/max"):
        parse_candidate("wpot4+tensor")
    with pytest.raises(ValueError, match="asymmetric ranges need an integer format"):
        parse_candidate("wpot4+asym")
    kinds.unregister(pot)
    formats.unregister(Pot(4))
    with pytest.raises(ValueError, match="'pot4' after 'w' is not a format"):
        parse_candidate("wpot4-a8")
    formats.register(Pot(4))
    kinds.register(pot)


# -- the toy kind through cost, apply, packed files and ONNX ------------------------------------


def test_toy_kind_cost(pot: PotKind) -> None:
    info = LayerInfo("fc", "linear", (4, 256), 4, 1024.0)
    spec = parse_candidate("wpot4-a8")
    assert cost.weight_bits(info, spec.weight) == 4 * 256 * 4 + 4 * 32
    assert cost.layer_costs(info, spec) == {
        "weight_bits": 4224.0,
        "size_bits": 4224.0 + 4 * 32 + 32 + 8,
        "bops": 1024.0 * 4 * 8,
    }
    table = cost.cost_table([info], [spec, parse_candidate("w4a8")])
    assert table["weight_bits"][0].tolist() == [4224.0, 4224.0]


def test_toy_kind_apply_fake_quantizes_with_a_straight_through_gradient(pot: PotKind, cnn) -> None:
    task, qmodel = cnn
    mixq.apply(qmodel, pot_plan(task, qmodel))
    for m in mixq.sites(qmodel).values():
        wq = m.weight_quant(m.weight)
        codes, s = pot_encode(m.weight)
        assert torch.equal(wq, pot_decode(codes, s))
        ratio = (wq / s.reshape(-1, *[1] * (wq.dim() - 1))).abs()
        assert set(ratio.unique().tolist()) <= {0.0, *(2.0**-k for k in range(7))}
    x = torch.cat([b[0] for b in task.val])[:8]
    qmodel(x).sum().backward()
    assert all(m.weight.grad is not None for m in mixq.sites(qmodel).values())
    qmodel.zero_grad()


def test_toy_kind_packed_round_trip_is_bit_exact(pot: PotKind, cnn, tmp_path) -> None:
    task, qmodel = cnn
    plan = pot_plan(task, qmodel)
    mixq.apply(qmodel, plan)
    res = mixq.Result(plan, qmodel, {})
    path = export.save(res, tmp_path / "m.safetensors")
    loaded = export.load(path, model=task.model)
    x = torch.cat([b[0] for b in task.val])[:64]
    with torch.no_grad():
        a, b = loaded(x), qmodel(x)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    _, layers, _ = export.read_safetensors(path)
    assert {lx.weight.spec.fmt for lx in layers.values()} == {Pot(4)}


def test_toy_kind_onnx_matches_the_simulation_in_onnx_runtime(pot: PotKind, cnn, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    task, qmodel = cnn
    plan = pot_plan(task, qmodel)
    mixq.apply(qmodel, plan)
    path = export.save(mixq.Result(plan, qmodel, {}), tmp_path / "m.onnx", format="onnx", task=task)
    graph = onnx.load(str(path)).graph
    assert "Gather" in {n.op_type for n in graph.node} and not any(n.domain == "mixq" for n in graph.node)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        sim = qmodel(x).numpy()
    out = session.run(None, {"input": x.numpy()})[0]
    diff, scale = abs(out - sim), abs(sim).max()
    # float summation order differs; a value on a later quantizer's rounding boundary may move a step
    assert (diff <= 1e-5 * scale).mean() >= 0.99 and diff.max() <= 0.02 * scale
    assert (out.argmax(1) == sim.argmax(1)).all()


def test_toy_kind_through_mixq_run(pot: PotKind, tmp_path) -> None:
    res = mixq.run("synthetic-mlp", candidates=["wpot4-a8", "w8a8"], budget={"avg_weight_bits": 5})
    assert "pot" in {kind_of(s.weight).name for s in res.plan.layers.values() if s.weight is not None}
    assert res.metrics.avg_weight_bits <= 5
    path = export.save(res, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    payload = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert payload == pytest.approx(res.metrics.size_bytes, rel=0.01)


# -- the site's public methods ------------------------------------------------------------------


def test_site_state_changes_through_public_methods_only(cnn) -> None:
    task, qmodel = cnn
    name, m = next(iter(mixq.sites(qmodel).items()))
    assert m.weight_quant.gram is None  # calibrated without Gram matrices
    with recording_grams(qmodel, [name]) as grams, torch.no_grad():
        for x, _ in task.calib[:2]:
            qmodel(x)
    assert torch.equal(m.weight_quant.gram, grams[name]) and grams[name].dtype == torch.float64
    mixq.apply(qmodel, Plan({name: parse_candidate("w4+omse-a8")}))
    spec = m.weight_quant.spec
    assert torch.equal(m.weight_quant(m.weight), fake.quantize_weight(m.weight, spec, grams[name].float()))
    x = torch.cat([b[0] for b in task.val])[:8]
    before = m.input_quant(x)
    lo, hi = m.input_quant.stats_min, m.input_quant.stats_max
    m.input_quant.set_range(lo * 2, hi * 2)  # drops the cached parameters
    assert not torch.equal(m.input_quant(x), before)
    m.input_quant.set_range(lo, hi)
    assert torch.equal(m.input_quant(x), before)
