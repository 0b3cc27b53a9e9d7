"""Small convolutional nets outside the zoo, written the way model libraries write them: shared by
the tests and the ONNX benchmarks (``bench.onnx_trained``, ``bench.onnx_synthetic``).

* :class:`SameConv2d`: a ``nn.Conv2d`` subclass padding as TensorFlow's "same" in its own forward.
* :func:`conv_net`: a MobileNet-like net ("same"-padding subclasses, one ReLU6 module shared by
  several places, depthwise blocks, squeeze-excitation gating, ``ZeroPad2d``, batch norm with
  non-trivial statistics), random weights, 3x16x16 inputs, 5 classes.
* :func:`hardswish_net`: a MobileNetV3-like net ("same" stem and depthwise convs, hard-swish,
  hard-sigmoid gating, average pooling), random weights, 3x16x16 inputs, 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "same" in its own forward (model libraries' style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    """Channel gating: global pool, reduce, ReLU, expand, sigmoid, multiply."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = SameConv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.expand(s))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3, "same"), squeeze-excite, project (1x1); ``act`` is shared.

    As in model libraries, only the convs whose padding depends on the input size are the
    "same"-padding subclass; the 1x1 convs are plain.
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int, act: nn.Module) -> None:
        super().__init__()
        self.act = act  # the same ReLU6 object as the network's: called at several places
        self.expand = nn.Conv2d(cin, mid, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(mid)
        self.dw = SameConv2d(mid, mid, 3, stride=stride, groups=mid, bias=False)
        self.dw_bn = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, 4)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.residual = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.expand_bn(self.expand(x)))
        h = self.se(self.act(self.dw_bn(self.dw(h))))
        h = self.project_bn(self.project(h))
        return x + h if self.residual else h


class LibraryConvNet(nn.Module):
    """A MobileNet-like net as a model library writes it."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_act = nn.ReLU6()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # TF-style asymmetric padding before a strided dw
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.blocks = nn.Sequential(
            InvertedResidual(8, 16, 12, 1, self.act), InvertedResidual(12, 24, 12, 1, self.act)
        )
        self.head = SameConv2d(12, 32, 1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.pad(self.stem_act(self.stem_bn(self.stem(x)))))
        x = self.blocks(self.act(self.dw_bn(x)))
        return self.fc(self.drop(self.act(self.head(x)).mean((2, 3))))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = LibraryConvNet()
    with torch.no_grad():  # batch norm with real statistics, so folding changes the weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class HardSwishNet(nn.Module):
    """A MobileNetV3-like net: "same" stem and depthwise convs, hard-swish, hard-sigmoid gating,
    average pooling."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = SameConv2d(3, 8, 3, stride=2)
        self.dw = SameConv2d(8, 8, 3, groups=8)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.stem(x))
        x = F.hardswish(self.dw(x))
        gate = F.hardsigmoid(self.expand(F.relu6(self.reduce(F.avg_pool2d(x, x.shape[-1])))))
        x = F.relu6(self.project(x * gate))
        return self.fc(torch.flatten(F.avg_pool2d(x, 2), 1))


def hardswish_net() -> nn.Module:
    torch.manual_seed(1)
    return HardSwishNet().eval()
