"""The layer's element-wise work as fused Triton kernels, for CUDA: ``docs/algorithm.md``
sections 2.1 to 2.3 and the Gaussian model of section 3.

On a GPU, a training step of the paper's small network is bound by the host: every torch
operation costs some 30 µs of Python, dispatch and launch whatever its size, and the layer's
norms, noise, cap, sampling and δ noise took about 45 of them per layer and step. With the
kernels of :mod:`qcnn.accel.fused.kernels`, the forward after the convolution is one kernel, and
the δ noise one per gradient (in the layer's backward, or per parameter at the optimiser
step of :func:`qcnn.add_gradient_noise`).

:func:`kernels_for` says where they run: on float32 tensors of a device type in
:data:`DEVICE_TYPES`, where Triton imports and the kernels pass a smoke test, made once per
device. Elsewhere the callers use torch operations, with a warning when the kernels failed.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# Device types the kernels run on. The tests add "cpu", where Triton's interpreter runs them.
DEVICE_TYPES = ("cuda",)


def kernels_for(*tensors: torch.Tensor) -> ModuleType | None:
    """:mod:`qcnn.accel.fused.kernels` if it can take these tensors (float32, all on one device of
    a type in :data:`DEVICE_TYPES`, whose smoke test passed), else None."""
    device = tensors[0].device
    if device.type not in DEVICE_TYPES:
        return None
    if any(t.dtype != torch.float32 or t.device != device for t in tensors):
        return None
    return _kernels_on(device)


@functools.cache
def _kernels_on(device: torch.device) -> ModuleType | None:
    """The kernels module if Triton imports and its smoke test passes on ``device``, else
    None, with a warning, once per device: the callers then run torch operations."""
    try:
        from qcnn.accel.fused import kernels  # imports Triton

        kernels.smoke_test(device)
    except Exception as error:  # whatever stops the kernels, torch operations still work
        log.warning(
            "the fused QCNN kernels cannot run on %s (%r): torch operations run there "
            "instead, several times slower per training step on a GPU", device, error
        )
        return None
    return kernels
