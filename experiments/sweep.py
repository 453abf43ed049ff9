"""Grid sweeps over σ, ε, C, δ (and any RunConfig field) × seeds, resumable and parallel.

Each run lives in ``<out>/runs/<run id>/`` and is written by :func:`experiments.train.train_run`,
whose ``metrics.json`` is replaced atomically and says whether the run finished. A sweep skips
finished runs and resumes unfinished ones from their last epoch checkpoint, so an interrupted
sweep loses at most the epochs in flight. Runs execute in this process (``--workers 1``), in a
local process pool (``--workers N``; on several GPUs each CUDA worker takes one in turn) or
as Ray tasks (``--launcher ray``, one GPU per task on CUDA), all writing into the same store.
A run folder is locked while it trains, so two sweeps on one store never train the same run.
The tables and plots are rebuilt from the store at the end, one row per run.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import fields, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from experiments.config import OMITTED_AT, QCNN_FIELDS, RunConfig, run_id
from experiments.files import RunLocked
from experiments.plots import Baseline, Panel, plot_accuracy, plot_accuracy_panels, plot_curves
from experiments.runfolder import read_curve, read_finished, read_metrics
from qcnn.training import finite_mean

# The authors' grid (docs/algorithm.md §6): 2 × 2 × 5 × 2 = 40 QCNN configurations, plus the CNN.
PAPER_GRID = {
    "epsilon": [0.01, 0.1],
    "cap": [2.0, 10.0],
    "sigma": [0.1, 0.2, 0.3, 0.4, 0.5],
    "delta": [0.01, 0.1],
}
AXES = ("epsilon", "cap", "delta")  # one line / one figure per combination of these
COST_FIELDS = ("max_norm_product", "mean_activation", "distinct_fraction", "eta", "quantum_cost",
               "classical_cost", "speedup")  # fmt: skip
COST_SEPARATOR = ":"  # a results column "<layer>:<cost field>"; layer names hold dots and underscores
SPEEDUP = f"{COST_SEPARATOR}speedup"


def speedup_layers(rows: list[dict]) -> list[str]:
    """The quantum layers whose speed-up the rows report, in the order they first appear."""
    return list(dict.fromkeys(key[: -len(SPEEDUP)] for row in rows for key in row if key.endswith(SPEEDUP)))


def expand_grid(
    base: RunConfig, grid: dict[str, list], seeds: Iterable[int], with_cnn: bool
) -> list[RunConfig]:
    """Every QCNN combination of ``grid`` × seeds, plus one CNN per seed if ``with_cnn``."""
    for name in grid:
        if name not in RunConfig.__dataclass_fields__ or name in ("model", "seed"):
            raise ValueError(f"cannot sweep over {name!r}: not a RunConfig field")
    names = list(grid)
    configs = []
    for seed in seeds:
        if with_cnn:
            configs.append(replace(base, model="cnn", seed=seed))
        for values in itertools.product(*(grid[n] for n in names)):
            configs.append(replace(base, model="qcnn", seed=seed, **dict(zip(names, values, strict=True))))
    return configs


_worker_device: str | None = None  # set in each process-pool worker by _start_worker


def worker_devices(device: str, workers: int) -> list[str]:
    """The device of each pool worker: with several GPUs, CUDA workers take them in turn."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2:
        return [device] * workers
    return [f"cuda:{index % gpus}" for index in range(workers)]


def _start_worker(devices) -> None:
    """Process-pool initializer: this worker trains on the next device in the queue, and
    ends as soon as the sweep that started it is gone (killed, even by SIGKILL), rather
    than train on as an orphan."""
    global _worker_device
    _worker_device = devices.get()
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True).start()


