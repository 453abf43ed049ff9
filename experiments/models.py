"""Build the CNN and QCNN of a run from the classical networks' conv-block argument."""

from __future__ import annotations

import torch
from torch import nn

from classical import NETWORKS, ConvBlock, conv_relu
from experiments.config import RunConfig
from qcnn import QConv2d, QuantumSGD


def qconv_block(generator: torch.Generator | None = None, **options) -> ConvBlock:
    """A conv-block factory that builds ``QConv2d`` layers sharing ``generator``."""

    def block(in_channels, out_channels, kernel_size, *, padding=0, pooling=None) -> QConv2d:
        return QConv2d(
            in_channels, out_channels, kernel_size, padding=padding, pooling=pooling,
            generator=generator, **options,
        )  # fmt: skip

    return block


def build_model(config: RunConfig, device: torch.device, generator: torch.Generator) -> nn.Module:
    """The run's network on ``device``, initialised from ``torch.manual_seed(config.seed)``.

    CNN and QCNN of one seed get identical initial weights: ``QConv2d`` draws its
    initialisation exactly like ``nn.Conv2d``.
    """
    torch.manual_seed(config.seed)
    if config.model == "cnn":
        block = conv_relu
    else:
        block = qconv_block(generator, **config.layer_options())
    return NETWORKS[config.net](block).to(device)


def build_optimiser(
    config: RunConfig, model: nn.Module, generator: torch.Generator
) -> torch.optim.Optimizer:
    """Plain SGD; for the authors' QCNN, SGD with δ-noise on every gradient."""
    if config.optimiser_delta > 0:
        return QuantumSGD(
            model.parameters(), lr=config.lr, momentum=config.momentum,
            delta=config.optimiser_delta, generator=generator,
        )  # fmt: skip
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def quantum_copy(model: nn.Module, generator: torch.Generator | None = None, **options) -> nn.Module:
    """A copy of a classically built network with every conv block replaced by ``QConv2d``.

    Each ``Sequential(Conv2d, ReLU[, MaxPool2d/AvgPool2d])`` child becomes
    ``QConv2d.from_conv`` with the same weights: the authors' "CNN train / QCNN test".
    """
    copy = NETWORKS[_network_name(model)](qconv_block(generator, **options))
    copy = copy.to(next(model.parameters()).device)
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and isinstance(child[0], nn.Conv2d):
            child = child[0]  # QConv2d and Conv2d share the state_dict keys weight and bias
        getattr(copy, name).load_state_dict(child.state_dict())
    return copy


def _network_name(model: nn.Module) -> str:
    for name, cls in NETWORKS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"quantum_copy needs one of {sorted(NETWORKS)}, got {type(model).__name__}")


def qconv_layers(model: nn.Module) -> dict[str, QConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
