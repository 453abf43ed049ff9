"""Capped ReLU and quantum sampling, ``qcnn-algorithm.md`` sections 2.2 and 2.3.

The layer measures the amplitude-encoded outputs ⌊σK⌋ times per image (K = D'H'W'); each
measurement returns one position with probability ∝ f(Ŷ) (or ∝ f(Ŷ)²). Positions seen keep
their value, all others become 0. Draws are with replacement, so the fraction of distinct
positions kept is below σ; the ℓ∞ tomography precision of the same budget is
η ≈ sqrt(log K / N_s).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch


def n_samples(sigma: float, outputs: int) -> int:
    """N_s = ⌊σK⌋, checked to be at least one draw."""
    count = math.floor(sigma * outputs)
    if count < 1:
        raise ValueError(
            f"sigma={sigma} draws no sample from K={outputs} outputs (⌊σK⌋ = 0); "
            f"use sigma >= {1 / outputs:.3g}"
        )
    return count


def tomography_eta(outputs: int, samples: int) -> float:
    """η ≈ sqrt(log K / N_s): the ℓ∞ precision that N_s samples over K outputs buy."""
    return math.sqrt(math.log(outputs) / samples) if outputs > 1 else 0.0


def sample_mask(
    values: torch.Tensor,
    sigma: float,
    sampling: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Boolean mask of the positions drawn at least once, same shape as ``values`` (B, ...).

    Per image, N_s = ⌊σK⌋ positions are drawn with replacement with probability ∝ values
    ("linear") or ∝ values² ("quadratic"); ``values`` must be >= 0. An image whose values
    are all 0 draws uniformly, which keeps only zeros: its output stays all zero.

    The N_s draws are made sorted: with E_1..E_{N+1} i.i.d. Exp(1) and S_j their partial
    sums, S_j / S_{N+1} (j <= N) are the order statistics of N uniforms. Each is mapped to
    the first position whose cumulative weight exceeds it (inverse CDF). On CPU a compiled
    merge of the sorted draws with the running CDF does this in O(K + N_s) per image, far
    faster than ``torch.multinomial`` or ``torch.searchsorted``; elsewhere
    ``torch.searchsorted`` does. Both read the same exponentials, so they agree draw for draw.
    """
    flat = values.reshape(len(values), -1)
    weights = (flat if sampling == "linear" else flat.square()).contiguous()
    exponentials = _exponentials(len(flat), n_samples(sigma, flat.shape[1]) + 1, generator, flat.device)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=values.device)
    if flat.device.type == "cpu":
        _merge_draws(weights.detach().numpy(), exponentials.numpy(), mask.numpy())
    else:
        mask.scatter_(1, _search_draws(weights, exponentials), True)
    return mask.view(values.shape)


def _exponentials(
    rows: int, columns: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(rows, columns) i.i.d. Exp(1) as −log(1 − U): four times faster than ``exponential_`` on CPU."""
    uniforms = torch.rand(rows, columns, generator=generator, device=device)
    return uniforms.neg_().log1p_().neg_()


def _search_draws(weights: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """Positions of the sorted draws, (B, N_s), by ``torch.searchsorted`` (any device)."""
    cdf = weights.cumsum(1, dtype=torch.float64)
    total = cdf[:, -1:]
    empty = total == 0  # all-zero image: uniform weights, which keep only zeros
    positions = torch.arange(1, cdf.shape[1] + 1, device=cdf.device, dtype=cdf.dtype)
    cdf = torch.where(empty, positions, cdf)
    total = torch.where(empty, float(cdf.shape[1]), total)
    spacings = exponentials.cumsum(1, dtype=torch.float64)
    draws = spacings[:, :-1] * (total / spacings[:, -1:])
    return torch.searchsorted(cdf, draws, right=True).clamp_max_(cdf.shape[1] - 1)


@numba.njit(cache=True)
def _merge_draws(weights: np.ndarray, exponentials: np.ndarray, mask: np.ndarray) -> None:
    """Set mask[b, i] where a sorted draw of image b falls in position i's CDF interval.

    Serial on purpose: a numba thread pool is a second OpenMP runtime beside torch's, and
    its spinning threads slowed torch's convolutions and matrix products by about 1.5×.
    """
    rows, k = weights.shape
    n = exponentials.shape[1] - 1
    for b in range(rows):
        total = 0.0
        for i in range(k):
            total += weights[b, i]
        uniform = total == 0.0  # all-zero image: uniform weights, which keep only zeros
        if uniform:
            total = float(k)
        spacing_total = 0.0
        for j in range(n + 1):
            spacing_total += exponentials[b, j]
        scale = total / spacing_total
        i = 0
        cdf = 1.0 if uniform else weights[b, 0]
        spacing = 0.0
        for j in range(n):
            spacing += exponentials[b, j]
            draw = spacing * scale
            while cdf <= draw and i < k - 1:
                i += 1
                cdf += 1.0 if uniform else weights[b, i]
            mask[b, i] = True
