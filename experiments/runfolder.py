"""A run's folder, read and written in one place (``docs/algorithm.md`` §6 for what a run is).

A run folder holds ``curve.csv`` (the mini-batch loss every ``log_every`` batches against
training images seen, the authors' x-axis), ``metrics.json`` (the configuration, per-epoch
test loss and accuracy, wall times, the QCNN layers' running-time accounting, and whether
the run finished or diverged) and ``checkpoint.pt`` (model, optimiser, generators, metrics
and curve at the last epoch end). Every file is replaced atomically. A ``metrics.json`` or
``checkpoint.pt`` that cannot be read (a truncated file, say) is renamed ``*.unreadable``
with a warning naming it, so the run is trained again from its last readable state.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import logging
import math
import pickle
import platform
import subprocess
import zipfile
from pathlib import Path
from typing import TextIO

import torch

from experiments.config import RunConfig
from experiments.files import atomic_save, atomic_write_text

METRICS, CURVE, CHECKPOINT = "metrics.json", "curve.csv", "checkpoint.pt"
CURVE_FIELDS = ("epoch", "batch", "images_seen", "loss")
log = logging.getLogger(__name__)
# What torch.load and json raise on a truncated or corrupt file.
UNREADABLE = (
    OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile
)  # fmt: skip


def set_aside(path: Path, error: Exception) -> None:
    """Rename an unreadable run file to ``<name>.unreadable`` (kept for a look), with a warning."""
    path.replace(path.with_name(path.name + ".unreadable"))
    log.warning("%s cannot be read (%s: %s): set aside as %s.unreadable; the run is trained again",
                path, type(error).__name__, error, path.name)  # fmt: skip


def read_metrics(folder: Path) -> dict | None:
    """``folder/metrics.json``, or None if there is none or it cannot be read (set aside)."""
    path = folder / METRICS
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


def strict(value: object) -> object:
    """``value`` with every NaN or infinite float as None: strict JSON, which has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    return value


VERSIONS = ("qcnn", "torch", "numpy", "numba", "triton", "pennylane", "qiskit", "qiskit-aer")


