"""The states and operators that the circuit backends prepare (``docs/algorithm.md`` §2.1, §5).

Hadamard test on n + 1 qubits (ancilla = most significant qubit), as QRAM would prepare it:

    |ψ> = (|0>|a> + |1>|f>) / √2,   then H on the ancilla:
    P(ancilla = 0) = ‖a + f‖² / 4 = (1 + <a|f>) / 2       (a, f normalised, real, padded to 2^n)

Canonical amplitude estimation (Brassard et al.) of P with the Grover operator
Q = −A S_0 A† S_χ, where A|0> = H_anc|ψ>, S_0 flips the sign of |0...0> and S_χ the sign of the
"good" states (ancilla = 0). On span{good, bad}, Q rotates by 2θ with sin²θ = P, so phase
estimation with m qubits returns y with y/2^m ≈ ±θ/π and P̂ = sin²(πy/2^m).

Circuit diagrams (n = 2, m = 3)::

    Hadamard test                          amplitude estimation
    anc: ─╭StatePrep(ψ)──H──┤ M            e0: ──H──────────╭●───────────╭QFT†──┤ M
    q1 : ─├StatePrep(ψ)─────┤              e1: ──H──────╭●──│────────────├QFT†──┤ M
    q2 : ─╰StatePrep(ψ)─────┤              e2: ──H──╭●──│───│────────────╰QFT†──┤ M
                                           s  : ─A──╰Q──╰Q²─╰Q⁴─────────────────┤
"""

from __future__ import annotations

import math

import numpy as np


def qubits_for(size: int) -> int:
    """⌈log₂ size⌉, at least 1."""
    return max(1, math.ceil(math.log2(size)))


def hadamard_states(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(n, 2^(q+1)) amplitudes of (|0>|a> + |1>|f>)/√2, rows of a and f padded to 2^q."""
    if a.shape != f.shape or a.ndim != 2:
        raise ValueError(f"a and f must both be (n, d), got {a.shape} and {f.shape}")
    width, d = 2 ** qubits_for(a.shape[1]), a.shape[1]
    padded = np.zeros((len(a), 2 * width))
    for half, vectors in ((padded[:, :d], a), (padded[:, width : width + d], f)):
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("a vector of norm 0 has no amplitude encoding")
        np.multiply(vectors, 1 / (norms * math.sqrt(2)), out=half)  # written in place: one pass
    return padded


def ancilla_hadamard(state: np.ndarray) -> np.ndarray:
    """H on the most significant qubit of a state vector (rows of a batch)."""
    half = state.shape[-1] // 2
    top, bottom = state[..., :half], state[..., half:]
    return np.concatenate([top + bottom, top - bottom], axis=-1) / math.sqrt(2)


def zero_probability(states: np.ndarray) -> np.ndarray:
    """Exact P(ancilla = 0) after the Hadamard test on each row of ``states``."""
    half = states.shape[-1] // 2
    return (ancilla_hadamard(states)[..., :half] ** 2).sum(-1)


def state_preparation_unitary(target: np.ndarray) -> np.ndarray:
    """A real orthogonal matrix whose first column is ``target`` (a Householder reflection)."""
    size = len(target)
    e0 = np.zeros(size)
    e0[0] = 1.0
    v = e0 - target
    if np.linalg.norm(v) < 1e-12:
        return np.eye(size)
    return np.eye(size) - 2 * np.outer(v, v) / (v @ v)


def grover_operator(state: np.ndarray) -> np.ndarray:
    """Q = −A S_0 A† S_χ for A|0> = H_anc|ψ>, good states = ancilla 0 (first half)."""
    a = state_preparation_unitary(ancilla_hadamard(state))
    size = len(state)
    s0 = np.eye(size)
    s0[0, 0] = -1.0
    s_good = np.diag(np.r_[-np.ones(size // 2), np.ones(size // 2)])
    return -a @ s0 @ a.T @ s_good


def amplitude_encoding(values: np.ndarray) -> np.ndarray:
    """Amplitudes √(f / Σf) over ⌈log₂K⌉ qubits (zero-padded): measuring returns p ∝ f."""
    values = np.asarray(values, dtype=float)
    if (values < 0).any() or values.sum() <= 0:
        raise ValueError("sampling needs non-negative values with a positive sum")
    amplitudes = np.zeros(2 ** qubits_for(len(values)))
    amplitudes[: len(values)] = np.sqrt(values / values.sum())
    return amplitudes
