"""Capped ReLU and quantum sampling, ``docs/algorithm.md`` sections 2.2 and 2.3.

The layer measures the amplitude-encoded outputs ⌊σK⌋ times per image (K = D'H'W'); each
measurement returns one position with probability ∝ f(Ŷ) (or ∝ f(Ŷ)²). Positions seen keep
their value, all others become 0. Draws are with replacement, so the fraction of distinct
positions kept is below σ; the ℓ∞ tomography precision of the same budget is
η ≈ sqrt(log K / N_s).
"""

from __future__ import annotations

import math

import torch


def capped_relu_(y_hat: torch.Tensor, y: torch.Tensor, cap: float, order: str) -> torch.Tensor:
    """f on the estimate (section 2.2), in place on ``y_hat`` (a tensor of the caller's own):
    min(max(Ŷ, 0), C) for the "theory" order, or the authors' clamp(clamp(Y) + (Ŷ − Y))
    from the exact Y (bias included in both) for "authors"."""
    if order == "theory":
        return y_hat.clamp_(0, cap)
    return (y.clamp(0, cap) + (y_hat - y)).clamp_(0, cap)


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


def sample_(
    values: torch.Tensor, sigma: float, sampling: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep ``values`` (B, ...) at the positions drawn, set the others to 0, in place.

    Returns the number of distinct positions kept per image, shape (B,). ``values`` must be
    contiguous and >= 0. Per image, N_s = ⌊σK⌋ positions are drawn with replacement with
    probability ∝ values ("linear") or ∝ values² ("quadratic"). An image whose values are
    all 0 draws uniformly, which keeps only zeros: its output stays all zero. Working in
    place spares a training step a mask of the output's size and one pass to apply it.

    The N_s draws are made sorted: with E_1..E_{N+1} i.i.d. Exp(1) and S_j their partial
    sums, S_j / S_{N+1} (j <= N) are the order statistics of N uniforms. Each is mapped to
    the first position whose cumulative weight exceeds it (inverse CDF). On CPU a compiled
    merge of the sorted draws with the CDF does this in O(K + N_s) per image, far
    faster than ``torch.multinomial`` or ``torch.searchsorted``; elsewhere
    ``torch.searchsorted`` does. Both read the same exponentials, so they agree draw for draw.
    """
    if not values.is_contiguous():
        raise ValueError("sample_ works in place: values must be contiguous")
    flat = values.view(len(values), -1)
    return _keep_drawn(flat, flat, sigma, sampling, generator)


def _keep_drawn(
    out: torch.Tensor,
    values: torch.Tensor,
    sigma: float,
    sampling: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Multiply ``out`` (B, K) by 1 at the positions drawn from ``values`` (B, K), else by
    0, in place; return the distinct positions drawn per row. ``out`` may be ``values``."""
    weights = (values if sampling == "linear" else values.square()).detach().contiguous()
    exponentials = _exponentials(len(out), n_samples(sigma, out.shape[1]) + 1, generator, out.device)
    if out.device.type == "cpu":
        distinct = torch.empty(len(out), dtype=torch.int64)
        from qcnn.accel.merge import merge_draws  # compiled with numba: imported at first use, not with qcnn

        merge_draws(weights.numpy(), exponentials.numpy(), out.detach().numpy(), distinct.numpy())
        return distinct
    drawn = torch.zeros_like(out).scatter_(1, _search_draws(weights, exponentials), 1)
    out.mul_(drawn)
    return drawn.sum(1, dtype=torch.int64)


def _exponentials(
    rows: int, columns: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(rows, columns) i.i.d. Exp(1) as −log(1 − U): four times faster than ``exponential_`` on CPU."""
    from qcnn.accel import rng  # compiled with numba: imported at first use, not with qcnn

    uniforms = rng.rand((rows, columns), generator, device)
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
