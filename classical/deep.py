"""AlexNet, VGG, GoogLeNet and ResNet at MNIST size (28×28×1 input, 10 log-probabilities).

Each keeps the idea of its architecture and is scaled down so that a 2-epoch full-MNIST run
takes minutes on a 2-core CPU: fewer and narrower channels, no dropout (it would draw from
the global random generator, which a resumed run does not restore), and layer sizes that
fit 28×28 input. Every convolution that the original follows by a ReLU is followed by one
here, so :func:`qcnn.convert` turns each of them into a quantum layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv_relu(cin: int, cout: int, kernel: int, padding: int = 0, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=padding), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def _classifier(features: int, hidden1: int, hidden2: int) -> nn.Sequential:
    """Flatten, then three fully connected layers with ReLU between, 10 outputs."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, hidden1), nn.ReLU(), nn.Linear(hidden1, hidden2), nn.ReLU(),
        nn.Linear(hidden2, 10),
    )  # fmt: skip


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012): large early kernels, 5 convolutions, 3 pools, 3 FC.

    conv 1→16 5×5 pad 2 → ReLU → pool 2 (14×14) → conv 16→32 5×5 pad 2 → ReLU → pool 2 (7×7)
    → conv 32→48 3×3 → conv 48→48 3×3 → conv 48→32 3×3 (pad 1, ReLU each) → pool 2 (3×3)
    → flatten 288 → fc 256 → ReLU → fc 128 → ReLU → fc 10 → log-softmax.
    Scaled down from 11×11/5×5 kernels with stride 4 on 224×224, 96-384 channels, FC 4096
    with dropout.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_relu(1, 16, 5, padding=2, pool=True),
            _conv_relu(16, 32, 5, padding=2, pool=True),
            _conv_relu(32, 48, 3, padding=1),
            _conv_relu(48, 48, 3, padding=1),
            _conv_relu(48, 32, 3, padding=1, pool=True),
        )
        self.classifier = _classifier(32 * 3 * 3, 256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


class VGG(nn.Module):
    """VGG (Simonyan and Zisserman 2015): stacks of 3×3 convolutions, pools between stacks.

    [conv 3×3 pad 1 → ReLU] × 2 per stack, widths 8, 16, 32, each stack then pool 2
    (28 → 14 → 7 → 3) → flatten 288 → fc 128 → ReLU → fc 128 → ReLU → fc 10 → log-softmax.
    Scaled down from VGG-16's five stacks of 2-3 convolutions, 64-512 channels, FC 4096.
    """

    def __init__(self) -> None:
        super().__init__()
        stacks, cin = [], 1
        for width in (8, 16, 32):
            stacks.append(_conv_relu(cin, width, 3, padding=1))
            stacks.append(_conv_relu(width, width, 3, padding=1, pool=True))
            cin = width
        self.features = nn.Sequential(*stacks)
        self.classifier = _classifier(32 * 3 * 3, 128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


class Inception(nn.Module):
    """Four branches concatenated: 1×1; 1×1 → 3×3; 1×1 → 5×5; 3×3 max pool → 1×1 (ReLU after
    every convolution, as in GoogLeNet)."""

    def __init__(self, cin: int, b1: int, b3: tuple[int, int], b5: tuple[int, int], pool: int) -> None:
        super().__init__()
        self.branch1 = _conv_relu(cin, b1, 1)
        self.branch3 = nn.Sequential(_conv_relu(cin, b3[0], 1), _conv_relu(b3[0], b3[1], 3, padding=1))
        self.branch5 = nn.Sequential(_conv_relu(cin, b5[0], 1), _conv_relu(b5[0], b5[1], 5, padding=2))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv_relu(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al. 2015): inception modules, global average pooling.

    conv 1→16 3×3 pad 1 → ReLU → pool 2 (14×14) → inception (16 → 8 + 12 + 4 + 4 = 28)
    → pool 2 (7×7) → inception (28 → 16 + 24 + 8 + 8 = 56) → global average pool → fc 10
    → log-softmax. Scaled down from a 7×7 stem, nine inception modules of 256-1024 channels
    and two auxiliary classifiers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_relu(1, 16, 3, padding=1, pool=True)
        self.inception1 = Inception(16, 8, (8, 12), (2, 4), 4)
        self.pool = nn.MaxPool2d(2)
        self.inception2 = Inception(28, 16, (12, 24), (4, 8), 8)
        self.fc = nn.Linear(56, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception2(self.pool(self.inception1(self.stem(x))))
        return F.log_softmax(self.fc(x.mean((2, 3))), dim=1)


class BasicBlock(nn.Module):
    """ResNet's basic block: conv 3×3 → BN → ReLU → conv 3×3 → BN, + shortcut, → ReLU. The
    shortcut is the identity, or a 1×1 convolution with BN where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet (He et al. 2016): basic blocks with BatchNorm and identity/projection shortcuts.

    conv 1→8 3×3 pad 1 → BN → ReLU (28×28) → block 8→8 (identity) → block 8→16 stride 2
    (projection, 14×14) → block 16→32 stride 2 (projection, 7×7) → global average pool
    → fc 10 → log-softmax: 8 weight layers, a ResNet-8. Scaled down from ResNet-18's 7×7
    stem with pooling, four stages of two blocks and 64-512 channels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return F.log_softmax(self.fc(x.mean((2, 3))), dim=1)
