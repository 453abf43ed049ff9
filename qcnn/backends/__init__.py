"""Circuit backends, chosen by name (``docs/algorithm.md`` section 5).

Every backend runs the same three primitives on states prepared by
:mod:`qcnn.backends.circuits`:

- ``hadamard_counts(states, shots, seed)``: ancilla-0 counts of the Hadamard test;
- ``ae_outcomes(states, m, shots, seed)``: outcomes y of canonical amplitude estimation;
- ``sample_positions(amplitudes, shots, seed)``: basis states measured from one encoding.

``outcome-law`` draws from the circuits' exact outcome distributions (no circuits);
``pennylane`` and ``qiskit-aer`` build and simulate the circuits. (The layer's
``backend="torch"`` is its vectorised emulation, which uses none of these.) Their packages
are imported only when asked for. ``device="auto"`` takes the GPU build when it is installed
and a GPU is present, else the CPU with a logged notice; ``device="gpu"`` without one is an
error.

On top, :func:`inner_products` and :func:`sample_positions` turn tensors into states, draw a
simulator seed from a ``torch.Generator`` and return tensors.
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np
import torch

from qcnn.backends.base import Backend
from qcnn.backends.circuits import amplitude_encoding, hadamard_states
from qcnn.options import BACKEND_DEVICES

# Inner products per backend call: a whole network's pairs are simulated in chunks of this many.
_PAIRS_PER_CALL = 1 << 15
# Name -> (module, class): a backend's package is imported only when it is asked for.
_CLASSES = {
    "outcome-law": ("qcnn.backends.emulation", "OutcomeLawBackend"),
    "pennylane": ("qcnn.backends.pennylane_backend", "PennyLaneBackend"),
    "qiskit-aer": ("qcnn.backends.qiskit_backend", "QiskitAerBackend"),
}
CIRCUIT_BACKENDS = tuple(_CLASSES)


@functools.cache
def get_backend(name: str, device: str = "auto", simulator: str | None = None) -> Backend:
    """The backend ``name`` on ``device``; ``simulator`` picks PennyLane's device.

    Made once per arguments and reused, so a layer on circuits builds its simulator (and
    logs a fallback to the CPU) once, not at every forward pass.
    """
    if name not in CIRCUIT_BACKENDS:
        raise ValueError(f"backend must be one of {CIRCUIT_BACKENDS}, got {name!r}")
    if device not in BACKEND_DEVICES:
        raise ValueError(f"device must be one of {BACKEND_DEVICES}, got {device!r}")
    if simulator is not None and name != "pennylane":
        raise ValueError(f"a simulator ({simulator!r}) can only be chosen for pennylane, not {name!r}")
    module, cls = _CLASSES[name]
    backend_class = getattr(importlib.import_module(module), cls)
    return backend_class(device) if simulator is None else backend_class(device, simulator)


def draw_seed(generator: torch.Generator | None) -> int:
    """A simulator seed from the torch generator, so circuit runs are reproducible too."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))


def inner_products(
    backend: Backend,
    a: torch.Tensor,
    f: torch.Tensor,
    *,
    shots: int | None = None,
    ae_qubits: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Estimates of <a_i|f_i> (normalised rows) by Hadamard test (shots) or AE (m qubits)."""
    if (shots is None) == (ae_qubits is None):
        raise ValueError("give exactly one of shots (Hadamard test) or ae_qubits (amplitude estimation)")
    dtype, device = a.dtype, a.device
    a, f = a.detach().double().cpu().numpy(), f.detach().double().cpu().numpy()
    probability = np.empty(len(a))
    for start in range(0, len(a), _PAIRS_PER_CALL):  # bounded memory for a whole network's pairs
        chunk = slice(start, start + _PAIRS_PER_CALL)
        states, seed = hadamard_states(a[chunk], f[chunk]), draw_seed(generator)
        if shots is not None:
            probability[chunk] = backend.hadamard_counts(states, shots, seed) / shots
        else:
            outcomes = backend.ae_outcomes(states, ae_qubits, 1, seed)[:, 0]
            probability[chunk] = np.sin(math.pi * outcomes / 2**ae_qubits) ** 2
    return torch.as_tensor(2 * probability - 1, dtype=torch.float64).to(dtype=dtype, device=device)


def sample_positions(
    backend: Backend, values: torch.Tensor, shots: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``shots`` positions of the flattened ``values``, drawn ∝ values by measuring √(f/Σf)."""
    amplitudes = amplitude_encoding(values.detach().double().cpu().reshape(-1).numpy())
    positions = backend.sample_positions(amplitudes, shots, draw_seed(generator))
    return torch.as_tensor(positions, dtype=torch.long, device=values.device)
