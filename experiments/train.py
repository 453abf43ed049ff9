"""Training and evaluation of one run, as the authors did it (`docs/algorithm.md` §6).

A run writes into its folder as it goes: ``curve.csv`` (mini-batch loss every
``log_every`` batches against training images seen, the authors' x-axis), ``metrics.json``
(config, per-epoch test loss and accuracy, wall times, QCNN running-time accounting), and
``checkpoint.pt`` at every epoch end. Rerunning the same config in the same folder resumes
from the last checkpoint, or returns at once if the run had finished.

A run whose loss becomes NaN or inf stops there and is stored as diverged: ``metrics.json``
says ``"diverged"`` (where, and the last finite loss) and has no test accuracy; the curve
keeps its finite points. A ``metrics.json`` or ``checkpoint.pt`` that cannot be read (a
truncated file, say) is renamed ``*.unreadable`` with a warning naming it, and the run is
trained again from its last readable state.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import pickle
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from experiments.config import RunConfig
from experiments.data import Mnist, batches
from experiments.files import atomic_save, atomic_write_text, run_lock
from experiments.models import build_model, build_optimiser, qconv_layers

CURVE_FIELDS = ("epoch", "batch", "images_seen", "loss")
log = logging.getLogger(__name__)
# What torch.load and json raise on a truncated or corrupt file.
UNREADABLE = (
    OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile
)  # fmt: skip


class Diverged(ArithmeticError):
    """The training loss became NaN or inf."""


def set_aside(path: Path, error: Exception) -> None:
    """Rename an unreadable run file to ``<name>.unreadable`` (kept for a look), with a warning."""
    path.replace(path.with_name(path.name + ".unreadable"))
    log.warning("%s cannot be read (%s: %s): set aside as %s.unreadable; the run is trained again",
                path, type(error).__name__, error, path.name)  # fmt: skip


def read_metrics(out_dir: Path) -> dict | None:
    """``out_dir/metrics.json``, or None if there is none or it cannot be read (set aside)."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict):
            raise ValueError(f"a JSON {type(metrics).__name__}, not an object")
        return metrics
    except UNREADABLE as error:
        set_aside(path, error)
        return None


def read_finished(out_dir: Path, config: RunConfig) -> dict | None:
    """The metrics of a finished (or diverged) run of ``config`` in ``out_dir``, else None."""
    metrics = read_metrics(out_dir)
    if metrics and metrics.get("finished") and metrics.get("config") == config.as_dict():
        return metrics
    return None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    loss_fn: Callable[..., torch.Tensor] = F.nll_loss,
) -> dict:
    """Test loss, accuracy and (QCNN) mean per-layer running-time accounting, of any model.

    The QCNN keeps its quantum forward pass (noise, cap, sampling) at test time: eval mode
    does not switch the quantum layer's noise off, so one pass is one random draw of the
    accuracy (average several, as ``python -m experiments evaluate --repeats`` does).
    ``loss_fn(output, labels, reduction="sum")`` gives the test loss.
    """
    model.eval()
    layers = qconv_layers(model)
    costs: dict[str, list[dict]] = {name: [] for name in layers}
    for layer in layers.values():
        layer.track_cost = True
    loss_sum, correct = 0.0, 0
    try:
        for x, y in batches(images, labels, batch_size):
            out = model(x)
            loss_sum += loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            for name, layer in layers.items():
                costs[name].append(layer.last_cost.as_dict())
    finally:
        for layer in layers.values():
            layer.track_cost = False
    model.train()
    summary = {
        name: {key: finite_mean([row[key] for row in rows]) for key in rows[0]}
        for name, rows in costs.items()
        if rows
    }
    return {"test_loss": loss_sum / len(images), "test_accuracy": correct / len(images), "cost": summary}


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a quantum cost is infinite where ε = 0); inf if none is."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    *,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.nll_loss,
    log_every: int = 10,
    on_log: Callable[[int, int, float], None] | None = None,
    progress: bool = True,
    desc: str = "training",
) -> list[float]:
    """One epoch of mini-batch training of any model; returns the loss of every
    ``log_every``-th batch. Raises :class:`Diverged` if one of them is NaN or inf.

    The batches are shuffled by ``generator`` (in order if None). ``loss_fn`` takes the
    model's output and the labels (the default suits a log-softmax output, as the built-in
    networks have; ``F.cross_entropy`` suits logits). ``on_log(batch index, batch size,
    loss)`` is called for each logged batch, e.g. to write a curve as it goes.
    """
    model.train()
    losses = []
    bar = tqdm(
        batches(images, labels, batch_size, generator), total=math.ceil(len(images) / batch_size),
        desc=desc, disable=not progress, leave=False,
    )  # fmt: skip
    for index, (x, y) in enumerate(bar):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimiser.step()
        if index % log_every == 0:  # a NaN stays NaN: checking the logged batches finds it
            value = loss.item()
            if not math.isfinite(value):
                raise Diverged(f"the loss became {value} at batch {index}")
            losses.append(value)
            if on_log is not None:
                on_log(index, len(x), value)
            bar.set_postfix(loss=f"{value:.3f}")
    return losses


