"""The two-convolution baselines: the authors' MNIST network and LeNet-5.

They are plain PyTorch models; :func:`qcnn.convert` makes their QCNN versions (each
conv → ReLU [→ pool] block becomes one ``QConv2d``), see ``experiments.models``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    padding: int = 0,
    pooling: str | None = None,
) -> nn.Sequential:
    """Conv2d -> ReLU, then 2x2 max or average pooling if ``pooling`` names one."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding),
        nn.ReLU(),
    ]
    if pooling == "max":
        layers.append(nn.MaxPool2d(2))
    elif pooling == "avg":
        layers.append(nn.AvgPool2d(2))
    elif pooling is not None:
        raise ValueError(f"pooling must be None, 'max' or 'avg', got {pooling!r}")
    return nn.Sequential(*layers)


class TwoConvNet(nn.Module):
    """Two conv blocks then three fully connected layers (ReLU between) and log-softmax.

    Subclasses build ``conv1``, ``conv2``, ``fc1``, ``fc2`` and ``fc3``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x)).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class AuthorsNet(TwoConvNet):
    """The network of Kerenidis, Landman and Prakash's MNIST experiment (`docs/algorithm.md` §6).

    conv 1->5 (7x7) -> act -> conv 5->10 (7x7) -> act -> flatten (10*16*16 = 2560)
    -> fc 300 -> ReLU -> fc 50 -> ReLU -> fc 10 -> log-softmax. No pooling.
    Input (N, 1, 28, 28), output (N, 10) log-probabilities.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_relu(1, 5, 7)
        self.conv2 = conv_relu(5, 10, 7)
        self.fc1 = nn.Linear(2560, 300)
        self.fc2 = nn.Linear(300, 50)
        self.fc3 = nn.Linear(50, 10)


class LeNet5(TwoConvNet):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, on 28x28 input.

    conv 1->6 (5x5, padding 2, as for the original 32x32 input) -> act -> pool 2
    -> conv 6->16 (5x5) -> act -> pool 2 -> flatten (16*5*5 = 400)
    -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc 10 -> log-softmax.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_relu(1, 6, 5, padding=2, pooling="max")
        self.conv2 = conv_relu(6, 16, 5, pooling="max")
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

