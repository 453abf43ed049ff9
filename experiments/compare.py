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
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from experiments.config import RunConfig, run_id
from experiments.data import Mnist
from experiments.evaluate import load_checkpoint
from experiments.plots import CHANCE, plot_curves
from experiments.runfolder import read_curve
from experiments.train import train_run
from qcnn import calibrate, convert
from qcnn.training import batches, evaluate
from qcnn.tuning import quantum_norms

LABELS = {"cnn": "CNN", "qcnn": "QCNN", "cnn-qcnn-test": "CNN train / QCNN test",
          "cnn-qcnn-calibrated": "CNN train / QCNN test, calibrated"}  # fmt: skip
SUMMARY_FIELDS = ("model", "seed", "test_accuracy", "test_loss", "train_seconds", "diverged")


def cnn_through_qcnn(
    config: RunConfig, run_dir: Path, data: Mnist, device: torch.device, calibrate_images: int = 0
) -> dict[str, dict]:
    """Test metrics of the trained CNN of ``run_dir`` with its conv blocks run as QConv2d
    ("cnn-qcnn-test"), and where its quantum layers hold BatchNorms and ``calibrate_images``
    is set, once more after calibrating them on that many training images
    ("cnn-qcnn-calibrated")."""
    generator = torch.Generator(device).manual_seed(config.seed)
    _, cnn, _ = load_checkpoint(run_dir, device, generator)
    quantum = convert(cnn, config.layer_options, layers=config.layer_map, generator=generator)
    images, labels = data.test_images[: config.test_limit], data.test_labels[: config.test_limit]
    results = {"cnn-qcnn-test": evaluate(quantum, images, labels, config.test_batch_size)}
    if calibrate_images and quantum_norms(quantum):
        train = (data.train_images[:calibrate_images], data.train_labels[:calibrate_images])
        calibrate(quantum, batches(*train, config.batch_size))
        results["cnn-qcnn-calibrated"] = evaluate(quantum, images, labels, config.test_batch_size)
    return results


