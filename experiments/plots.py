"""Figures in the style of the paper: loss against training images seen (rolling mean of 12),
and test accuracy against an option (σ for sweeps, ε for ``evaluate``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROLLING = 12


def rolling_mean(values: np.ndarray, window: int = ROLLING) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start), as pandas' rolling(min_periods=1)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot_curves(curves: dict[str, list[list[dict]]], path: Path, title: str = "") -> None:
    """One line per label: the mean over its seeds' smoothed curves, a band of ±1 std."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in curves.items():
        length = min(len(run) for run in runs)
        x = np.array([row["images_seen"] for row in runs[0][:length]], dtype=float)
        smoothed = np.stack(
            [rolling_mean(np.array([row["loss"] for row in run[:length]], dtype=float)) for run in runs]
        )
        mean = smoothed.mean(0)
        (line,) = ax.plot(x, mean, label=label if len(runs) == 1 else f"{label} ({len(runs)} seeds)")
        if len(runs) > 1:
            std = smoothed.std(0)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training images seen")
    ax.set_ylabel(f"training loss (rolling mean of {ROLLING} logs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


Points = list[tuple[float, float, float]]  # (x, mean accuracy, std)


def plot_accuracy(series: dict[str, Points], path: Path, xlabel: str = "sampling ratio σ") -> None:
    """Test accuracy (x, mean, std) against an option, one line per label, error bars = std
    (over seeds, or over repeated passes)."""
    plot_accuracy_panels({"": series}, path, xlabel)


def plot_accuracy_panels(
    panels: dict[str, dict[str, Points]], path: Path, xlabel: str = "sampling ratio σ"
) -> None:
    """:func:`plot_accuracy` once per panel (titled by its key), side by side, sharing the y axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), sharey=True, squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items(), strict=True):
        for label, points in series.items():
            points = sorted(points)
            ax.errorbar(
                [p[0] for p in points], [100 * p[1] for p in points], yerr=[100 * p[2] for p in points],
                marker="o", capsize=3, label=label,
            )  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
