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


def plot_per_layer(rows: list[dict], path: Path) -> None:
    """Sensitivity per layer: one bar per layer (the accuracy with only that layer quantum,
    every other exact), one colour per grid point; the accuracy with every layer exact (the
    classical network) and with every layer quantum as lines, chance as a dotted line. One
    pass over the test images each: no error bars."""
    points = list(dict.fromkeys((row["epsilon"], row["sigma"], row["cap"]) for row in rows))
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(layers) * len(points) + 2) + 4, 4.5))
    width = 0.8 / len(points)
    for index, point in enumerate(points):
        chosen = {row["layer"]: row for row in rows if (row["epsilon"], row["sigma"], row["cap"]) == point}
        x = np.arange(len(layers)) + (index - (len(points) - 1) / 2) * width
        label = f"ε={point[0]:g}, σ={'no sampling' if point[1] is None else point[1]}, C={point[2]:g}"
        bars = ax.bar(x, [100 * chosen[layer]["sensitivity_accuracy"] for layer in layers], width,
                      label=f"only this layer quantum ({label})")  # fmt: skip
        first = next(iter(chosen.values()))
        ax.axhline(100 * first["quantum_accuracy"], color=bars.patches[0].get_facecolor(), linestyle="--",
                   label=f"every layer quantum ({label})")  # fmt: skip
    ax.axhline(100 * rows[0]["exact_accuracy"], color="black", label="every layer exact (classical)")
    ax.axhline(10, color="grey", linestyle=":", label="chance (10 classes)")
    ax.set_xticks(np.arange(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), one pass")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
