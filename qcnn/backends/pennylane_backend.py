"""The ``pennylane`` backend: the circuits of :mod:`qcnn.backends.circuits` on PennyLane.

Simulators: ``default.qubit`` (torch tensors with parameter broadcasting: a whole batch of
Hadamard tests is one execution, on CUDA when torch has it), ``lightning.qubit`` (C++, CPU),
``lightning.gpu`` (cuQuantum, needs the ``gpu`` extra and a CUDA GPU). Wire 0 is the most
significant qubit, as in :mod:`qcnn.backends.circuits`.
"""

from __future__ import annotations

import numpy as np
import torch

from qcnn.backends.base import counts_from, fall_back_to_cpu, outcomes_from
from qcnn.backends.circuits import ancilla_hadamard, grover_operator, qubits_for

SIMULATORS = ("default.qubit", "lightning.qubit", "lightning.gpu")


class PennyLaneBackend:
    name = "pennylane"

    def __init__(self, device: str = "auto", simulator: str | None = None) -> None:
        try:
            import pennylane as qml
        except ImportError as error:
            message = "backend 'pennylane' needs the circuits extra: pip install 'qcnn[circuits]'"
            raise ImportError(message) from error
        self.qml = qml
        if simulator is not None and simulator not in SIMULATORS:
            raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
        if simulator is None:
            simulator = "lightning.gpu" if device in ("auto", "gpu") and self._has_lightning_gpu() else None
            if simulator is None:
                if device != "cpu":
                    device = fall_back_to_cpu("pennylane", "lightning.gpu is not usable here", device)
                simulator = "default.qubit"
        if simulator == "lightning.gpu" and not self._has_lightning_gpu():
            raise RuntimeError("pennylane: lightning.gpu asked for, but it is not installed or no GPU")
        self.simulator = simulator
        on_gpu = simulator == "lightning.gpu" or (
            simulator == "default.qubit" and device != "cpu" and torch.cuda.is_available()
        )
        self.torch_device = torch.device("cuda" if on_gpu and simulator == "default.qubit" else "cpu")
        self.device = f"{simulator} on {'GPU' if on_gpu else 'CPU'}"

    def _has_lightning_gpu(self) -> bool:
        try:
            self.qml.device("lightning.gpu", wires=1)
        except Exception:  # missing plug-in, missing CUDA libraries or no GPU: all mean "not here"
            return False
        return True

    def _device(self, wires: int, seed: int):
        return self.qml.device(self.simulator, wires=wires, seed=seed)

    def _batch(self, states: np.ndarray):
        # default.qubit broadcasts over the leading dimension; lightning runs it circuit by circuit
        return torch.as_tensor(states, device=self.torch_device)

    def hadamard_counts(self, states: np.ndarray, shots: int, seed: int) -> np.ndarray:
        """The simulator evolves every state of the batch (one broadcast execution on
        ``default.qubit``) to the exact P(ancilla = 0); the shot counts are drawn from it."""
        qml = self.qml
        wires = qubits_for(states.shape[1])

        @qml.qnode(self._device(wires, seed))
        def hadamard_test(state):
            qml.StatePrep(state, wires=range(wires), validate_norm=False)
            qml.Hadamard(wires=0)
            return qml.probs(wires=0)

        probabilities = torch.as_tensor(hadamard_test(self._batch(states))).reshape(len(states), 2)
        return counts_from(probabilities[:, 0].cpu().numpy(), shots, seed)

    def ae_outcomes(self, states: np.ndarray, m: int, shots: int, seed: int) -> np.ndarray:
        """The simulator runs phase estimation of every state's Grover operator (one broadcast
        execution over a batch of prepared states and Grover matrices) to the exact law of
        the outcome y on the m estimation qubits; the shots are drawn from it."""
        qml = self.qml
        wires = qubits_for(states.shape[1])
        estimation, system = list(range(m)), list(range(m, m + wires))

        @qml.qnode(self._device(m + wires, seed))
        def amplitude_estimation(prepared, grover):
            qml.StatePrep(prepared, wires=system, validate_norm=False)  # A|0>
            qml.QuantumPhaseEstimation(qml.QubitUnitary(grover, wires=system), estimation_wires=estimation)
            return qml.probs(wires=estimation)  # wire 0 is the most significant bit of y

        prepared = self._batch(ancilla_hadamard(states))
        grovers = self._batch(np.stack([grover_operator(state) for state in states]))
        probabilities = torch.as_tensor(amplitude_estimation(prepared, grovers)).reshape(len(states), 2**m)
        return outcomes_from(probabilities.cpu().numpy(), shots, seed)

    def sample_positions(self, amplitudes: np.ndarray, shots: int, seed: int) -> np.ndarray:
        qml = self.qml
        wires = qubits_for(len(amplitudes))

        @qml.set_shots(shots)
        @qml.qnode(self._device(wires, seed))
        def measure(state):
            qml.StatePrep(state, wires=range(wires))
            return qml.sample(wires=range(wires))

        bits = np.asarray(measure(amplitudes)).reshape(shots, wires)
        return bits @ 2 ** np.arange(wires - 1, -1, -1)
