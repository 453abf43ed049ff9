"""Quantum backpropagation error models, ``docs/algorithm.md`` section 3.

The quantum algorithm reads each gradient out by ℓ∞ tomography with precision δ: every entry
of the estimate g̃ satisfies |g̃ − g| <= δ‖g‖₂ (with high probability). Models:

- ``gaussian`` (the authors' simulation): g̃ = g + δ‖g‖₂ξ, ξ ~ N(0, I).
- ``tomography``: N = ⌈36 ln d / δ²⌉ measurements of the state with amplitudes g/‖g‖;
  |g_i| is estimated as ‖g‖ sqrt(n_i / N) from the counts n_i, the sign of g is kept.
- ``exact``: g̃ = g.

A "vector" is one row of a (rows, d) view: the layer treats each image's ∂L/∂X as one
vector and the whole kernel gradient ∂L/∂F as one. :func:`add_gradient_noise` and
:class:`QuantumSGD` apply the Gaussian model to every parameter at the optimiser step,
as the authors did (on CUDA by the fused kernel of :mod:`qcnn.accel.fused`, one per parameter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from qcnn.accel.fused import kernels_for


def noisy_gradient(
    gradient: torch.Tensor,
    delta: float,
    model: str,
    generator: torch.Generator | None,
    rows: int = 1,
) -> torch.Tensor:
    """The gradient as ℓ∞ tomography would return it, each of ``rows`` rows a vector."""
    if model == "exact" or delta == 0:
        return gradient
    flat = gradient.reshape(rows, -1)
    if model == "gaussian":
        norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
        from qcnn.accel import rng  # compiled with numba: imported at first use, not with qcnn

        noise = rng.randn(flat.shape, generator, flat.device, flat.dtype)
        return torch.addcmul(flat, norms, noise, value=delta, out=noise).view_as(gradient)
    if model == "tomography":
        return tomography_estimate(flat, delta, generator).view_as(gradient)
    raise ValueError(f"backprop model must be 'exact', 'gaussian' or 'tomography', got {model!r}")


def tomography_samples(dimension: int, delta: float) -> int:
    """N = ⌈36 ln d / δ²⌉, the sample count of the ℓ∞ tomography theorem."""
    return math.ceil(36 * math.log(max(dimension, 2)) / delta**2)


def tomography_estimate(
    vectors: torch.Tensor, delta: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Simulated ℓ∞ tomography of each row of ``vectors`` (rows, d).

    The counts are one multinomial draw per row, made by NumPy (exact conditional-binomial
    sampling, fast for the millions of shots that small δ asks for), seeded from
    ``generator`` so the result is reproducible.
    """
    n = tomography_samples(vectors.shape[1], delta)
    values = vectors.detach().double().cpu()
    norms = torch.linalg.vector_norm(values, dim=1, keepdim=True)
    probs = torch.where(norms > 0, values.square() / norms.square().clamp_min(1e-300), 1.0)
    probs = (probs / probs.sum(1, keepdim=True)).numpy()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_device(generator)))
    counts = np.random.default_rng(seed).multinomial(n, probs)
    magnitudes = norms * torch.from_numpy(counts / n).sqrt()
    estimate = torch.sign(values) * magnitudes
    return estimate.to(device=vectors.device, dtype=vectors.dtype)


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


@torch.no_grad()
def add_gradient_noise(
    parameters: Iterable[torch.Tensor],
    delta: float,
    generator: torch.Generator | None = None,
    fused_noise: bool = True,
) -> None:
    """Replace every ``p.grad`` by p.grad + δ‖p.grad‖₂ξ (the authors' optimiser-step form).

    Call it between ``loss.backward()`` and ``optimizer.step()`` to add quantum gradient
    noise to any optimiser; :class:`QuantumSGD` does it for plain SGD. With ``fused_noise``
    (and float32 gradients on CUDA, see :mod:`qcnn.accel.fused`), one seed draw and one fused
    kernel per parameter replace the three or four torch operations of each.
    """
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")
    with_grad = [p for p in parameters if p.grad is not None]
    if delta == 0 or not with_grad:
        return
    kernels = kernels_for(*(p.grad for p in with_grad)) if fused_noise else None
    if kernels is None:
        for p in with_grad:
            p.grad = noisy_gradient(p.grad, delta, "gaussian", generator)
        return
    seeds = kernels.draw_seeds(generator, with_grad[0].device, len(with_grad))
    for index, p in enumerate(with_grad):
        p.grad = kernels.gaussian_noise(p.grad, delta, seeds, index)


class QuantumSGD(torch.optim.SGD):
    """SGD whose every step first adds δ‖g‖₂ξ to each parameter's gradient.

    This is where the authors' simulation put the quantum backpropagation error: on the
    gradient of every parameter tensor of the model (conv, bias and fully connected).
    ``fused_noise`` is that of :func:`add_gradient_noise`; other options go to SGD.
    """

    def __init__(
        self,
        params,
        lr: float = 0.01,
        *,
        delta: float = 0.01,
        generator: torch.Generator | None = None,
        fused_noise: bool = True,
        **sgd_options,
    ) -> None:
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        super().__init__(params, lr=lr, **sgd_options)
        self.delta = delta
        self.generator = generator
        self.fused_noise = fused_noise

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            add_gradient_noise(group["params"], self.delta, self.generator, self.fused_noise)
        super().step()
        return loss
