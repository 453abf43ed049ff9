"""The ``qiskit-aer`` backend: the circuits of :mod:`qcnn.backends.circuits` on Qiskit Aer.

Many circuits go into one ``AerSimulator.run``, seeded with ``seed_simulator``. Every circuit uses
only instructions Aer runs natively (``initialize``, ``set_statevector``, ``h``, ``unitary``,
``measure``, ``save_probabilities``), so
nothing is transpiled: ``transpile`` would dominate the cost of ``initialize`` circuits and
takes minutes to synthesise controlled Grover powers. No circuit has free parameters, which
also avoids binding parameters after ``transpile`` (qiskit-aer issue 2403).

Qiskit numbers qubits little-endian (qubit 0 = least significant); the state vectors of
:mod:`qcnn.backends.circuits` are indexed the same way, so the ancilla (most significant
qubit) is the last one.
"""

from __future__ import annotations

import numpy as np

from qcnn.backends.base import counts_from, fall_back_to_cpu
from qcnn.backends.circuits import ancilla_hadamard, grover_operator, qubits_for

# Hadamard tests per circuit: Aer's fixed cost per circuit is spread over many of them.
_TESTS_PER_CIRCUIT = 1024


class QiskitAerBackend:
    name = "qiskit-aer"

    def __init__(self, device: str = "auto") -> None:
        try:
            import qiskit
            from qiskit_aer import AerSimulator
        except ImportError as error:
            message = "backend 'qiskit-aer' needs the circuits extra: pip install 'qcnn[circuits]'"
            raise ImportError(message) from error
        self.qiskit = qiskit
        gpu = "GPU" in AerSimulator().available_devices()
        if device in ("auto", "gpu") and not gpu:
            reason = "the Aer GPU build (qiskit-aer-gpu) or a GPU is missing"
            device = fall_back_to_cpu("qiskit-aer", reason, device)
        on_gpu = device != "cpu" and gpu
        self.simulator = AerSimulator(device="GPU" if on_gpu else "CPU")
        self.device = f"AerSimulator on {'GPU' if on_gpu else 'CPU'}"

    def _run(self, circuits, shots: int, seed: int, memory: bool = False):
        return self.simulator.run(circuits, shots=shots, seed_simulator=seed, memory=memory).result()

    def hadamard_counts(self, states: np.ndarray, shots: int, seed: int) -> np.ndarray:
        """Aer evolves every state (``set_statevector``, H on the ancilla) to the exact
        P(ancilla = 0), many Hadamard tests one after the other in one circuit (Aer's cost per
        circuit, not per gate, bounded the throughput); the shot counts are drawn from it."""
        from qiskit.circuit import CircuitInstruction
        from qiskit.circuit.library import HGate
        from qiskit_aer.library import SaveProbabilities, SetStatevector

        wires = qubits_for(states.shape[1])
        hadamard = HGate()
        saves = [SaveProbabilities(1, label=f"p{i}") for i in range(min(_TESTS_PER_CIRCUIT, len(states)))]
        circuits = []
        for start in range(0, len(states), _TESTS_PER_CIRCUIT):
            circuit = self.qiskit.QuantumCircuit(wires)
            qubits, ancilla = tuple(circuit.qubits), (circuit.qubits[-1],)
            for state, save in zip(states[start : start + _TESTS_PER_CIRCUIT], saves, strict=False):
                circuit._append(CircuitInstruction(SetStatevector(state), qubits))
                circuit._append(CircuitInstruction(hadamard, ancilla))
                circuit._append(CircuitInstruction(save, ancilla))
            circuits.append(circuit)
        result = self._run(circuits, 1, seed)
        probabilities = []
        for index, circuit in enumerate(circuits):
            data = result.data(index)
            probabilities += [data[f"p{i}"][0] for i in range(len(circuit.data) // 3)]
        return counts_from(np.array(probabilities), shots, seed)

    def ae_outcomes(self, states: np.ndarray, m: int, shots: int, seed: int) -> np.ndarray:
        """Phase estimation built from gates Aer runs natively, so nothing is transpiled.

        Estimation qubit k (0..m−1, little-endian) controls Q^(2^k); the controlled power is
        one ``UnitaryGate`` on system + [k] (control most significant: block_diag(I, Q^p)), the
        inverse QFT is the 2^m × 2^m inverse DFT matrix, so the measured integer is y itself.
        """
        from qiskit.circuit.library import UnitaryGate

        wires = qubits_for(states.shape[1])
        system = list(range(m, m + wires))
        size = 2**m
        inverse_qft = np.exp(-2j * np.pi * np.outer(np.arange(size), np.arange(size)) / size) / np.sqrt(size)
        circuits = []
        for state in states:
            circuit = self.qiskit.QuantumCircuit(m + wires, m)
            circuit.initialize(ancilla_hadamard(state), system)  # A|0>
            circuit.h(range(m))
            power = grover_operator(state)
            zero = np.zeros_like(power)
            for k in range(m):
                controlled = np.block([[np.eye(len(power)), zero], [zero, power]])
                circuit.append(UnitaryGate(controlled, check_input=False), [*system, k])
                power = power @ power
            circuit.append(UnitaryGate(inverse_qft, check_input=False), range(m))
            circuit.measure(range(m), range(m))
            circuits.append(circuit)
        result = self._run(circuits, shots, seed, memory=True)
        return np.array(
            [[int(bits, 2) for bits in result.get_memory(i)] for i in range(len(circuits))], dtype=np.int64
        )

    def sample_positions(self, amplitudes: np.ndarray, shots: int, seed: int) -> np.ndarray:
        wires = qubits_for(len(amplitudes))
        circuit = self.qiskit.QuantumCircuit(wires)
        circuit.initialize(amplitudes, range(wires))
        circuit.measure_all()
        memory = self._run(circuit, shots, seed, memory=True).get_memory(0)
        return np.array([int(bits, 2) for bits in memory], dtype=np.int64)
