"""Training and evaluation of one run, as the authors did it (`docs/algorithm.md` §6).

A run writes into its folder (:mod:`experiments.runfolder`) as it goes. Rerunning the same
config in the same folder resumes from the last checkpoint, or returns at once if the run
had finished. A run whose training loss, a parameter or its test loss becomes NaN or inf (checked at every
step and every evaluation) stops there and is stored as diverged:
``metrics.json`` says ``"diverged"`` (where, and the last finite loss) and has no test
accuracy; the curve keeps its finite points.

A QCNN run with ``init_from`` (fine-tuning) starts from a trained CNN's weights instead of
its initialisation: converted, evaluated, calibrated on ``calibrate`` training images
(:func:`qcnn.calibrate`) and evaluated again, all recorded under ``"start"`` in its metrics.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from experiments import runfolder
from experiments.config import RunConfig
from experiments.data import Mnist
from experiments.files import run_lock
from experiments.models import build_model, build_optimiser
from qcnn import calibrate, load_classical
from qcnn.functional import NonFiniteError
from qcnn.training import Diverged, batches, evaluate, train_epoch
from qcnn.tuning import quantum_norms


def train_run(
    config: RunConfig,
    data: Mnist,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
    tensorboard: bool = False,
) -> dict:
    """Train and evaluate one run in ``out_dir``; resumable; returns its metrics. With
    ``tensorboard``, the epochs it trains are also logged as TensorBoard events
    (:class:`experiments.runfolder.EventLog`).

    Raises :class:`experiments.files.RunLocked` if another process is training there.
    """
    with run_lock(out_dir):
        return _train(config, data, out_dir, device, progress, tensorboard)


def _train(
    config: RunConfig, data: Mnist, out_dir: Path, device: torch.device, progress: bool, tensorboard: bool
) -> dict:
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
    if state is not None and state["config"] != config.as_dict():
        state = None  # another configuration's: this run starts afresh and overwrites it
    if state is not None:
        try:
            weights = runfolder.weights_for(model, state, out_dir / runfolder.CHECKPOINT)
        except ValueError as error:
            runfolder.set_aside(out_dir / runfolder.CHECKPOINT, error)
            state = None
    if state is not None:
        model.load_state_dict(weights)
        optimiser.load_state_dict(state["optimiser"])
        noise.set_state(state["noise"])
        order.set_state(state["order"])
        metrics, curve, start_epoch = state["metrics"], state["curve"], state["epoch"]
    elif config.init_from is not None:
        metrics["start"] = start_from_cnn(config, model, (train_x, train_y), (test_x, test_y), device)

    if start_epoch == config.epochs:  # finished, but its metrics.json was lost: write it again
        runfolder.write_metrics(out_dir, metrics)
        return metrics
    # One entry per session that trained it (a resumed run may change machine or threads).
    metrics.setdefault("provenance", []).append(runfolder.provenance(device))
    events = runfolder.EventLog(out_dir) if tensorboard else None
    try:
        with open(out_dir / runfolder.CURVE, "w", newline="") as handle:
            writer = runfolder.CurveWriter(handle, curve)
            for epoch in range(start_epoch, config.epochs):

                def log_point(index: int, size: int, loss: float, epoch: int = epoch) -> None:
                    seen = epoch * len(train_x) + index * config.batch_size + size
                    writer.add({"epoch": epoch, "batch": index, "images_seen": seen, "loss": loss})
                    if events is not None:
                        events.train_loss(seen, loss)

                started = time.perf_counter()
                try:
                    train_epoch(
                        model, optimiser, train_x, train_y, config.batch_size, generator=order,
                        log_every=config.log_every, on_log=log_point, progress=progress,
                        desc=f"{config.model} epoch {epoch + 1}/{config.epochs}",
                    )  # fmt: skip
                    train_seconds = time.perf_counter() - started
                    result = tested(model, (test_x, test_y), config.test_batch_size, epoch + 1)
                except Diverged as error:
                    before = sum(e["train_seconds"] for e in metrics["epochs"])
                    seconds = before + time.perf_counter() - started
                    last = curve[-1]["loss"] if curve else None
                    where = {"epoch": epoch + 1, "reason": str(error), "last_finite_loss": last}
                    metrics.update(finished=True, test_accuracy=None, test_loss=None, train_seconds=seconds,
                                   diverged=where)  # fmt: skip
                    runfolder.write_metrics(out_dir, metrics)
                    return metrics
                metrics["epochs"].append({"epoch": epoch + 1, "train_seconds": train_seconds, **result})
                metrics.update(result)
                if events is not None:
                    events.epoch(epoch + 1, result)
                metrics["train_seconds"] = sum(e["train_seconds"] for e in metrics["epochs"])
                metrics["finished"] = epoch + 1 == config.epochs
                runfolder.save_checkpoint(
                    out_dir,
                    {"config": config.as_dict(), "model": model.state_dict(),
                     "optimiser": optimiser.state_dict(), "noise": noise.get_state(),
                     "order": order.get_state(), "metrics": metrics, "curve": curve, "epoch": epoch + 1},
                )  # fmt: skip
                runfolder.write_metrics(out_dir, metrics)
    finally:
        if events is not None:  # the hyper-parameters once the run has its final metrics
            events.close(config.as_dict(), metrics if metrics["finished"] else None)
    return metrics


def tested(model: torch.nn.Module, test: tuple, batch_size: int, epoch: int) -> dict:
    """The test metrics after ``epoch``; :class:`Diverged` if the test loss, or a quantum
    layer's input or weights, is NaN or inf: such a model has no accuracy to report."""
    try:
        result = evaluate(model, *test, batch_size)
    except NonFiniteError as error:
        raise Diverged(f"{error} in the test after epoch {epoch}") from None
    if not math.isfinite(result["test_loss"]):
        raise Diverged(f"the test loss became {result['test_loss']} after epoch {epoch}")
    return result


def source_run(folder: Path, device: torch.device, net: str | None = None) -> dict:
    """The checkpoint of the trained CNN run in ``folder``; ValueError if it is not one (of
    ``net``, if given)."""
    state = runfolder.read_checkpoint(folder, device)
    source = RunConfig.from_dict(state["config"])
    if source.model != "cnn":
        raise ValueError(f"{folder} is not a CNN run (its model is {source.model!r}): fine-tuning starts "
                         "from a CNN")  # fmt: skip
    if net is not None and source.net != net:
        raise ValueError(f"{folder} trained the {source.net} net, not {net}")
    return state


def start_from_cnn(config: RunConfig, model: torch.nn.Module, train: tuple, test: tuple, device) -> dict:
    """Load ``config.init_from``'s CNN weights into the QCNN ``model`` and calibrate it on
    the first ``config.calibrate`` training images; the test metrics of each step."""
    load_classical(model, source_run(Path(config.init_from), device, config.net)["model"])

    def test_metrics() -> dict:
        result = evaluate(model, *test, config.test_batch_size)
        return {"test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"]}

    start = {"converted": test_metrics()}
    if config.calibrate and quantum_norms(model):  # a net without BatchNorms has nothing to calibrate
        started = time.perf_counter()
        images, labels = (part[: config.calibrate] for part in train)
        calibrate(model, batches(images, labels, config.batch_size))
        seconds = time.perf_counter() - started  # the calibration alone, not the test after it
        start["calibrated"] = {**test_metrics(), "calibrate_seconds": seconds}
    return start
