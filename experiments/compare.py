"""The MNIST quantum-vs-classical comparison (`docs/algorithm.md` §6).

For each seed: the CNN and the QCNN with identical initial weights and data order, then the
trained CNN evaluated through the QCNN forward pass (the authors' "CNN train / QCNN test").
Writes one folder per run, named by its whole configuration (:func:`experiments.config.run_id`,
so runs with other options never share a folder), ``summary.csv`` and ``curves.png`` into the
output folder.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from experiments.config import RunConfig, run_id
from experiments.data import Mnist
from experiments.evaluate import load_checkpoint
from experiments.plots import plot_curves
from experiments.runfolder import read_curve
from experiments.train import train_run
from qcnn import convert
from qcnn.training import evaluate

LABELS = {"cnn": "CNN", "qcnn": "QCNN", "cnn-qcnn-test": "CNN train / QCNN test"}
SUMMARY_FIELDS = ("model", "seed", "test_accuracy", "test_loss", "train_seconds", "diverged")


def cnn_through_qcnn(
    config: RunConfig, run_dir: Path, data: Mnist, device: torch.device
) -> dict:
    """Test metrics of the trained CNN of ``run_dir`` with its conv blocks run as QConv2d."""
    generator = torch.Generator(device).manual_seed(config.seed)
    _, cnn = load_checkpoint(run_dir, device, generator)
    quantum = convert(cnn, config.layer_options, generator=generator)
    images, labels = data.test_images[: config.test_limit], data.test_labels[: config.test_limit]
    return evaluate(quantum, images, labels, config.test_batch_size)


def run_compare(
    base: RunConfig,
    seeds: list[int],
    models: list[str],
    data: Mnist,
    out: Path,
    device: torch.device,
    progress: bool = True,
) -> list[dict]:
    """Train every (model, seed); return and write one summary row per result."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    curves: dict[str, list[list[dict]]] = {}
    for seed in seeds:
        for model in models:
            config = replace(base, model=model, seed=seed)
            run_dir = out / run_id(config)
            metrics = train_run(config, data, run_dir, device, progress)
            curves.setdefault(LABELS[model], []).append(read_curve(run_dir))
            diverged = "diverged" in metrics
            rows.append({"model": model, "seed": seed, **{k: metrics[k] for k in SUMMARY_FIELDS[2:-1]},
                         "diverged": diverged})  # fmt: skip
            label = LABELS[model]
            if diverged:
                print(f"  {label:<6} seed {seed}: diverged, {metrics['diverged']['reason']}")
            else:
                print(f"  {label:<6} seed {seed}: test accuracy {100 * metrics['test_accuracy']:.2f} %")
        cnn_trained = any(r["model"] == "cnn" and r["seed"] == seed and not r["diverged"] for r in rows)
        if cnn_trained:  # a diverged CNN's weights are NaN: nothing to run through the QCNN
            config = replace(base, seed=seed)
            result = cnn_through_qcnn(config, out / run_id(replace(config, model="cnn")), data, device)
            accuracy, loss = result["test_accuracy"], result["test_loss"]
            rows.append(
                {"model": "cnn-qcnn-test", "seed": seed, "train_seconds": 0.0,
                 "test_accuracy": accuracy, "test_loss": loss, "diverged": False}
            )  # fmt: skip
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    title = (
        f"{base.net} net, QCNN ε={base.epsilon}, C={base.cap}, σ={base.sigma}, "
        f"δ={base.delta} ({base.mode})"
    )
    plot_curves(curves, out / "curves.png", title)
    return rows


def format_table(rows: list[dict]) -> str:
    """Mean ± std over seeds per model: test accuracy, test loss, training time."""
    lines = [f"{'model':<22} {'seeds':>5} {'test accuracy %':>18} {'test loss':>10} {'train s':>8}"]
    for model, label in LABELS.items():
        group = [r for r in rows if r["model"] == model and not r["diverged"]]
        diverged = sum(r["model"] == model and r["diverged"] for r in rows)
        if diverged:
            lines.append(f"{label:<22} {diverged:>5}  diverged (no test accuracy)")
        if not group:
            continue
        acc = [100 * r["test_accuracy"] for r in group]
        spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        lines.append(
            f"{label:<22} {len(group):>5} {statistics.mean(acc):>10.2f}{spread:<8} "
            f"{statistics.mean(r['test_loss'] for r in group):>10.4f} "
            f"{statistics.mean(r['train_seconds'] for r in group):>8.1f}"
        )
    return "\n".join(lines)
