"""Training and evaluation of one run, as the authors did it (`docs/algorithm.md` §6).

A run writes into its folder (:mod:`experiments.runfolder`) as it goes. Rerunning the same
config in the same folder resumes from the last checkpoint, or returns at once if the run
had finished. A run whose loss becomes NaN or inf stops there and is stored as diverged:
``metrics.json`` says ``"diverged"`` (where, and the last finite loss) and has no test
accuracy; the curve keeps its finite points.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from experiments import runfolder
from experiments.config import RunConfig
from experiments.data import Mnist
from experiments.files import run_lock
from experiments.models import build_model, build_optimiser
from qcnn.training import Diverged, evaluate, train_epoch


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
    if (finished := runfolder.read_finished(out_dir, config)) is not None:
        return finished
    train_x, train_y = data.train_images[: config.train_limit], data.train_labels[: config.train_limit]
    test_x, test_y = data.test_images[: config.test_limit], data.test_labels[: config.test_limit]

    noise = torch.Generator(device).manual_seed(config.seed)  # the QCNN layers' randomness
    order = torch.Generator().manual_seed(config.seed)  # data order, identical on every device
    model = build_model(config, device, noise)
    optimiser = build_optimiser(config, model, noise)
    metrics = {"config": config.as_dict(), "device": str(device), "epochs": [], "finished": False}
    curve: list[dict] = []
    start_epoch, state = 0, None
    if (out_dir / runfolder.CHECKPOINT).is_file():
        try:
            state = runfolder.read_checkpoint(out_dir, device)
        except ValueError as error:
            runfolder.set_aside(out_dir / runfolder.CHECKPOINT, error)
    if state is not None and state["config"] == config.as_dict():
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        noise.set_state(state["noise"])
        order.set_state(state["order"])
        metrics, curve, start_epoch = state["metrics"], state["curve"], state["epoch"]

    if start_epoch == config.epochs:  # finished, but its metrics.json was lost: write it again
        runfolder.write_metrics(out_dir, metrics)
        return metrics
    with open(out_dir / runfolder.CURVE, "w", newline="") as handle:
        writer = runfolder.CurveWriter(handle, curve)
        for epoch in range(start_epoch, config.epochs):

            def log_point(index: int, size: int, loss: float, epoch: int = epoch) -> None:
                seen = epoch * len(train_x) + index * config.batch_size + size
                writer.add({"epoch": epoch, "batch": index, "images_seen": seen, "loss": loss})

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
                runfolder.write_metrics(out_dir, metrics)
                return metrics
            train_seconds = time.perf_counter() - started
            result = evaluate(model, test_x, test_y, config.test_batch_size)
            metrics["epochs"].append({"epoch": epoch + 1, "train_seconds": train_seconds, **result})
            metrics.update(result)
            metrics["train_seconds"] = sum(e["train_seconds"] for e in metrics["epochs"])
            metrics["finished"] = epoch + 1 == config.epochs
            runfolder.save_checkpoint(
                out_dir,
                {"config": config.as_dict(), "model": model.state_dict(),
                 "optimiser": optimiser.state_dict(), "noise": noise.get_state(),
                 "order": order.get_state(), "metrics": metrics, "curve": curve, "epoch": epoch + 1},
            )  # fmt: skip
            runfolder.write_metrics(out_dir, metrics)
    return metrics