def _end_with(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(0.2)
    os._exit(1)


def _execute_job(job: tuple) -> dict:
    return execute(*job)


def execute(
    config_dict: dict, run_dir: str, device: str, data_dir: str | None, threads: int, tensorboard: bool
) -> dict:
    """One run, in whatever process it lands (this one, a pool worker or a Ray task)."""
    from experiments.data import load_mnist
    from experiments.train import train_run

    device = _worker_device or device
    torch.set_num_threads(threads)  # workers share the cores: no pool may claim them all
    config = RunConfig.from_dict(config_dict)
    data = load_mnist(data_dir, device)
    started = time.perf_counter()
    try:
        metrics = train_run(config, data, Path(run_dir), torch.device(device), False, tensorboard)
    except RunLocked:  # another sweep on the same store has it: leave it to that one
        return {"run": Path(run_dir).name, "locked": True, "seconds": time.perf_counter() - started}
    return {"run": Path(run_dir).name, "locked": False, "accuracy": metrics["test_accuracy"],
            "diverged": metrics.get("diverged"), "seconds": time.perf_counter() - started}  # fmt: skip


def run_sweep(
    configs: list[RunConfig],
    out: Path,
    device: str,
    data_dir: str | None = None,
    workers: int = 1,
    launcher: str = "local",
    ray_address: str | None = None,
    tensorboard: bool = False,
) -> list[str]:
    """Run the configs not finished yet (with TensorBoard events if ``tensorboard``); return
    the ids of the runs executed now."""
    store = out / "runs"
    store.mkdir(parents=True, exist_ok=True)
    unique = {run_id(c): c for c in configs}  # a value repeated in the grid is one run
    pending = [(c, i) for i, c in unique.items() if read_finished(store / i, c) is None]
    print(f"sweep: {len(unique)} runs, {len(unique) - len(pending)} already finished, "
          f"{len(pending)} to run with {workers} worker(s) via {launcher}")  # fmt: skip
    threads = max(1, torch.get_num_threads() // max(1, workers))
    jobs = [(c.as_dict(), str(store / i), device, data_dir, threads, tensorboard) for c, i in pending]
    started = time.perf_counter()
    done = []

    def report(result: dict) -> None:
        if result["locked"]:
            print(f"  skipped {result['run']}: another process is training it")
            return
        done.append(result["run"])
        if result["diverged"]:
            outcome = f"diverged, {result['diverged']['reason']}"
        else:
            outcome = f"test accuracy {100 * result['accuracy']:.2f} %"
        print(f"  [{len(done)}/{len(jobs)}] {result['run']}: {outcome}, {result['seconds']:.1f} s")

    if launcher == "ray":
        import ray

        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
        # Ray gives a task that asks for a GPU its own, through CUDA_VISIBLE_DEVICES.
        remote = ray.remote(num_cpus=threads, num_gpus=int(device == "cuda"))(execute)
        futures = [remote.remote(*job) for job in jobs]
        while futures:
            ready, futures = ray.wait(futures, num_returns=1)
            report(ray.get(ready[0]))
    elif workers > 1:
        context = get_context("spawn")
        devices = context.Queue()
        for name in worker_devices(device, workers):
            devices.put(name)
        # Leaving the block, by the end or by Ctrl-C, terminates the workers at once: an
        # interrupted sweep starts no further run, and a resumed one redoes the runs cut off.
        with context.Pool(workers, _start_worker, (devices,)) as pool:
            for result in pool.imap_unordered(_execute_job, jobs):
                report(result)
    else:
        for job in jobs:
            report(execute(*job))
    print(f"sweep: ran {len(done)} run(s) in {time.perf_counter() - started:.1f} s wall time")
    return done


def run_folders(out: Path) -> Path:
    """Where a store keeps its run folders: ``runs/`` of a sweep, the folder itself of a
    ``compare``."""
    return out / "runs" if (out / "runs").is_dir() else out


def collect(out: Path) -> list[dict]:
    """One row per finished run in a sweep or compare store: config, test metrics, per-layer
    cost (a CNN's layer fields empty)."""
    rows = []
    for path in sorted(run_folders(out).glob("*/metrics.json")):
        metrics = read_metrics(path.parent)
        if not (metrics and metrics.get("finished")):
            continue
        config = metrics["config"]
        if config["model"] == "cnn":  # the layer's fields are no part of a CNN
            config = {**config, **dict.fromkeys(QCNN_FIELDS)}
        row = {**config, "run": path.parent.name, "test_accuracy": metrics["test_accuracy"],
               "test_loss": metrics["test_loss"], "train_seconds": metrics["train_seconds"],
               "diverged": "diverged" in metrics}  # fmt: skip
        for layer, cost in metrics.get("cost", {}).items():
            row.update({f"{layer}{COST_SEPARATOR}{field}": cost[field] for field in COST_FIELDS})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)


TABLE = ("model", "epsilon", "cap", "sigma", "delta")  # the summary's own columns
# Runs that differ in any field but the seed are different configurations.
GROUPED = tuple(f.name for f in fields(RunConfig) if f.name != "seed")


def configuration(row: dict) -> tuple:
    """The fields that tell configurations apart; seeds of one configuration share them. A
    field missing from an older run's row has its omitted value (``OMITTED_AT``)."""
    values = (row.get(name, OMITTED_AT.get(name)) for name in GROUPED)
    return tuple(json.dumps(value) if isinstance(value, list | dict) else value for value in values)


def varying(rows: list[dict]) -> tuple[str, ...]:
    """The fields besides the summary's columns and the mode whose values differ between
    ``rows`` (between QCNN rows, for a field only a QCNN has): the ones a label must name to
    tell configurations apart."""
    def values(name: str) -> set:
        having = [row for row in rows if row["model"] == "qcnn"] if name in QCNN_FIELDS else rows
        return {str(row.get(name, OMITTED_AT.get(name))) for row in having}

    return tuple(name for name in GROUPED if name not in (*TABLE, "mode") and len(values(name)) > 1)


def variant(row: dict, names: tuple[str, ...]) -> str:
    """The mode and the fields ``names`` (see :func:`varying`): "theory, lr=0.01"."""
    return ", ".join([row["mode"], *(f"{name}={row.get(name, OMITTED_AT.get(name))}" for name in names)])


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std of accuracy and time over the seeds that did not diverge, per configuration."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[configuration(row)].append(row)
    summary = []
    for key, group in sorted(groups.items(), key=lambda item: str(item[0])):
        trained = [r for r in group if not r["diverged"]]
        accuracy = [r["test_accuracy"] for r in trained]
        entry = {**dict(zip(GROUPED, key, strict=True)),
                 "seeds": len(group), "diverged": len(group) - len(trained),
                 "accuracy_mean": statistics.mean(accuracy) if accuracy else math.nan,
                 "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                 "train_seconds_mean": statistics.mean(r["train_seconds"] for r in group)}  # fmt: skip
        for layer in speedup_layers(trained):
            values = [r[layer + SPEEDUP] for r in trained if layer + SPEEDUP in r]
            entry[layer + SPEEDUP] = finite_mean(values)
        summary.append(entry)
    return summary


def sigma_panel(summary: list[dict], labelled: tuple[str, ...]) -> Panel:
    """Accuracy against σ: (σ, mean, std, seeds) points per QCNN configuration but σ,
    labelled by ε, C, δ and ``labelled``; "no sampling" (σ = None) configurations as flat
    lines; the CNN configurations as baselines. Seeds that diverged are not counted."""
    panel = Panel(defaultdict(list))
    for entry in summary:
        trained = entry["seeds"] - entry["diverged"]
        if not trained:
            continue
        point = (entry["accuracy_mean"], entry["accuracy_std"], trained)
        if entry["model"] == "cnn":
            kind = ", ".join(f"{name}={entry[name]}" for name in labelled if name not in QCNN_FIELDS)
            panel.baselines.append(Baseline(f"CNN ({kind})" if kind else "CNN", *point))
            continue
        options = f"ε={entry['epsilon']:g}, C={entry['cap']:g}, δ={entry['delta']:g}"
        label = f"{options} ({variant(entry, labelled)})"
        if entry["sigma"] is None:
            panel.unsampled[label] = point
        else:
            panel.series[label].append((entry["sigma"], *point))
    return panel


def plot_stores(stores: list[Path], path: Path) -> None:
    """Accuracy against σ, one panel per sweep store (e.g. one per network), side by side."""
    panels = {}
    for store in stores:
        rows = collect(store)
        if not rows:
            raise ValueError(f"{store}: no finished runs in this sweep store")
        nets = sorted({row.get("net", "authors") for row in rows})
        panels[f"{', '.join(nets)} net ({len(rows)} runs)"] = sigma_panel(summarise(rows), varying(rows))
    plot_accuracy_panels(panels, path)


def write_reports(out: Path) -> list[dict]:
    """results.csv (one row per run), summary.csv, summary.md and the figures."""
    rows = collect(out)
    if not rows:
        return []
    write_csv(out / "results.csv", rows)
    summary = summarise(rows)
    labelled = varying(rows)
    write_csv(out / "summary.csv", summary)
    (out / "summary.md").write_text(summary_markdown(summary))
    if (panel := sigma_panel(summary, labelled)).series:
        plot_accuracy(panel, out / "accuracy_vs_sigma.png")
    curves_of = {row["run"]: read_curve(run_folders(out) / row["run"]) for row in rows}  # None: left out
    cnn_runs = [curves_of[r["run"]] for r in rows if r["model"] == "cnn" and curves_of[r["run"]]]
    figures: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["model"] == "qcnn" and (curve := curves_of[row["run"]]):
            key = (*(row[a] for a in AXES), variant(row, labelled))
            figures[key][f"σ={row['sigma']}"].append(curve)
    for (epsilon, cap, delta, kind), curves in figures.items():
        if cnn_runs:
            curves["CNN"] = cnn_runs
        suffix = kind.replace(", ", "_").replace("=", "-")
        name = f"curves_eps{epsilon:g}_C{cap:g}_delta{delta:g}_{suffix}.png"
        title = f"QCNN ε={epsilon}, C={cap}, δ={delta} ({kind})"
        plot_curves(dict(sorted(curves.items())), out / name, title)
    return summary


def accuracy_cell(entry: dict) -> str:
    """Mean ± std in %, and how many seeds diverged, if any."""
    diverged = f"{entry['diverged']} diverged" if entry["diverged"] else ""
    if entry["diverged"] == entry["seeds"]:
        return diverged
    accuracy = f"{100 * entry['accuracy_mean']:.2f} ± {100 * entry['accuracy_std']:.2f}"
    return f"{accuracy} ({diverged})" if diverged else accuracy


def summary_markdown(summary: list[dict]) -> str:
    labelled = varying(summary)
    layers = speedup_layers(summary)
    lines = [
        "| model | mode, options | ε | C | σ | δ | seeds | test accuracy % | "
        + "".join(f"{layer} speedup | " for layer in layers) + "train s |",
        "|" + "---|" * (9 + len(layers)),
    ]
    for e in summary:
        quantum = e["model"] == "qcnn"
        cells = [e["model"], variant(e, labelled) if quantum else "", *(f"{e[k]}" if quantum else "" for k in
                 ("epsilon", "cap", "sigma", "delta")), str(e["seeds"]),
                 accuracy_cell(e),
                 *(f"{e[layer + SPEEDUP]:.3g}" if layer + SPEEDUP in e else "" for layer in layers),
                 f"{e['train_seconds_mean']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
