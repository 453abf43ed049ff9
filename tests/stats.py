"""Statistical checks with bounds from the theory, shared by the tests.

Every test uses a fixed seed, so each check is deterministic; the significance levels
below say how unlikely a failure of a correct implementation would be for a random seed.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 1e-4  # significance level of every statistical test


def assert_standard_normal(z: np.ndarray) -> None:
    """z-test of mean 0 and chi-square test of variance 1 for i.i.d. samples ``z``."""
    z = np.asarray(z, dtype=float).ravel()
    n = len(z)
    bound = stats.norm.ppf(1 - ALPHA / 2) / np.sqrt(n)
    assert abs(z.mean()) < bound, f"mean {z.mean():.4g} outside ±{bound:.4g} (n={n})"
    statistic = ((z - z.mean()) ** 2).sum()  # (n−1)s² ~ χ²(n−1) when the variance is 1
    low, high = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], n - 1)
    assert low < statistic < high, f"variance {statistic / (n - 1):.4g} not 1 (n={n})"


def assert_matches_distribution(counts: np.ndarray, probabilities: np.ndarray) -> None:
    """Chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    counts = np.asarray(counts, dtype=float)
    probabilities = np.asarray(probabilities, dtype=float)
    expected = probabilities / probabilities.sum() * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        if expected[-1] == 0:
            assert counts[-1] == 0, f"{counts[-1]} draws in cells of probability 0"
            counts, expected = counts[:-1], expected[:-1]
    result = stats.chisquare(counts, expected)
    assert result.pvalue > ALPHA, f"chi-square p = {result.pvalue:.3g}: {counts} vs {expected}"
