"""Batch-norm folding: the folded float model computes what the original computes."""

import copy

import pytest
import torch
from torch import nn

from mixq.fold import fold_batchnorm


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
