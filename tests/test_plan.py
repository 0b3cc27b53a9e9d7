"""Test mixq.plan: the candidate grammar (parse <-> name), QSpec checks, strict plan JSON."""

import doctest
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mixq.plan
from mixq import formats
from mixq.formats import Fp, Int, Mx
from mixq.plan import FLOAT, GRAMMAR, LayerSpec, Plan, QSpec, parse_candidate

FP_FORMATS = [Fp(4, 3), Fp(5, 2), Fp(3, 2), Fp(2, 3), Fp(2, 1)]

NAMES = [
    "w2",
    "w3",
    "w4",
    "w5",
    "w6",
    "w7",
    "w8",
    "a8",
    "w4a8",
    "w4g128",
    "w4g128a8",
    "w2+asym+mse-a8",
    "w2+asym+omse",
    "wfp8_e4m3fn-afp8_e4m3fn",
    "wmxfp4_e2m1",
    "w8+tensor",
    "w4+p99.9",
    "wuint4+asym",
    "w4+asym+p99.9-a8+p99",
    "a8+sym",
    "a8+mse",
    "wuint8",
    "w3g7+asym+mse",
    "wmxfp4_e2m1-amxfp4_e2m1",
    "wmxint8_b16",
    "w4+asym+tensor-a4+sym+p99.5",
    "afp4_e2m1",
]


@pytest.mark.parametrize("name", NAMES + [f"w{n}" for n in formats.FORMAT_NAMES])
def test_name_round_trip(name):
    spec = parse_candidate(name)
    assert parse_candidate(spec.name) == spec
    assert parse_candidate(spec.name).name == spec.name


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("wmxint8_b")] + ["w4", "float"])
def test_canonical_names_are_fixed_points(name):
    assert parse_candidate(name).name == name


@pytest.mark.parametrize("name", formats.FORMAT_NAMES)
def test_every_format_as_weight_and_activation(name):
    fmt = formats.parse(name)
    w = parse_candidate(f"w{name}").weight
    assert w.fmt == fmt
    assert w.granularity == ("block" if isinstance(fmt, Mx) else "channel")
    assert w.symmetric and w.clip == "minmax"
    a = parse_candidate(f"a{name}").act
    assert a.fmt == fmt
    assert a.granularity == ("block" if isinstance(fmt, Mx) else "tensor")
    # activations default to asymmetric ranges, which only integer formats have
    assert a.symmetric == (not isinstance(fmt, Int))


def test_parsed_fields():
    s = parse_candidate("w2+asym+mse-a8")
    assert s.weight == QSpec(Int(2), "channel", None, False, "mse")
    assert s.act == QSpec(Int(8), "tensor", None, False, "minmax")
    assert parse_candidate("w4g128").weight == QSpec(Int(4), "group", 128)
    assert parse_candidate("w8+tensor").weight.granularity == "tensor"
    p = parse_candidate("w4+p99.9").weight
    assert (p.clip, p.percentile) == ("percentile", 99.9)
    assert parse_candidate("wuint4+asym").weight == QSpec(Int(4, signed=False), symmetric=False)
    assert parse_candidate("w2+asym+omse").weight.clip == "omse"
    fp = parse_candidate("wfp8_e4m3fn-afp8_e4m3fn")
    assert fp.weight == QSpec(Fp(4, 3)) and fp.act == QSpec(Fp(4, 3), "tensor")
    assert parse_candidate("wmxfp4_e2m1").weight == QSpec(Mx(Fp(2, 1)), "block")
    assert parse_candidate("a8").weight is None and parse_candidate("w8").act is None
    assert parse_candidate("float") == FLOAT == LayerSpec()
    assert parse_candidate(" w4a8 ") == parse_candidate("w4a8")
    assert parse_candidate("w4-a8") == parse_candidate("w4a8")


# -- hypothesis: every valid spec has a name that parses back to it ------------------------------

MX_FORMATS = [Mx(e, b) for e in [*FP_FORMATS, Int(8)] for b in (32, 16, 64)]
percentiles = st.floats(min_value=50.0, max_value=100.0, exclude_min=True, allow_nan=False)


@st.composite
def qspecs(draw, act: bool):
    fmt = draw(
        st.one_of(
            st.builds(Int, st.integers(2, 8), st.booleans()),
            st.sampled_from(FP_FORMATS),
            st.sampled_from(MX_FORMATS),
        )
    )
    group_size = None
    if isinstance(fmt, Mx):
        granularity = "block"
    elif act:
        granularity = "tensor"
    else:
        granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
        if granularity == "group":
            group_size = draw(st.integers(1, 512))
    symmetric = draw(st.booleans()) if isinstance(fmt, Int) else True
    clip = draw(st.sampled_from(["minmax", "mse", "percentile"] + ([] if act else ["omse"])))
    pct = draw(percentiles) if clip == "percentile" else 99.99
    return QSpec(fmt, granularity, group_size, symmetric, clip, pct)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.none(), qspecs(act=False)), st.one_of(st.none(), qspecs(act=True)))
