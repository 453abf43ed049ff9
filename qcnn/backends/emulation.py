"""The ``outcome-law`` backend: the exact outcome distributions of the circuits, drawn by torch
without circuits (the law the emulation's estimator follows).

Hadamard counts ~ Binomial(shots, P), amplitude-estimation outcomes from
:func:`qcnn.estimation.ae_outcome_probabilities`, positions ~ Categorical(|amplitude|²): the
distributions the circuit backends must reproduce.
"""

from __future__ import annotations

import numpy as np
import torch

from qcnn.backends.base import fall_back_to_cpu
from qcnn.backends.circuits import zero_probability
from qcnn.estimation import sample_ae_outcomes


class OutcomeLawBackend:
    name = "outcome-law"

    def __init__(self, device: str = "auto") -> None:
        if device != "cpu" and not torch.cuda.is_available():
            device = fall_back_to_cpu("outcome-law", "no CUDA device is available", device)
        self.torch_device = torch.device("cpu" if device == "cpu" else "cuda")
        self.device = str(self.torch_device)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.torch_device).manual_seed(seed)

    def hadamard_counts(self, states: np.ndarray, shots: int, seed: int) -> np.ndarray:
        p = torch.as_tensor(zero_probability(states), device=self.torch_device)
        counts = torch.binomial(torch.full_like(p, shots), p.clamp(0, 1), generator=self._generator(seed))
        return counts.long().cpu().numpy()

    def ae_outcomes(self, states: np.ndarray, m: int, shots: int, seed: int) -> np.ndarray:
        p = torch.as_tensor(zero_probability(states), device=self.torch_device)
        outcomes = sample_ae_outcomes(p.unsqueeze(1).expand(-1, shots), m, self._generator(seed))
        return outcomes.long().cpu().numpy()

    def sample_positions(self, amplitudes: np.ndarray, shots: int, seed: int) -> np.ndarray:
        probabilities = torch.as_tensor(amplitudes**2, device=self.torch_device)
        drawn = torch.multinomial(probabilities, shots, replacement=True, generator=self._generator(seed))
        return drawn.cpu().numpy()