def run_compare(
    base: RunConfig,
    seeds: list[int],
    models: list[str],
    data: Mnist,
    out: Path,
    device: torch.device,
    progress: bool = True,
    calibrate_images: int = 0,
    tensorboard: bool = False,
) -> list[dict]:
    """Train every (model, seed), with TensorBoard events if ``tensorboard``; return and
    write one summary row per result (with a calibrated "CNN train / QCNN test" row where
    ``calibrate_images`` and BatchNorms ask for one)."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    curves: dict[str, list[list[dict]]] = {}
    for seed in seeds:
        for model in models:
            config = replace(base, model=model, seed=seed)
            run_dir = out / run_id(config)
            metrics = train_run(config, data, run_dir, device, progress, tensorboard)
            if curve := read_curve(run_dir):  # None: unreadable, left out of the figure
                curves.setdefault(LABELS[model], []).append(curve)
            diverged = "diverged" in metrics
            rows.append({"model": model, "seed": seed, **{k: metrics[k] for k in SUMMARY_FIELDS[2:-1]},
                         "diverged": diverged})  # fmt: skip
            label = LABELS[model]
            if diverged:
                print(f"  {label:<6} seed {seed}: diverged, {metrics['diverged']['reason']}")
            else:
                print(f"  {label:<6} seed {seed}: test accuracy {100 * metrics['test_accuracy']:.2f} %")
                if note := near_chance(config, metrics["test_accuracy"], len(data.train_images)):
                    print(f"  {label:<6} seed {seed}: {note}")
        cnn_trained = any(r["model"] == "cnn" and r["seed"] == seed and not r["diverged"] for r in rows)
        if cnn_trained:  # a diverged CNN's weights are NaN: nothing to run through the QCNN
            config = replace(base, seed=seed)
            cnn_run = out / run_id(replace(config, model="cnn"))
            for name, result in cnn_through_qcnn(config, cnn_run, data, device, calibrate_images).items():
                metrics = {key: result[key] for key in ("test_accuracy", "test_loss")}
                rows.append({"model": name, "seed": seed, "train_seconds": 0.0, **metrics, "diverged": False})
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


# A recipe that learns on little data: over 80 % on 2,000 images (tests/test_experiments.py).
SMALL_DATA_RECIPE = "--train-limit 2000 --epochs 5 --lr 0.05 --momentum 0.5"


def near_chance(config: RunConfig, accuracy: float, available: int) -> str | None:
    """Why a run that ends below twice chance learnt nothing, or None if it did learn
    (``available``: the training images there are; a larger limit is refused before)."""
    if accuracy >= 2 * CHANCE:
        return None
    images = config.train_limit or available
    steps = config.epochs * -(-images // config.batch_size)
    return (f"near chance ({100 * CHANCE:.0f} %): {steps} step(s) of batch {config.batch_size} at lr "
            f"{config.lr:g} ({config.optimizer}) are too few for this recipe; on little data, "
            f"{SMALL_DATA_RECIPE} learns (README, Quick start)")  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """Mean ± std over seeds per model (per net and model, with rows of several nets): test
    accuracy, test loss, training time."""
    nets = list(dict.fromkeys(row.get("net") for row in rows))
    kinds = [(net, model, f"{net}: {label}" if len(nets) > 1 else label)
             for net in nets for model, label in LABELS.items()]  # fmt: skip
    width = max(22, *(len(label) for net, model, label in kinds if any(r["model"] == model for r in rows)))
    lines = [f"{'model':<{width}} {'seeds':>5} {'test accuracy %':>18} {'test loss':>10} {'train s':>8}"]
    for net, model, label in kinds:
        group = [r for r in rows if r.get("net") == net and r["model"] == model and not r["diverged"]]
        diverged = sum(r.get("net") == net and r["model"] == model and r["diverged"] for r in rows)
        if diverged:
            lines.append(f"{label:<{width}} {diverged:>5}  diverged (no test accuracy)")
        if not group:
            continue
        acc = [100 * r["test_accuracy"] for r in group]
        spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        lines.append(
            f"{label:<{width}} {len(group):>5} {statistics.mean(acc):>10.2f}{spread:<8} "
            f"{statistics.mean(r['test_loss'] for r in group):>10.4f} "
            f"{statistics.mean(r['train_seconds'] for r in group):>8.1f}"
        )
    return "\n".join(lines)


def format_start(runs: list[tuple[dict, dict]]) -> str:
    """Fine-tuning runs step by step: the CNN each started from (its metrics), converted,
    calibrated, trained on as a QCNN (the run's metrics); test accuracy (mean ± std over the
    runs that did not diverge) and mean seconds of each step."""
    steps: dict[str, list[tuple[float | None, float]]] = defaultdict(list)
    for source, metrics in runs:
        start = metrics["start"]
        steps["CNN"].append((source["test_accuracy"], source["train_seconds"]))
        steps["converted to a QCNN"].append((start["converted"]["test_accuracy"], 0.0))
        if calibrated := start.get("calibrated"):
            steps["calibrated"].append((calibrated["test_accuracy"], calibrated["calibrate_seconds"]))
        label = f"fine-tuned, {metrics['config']['epochs']} epoch(s)"
        accuracy = None if "diverged" in metrics else metrics["test_accuracy"]
        steps[label].append((accuracy, metrics["train_seconds"]))
    lines = [f"{'step':<30} {'runs':>4} {'test accuracy %':>18} {'seconds':>8}"]
    for label, values in steps.items():
        accuracy = [100 * value for value, _ in values if value is not None]
        shown = f"{statistics.mean(accuracy):.2f}" if accuracy else "diverged"
        shown += f" ± {statistics.stdev(accuracy):.2f}" if len(accuracy) > 1 else ""
        seconds = statistics.mean(second for _, second in values)
        lines.append(f"{label:<30} {len(values):>4} {shown:>18} {seconds:>8.1f}")
    return "\n".join(lines)