def test_random_specs_round_trip(weight, act):
    spec = LayerSpec(weight, act)
    name = spec.name
    assert parse_candidate(name) == spec, name
    # the JSON form round-trips too
    assert LayerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# -- bad names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, named",
    [
        ("w9", "9"),
        ("w1", "1"),
        ("w0", "0"),
        ("w16a8", "16"),
        ("w4a9", "9"),
        ("x4", "x4"),
        ("w4q", "w4q"),
        ("w4+foo", "foo"),
        ("", "''"),
        ("   ", "'   '"),
        ("a8+omse", "omse"),
        ("wfp8_e4m3fn+asym", "asym"),
        ("a8+channel", "a8+channel"),
        ("wmxfp4_e2m1g32", "g32"),
        ("wmxfp4_e2m1+tensor", "tensor"),
        ("w4g0", "g0"),
        ("w4+p40", "p40"),
        ("w4+p100.5", "p100.5"),
        ("wint4_b16", "int4_b16"),
        ("-a8", "-a8"),
        ("w4a8a8", "w4a8a8"),
    ],
)
def test_bad_names_raise_naming_value_and_grammar(bad, named):
    with pytest.raises(ValueError) as e:
        parse_candidate(bad)
    msg = str(e.value)
    assert repr(bad) in msg, msg  # the whole candidate is quoted
    assert named.strip("'") in msg or named in msg, msg
    # the rule it broke, not the whole grammar (that stays in `mixq list`)
    assert GRAMMAR not in msg and "`mixq list`" in msg and len(msg) < 320, msg


@pytest.mark.parametrize(
    "bad, token, rule",
    [
        ("wfp5", "'fp5'", "is not a format; a format is a bit count 2..8 or a format name"),
        ("w4g-1", "'g-1'", "a group size after 'g' is a positive integer"),
        ("W4A8", "'W4A8'", "names are lower case (did you mean 'w4a8'?)"),
        ("w4a8x", "'x' after 'w4a8'", "a candidate ends there"),
        ("q4", "'q'", "a candidate starts with 'w' (weights) or 'a'"),
        ("w4+", "'+'", "a modifier follows '+'"),
        ("w4+foo-a8", "'foo'", "unknown modifier"),
        ("w4-a", "after 'w4-a'", "no format"),
        ("wint4_b16", "'int4_b16'", "is not a format"),
    ],
)
def test_bad_names_quote_the_token_and_the_rule_it_broke(bad, token, rule):
    with pytest.raises(ValueError) as e:
        parse_candidate(bad)
    msg = str(e.value)
    assert msg.startswith(f"candidate {bad!r}: ") and token in msg and rule in msg, msg
    assert len(msg.splitlines()) == 1


def test_bits_out_of_range_names_valid_range():
    for bits in (0, 1, 9, 10, 32):
        with pytest.raises(ValueError, match=r"2\.\.8"):
            parse_candidate(f"w{bits}")
    with pytest.raises(ValueError):
        Int(9)
    assert [parse_candidate(f"w{b}").weight.fmt.bits for b in range(2, 9)] == list(range(2, 9))


def test_non_string_candidate():
    with pytest.raises(ValueError, match="string"):
        parse_candidate(4)  # type: ignore[arg-type]


# -- QSpec checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fmt": Int(4), "granularity": "row"}, "granularity"),
        ({"fmt": Int(4), "clip": "max"}, "clip"),
        ({"fmt": Int(4), "granularity": "group"}, "group_size"),
        ({"fmt": Int(4), "group_size": 32}, "group_size"),
        ({"fmt": Int(4), "granularity": "group", "group_size": 0}, "positive"),
        ({"fmt": Int(4), "granularity": "block"}, "block"),
        ({"fmt": Mx(Fp(2, 1))}, "block"),
        ({"fmt": Fp(4, 3), "symmetric": False}, "integer"),
        ({"fmt": Int(4), "percentile": 50.0}, "percentile"),
        ({"fmt": Int(4), "percentile": 100.01}, "percentile"),
    ],
)
def test_qspec_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSpec(**kwargs)


def test_qspec_bits():
    assert parse_candidate("w3").weight.bits == 3
    assert parse_candidate("wmxfp4_e2m1").weight.bits == 4
    assert parse_candidate("wfp8_e5m2").weight.bits == 8


# -- plans -------------------------------------------------------------------------------------


