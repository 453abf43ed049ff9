"""Inner-product estimation, ``docs/algorithm.md`` section 2.1.

Every output Y[p, q] = <A_p, F_q> of the convolution is read from a Hadamard test on
(|0>|A_p> + |1>|F_q>)/√2, whose outcome 0 has probability P = (1 + <A_p|F_q>)/2. The error
models below turn the exact Y into the estimate Ŷ = ‖A_p‖‖F_q‖(2P̂ − 1), element-wise and
vectorised over the batch.
"""

from __future__ import annotations

import functools
import math

import torch

from qcnn.options import QConvOptions

# Rows of outcome probabilities handled at once by the amplitude-estimation sampler,
# as a number of float64 entries (128 MiB).
_AE_CHUNK_ENTRIES = 1 << 24


def patch_norms(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    authors: bool = False,
) -> torch.Tensor:
    """‖A_p‖ for every output position, shape (B, 1, H', W') (or (1, 1, H', W') if ``authors``).

    The squared norm of a receptive field over all input channels is a convolution of the
    channel-summed x² with a ones kernel, so the im2col matrix A is never written out. The
    ones kernel is separable: the convolution is two banded matrix products, one per axis,
    which honour stride and zero padding and run much faster than a 2-D pooling on CPU.
    ``authors`` reproduces the authors' shortcut: the norms of image 0, channel 0, shared by
    the whole batch.
    """
    squares = x[:1, 0].square() if authors else x.square().sum(1)
    rows = _box_band(x.shape[2], kernel_size[0], stride[0], padding[0], x.device, x.dtype)
    cols = _box_band(x.shape[3], kernel_size[1], stride[1], padding[1], x.device, x.dtype)
    sums = rows.T @ squares @ cols  # (B, H', W')
    return sums.clamp_min(0).sqrt().unsqueeze(1)


@functools.lru_cache(maxsize=64)
def _box_band(
    size: int, kernel: int, stride: int, padding: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(size, out) 0/1 matrix: column o sums inputs o·stride − padding ... + kernel − 1.

    Cached, and never written to: a layer needs the same two bands at every forward pass,
    and building them anew took nine small kernel launches per band on CUDA.
    """
    out = (size + 2 * padding - kernel) // stride + 1
    with torch.inference_mode(False):  # a cached inference tensor could not join autograd later
        start = torch.arange(out, device=device) * stride - padding
        index = torch.arange(size, device=device).unsqueeze(1)
        return ((index >= start) & (index < start + kernel)).to(dtype)


def estimate(
    y: torch.Tensor,
    scale: torch.Tensor,
    options: QConvOptions,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Ŷ from the exact Y and scale = ‖A_p‖‖F_q‖ (broadcastable to Y), by ``options.estimator``."""
    if options.estimator == "exact" or (options.estimator == "gaussian" and options.epsilon == 0):
        return y
    if options.estimator == "gaussian":
        from qcnn.accel import rng  # compiled with numba: imported at first use, not with qcnn

        noise = rng.randn(y.shape, generator, y.device, y.dtype)
        return torch.addcmul(y, scale, noise, value=2 * options.epsilon, out=noise)
    probability = hadamard_probability(y, scale)
    if options.estimator == "shots":
        n = options.n_shots
        counts = torch.binomial(torch.full_like(probability, n), probability, generator=generator)
        estimate_p = counts / n
    else:
        m = options.n_ae_qubits
        outcomes = sample_ae_outcomes(probability, m, generator)
        estimate_p = torch.sin(math.pi * outcomes / 2**m).square().to(y.dtype)
    return scale * (2 * estimate_p - 1)


def hadamard_probability(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P = (1 + Y / (‖A‖‖F‖)) / 2; a zero vector gives inner product 0 (P = 1/2).

    The normalised inner product is clipped to [-1, 1] only to absorb float rounding.
    """
    scale = scale.expand_as(y)
    cosine = torch.where(scale > 0, y / scale.clamp_min(torch.finfo(y.dtype).tiny), 0.0)
    return (1 + cosine.clamp(-1, 1)) / 2


def ae_outcome_probabilities(a: torch.Tensor, m: int) -> torch.Tensor:
    """Exact outcome distribution of canonical amplitude estimation, shape (*a.shape, 2^m).

    With a = sin²θ and M = 2^m, phase estimation on the Grover operator (eigenphases ±2θ)
    returns y with probability ½[F(y/M − θ/π) + F(y/M + θ/π)], where
    F(d) = sin²(Mπd) / (M² sin²(πd)) is the Fejér kernel (F = 1 at integer d).
    The estimate is â = sin²(πy/M). Computed in float64.
    """
    big_m = 2**m
    theta = torch.asin(a.double().clamp(0, 1).sqrt()) / math.pi
    y = torch.arange(big_m, device=a.device, dtype=torch.float64) / big_m

    def fejer(d: torch.Tensor) -> torch.Tensor:
        den = big_m**2 * torch.sin(math.pi * d).square()
        num = torch.sin(big_m * math.pi * d).square()
        return torch.where(den > 1e-20, num / den.clamp_min(1e-300), 1.0)

    theta = theta.unsqueeze(-1)
    return 0.5 * (fejer(y - theta) + fejer(y + theta))


def sample_ae_outcomes(
    a: torch.Tensor, m: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One outcome y per entry of ``a``, drawn from :func:`ae_outcome_probabilities`."""
    flat = a.reshape(-1)
    outcomes = torch.empty(flat.shape, dtype=torch.float64, device=a.device)
    rows = max(1, _AE_CHUNK_ENTRIES // 2**m)
    for start in range(0, flat.numel(), rows):
        probs = ae_outcome_probabilities(flat[start : start + rows], m)
        cdf = probs.cumsum(-1)
        u = torch.rand(len(probs), 1, generator=generator, device=a.device, dtype=torch.float64)
        index = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(2**m - 1)
        outcomes[start : start + rows] = index.squeeze(-1).double()
    return outcomes.reshape(a.shape)
