"""Build the CNN and QCNN of a run: the QCNN is the classical network made quantum by
:func:`qcnn.convert`, so the two are never written twice."""

from __future__ import annotations

import torch
from torch import nn

from classical import NETWORKS
from experiments.config import RunConfig
from qcnn import QConv2d, QuantumSGD, add_gradient_noise, convert


def build_model(config: RunConfig, device: torch.device, generator: torch.Generator) -> nn.Module:
    """The run's network on ``device``, initialised from ``torch.manual_seed(config.seed)``.

    CNN and QCNN of one seed get identical initial weights: the QCNN is the CNN converted.
    """
    torch.manual_seed(config.seed)
    model = NETWORKS[config.net]()
    if config.model == "qcnn":
        model = convert(model, config.layer_options, layers=config.layer_map, generator=generator)
    return model.to(device)


def build_optimiser(
    config: RunConfig, model: nn.Module, generator: torch.Generator
) -> torch.optim.Optimizer:
    """SGD or Adam; for the authors' QCNN, with δ-noise on every gradient before each step."""
    delta = config.optimiser_delta
    if config.optimizer == "sgd" and delta > 0:
        return QuantumSGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, delta=delta, generator=generator
        )  # fmt: skip
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    if delta > 0:  # what QuantumSGD does for SGD, as a hook before each step
        parameters = list(model.parameters())
        optimiser.register_step_pre_hook(lambda *_: add_gradient_noise(parameters, delta, generator))
    return optimiser


def check_network(config: RunConfig, image_shape: tuple[int, ...]) -> None:
    """ValueError, before any training, for a run its network cannot do: one forward pass of
    two blank images of the data's ``image_shape`` (C, H, W) through the run's model finds
    what the layer would only find then, e.g. σ that draws no sample (⌊σK⌋ = 0), a kernel
    larger than a feature map or the authors' cap order before a BatchNorm."""
    if config.model != "qcnn":
        return
    model = build_model(config, torch.device("cpu"), torch.Generator()).eval()
    with torch.no_grad():
        model(torch.zeros(2, *image_shape))


def qconv_layers(model: nn.Module) -> dict[str, QConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
