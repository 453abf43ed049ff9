"""What every circuit backend provides, and how it falls back from the GPU to the CPU."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

log = logging.getLogger("qcnn.backends")


class Backend(Protocol):
    """The three primitives of :mod:`qcnn.backends`, on states from :mod:`qcnn.backends.circuits`."""

    name: str
    device: str  # what it runs on, in words

    def hadamard_counts(self, states: np.ndarray, shots: int, seed: int) -> np.ndarray: ...

    def ae_outcomes(self, states: np.ndarray, m: int, shots: int, seed: int) -> np.ndarray: ...

    def sample_positions(self, amplitudes: np.ndarray, shots: int, seed: int) -> np.ndarray: ...


def fall_back_to_cpu(backend: str, reason: str, device: str) -> str:
    """"cpu" after a logged notice for device="auto"; an error for an explicit "gpu"."""
    if device == "gpu":
        raise RuntimeError(f"{backend}: device='gpu' asked for, but {reason}")
    log.warning("%s: %s; running on the CPU", backend, reason)
    return "cpu"


def counts_from(probabilities: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Outcome-0 counts of ``shots`` shots for each exact probability, Binomial(shots, p).

    The circuit backends simulate every state to its exact outcome distribution and draw the
    shots from it: the same counts, in law, as the libraries' per-shot samplers, which were
    the bottleneck (``docs/circuits.md``).
    """
    return np.random.default_rng(seed).binomial(shots, np.clip(probabilities, 0.0, 1.0))


def outcomes_from(probabilities: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` outcomes per row of exact outcome laws (rows, outcomes), shape (rows, shots),
    by the inverse CDF of uniform draws: what a per-shot sampler returns, in law."""
    cdf = np.cumsum(probabilities, axis=1)
    uniforms = np.random.default_rng(seed).random((len(cdf), shots)) * cdf[:, -1:]
    return (uniforms[:, :, None] >= cdf[:, None, :]).sum(axis=2).clip(max=cdf.shape[1] - 1)