def train_run(
    config: RunConfig,
    data: Mnist,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Train and evaluate one run in ``out_dir``; resumable; returns its metrics.

    Raises :class:`experiments.files.RunLocked` if another process is training there.
    """
    with run_lock(out_dir):
        return _train(config, data, out_dir, device, progress)


def _train(config: RunConfig, data: Mnist, out_dir: Path, device: torch.device, progress: bool) -> dict:
    if (finished := read_finished(out_dir, config)) is not None:
        return finished
    train_x, train_y = data.train_images[: config.train_limit], data.train_labels[: config.train_limit]
    test_x, test_y = data.test_images[: config.test_limit], data.test_labels[: config.test_limit]

    noise = torch.Generator(device).manual_seed(config.seed)  # the QCNN layers' randomness
    order = torch.Generator().manual_seed(config.seed)  # data order, identical on every device
    model = build_model(config, device, noise)
    optimiser = build_optimiser(config, model, noise)
    metrics = {"config": config.as_dict(), "device": str(device), "epochs": [], "finished": False}
    curve_path, checkpoint_path = out_dir / "curve.csv", out_dir / "checkpoint.pt"
    curve: list[dict] = []
    start_epoch = 0
    if checkpoint_path.is_file():
        try:
            state = torch.load(checkpoint_path, map_location=device, weights_only=False)
            resume = state["config"] == config.as_dict()
        except UNREADABLE as error:
            set_aside(checkpoint_path, error)
            resume = False
        if resume:
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            noise.set_state(state["noise"])
            order.set_state(state["order"])
            metrics, curve, start_epoch = state["metrics"], state["curve"], state["epoch"]

    if start_epoch == config.epochs:  # finished, but its metrics.json was lost: write it again
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics
    with open(curve_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(curve)
        handle.flush()
        for epoch in range(start_epoch, config.epochs):

            def log_point(index: int, size: int, loss: float, epoch: int = epoch) -> None:
                seen = epoch * len(train_x) + index * config.batch_size + size
                row = {"epoch": epoch, "batch": index, "images_seen": seen, "loss": loss}
                curve.append(row)
                writer.writerow(row)
                handle.flush()

            started = time.perf_counter()
            try:
                train_epoch(
                    model, optimiser, train_x, train_y, config.batch_size, generator=order,
                    log_every=config.log_every, on_log=log_point, progress=progress,
                    desc=f"{config.model} epoch {epoch + 1}/{config.epochs}",
                )  # fmt: skip
            except Diverged as error:
                seconds = sum(e["train_seconds"] for e in metrics["epochs"]) + time.perf_counter() - started
                last = curve[-1]["loss"] if curve else None
                where = {"epoch": epoch + 1, "reason": str(error), "last_finite_loss": last}
                metrics.update(finished=True, test_accuracy=None, test_loss=None, train_seconds=seconds,
                               diverged=where)  # fmt: skip
                atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
                return metrics
            train_seconds = time.perf_counter() - started
            result = evaluate(model, test_x, test_y, config.test_batch_size)
            metrics["epochs"].append({"epoch": epoch + 1, "train_seconds": train_seconds, **result})
            metrics.update(result)
            metrics["train_seconds"] = sum(e["train_seconds"] for e in metrics["epochs"])
            metrics["finished"] = epoch + 1 == config.epochs
            atomic_save(
                {"config": config.as_dict(), "model": model.state_dict(),
                 "optimiser": optimiser.state_dict(), "noise": noise.get_state(),
                 "order": order.get_state(), "metrics": metrics, "curve": curve, "epoch": epoch + 1},
                checkpoint_path,
            )  # fmt: skip
            atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