def example_plan() -> Plan:
    return Plan(
        {
            "features.0": parse_candidate("w4a8"),
            "features.3": parse_candidate("w2+asym+omse-a8+p99.9"),
            "head": parse_candidate("wmxfp4_e2m1"),
            "block.fc": parse_candidate("w4g128+asym"),
            "fp8": parse_candidate("wfp8_e4m3fn-afp8_e5m2"),
            "act_only": parse_candidate("a8"),
        },
        {"task": "x", "budget": {"avg_weight_bits": 4.0}},
    )


def test_plan_save_load_round_trip(tmp_path):
    plan = example_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert list(loaded.layers) == list(plan.layers)
    assert json.loads(path.read_text())["schema"] == 1
    assert Plan.load(path, layer_names=[*plan.layers, "other"]) == plan
    assert loaded.summary() == {
        "w4a8": 1,
        "w2+asym+omse-a8+p99.9": 1,
        "wmxfp4_e2m1": 1,
        "w4g128+asym": 1,
        "wfp8_e4m3fn-afp8_e5m2": 1,
        "a8": 1,
    }


def test_plan_load_corrupt_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema": 1, "layers": {')
    with pytest.raises(ValueError, match="broken.json"):
        Plan.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="broken.json"):
        Plan.load(path)


def write(tmp_path, d) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    return str(path)


def good_dict() -> dict:
    return example_plan().to_dict()


def test_plan_load_rejects_unknown_top_level_key(tmp_path):
    d = good_dict() | {"layer": {}}
    with pytest.raises(ValueError, match=r"plan\.json.*'layer'.*layers, meta, schema"):
        Plan.load(write(tmp_path, d))


def test_plan_load_rejects_unknown_spec_keys(tmp_path):
    d = good_dict()
    d["layers"]["head"]["weight"]["bitz"] = 4
    with pytest.raises(ValueError, match="'bitz'") as e:
        Plan.load(write(tmp_path, d))
    assert "group_size" in str(e.value)  # lists the valid keys
    d = good_dict()
    d["layers"]["head"]["activation"] = None
    with pytest.raises(ValueError, match="'activation'.*'act', 'weight'"):
        Plan.load(write(tmp_path, d))


def test_plan_load_rejects_unknown_format(tmp_path):
    d = good_dict()
    d["layers"]["head"]["weight"]["fmt"] = "int12"
    with pytest.raises(ValueError, match="'int12'.*fp8_e4m3fn"):
        Plan.load(write(tmp_path, d))


@pytest.mark.parametrize(
    "key, value",
    [("fmt", 4), ("symmetric", "false"), ("group_size", "128"), ("granularity", 3), ("clip", None)],
)
def test_plan_load_rejects_wrongly_typed_spec_values(tmp_path, key, value):
    d = good_dict()
    d["layers"]["block.fc"]["weight"][key] = value
    with pytest.raises(ValueError, match=key):
        Plan.load(write(tmp_path, d))


@pytest.mark.parametrize("schema", [2, 0, None, "1"])
def test_plan_load_rejects_wrong_schema(tmp_path, schema):
    d = good_dict()
    d["schema"] = schema
    with pytest.raises(ValueError, match="schema"):
        Plan.load(write(tmp_path, d))
    del d["schema"]
    with pytest.raises(ValueError, match="schema"):
        Plan.load(write(tmp_path, d))


@pytest.mark.parametrize("d", [[], "plan", {"schema": 1}, {"schema": 1, "layers": []}])
def test_plan_load_rejects_bad_structure(tmp_path, d):
    with pytest.raises(ValueError, match="plan.json"):
        Plan.load(write(tmp_path, d))


def test_plan_load_rejects_non_object_meta(tmp_path):
    d = good_dict()
    d["meta"] = [1, 2]
    with pytest.raises(ValueError, match="meta"):
        Plan.load(write(tmp_path, d))


def test_plan_load_rejects_layers_not_in_model(tmp_path):
    path = write(tmp_path, good_dict())
    valid = ["features.0", "features.3", "head", "block.fc", "fp8"]
    with pytest.raises(ValueError) as e:
        Plan.load(path, layer_names=valid)
    msg = str(e.value)
    assert "act_only" in msg
    for name in valid:
        assert name in msg
    example_plan().check_layers([*valid, "act_only"])
    with pytest.raises(ValueError, match="act_only"):
        example_plan().check_layers(valid)


def test_plan_float_layers_are_null(tmp_path):
    plan = Plan({"a": FLOAT, "b": parse_candidate("w8")})
    d = plan.to_dict()
    assert d["layers"]["a"] == {"weight": None, "act": None}
    assert Plan.from_dict(d) == plan


def test_doctests():
    assert doctest.testmod(mixq.plan).failed == 0
