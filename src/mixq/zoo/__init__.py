"""Benchmark model zoo: small CNNs for Fashion-MNIST, trained by ``bench/train_zoo.py``.

Both models take normalized ``[B, 1, 28, 28]`` images (see :func:`mixq.datasets.fashion_mnist`)
and return ``[B, 10]`` logits. They are plain :class:`torch.nn.Module` trees: every convolution,
batch norm, activation and linear layer is its own module instance (``nn.ReLU`` / ``nn.ReLU6``
modules, never functional calls, never shared), so quantization wrappers and BN folding see
every layer. Residual additions happen in ``forward``.

Weights live beside this file as ``{name}.safetensors`` with a training record ``{name}.json``;
:func:`load` builds a model and loads them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mixq.nn import Add

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent
NUM_CLASSES = 10


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Return ``[Conv2d (k x k, no bias, 'same' padding), BatchNorm2d]`` as fresh instances."""
    conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU, conv3x3-BN, add shortcut, ReLU.

    The shortcut is the identity when shape is kept, else a 1x1 conv + BN projection (option B).

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first 3x3 conv (and of the projection).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(c_out, c_out, 3)
        self.shortcut = (
            nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.add = Add()  # a module: mixq.wrap can quantize both operands (plan meta "adds")
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016, section 4.2) for 1x28x28 inputs.

    ============  ==========  =======  ========  ==================
    stage         output      blocks   channels  first-block stride
    ============  ==========  =======  ========  ==================
    stem conv3x3  28x28       --       16        1
    stage1        28x28       3        16        1
    stage2        14x14       3        32        2
    stage3        7x7         3        64        2
    head          1x1         --       10        global avg pool + Linear(64, 10)
    ============  ==========  =======  ========  ==================

    19 conv layers + 1 linear = 20 weighted layers. Shortcuts: identity inside a stage; the two
    downsampling blocks use option-B projections (1x1 conv stride 2 + BN), chosen over option-A
    zero padding so that every shortcut is an ordinary conv+BN that quantizers and BN folding
    handle like any other layer (21 convs in all). 272,186 parameters, 31.0M multiply-accumulates
    (conv + linear) per image.

    Args:
        num_classes: Number of output logits.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(1, 16, 3)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, 1, 28, 28]`` to logits ``[B, num_classes]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.flatten(self.pool(self.layers(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN.

    The projection is linear (no activation: the "linear bottleneck"). With expansion 1 the
    expand conv is omitted. The input is added back when stride is 1 and channels match.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the depthwise conv.
        expansion: Hidden width as a multiple of ``c_in``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, c_out, 1)
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out
        if self.use_residual:
            self.add = Add()  # a module: mixq.wrap can quantize both operands (plan meta "adds")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.body(x)
        return self.add(x, out) if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2-style network (Sandler et al. 2018) sized for 1x28x28 inputs.

    Rows ``(t, c, n, s)``: expansion, output channels, repeats, stride of the first repeat.

    ============  =====  ====  ===  ===  ======
    layer         t      c     n    s    output
    ============  =====  ====  ===  ===  ======
    conv3x3       --     16    1    1    28x28
    bottleneck    1      16    1    1    28x28
    bottleneck    6      24    2    2    14x14
    bottleneck    6      32    3    2    7x7
    bottleneck    6      64    2    1    7x7
    bottleneck    6      96    1    1    7x7
    conv1x1       --     384   1    1    7x7
    avgpool, fc   --     10    --   --   1x1
    ============  =====  ====  ===  ===  ======

    Every conv is followed by BN; ReLU6 after the stem, the expand and depthwise convs and the last
    1x1 conv; none after a block's projection. Nine inverted-residual blocks (five with a residual
    add), 28 convs (nine depthwise), one linear layer. With ``width=1.0`` (the zoo's model):
    237,738 parameters, 14.8M multiply-accumulates per image. All channel counts except the input
    and the logits scale with ``width`` (rounded to multiples of 8): 0.5 gives 69,722 parameters
    and 4.5M MACs, 1.4 gives 454,730 and 28.5M. This is smaller than the ImageNet table (no
    160/320 stages, stem 16, last conv 384) so that it trains on two CPU cores.

    Args:
        num_classes: Number of output logits.
        width: Width multiplier.
    """

    CONFIG: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 2, 1),
        (6, 96, 1, 1),
    )
    STEM = 16
    LAST = 384

    def __init__(self, num_classes: int = NUM_CLASSES, width: float = 1.0) -> None:
        super().__init__()
        c_in = scaled(self.STEM, width)
        layers: list[nn.Module] = [*conv_bn(1, c_in, 3), nn.ReLU6()]
        for t, c, n, s in self.CONFIG:
            c_out = scaled(c, width)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        last = scaled(self.LAST, width)
        layers += [*conv_bn(c_in, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, 1, 28, 28]`` to logits ``[B, num_classes]``."""
        return self.fc(self.flatten(self.pool(self.features(x))))


def scaled(channels: int, width: float) -> int:
    """Scale a channel count by ``width`` and round to a multiple of 8 (at least 8)."""
    return max(8, int(channels * width + 4) // 8 * 8)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, unit/zero BN, small normal linear layers, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Return the multiply-accumulates per image of the Conv2d and Linear layers of ``model``.

    The model runs once, in eval mode, on zeros of ``input_shape`` (batch 1); BN, activations,
    pooling and additions are not counted.
    """
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out[0].numel() * (m.in_channels // m.groups) * kh * kw
        else:
            total += m.in_features * m.out_features

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


MODELS: dict[str, type[nn.Module]] = {
    "fashion-resnet20": ResNet20,
    "fashion-mobilenetv2": MobileNetV2,
}


def build(name: str) -> nn.Module:
    """Build the untrained model registered as ``name``; ValueError if it is not in MODELS."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name]()


def weights_path(name: str, folder: Path | None = None) -> Path:
    """Return where the weights of ``name`` are stored (``folder`` defaults to this package)."""
    return (folder or ZOO_DIR) / f"{name}.safetensors"


def load(name: str, folder: Path | None = None) -> nn.Module:
    """Build the zoo model ``name``, load its trained weights (strictly) and return it in eval mode.

    Args:
        name: A key of :data:`MODELS`, e.g. ``"fashion-resnet20"``.
        folder: Where ``{name}.safetensors`` lives; defaults to the ``mixq.zoo`` package folder.

    Returns:
        The trained model in eval mode, on the CPU, in float32.

    Raises:
        ValueError: If ``name`` is unknown.
        FileNotFoundError: If the weight file is missing.
    """
    from safetensors.torch import load_file

    model = build(name)  # ValueError for an unknown name
    path = weights_path(name, folder)
    if not path.exists():
        raise FileNotFoundError(
            f"weights for {name!r} not found at {path}; train them with "
            f"`python bench/train_zoo.py --model {name}`"
        )
    model.load_state_dict(load_file(path), strict=True)
    log.debug("loaded %s from %s", name, path)
    return model.eval()
