"""A trained network through the QCNN forward pass at a grid of options (``evaluate``).

The quantum layer is noisy in eval mode too (its estimation and sampling are what it is), so
one pass over the test set is one random draw of the accuracy. Each (ε, σ, C) is evaluated
``repeats`` times with the layers' generator running on, and reported as mean ± std over the
passes. A CNN checkpoint is made quantum by :func:`qcnn.convert` (the authors' "CNN train /
QCNN test"); a QCNN checkpoint keeps its mode's options and gets the grid's ε, σ and C by
:func:`qcnn.configure`.
"""

from __future__ import annotations

import csv
import itertools
import logging
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from experiments.config import RunConfig
from experiments.data import Mnist
from experiments.models import build_model
from experiments.plots import Baseline, Panel, plot_accuracy, plot_per_layer
from experiments.runfolder import read_checkpoint, read_metrics, weights_for
from qcnn import calibrate, configure, convert, diagnose
from qcnn.training import batches, evaluate
from qcnn.tuning import quantum_norms

log = logging.getLogger(__name__)
FIELDS = ("epsilon", "sigma", "cap", "repeat", "test_accuracy", "test_loss")


def load_checkpoint(
    path: Path, device: torch.device, generator: torch.Generator
) -> tuple[RunConfig, torch.nn.Module, dict]:
    """The run configuration, trained network and metrics of a run folder or its
    ``checkpoint.pt``; ValueError for a run that has not finished (or diverged): its numbers
    would be no result."""
    state = read_checkpoint(path, device)
    config = RunConfig.from_dict(state["config"])
    if not state["metrics"].get("finished"):
        folder = path if path.is_dir() else path.parent
        latest = read_metrics(folder) or {}
        done = len(state["metrics"]["epochs"])
        why = f"it trained {done} of {config.epochs} epochs; rerun its command to finish it"
        if "diverged" in latest:
            why = f"it diverged ({latest['diverged']['reason']})"
        raise ValueError(f"{path} is not a finished run: {why}")
    model = build_model(config, device, generator)
    model.load_state_dict(weights_for(model, state, path))
    return config, model, state["metrics"]


def run_evaluate(
    checkpoint: Path,
    epsilons: list[float],
    sigmas: list[float | None],
    caps: list[float],
    repeats: int,
    data: Mnist,
    device: torch.device,
    seed: int,
    out: Path,
    progress: bool = True,
    *,
    layers: dict | None = None,
    calibrate_images: int = 0,
    per_layer: bool = False,
) -> list[dict]:
    """Evaluate every grid point ``repeats`` times; write ``evaluate.csv`` (one row per pass)
    and ``accuracy_vs_epsilon.png`` into ``out``; return the rows.

    ``layers`` (a CNN run only) is the conversion's per-layer mapping (:func:`qcnn.convert`).
    With ``calibrate_images``, each grid point first calibrates the quantum layers'
    BatchNorms on that many training images (:func:`qcnn.calibrate`). With ``per_layer``,
    each grid point is also diagnosed layer by layer (:func:`qcnn.diagnose`), into
    ``per_layer.csv`` and ``per_layer.png``.
    """
    generator = torch.Generator(device).manual_seed(seed)
    config, model, trained = load_checkpoint(checkpoint, device, generator)
    if config.model == "cnn":
        model = convert(model, config.layer_options, layers=layers or config.layer_map, generator=generator)
    elif layers:
        raise ValueError(f"{checkpoint} is a QCNN run: a layers mapping chooses how a CNN run is converted")
    if calibrate_images and not quantum_norms(model):
        log.warning("evaluate: the quantum layers hold no BatchNorm: no calibration to do")
        calibrate_images = 0
    images, labels = data.test_images[: config.test_limit], data.test_labels[: config.test_limit]
    grid = list(itertools.product(epsilons, sigmas, caps))
    rows, diagnosed = [], []
    for epsilon, sigma, cap in tqdm(grid, desc="evaluate", disable=not progress):
        configure(model, epsilon=epsilon, sigma=sigma, cap=cap)
        if calibrate_images:
            train = (data.train_images[:calibrate_images], data.train_labels[:calibrate_images])
            calibrate(model, batches(*train, config.batch_size))
        for repeat in range(repeats):
            result = evaluate(model, images, labels, config.test_batch_size)
            point = {"epsilon": epsilon, "sigma": sigma, "cap": cap, "repeat": repeat}
            rows.append({**point, "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"]})
        if per_layer:
            diagnosis = diagnose(model, images, labels, config.test_batch_size)
            accuracies = {key: diagnosis[key] for key in ("exact_accuracy", "quantum_accuracy")}
            point = {"epsilon": epsilon, "sigma": sigma, "cap": cap}
            diagnosed += [{**point, **row, **accuracies} for row in diagnosis["layers"]]
    out.mkdir(parents=True, exist_ok=True)
    if per_layer:
        with open(out / "per_layer.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(diagnosed[0]))
            writer.writeheader()
            writer.writerows(diagnosed)
        plot_per_layer(diagnosed, out / "per_layer.png")
    with open(out / "evaluate.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    as_trained = Baseline(
        f"the {config.model.upper()} as trained (its run's test)", trained["test_accuracy"]
    )
    panel = Panel({}, [as_trained])
    for (epsilon, sigma, cap), mean, std, passes in summarise(rows):
        label = "no sampling" if sigma is None else f"σ={sigma:g}"
        label += f", C={cap:g}" if len(caps) > 1 else ""
        panel.series.setdefault(label, []).append((epsilon, mean, std, passes))
    plot_accuracy(panel, out / "accuracy_vs_epsilon.png", xlabel="inner-product error ε", unit="passes")
    return rows


def summarise(rows: list[dict]) -> list[tuple[tuple, float, float, int]]:
    """((ε, σ, C), mean accuracy, std over passes, passes) per grid point, in the grid's order."""
    points: dict[tuple, list[float]] = {}
    for row in rows:
        points.setdefault((row["epsilon"], row["sigma"], row["cap"]), []).append(row["test_accuracy"])
    return [
        (key, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
        for key, values in points.items()
    ]


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'epsilon':>8} {'sigma':>6} {'cap':>6} {'passes':>6}  test accuracy %"]
    for (epsilon, sigma, cap), mean, std, passes in summarise(rows):
        accuracy = f"{100 * mean:.2f} ± {100 * std:.2f}"
        lines.append(f"{epsilon:>8g} {str(sigma):>6} {cap:>6g} {passes:>6}  {accuracy}")
    return "\n".join(lines)
