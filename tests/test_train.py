"""The shared QAT loop: schedule, hook, batch norm, checkpoints and resuming."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixq.train import CHECKPOINT, TrainConfig, batch_order, lr_factor, train


def regression_batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, x @ w))
    return out


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    total, warm = 20, 4
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    for s in range(warm, total):
        assert f[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))


def test_training_lowers_the_loss_and_records_history():
    model, batches = make_model(), regression_batches()
    with torch.no_grad():
        before = sum(float(mse(model.eval(), b)) for b in batches)
    res = train(
        model, mse, batches, [{"params": model.parameters(), "lr": 0.02}], TrainConfig(epochs=5, log_every=5)
    )
    with torch.no_grad():
        after = sum(float(mse(model.eval(), b)) for b in batches)
    assert res.steps == 30 and res.resumed_from == 0
    assert after < 0.5 * before
    assert [h["step"] for h in res.history] == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]


def test_steps_override_epochs_and_fractional_epochs_round_up():
    assert TrainConfig(steps=7, epochs=3).total_steps(10) == 7
    assert TrainConfig(epochs=0.25).total_steps(10) == 3


def test_hook_runs_before_each_forward_and_its_term_is_trained():
    model, batches = make_model(), regression_batches()
    seen = []
    target = nn.Parameter(torch.tensor(3.0))

    def hook(step: int, m: nn.Module) -> torch.Tensor:
        seen.append(step)
        return target**2

    res = train(
        model,
        mse,
        batches,
        [{"params": model.parameters(), "lr": 0.01}, {"params": [target], "lr": 0.1}],
        TrainConfig(steps=12, warmup=0.0, log_every=4),
        hook=hook,
    )
    assert seen == list(range(12))
    assert abs(float(target.detach())) < 3.0
    assert all("extra" in h for h in res.history)


@pytest.mark.parametrize("bn, changes", [("freeze", False), ("train", True)])
def test_batch_norm_frozen_or_trained(bn, changes):
    model, batches = make_model(), regression_batches()
    before = model[1].running_mean.clone()
    train(model, mse, batches, [{"params": model.parameters(), "lr": 0.01}], TrainConfig(steps=3, bn=bn))
    assert (not torch.equal(model[1].running_mean, before)) == changes
    assert not model.training  # left in eval mode


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    batches = regression_batches()
    cfg = TrainConfig(epochs=3, optimizer="sgd", log_every=1)

    straight = make_model()
    train(straight, mse, batches, [{"params": straight.parameters(), "lr": 0.05}], cfg)

    class Stop(Exception):
        pass

    def crash(step: int, m: nn.Module) -> None:
        if step == 8:  # in the middle of the second epoch: the first epoch's checkpoint is on disk
            raise Stop

    model = make_model()
    with pytest.raises(Stop):
        train(
            model,
            mse,
            batches,
            [{"params": model.parameters(), "lr": 0.05}],
            cfg,
            hook=crash,
            checkpoint_dir=tmp_path,
        )
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert int(state["step"]) == 6
    resumed = make_model()
    res = train(
        resumed, mse, batches, [{"params": resumed.parameters(), "lr": 0.05}], cfg, checkpoint_dir=tmp_path
    )
    assert res.resumed_from == 6 and res.steps == 18
    assert len(res.history) == 18
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_another_length_is_refused(tmp_path):
    model, batches = make_model(), regression_batches()
    train(
        model,
        mse,
        batches,
        [{"params": model.parameters(), "lr": 0.01}],
        TrainConfig(steps=2),
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="is for 2 steps, this run has 3"):
        train(
            model,
            mse,
            batches,
            [{"params": model.parameters(), "lr": 0.01}],
            TrainConfig(steps=3),
            checkpoint_dir=tmp_path,
        )


def test_batch_order_is_a_fixed_permutation_per_epoch():
    assert sorted(batch_order(10, 0, 0)) == list(range(10))
    assert batch_order(10, 1, 0) == batch_order(10, 1, 0)
    assert batch_order(10, 0, 0) != batch_order(10, 1, 0)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="optimizer 'lamb'.*adam, sgd"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="bn mode 'update'.*freeze, train"):
        TrainConfig(bn="update")
    with pytest.raises(ValueError, match="steps > 0 or epochs > 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=1.0)
    model = make_model()
    with pytest.raises(ValueError, match="'params' and 'lr'"):
        train(model, mse, regression_batches(), [{"params": model.parameters()}], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="no training batches"):
        train(model, mse, [], [{"params": model.parameters(), "lr": 0.1}], TrainConfig(steps=1))
