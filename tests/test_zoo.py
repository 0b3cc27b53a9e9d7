"""Tests of the benchmark model zoo ``mixq.zoo`` and its training script ``bench/train_zoo.py``."""

from __future__ import annotations

import importlib.util
import json
import operator
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import fx, nn

from mixq import zoo
from mixq.nn import Add

ROOT = Path(__file__).resolve().parent.parent
# name -> (exact parameter count, documented range)
PARAMS = {
    "fashion-resnet20": (272_186, (260_000, 285_000)),
    "fashion-mobilenetv2": (237_738, (200_000, 600_000)),
}
WEIGHTED = (nn.Conv2d, nn.Linear)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run these small models on one thread: faster than two on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_script() -> ModuleType:
    """Import the training script ``bench.train_zoo``."""
    return importlib.import_module("bench.train_zoo")


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_build_forward_and_params(name: str) -> None:
    model = zoo.build(name)
    exact, (low, high) = PARAMS[name]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == exact and low <= n_params <= high
    for mode in (True, False):
        model.train(mode)
        out = model(torch.randn(3, 1, 28, 28))
        assert out.shape == (3, 10) and out.dtype == torch.float32
    assert 1e6 < zoo.count_macs(model) < 40e6


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_every_layer_is_its_own_module_called_once(name: str) -> None:
    model = zoo.build(name).eval()
    all_uses = list(model.named_modules(remove_duplicate=False))
    assert len(all_uses) == len(list(model.named_modules())), "a module instance is shared"
    graph = fx.symbolic_trace(model).graph
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert len(called) == len(set(called)), "a module is called twice"
    functions = {n.target for n in graph.nodes if n.op in ("call_function", "call_method")}
    assert functions <= {operator.add}, f"functional ops besides the residual add: {functions}"
    # fx traces through mixq.nn.Add (not a torch.nn leaf): its sum is the operator.add above
    adds = {n for n, m in model.named_modules() if isinstance(m, Add)}
    leaves = {n for n, m in model.named_modules() if not list(m.children())}
    unused = leaves - set(called) - adds
    assert not unused, f"modules never called: {unused}"
    n_adds = sum(1 for n in graph.nodes if n.op == "call_function" and n.target is operator.add)
    assert n_adds == len(adds), "every residual addition is an Add module, used once"


def test_resnet20_structure() -> None:
    model = zoo.ResNet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21 and sum(c.kernel_size == (1, 1) for c in convs) == 2
    assert all(c.bias is None for c in convs)
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 21
    assert len([m for m in model.modules() if isinstance(m, zoo.BasicBlock)]) == 9
    assert model.fc.in_features == 64 and model.fc.out_features == 10


def test_mobilenetv2_structure() -> None:
    model = zoo.MobileNetV2()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 9
    for c in depthwise:
        assert c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3)
    blocks = [m for m in model.modules() if isinstance(m, zoo.InvertedResidual)]
    assert len(blocks) == 9 and sum(b.use_residual for b in blocks) == 5
    assert len([m for m in model.modules() if isinstance(m, nn.ReLU6)]) == 2 + 2 * 9 - 1
    # linear bottleneck: each block ends with BN, not an activation
    assert all(isinstance(b.body[-1], nn.BatchNorm2d) for b in blocks)
    assert len(zoo.MobileNetV2(width=0.5).fc.weight[0]) < len(model.fc.weight[0])


def test_unknown_name_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fashion-resnet20"):
        zoo.load("resnet-1000")
    with pytest.raises(FileNotFoundError, match="train_zoo.py"):
        zoo.load("fashion-resnet20", folder=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_trained_weights_match_record(name: str) -> None:
    path = zoo.weights_path(name)
    if not path.exists():
        pytest.skip(f"{path} not trained yet (bench/train_zoo.py)")
    from mixq.datasets import fashion_mnist

    try:
        x, y = fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    record = json.loads(path.with_suffix(".json").read_text())
    model = zoo.load(name)
    assert not model.training
    assert record["params"] == sum(p.numel() for p in model.parameters())
    assert record["model"] == name and record["epochs"] == len(record["history"])
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, 1000, 500)])
    acc = 100.0 * (pred == y[:1000]).float().mean().item()
    assert abs(acc - record["acc_first1000"]) <= 0.2
    assert record["final_test_acc"] >= 85.0


def test_augment_is_a_shifted_or_flipped_crop() -> None:
    tz = train_script()
    x = torch.randn(16, 1, 28, 28)
    out = tz.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2), value=-tz.FASHION_MEAN / tz.FASHION_STD)
    for i in range(16):
        crops = [padded[i, :, a : a + 28, b : b + 28] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    same = tz.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    tz = train_script()
    f = [tz.lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False)) and f[-1] < 0.01


def test_train_script_writes_loadable_weights_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tz = train_script()
    g = torch.Generator().manual_seed(0)
    data = {
        "x_train": torch.randn(64, 1, 28, 28, generator=g),
        "y_train": torch.randint(0, 10, (64,), generator=g),
        "x_test": torch.randn(32, 1, 28, 28, generator=g),
        "y_test": torch.randint(0, 10, (32,), generator=g),
    }
    name = "fashion-resnet20"

    def run(folder: Path, *extra: str) -> dict:
        argv = ["--model", name, "--epochs", "2", "--batch-size", "32", "--out", str(folder)]
        args = tz.parse_args([*argv, "--ckpt-dir", str(folder / "ckpt"), *extra])
        return tz.train_one(name, args, data)

    record = run(tmp_path / "a")
    assert (tmp_path / "a" / "ckpt" / ".gitignore").read_text().strip().endswith("*")
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    model = zoo.load(name, folder=tmp_path / "a")
    acc = tz.accuracy(model, data["x_test"], data["y_test"])
    assert record["acc_first1000"] == pytest.approx(acc, abs=0.2)

    # interrupt after the first epoch's checkpoint, then resume: same weights as uninterrupted
    save = tz.save_atomic

    def save_then_stop(obj: dict, path: Path) -> None:
        save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(tz, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(tz, "save_atomic", save)
    resumed = run(tmp_path / "b", "--resume")
    assert len(resumed["sessions"]) == 2 and resumed["sessions"][1]["start_epoch"] == 1
    a = zoo.load(name, folder=tmp_path / "a").state_dict()
    b = zoo.load(name, folder=tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
