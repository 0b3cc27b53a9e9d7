"""Batch-norm folding: the folded float model computes what the original computes."""

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq import export, zoo
from mixq.fold import FoldedNorm, fold_batchnorm, fold_model


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.bn2(self.dw(y))
        return self.bn3(self.fc(y.mean((2, 3))))


@pytest.mark.parametrize(
    ("make", "n_pairs"),
    [
        (Residual, 3),
        (
            lambda: nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 6 * 6, 3),
                nn.BatchNorm1d(3),
            ),
            2,
        ),
    ],
)
def test_folded_model_equals_original(make, n_pairs: int) -> None:
    torch.manual_seed(0)
    model = make().eval()
    _randomize_bn(model)
    x = torch.randn(16, 3, 8, 8)
    ref = model(x)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded)
    assert len(pairs) == n_pairs
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_bn_after_shared_input_is_not_folded() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used twice: folding would change it

    model = Branch().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    assert fold_batchnorm(model) == []
    torch.testing.assert_close(model(x), ref)


def test_training_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))


# -- any model: subclasses, Conv1d, models fx cannot trace, the check, the run ----------------


class SameConv(nn.Conv2d):
    """A conv subclass with its own "same"-padding forward (as model libraries ship them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class NoBiasConv(nn.Conv2d):
    """A subclass whose forward ignores the bias: folding a BN into it cannot keep the function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, padding=1)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = SameConv(3, 6, 3, bias=False)
        self.bn_same = nn.BatchNorm2d(6)
        self.nobias = NoBiasConv(6, 6, 3, bias=False)
        self.bn_nobias = nn.BatchNorm2d(6)
        self.c1d = nn.Conv1d(6, 4, 3, padding=1)
        self.bn_1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 16, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_nobias(self.nobias(torch.relu(self.bn_same(self.same(x))))))
        y = torch.relu(self.bn_1d(self.c1d(y.flatten(2))))  # [N, 6, 16]
        return self.bn_fc(self.fc(y.flatten(1)))


