"""Figures in the style of the paper: loss against training images seen (a rolling mean), test
accuracy against an option (σ for sweeps, ε for ``evaluate``) with the CNN and chance drawn,
and the per-layer sensitivity."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """One line per label: the mean over its seeds' smoothed curves, a band of ±1 std. The
    rolling mean takes 12 points, or a quarter of a short curve."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shortest = min(len(run) for runs in curves.values() for run in runs)
    window = max(1, min(ROLLING, shortest // 4))
    for label, runs in curves.items():
        length = min(len(run) for run in runs)
        x = np.array([row["images_seen"] for row in runs[0][:length]], dtype=float)
        losses = [np.array([row["loss"] for row in run[:length]], dtype=float) for run in runs]
        smoothed = np.stack([rolling_mean(loss, window) for loss in losses])
        mean = smoothed.mean(0)
        seeds = f" (mean ± 1 std over {len(runs)} seeds)" if len(runs) > 1 else ""
        (line,) = ax.plot(x, mean, label=f"{label}{seeds}")
        if len(runs) > 1:
            std = smoothed.std(0)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training images seen")
    ax.set_ylabel(f"training loss (rolling mean of {window} logged batches)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


Points = list[tuple[float, float, float, int]]  # (x, mean accuracy, std, how many runs or passes)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CHANCE = 0.1  # ten classes


@dataclass
class Baseline:
    """A reference accuracy drawn across a panel: the CNN's, mean ± std over ``count``."""

    label: str
    mean: float
    std: float = 0.0
    count: int = 1


@dataclass
class Panel:
    """One panel of :func:`plot_accuracy_panels`: lines of (x, mean, std, n) points, the
    baselines drawn across it, and a series' configuration without sampling (no σ, so no x)
    as a dashed line of the series' colour."""

    series: dict[str, Points]
    baselines: list[Baseline] = field(default_factory=list)
    unsampled: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # label: (mean, std, n)


def plot_accuracy(panel: Panel, path: Path, xlabel: str = "sampling ratio σ", unit: str = "seeds") -> None:
    """Test accuracy against an option: one panel (see :func:`plot_accuracy_panels`)."""
    plot_accuracy_panels({"": panel}, path, xlabel, unit)


def plot_accuracy_panels(
    panels: dict[str, Panel], path: Path, xlabel: str = "sampling ratio σ", unit: str = "seeds"
) -> None:
    """Test accuracy against an option, one panel per key, side by side on one y axis.

    Points are means with error bars of ±1 std over the n ``unit`` (seeds, or repeated
    passes) of each, n in the legend; series are told apart by marker and a small x offset;
    the baselines (the CNN) are lines with a ±1 std band, chance a dotted line; the x axis is
    logarithmic (linear around 0) where its values span a decade or more.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), sharey=True, squeeze=False)
    for ax, (title, panel) in zip(axes[0], panels.items(), strict=True):
        xs = sorted({p[0] for points in panel.series.values() for p in points})
        positive = [x for x in xs if x > 0]
        log = len(positive) > 1 and positive[-1] / positive[0] >= 10
        if log:
            ax.set_xscale("symlog", linthresh=positive[0]) if xs[0] <= 0 else ax.set_xscale("log")
        for index, (label, points) in enumerate(panel.series.items()):
            points = sorted(points)
            offset = (index - (len(panel.series) - 1) / 2) * 0.012  # a share of the x range (or decade)
            shift = [x * 10**offset if log else x + offset * (xs[-1] - xs[0] or 1) for x, *_ in points]
            counts = sorted({p[3] for p in points})
            n = f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"
            means, stds = [100 * p[1] for p in points], [100 * p[2] for p in points]
            marker = MARKERS[index % len(MARKERS)]
            line = ax.errorbar(shift, means, yerr=stds, marker=marker, capsize=3, label=f"{label} ({n})")
            if label in panel.unsampled:
                mean, std, count = panel.unsampled[label]
                text = f"{label}, no sampling: {100 * mean:.2f} ± {100 * std:.2f} % (n = {count})"
                colour = line.lines[0].get_color()
                ax.axhline(100 * mean, color=colour, linestyle="--", linewidth=1, label=text)
        for baseline in panel.baselines:
            low, high = 100 * (baseline.mean - baseline.std), 100 * (baseline.mean + baseline.std)
            ax.axhspan(low, high, color="black", alpha=0.08)
            ax.axhline(100 * baseline.mean, color="black", linewidth=1.2,
                       label=f"{baseline.label}: {100 * baseline.mean:.2f} ± {100 * baseline.std:.2f} % "
                             f"(n = {baseline.count})")  # fmt: skip
        ax.axhline(100 * CHANCE, color="grey", linestyle=":", label="chance (10 classes)")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"test accuracy (%): mean ± 1 std over n {unit}")
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
    ax.axhline(100 * CHANCE, color="grey", linestyle=":", label="chance (10 classes)")
    ax.set_xticks(np.arange(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), one pass")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
