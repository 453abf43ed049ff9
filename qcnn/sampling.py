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
        _merge_draws(weights.numpy(), exponentials.numpy(), out.detach().numpy(), distinct.numpy())
        return distinct
    drawn = torch.zeros_like(out).scatter_(1, _search_draws(weights, exponentials), 1)
    out.mul_(drawn)
    return drawn.sum(1, dtype=torch.int64)


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
def _merge_draws(
    weights: np.ndarray, exponentials: np.ndarray, out: np.ndarray, distinct: np.ndarray
) -> None:
    """Multiply out[b, i] by 1 where a sorted draw of image b falls in position i's CDF
    interval, else by 0; count each image's positions drawn in distinct[b].

    Per image, the CDF (float64 running sums in the same order as ``_search_draws``'s
    ``cumsum``) and the sorted draws are merged like two sorted lists. Each step compares
    the current draw with the current CDF entry: a draw below it lands at that position and
    the next draw comes up, otherwise the next position does. The CDF's last entry is +inf,
    so the last position takes every draw past the others (as ``searchsorted``'s clamp
    does), and a +inf after the last draw keeps the positions within the CDF: K + N − 1
    steps place all N draws. The steps are branch-free: draws land at unpredictable
    distances, and mispredicted branches dominated the walks this merge replaces. Positions
    are also capped at K − 1: a NaN draw (from NaN weights) never lands, and without the
    cap the walk would step past the image's row.

    Four images (a, b, c, d) are merged side by side, so that their chains of dependent
    loads and compares overlap. Their sums and positions are plain local variables on
    purpose: LLVM keeps those in registers, whereas state kept in small arrays made every
    step a round trip through memory. The walks mark the positions drawn in four scratch
    rows, which stay in cache; ``out`` is then multiplied by them row by row (it may be
    ``weights`` itself: each image's CDF is complete before its row changes).
    Serial on purpose: a numba thread pool is a second OpenMP runtime beside torch's, and
    its spinning threads slowed torch's convolutions and matrix products by about 1.5×.
    """
    rows, k = weights.shape
    n = exponentials.shape[1] - 1
    last = k - 1
    cdfs = np.empty((4, k))
    draws = np.full((4, n + 1), np.inf)
    hits = np.zeros((4, k), out.dtype)
    cdf_a, cdf_b, cdf_c, cdf_d = cdfs[0], cdfs[1], cdfs[2], cdfs[3]
    draw_a, draw_b, draw_c, draw_d = draws[0], draws[1], draws[2], draws[3]
    hit_a, hit_b, hit_c, hit_d = hits[0], hits[1], hits[2], hits[3]
    for a in range(0, rows, 4):
        # The last group repeats its last image: same draws, same positions.
        b, c, d = min(a + 1, rows - 1), min(a + 2, rows - 1), min(a + 3, rows - 1)
        ta = tb = tc = td = 0.0
        for i in range(k):
            ta, tb, tc, td = ta + weights[a, i], tb + weights[b, i], tc + weights[c, i], td + weights[d, i]
            cdf_a[i], cdf_b[i], cdf_c[i], cdf_d[i] = ta, tb, tc, td
        sa = sb = sc = sd = 0.0
        for j in range(n + 1):
            sa, sb = sa + exponentials[a, j], sb + exponentials[b, j]
            sc, sd = sc + exponentials[c, j], sd + exponentials[d, j]
        # Draw j of an image is (E_1 + ... + E_j) · total weight / (E_1 + ... + E_{N+1}).
        fa, fb = _close_cdf(cdf_a, ta) / sa, _close_cdf(cdf_b, tb) / sb
        fc, fd = _close_cdf(cdf_c, tc) / sc, _close_cdf(cdf_d, td) / sd
        sa = sb = sc = sd = 0.0
        for j in range(n):
            sa, sb = sa + exponentials[a, j], sb + exponentials[b, j]
            sc, sd = sc + exponentials[c, j], sd + exponentials[d, j]
            draw_a[j], draw_b[j], draw_c[j], draw_d[j] = sa * fa, sb * fb, sc * fc, sd * fd
        pa = pb = pc = pd = 0  # positions, never past the last: see above
        ja = jb = jc = jd = 0  # draws
        for _ in range(k + n - 1):
            xa, xb = draw_a[ja] < cdf_a[pa], draw_b[jb] < cdf_b[pb]
            xc, xd = draw_c[jc] < cdf_c[pc], draw_d[jd] < cdf_d[pd]
            hit_a[pa] = max(hit_a[pa], xa)
            hit_b[pb] = max(hit_b[pb], xb)
            hit_c[pc] = max(hit_c[pc], xc)
            hit_d[pd] = max(hit_d[pd], xd)
            ja, jb, jc, jd = ja + xa, jb + xb, jc + xc, jd + xd
            pa, pb = min(pa + 1 - xa, last), min(pb + 1 - xb, last)
            pc, pd = min(pc + 1 - xc, last), min(pd + 1 - xd, last)
        for row in range(a, min(a + 4, rows)):
            hit = hits[row - a]
            count = 0
            for i in range(k):
                out[row, i] *= hit[i]
                count += hit[i] != 0
            distinct[row] = count
        hits[:] = 0


@numba.njit(cache=True)
def _close_cdf(cdf: np.ndarray, total: float) -> float:
    """End one image's CDF with +inf; return its total weight.

    An all-zero image gets uniform weights instead, which keep only zeros.
    """
    k = len(cdf)
    if total == 0.0:
        for i in range(k):
            cdf[i] = i + 1.0
        total = float(k)
    cdf[k - 1] = np.inf
    return total
