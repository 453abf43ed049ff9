"""Calibration of a converted model's quantum layers (``docs/algorithm.md``, *Classical terms
before the non-linearity*).

A BatchNorm that :func:`qcnn.convert` moved into a layer normalises the estimate Ŷ, but its
running statistics were learnt on the classical Y of complete feature maps; under the
quantum forward the layer's inputs are sampled and noisy. :func:`calibrate` re-estimates
those statistics under the quantum forward, as post-training quantization calibrates its
observers: no gradients, a cumulative average over the batches given, every other module of
the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from qcnn.layer import QConv2d

log = logging.getLogger(__name__)


def quantum_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorms with running statistics inside ``model``'s quantum layers."""
    layers = [m for m in model.modules() if isinstance(m, QConv2d) and m.norm is not None]
    return [layer.norm for layer in layers if layer.norm.track_running_stats]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor | tuple]) -> nn.Module:
    """Re-estimate the running statistics of every quantum layer's BatchNorm (``norm``) on
    ``batches`` (input tensors, or ``(input, label)`` pairs) under the quantum forward, as
    a cumulative average; returns ``model``. Only those buffers change: the model runs in
    eval mode, each module's mode and each norm's momentum are restored after. A model
    whose quantum layers hold no BatchNorm is returned as it was, with a warning."""
    norms = quantum_norms(model)
    if not norms:
        log.warning("calibrate: no quantum layer of %s has a BatchNorm with running statistics: "
                    "nothing to calibrate", type(model).__name__)  # fmt: skip
        return model
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
        norm.train()
    count = 0
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, tuple | list) else batch)
            count += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        for module, mode in modes.items():
            module.train(mode)
    if count == 0:
        raise ValueError("calibrate: batches held no batch")
    return model