def provenance(device: torch.device) -> dict:
    """What a run's numbers depend on besides its configuration: the versions of qcnn (and
    the git commit of its source, "+dirty" with uncommitted changes) and of the packages
    that compute, the torch threads, the device and the CPU."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        status = ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=10, check=True).stdout
        commit += "+dirty" * bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"versions": versions, "commit": commit, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": str(device), "device_name": name, "cpu": cpu_name()}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_metrics(folder: Path, metrics: dict) -> None:
    """``metrics.json`` as strict JSON (a non-finite number, an infinite cost at ε = 0, is null)."""
    atomic_write_text(folder / METRICS, json.dumps(strict(metrics), indent=2, allow_nan=False))


def read_finished(folder: Path, config: RunConfig) -> dict | None:
    """The metrics of a finished (or diverged) run of ``config`` in ``folder``, else None."""
    metrics = read_metrics(folder)
    if metrics and metrics.get("finished") and metrics.get("config") == config.as_dict():
        return metrics
    return None


def read_curve(folder: Path) -> list[dict] | None:
    """The training curve, [{"images_seen": int, "loss": float}, ...]. A missing or damaged
    ``curve.csv`` is rebuilt from the checkpoint's copy (with a warning), or left out (None,
    with a warning) where there is none."""
    try:
        with open(folder / CURVE, newline="") as handle:
            return [
                {"images_seen": int(row["images_seen"]), "loss": float(row["loss"])}
                for row in csv.DictReader(handle)
            ]
    except (OSError, ValueError, TypeError, KeyError) as error:
        damage = f"{type(error).__name__}: {error}"
    try:
        points = read_checkpoint(folder, torch.device("cpu"))["curve"]
    except ValueError:
        log.warning("%s cannot be read (%s) and there is no checkpoint to rebuild it from: left out",
                    folder / CURVE, damage)  # fmt: skip
        return None
    text = io.StringIO()
    writer = csv.DictWriter(text, CURVE_FIELDS)
    writer.writeheader()
    writer.writerows(points)
    atomic_write_text(folder / CURVE, text.getvalue())
    log.warning("%s cannot be read (%s): rebuilt from the checkpoint (%d points, to its last epoch)",
                folder / CURVE, damage, len(points))  # fmt: skip
    return [{"images_seen": point["images_seen"], "loss": point["loss"]} for point in points]


class CurveWriter:
    """``curve.csv`` rewritten from the points a checkpoint kept, then appended to and
    flushed point by point, so a killed run leaves every point it logged."""

    def __init__(self, handle: TextIO, points: list[dict]) -> None:
        self.points, self.handle = points, handle
        self.writer = csv.DictWriter(handle, CURVE_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(points)
        handle.flush()

    def add(self, point: dict) -> None:
        self.points.append(point)
        try:
            self.writer.writerow(point)
            self.handle.flush()
        except OSError as error:  # a full disk, a file-size limit: one line naming the file
            raise OSError(f"cannot write {self.handle.name}: {error.strerror or error}") from None


def checkpoint_file(path: Path) -> Path:
    """The checkpoint of a run folder, or ``path`` itself; ValueError if there is none."""
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no checkpoint at {file} (give a run folder or its checkpoint.pt)")
    return file


def read_checkpoint(path: Path, device: torch.device) -> dict:
    """The saved state of a run folder or its ``checkpoint.pt`` (``"config"`` as a dict, as
    :meth:`RunConfig.as_dict` wrote it, ``"model"``, ...); ValueError naming the file if it
    cannot be read."""
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location=device, weights_only=False)
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and "model" in state):
            raise ValueError("not a run's checkpoint (no config and model in it)")
        return state
    except UNREADABLE as error:
        raise ValueError(f"{file} is not a readable checkpoint ({type(error).__name__}: {error})") from None


def weights_for(model: torch.nn.Module, state: dict, file: Path) -> dict:
    """The model weights of a checkpoint's ``state``, checked to name exactly ``model``'s
    entries first (nothing is loaded half-way); ValueError naming ``file`` if they do not, as
    for a checkpoint of an older qcnn, whose QCNN layers had other names."""
    saved, expected = set(state["model"]), set(model.state_dict())
    if saved != expected:
        odd = sorted(saved ^ expected)[:3]
        raise ValueError(f"{file} holds weights of another layout than this version's network (e.g. {odd}; "
                         "saved by an older qcnn?): train the run again")  # fmt: skip
    return state["model"]


def save_checkpoint(folder: Path, state: dict) -> None:
    atomic_save(state, folder / CHECKPOINT)


class EventLog:
    """TensorBoard event files in ``folder/tensorboard``: the training loss against images
    seen, the test accuracy and loss per epoch, and at the end the run's hyper-parameters
    with its final metrics, for TensorBoard's HParams view across a sweep's runs
    (``tensorboard --logdir STORE``). Needs the ``tensorboard`` package (the extra of that
    name); a resumed run appends new event files."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            message = "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
            raise ImportError(message) from error
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def train_loss(self, images_seen: int, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, images_seen)

    def epoch(self, epoch: int, result: dict) -> None:
        self.writer.add_scalar("test/accuracy", result["test_accuracy"], epoch)
        self.writer.add_scalar("test/loss", result["test_loss"], epoch)
        self.writer.flush()

    def close(self, config: dict, metrics: dict | None) -> None:
        """With the final ``metrics`` of a finished run (None: not finished yet), the
        hyper-parameters (every configuration field, lists as JSON) and those metrics (NaN
        for a diverged run)."""
        if metrics is None:
            self.writer.close()
            return
        hparams = {key: value if isinstance(value, int | float | str | bool) else json.dumps(value)
                   for key, value in config.items()}  # fmt: skip
        final = {f"hparam/{key}": metrics.get(key) if metrics.get(key) is not None else math.nan
                 for key in ("test_accuracy", "test_loss")}  # fmt: skip
        self.writer.add_hparams(hparams, final, run_name=".")
        self.writer.close()