class Untraceable(Mixed):
    """The same model with data-dependent control flow (fx cannot trace it) and a shared input."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(3, 6, 1)
        self.bn_side = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) > 0:  # data-dependent: fx raises
            x = x * 1.0
        side = self.side(x)
        return super().forward(x) + (self.bn_side(side) + side).mean()  # side is used twice


def _mixed(cls: type) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    _randomize_bn(model)
    return model


@pytest.mark.parametrize(("cls", "traced"), [(Mixed, "fx"), (Untraceable, "forward")])
def test_fold_model_finds_subclasses_conv1d_and_checks_the_outputs(cls: type, traced: str) -> None:
    model = _mixed(cls)
    x = torch.randn(8, 3, 4, 4)
    ref = model(x)
    rec = fold_model(model, lambda m: m(x))
    assert rec["traced"] == traced
    assert rec["folded"] == [["same", "bn_same"], ["c1d", "bn_1d"], ["fc", "bn_fc"]]
    assert rec["kept"]["bn_nobias"].startswith("folding into nobias changed the outputs")
    if cls is Untraceable:
        assert rec["kept"]["bn_side"] == "not after a conv or linear layer whose output only it uses"
    assert set(rec["kept"]) == {"bn_nobias"} | ({"bn_side"} if cls is Untraceable else set())
    assert isinstance(model.bn_same, nn.Identity) and isinstance(model.bn_nobias, nn.BatchNorm2d)
    assert rec["max_abs_diff"] < 1e-4
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    json.dumps(rec)


def test_untraceable_model_without_an_example_keeps_its_batch_norm(caplog) -> None:
    model = _mixed(Untraceable)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="mixq.fold"):
        rec = fold_model(model)
    assert rec["folded"] == [] and rec["traced"] is None
    assert set(rec["kept"]) == {"bn_same", "bn_nobias", "bn_1d", "bn_fc", "bn_side"}
    assert rec["kept"]["bn_fc"] == "not traceable by torch.fx (TypeError) and no example batch"
    assert "batch norm not folded (5 modules kept)" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_shared_norm_or_layer_is_not_folded() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
            self.bn, self.bn_c = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.a(x)) + self.bn(self.b(x))  # one norm after two layers
            return self.bn_c(self.c(y)) + self.c(x)  # c is called twice

    model = _mixed(Shared)
    x = torch.randn(2, 2, 3, 3)
    for example in (None, lambda m: m(x)):
        rec = fold_model(copy.deepcopy(model), example)
        assert rec["folded"] == [] and set(rec["kept"]) == {"bn", "bn_c"}


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SameConv(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # fx: comparing a Proxy is fine, but the next line is not
            return x
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(y) if float(y.sum()) == float(y.sum()) else y  # data-dependent branch


@pytest.mark.parametrize("fold_bn", [True, False])
def test_run_folds_on_its_copy_and_records_it(fold_bn: bool) -> None:
    model = _mixed(BNNet)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)
    ]
    task = mixq.Task(model, calib=data[:1], val=data[1:], name="bn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = mixq.run(task, candidates=["float"], fold_bn=fold_bn)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the user's model
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert res.metrics.metric == pytest.approx(res.metrics.fp_metric)
    if fold_bn:
        rec = res.metrics.extra["fold_bn"]
        assert rec["folded"] == [["conv", "bn"]] and rec["kept"] == {} and rec["traced"] == "forward"
        assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
        plan_eval = mixq.evaluate(task, res.plan)
        assert plan_eval.metrics.metric == res.metrics.metric
    else:
        assert "fold_bn" not in res.metrics.extra
        assert any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    with pytest.raises(ValueError, match="fold_bn must be bool, got 'no'"):
        mixq.run(task, candidates=["float"], fold_bn="no")


def test_folding_a_folded_model_changes_nothing() -> None:
    model = zoo.load("fashion-mobilenetv2").eval()
    x = torch.randn(2, 1, 28, 28)
    first = fold_model(model, lambda m: m(x))
    assert len(first["folded"]) == 28 and first["kept"] == {} and first["traced"] == "fx"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fold_model(model, lambda m: m(x)) == {
        "folded": [],
        "kept": {},
        "traced": None,
        "max_abs_diff": None,
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_folded_run_exports_and_loads_into_the_users_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    model = model.eval()
    _randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)
    ]
    res = mixq.run(mixq.Task(model, calib=data[:1], val=data[1:], name="bn"), candidates=["w4a8"])
    assert res.metrics.extra["fold_bn"]["folded"] == [["0", "1"]]
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"), model)
    assert isinstance(loaded[1], FoldedNorm) and isinstance(model[1], nn.BatchNorm2d)
    x = data[1][0]
    assert torch.equal(loaded(x), res.model(x))


def test_a_bf16_model_is_folded_within_its_own_tolerance() -> None:
    model = _mixed(Residual).to(torch.bfloat16)
    x = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16)
    ref = model(x)
    rec = fold_model(model, lambda m: m(x))
    assert len(rec["folded"]) == 3 and rec["kept"] == {}
    assert model.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


def _bn_task(outputs: str = "auto") -> mixq.Task:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    _randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)
    ]
    return mixq.Task(model, calib=data[:1], val=data[1:], name="bn", outputs=outputs)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_a_plan_measures_again_as_its_run_folded(tmp_path, fold_bn: bool) -> None:
    task, d = _bn_task(), tmp_path / "run"
    res = mixq.run(task, "uniform", ["w3+tensor"], out=d, fold_bn=fold_bn)
    assert res.plan.meta["fold_bn"] is fold_bn
    again = mixq.evaluate(task, mixq.Plan.load(d / "plan.json"))  # as the run folded, by its plan
    assert (again.metrics.metric, again.metrics.size_bytes) == (res.metrics.metric, res.metrics.size_bytes)
    other = mixq.evaluate(task, res.plan, fold_bn=not fold_bn)  # the other model: another size
    assert other.metrics.size_bytes != res.metrics.size_bytes
    rebuilt, _ = export.rebuild(d, task=task)  # the file's costs, on the model the run quantized
    assert (rebuilt.metrics.metric, rebuilt.metrics.size_bytes) == (
        res.metrics.metric,
        res.metrics.size_bytes,
    )


def test_the_task_outputs_key_the_run_directory(tmp_path) -> None:
    d = tmp_path / "run"
    mixq.run(_bn_task("logits"), "uniform", ["w4"], out=d)
    with pytest.raises(ValueError, match="outputs: 'logits' there, 'values' here"):
        mixq.run(_bn_task("values"), "uniform", ["w4"], out=d)


def test_the_command_line_keeps_batch_norm_on_request(tmp_path, monkeypatch) -> None:
    from mixq import cli

    monkeypatch.setattr(mixq.tasks, "TASKS", {**mixq.tasks.TASKS, "bn-test": _bn_task})
    for flag, folded in (([], True), (["--no-fold-bn"], False)):
        d = tmp_path / f"run{len(flag)}"
        args = ["run", "--task", "bn-test", "--candidates", "w4", "--out", str(d), *flag]
        assert cli.main(args) == 0
        assert mixq.Plan.load(d / "plan.json").meta["fold_bn"] is folded
        assert ("fold_bn" in json.loads((d / "metrics.json").read_text())) is folded
