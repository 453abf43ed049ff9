"""Quantum convolutional neural networks (Kerenidis, Landman, Prakash, ICLR 2020) in PyTorch.

The specification is ``docs/algorithm.md``; :class:`QConv2d` is the layer,
:func:`qcnn.functional.qconv2d` its functional form, :class:`QConvOptions` its options (with
their defaults), :class:`QuantumSGD` and :func:`add_gradient_noise` the optimiser-level
quantum gradient error. :func:`convert` turns a classical model's conv → ReLU patterns into
``QConv2d`` layers, :func:`configure` changes the options of every layer of a model, and
:func:`load_classical` and :func:`classical_state_dict` carry weights between a model and its
converted copy. :func:`calibrate` re-estimates the quantum layers' BatchNorm statistics under
the quantum forward, :func:`diagnose` compares each layer with its exact limit (error, SQNR,
sampling, cost, sensitivity), and :mod:`qcnn.training` trains and evaluates any model.

The core needs torch, numpy and numba; the circuit backends need the ``circuits`` extra.
"""

from importlib.metadata import PackageNotFoundError, version

from qcnn import cost, functional, training
from qcnn.backprop import QuantumSGD, add_gradient_noise
from qcnn.convert import ConversionReport, classical_state_dict, configure, convert, load_classical
from qcnn.cost import LayerCost
from qcnn.diagnostics import diagnose
from qcnn.layer import QConv2d
from qcnn.options import QConvOptions
from qcnn.tuning import calibrate

try:
    __version__ = version("qcnn")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "ConversionReport",
    "LayerCost",
    "QConv2d",
    "QConvOptions",
    "QuantumSGD",
    "__version__",
    "add_gradient_noise",
    "calibrate",
    "classical_state_dict",
    "configure",
    "convert",
    "cost",
    "diagnose",
    "functional",
    "load_classical",
    "training",
]
