"""Quantum convolutional neural networks (Kerenidis, Landman, Prakash, ICLR 2020) in PyTorch.

The specification is ``docs/algorithm.md``; :class:`QConv2d` is the layer,
:func:`qcnn.functional.qconv2d` its functional form, :class:`QuantumSGD` and
:func:`add_gradient_noise` the optimiser-level quantum gradient error, :func:`convert`
turns a classical model's conv → ReLU patterns into ``QConv2d`` layers and :func:`configure`
changes the options of every layer of a model.
"""

from qcnn import cost, functional
from qcnn.backprop import QuantumSGD, add_gradient_noise
from qcnn.convert import ConversionReport, configure, convert
from qcnn.cost import LayerCost
from qcnn.layer import QConv2d
from qcnn.options import QConvOptions

__all__ = [
    "ConversionReport",
    "LayerCost",
    "QConv2d",
    "QConvOptions",
    "QuantumSGD",
    "add_gradient_noise",
    "configure",
    "convert",
    "cost",
    "functional",
]
