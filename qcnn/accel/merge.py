"""The sampling of ``docs/algorithm.md`` §2.3 on CPU, compiled: :func:`merge_draws` places an
image's sorted draws on its cumulative weights in one walk, O(K + N_s), where
``torch.searchsorted`` (:func:`qcnn.sampling._search_draws`, the reference it is tested
against draw for draw) costs O(N_s log K) with far worse constants on CPU.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def merge_draws(
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
    distances, and mispredicted branches dominated the walks this merge replaces. A NaN
    draw (from NaN weights) never lands, so its walk runs on past position K − 1: the
    scratch arrays go on for N more positions of +inf, which it marks nowhere.

    Four images are merged side by side, so that their chains of dependent loads and
    compares overlap. Their CDFs, draws and marks are interleaved in (positions, 4) scratch
    arrays, each walked through one flat view by indices that step by 4: three base
    pointers instead of twelve, so the walk spills few values to the stack, and unsigned
    indices spare each access numba's check for negative ones. The scratch arrays stay in
    cache; ``out`` is multiplied by the marks once the four walks end (it may be
    ``weights`` itself: each image's CDF is complete before its row changes).
    Serial on purpose: a numba thread pool is a second OpenMP runtime beside torch's, and
    its spinning threads slowed torch's convolutions and matrix products by about 1.5×.
    """
    rows, k = weights.shape
    n = exponentials.shape[1] - 1
    cdfs = np.full((k + n, 4), np.inf)
    draws = np.full((n + 1, 4), np.inf)
    hits = np.zeros((k + n, 4), np.uint8)
    cdf, draw, hit = cdfs.ravel(), draws.ravel(), hits.ravel()
    step = np.uint64(4)  # from one position (or draw) of an image to its next
    for a in range(0, rows, 4):
        # The last group repeats its last image: same draws, same positions.
        b, c, d = min(a + 1, rows - 1), min(a + 2, rows - 1), min(a + 3, rows - 1)
        ta = tb = tc = td = 0.0
        for i in range(k):
            ta, tb, tc, td = ta + weights[a, i], tb + weights[b, i], tc + weights[c, i], td + weights[d, i]
            cdfs[i, 0], cdfs[i, 1], cdfs[i, 2], cdfs[i, 3] = ta, tb, tc, td
        sa = sb = sc = sd = 0.0
        for j in range(n):
            sa, sb = sa + exponentials[a, j], sb + exponentials[b, j]
            sc, sd = sc + exponentials[c, j], sd + exponentials[d, j]
            draws[j, 0], draws[j, 1], draws[j, 2], draws[j, 3] = sa, sb, sc, sd
        sa, sb = sa + exponentials[a, n], sb + exponentials[b, n]
        sc, sd = sc + exponentials[c, n], sd + exponentials[d, n]
        # Draw j of an image is (E_1 + ... + E_j) · total weight / (E_1 + ... + E_{N+1}).
        fa, fb = _close_cdf(cdfs[:k, 0], ta) / sa, _close_cdf(cdfs[:k, 1], tb) / sb
        fc, fd = _close_cdf(cdfs[:k, 2], tc) / sc, _close_cdf(cdfs[:k, 3], td) / sd
        for j in range(n):
            draws[j, 0], draws[j, 1] = draws[j, 0] * fa, draws[j, 1] * fb
            draws[j, 2], draws[j, 3] = draws[j, 2] * fc, draws[j, 3] * fd
        pa, pb, pc, pd = np.uint64(0), np.uint64(1), np.uint64(2), np.uint64(3)  # positions
        ja, jb, jc, jd = np.uint64(0), np.uint64(1), np.uint64(2), np.uint64(3)  # draws
        for _ in range(k + n - 1):
            xa, xb = np.uint64(draw[ja] < cdf[pa]), np.uint64(draw[jb] < cdf[pb])
            xc, xd = np.uint64(draw[jc] < cdf[pc]), np.uint64(draw[jd] < cdf[pd])
            hit[pa] |= xa
            hit[pb] |= xb
            hit[pc] |= xc
            hit[pd] |= xd
            ja, jb, jc, jd = ja + step * xa, jb + step * xb, jc + step * xc, jd + step * xd
            pa, pb = pa + step - step * xa, pb + step - step * xb
            pc, pd = pc + step - step * xc, pd + step - step * xd
        count_a = count_b = count_c = count_d = 0
        for i in range(k):
            ha, hb, hc, hd = hits[i, 0], hits[i, 1], hits[i, 2], hits[i, 3]
            out[a, i] *= ha
            out[b, i] *= hb
            out[c, i] *= hc
            out[d, i] *= hd
            count_a, count_b, count_c, count_d = count_a + ha, count_b + hb, count_c + hc, count_d + hd
        distinct[a], distinct[b], distinct[c], distinct[d] = count_a, count_b, count_c, count_d
        hits[:k] = 0


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
