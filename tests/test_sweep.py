"""Sweep: grid expansion, resume after a kill (process pool and Ray), outputs."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import cli
from experiments.config import RunConfig, run_id
from experiments.files import RunLocked, run_lock
from experiments.runfolder import read_finished
from experiments.sweep import PAPER_GRID, expand_grid, run_sweep, worker_devices, write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--train-limit", "256", "--test-limit", "100", "--epochs", "1", "--batch-size", "32",
        "--device", "cpu", "--no-progress"]  # fmt: skip
GRID = ["--sigma", "0.2", "0.5", "--epsilon", "0.01", "0.1", "--seeds", "2"]  # 2 × 2 × 2 + 2 CNN = 10 runs


def test_paper_preset_expands_to_40_configurations_per_seed():
    configs = expand_grid(RunConfig(), PAPER_GRID, seeds=[1, 2, 3], with_cnn=True)
    quantum = [c for c in configs if c.model == "qcnn"]
    assert len(quantum) == 3 * 40 and sum(c.model == "cnn" for c in configs) == 3
    assert len({run_id(c) for c in configs}) == len(configs)
    assert {c.sigma for c in quantum} == {0.1, 0.2, 0.3, 0.4, 0.5}
    with pytest.raises(ValueError, match="not a RunConfig field"):
        expand_grid(RunConfig(), {"learning_rate": [0.1]}, seeds=[1], with_cnn=False)


def test_pool_workers_spread_over_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert worker_devices("cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert worker_devices("cpu", 2) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_devices("cuda", 2) == ["cuda", "cuda"]


def finished_runs(out: Path) -> set[str]:
    finished = set()
    for path in (out / "runs").glob("*/metrics.json"):
        if json.loads(path.read_text()).get("finished"):
            finished.add(path.parent.name)
    return finished


def configs_of(out: Path) -> list[RunConfig]:
    paths = (out / "runs").glob("*/metrics.json")
    return [RunConfig.from_dict(json.loads(path.read_text())["config"]) for path in paths]


def kill_after(out: Path, runs: int, extra: list[str]) -> set[str]:
    """Start the sweep in a subprocess, kill it once ``runs`` runs have finished."""
    command = [sys.executable, "-m", "experiments", "sweep", *GRID, *TINY, "--out", str(out), *extra]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while len(finished_runs(out)) < runs:
            assert process.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    wait_until_no_run_is_locked(out)
    return finished_runs(out)


def wait_until_no_run_is_locked(out: Path) -> None:
    """Wait for workers that outlive the killed sweep to let go of their runs.

    Ray's workers are not in the sweep's process group: a task running when the sweep is killed
    may still finish its run afterwards (a task still loading data takes its lock a moment
    later), so the test reads the store only once every run lock has been free for two seconds.
    """
    deadline = time.monotonic() + 120
    free_since = None
    while free_since is None or time.monotonic() - free_since < 2.0:
        assert time.monotonic() < deadline, "a worker of the killed sweep kept its run locked"
        try:
            with contextlib.ExitStack() as locks:
                for folder in (out / "runs").glob("*/"):
                    locks.enter_context(run_lock(folder))
            free_since = free_since or time.monotonic()
        except RunLocked:
            free_since = None
        time.sleep(0.1)


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_killed_sweep_resumes_exactly_the_missing_runs(tmp_path, mnist_raw_dir, launcher):
    out = tmp_path / "sweep"
    extra = ["--workers", "2", "--launcher", launcher]
    before = kill_after(out, 3, extra)
    assert 3 <= len(before) < 10
    args = cli.build_parser().parse_args(["sweep", *GRID, *TINY, "--out", str(out), *extra])
    configs = cli.sweep_configs(args)
    executed = run_sweep(configs, out, "cpu", workers=2, launcher=launcher)
    assert sorted(executed) == sorted({run_id(c) for c in configs} - before)
    assert all(read_finished(out / "runs" / run_id(c), c) for c in configs)
    write_reports(out)
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and len({r["run"] for r in rows}) == 10
    leftovers = [p for p in (out / "runs").rglob(".*") if p.is_file() and p.name != ".lock"]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_a_run_that_another_process_is_training_is_left_to_it(tmp_path, mnist_raw_dir, capsys):
    """Two sweeps on one store never train the same run: the run lock makes the second skip it."""
    out = tmp_path / "sweep"
    args = cli.build_parser().parse_args(["sweep", "--sigma", "0.5", *TINY, "--out", str(out)])
    configs = cli.sweep_configs(args)
    busy = out / "runs" / run_id(configs[0])
    with run_lock(busy):
        executed = run_sweep(configs, out, "cpu")
        with pytest.raises(RunLocked), run_lock(busy):
            pass
    assert executed == [run_id(c) for c in configs[1:]]
    assert "another process is training it" in capsys.readouterr().out
    assert run_sweep(configs, out, "cpu") == [run_id(configs[0])]


def test_sweep_cli_with_two_workers_writes_every_output(tmp_path, mnist_raw_dir, capsys):
    out = tmp_path / "sweep"
    cli.main(["sweep", "--sigma", "0.3", "0.5", "--cap", "2", "--workers", "2", *TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "test accuracy %" in printed and "wall time" in printed
    for name in ("results.csv", "summary.csv", "summary.md"):
        assert (out / name).stat().st_size > 0
    for name in ("accuracy_vs_sigma.png", "curves_eps0.01_C2_delta0.01_theory.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    quantum = [r for r in rows if r["model"] == "qcnn"]
    assert all(float(r["conv1.0:distinct_fraction"]) > 0 and float(r["conv2.0:speedup"]) > 0 for r in quantum)
    # a second call finds everything done
    cli.main(["sweep", "--sigma", "0.3", "0.5", "--cap", "2", *TINY, "--out", str(out)])
    assert "3 already finished, 0 to run" in capsys.readouterr().out


def test_sweep_config_file(tmp_path, mnist_raw_dir):
    spec = {"grid": {"delta": [0.01, 0.1], "norms": ["exact", "authors"]}, "seeds": [5], "mode": "authors"}
    (tmp_path / "grid.json").write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    cli.main(["sweep", "--config", str(tmp_path / "grid.json"), "--no-cnn", *TINY, "--out", str(out)])
    configs = configs_of(out)
    assert sorted((c.delta, c.norms) for c in configs) == [
        (0.01, "authors"), (0.01, "exact"), (0.1, "authors"), (0.1, "exact")]  # fmt: skip
    assert all(c.mode == "authors" and c.seed == 5 for c in configs)
    # an option off its default is part of the configuration, its label and its figure
    summary = (out / "summary.md").read_text()
    assert summary.count("| authors, norms=exact |") == 2 and summary.count("| authors, norms=authors |") == 2
    assert (out / "curves_eps0.01_C10_delta0.1_authors_norms-exact.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_sweeps_draws_one_panel_per_store(tmp_path, mnist_raw_dir):
    for net in ("authors", "lenet5"):
        out = str(tmp_path / net)
        cli.main(["sweep", "--net", net, "--sigma", "0.3", "0.5", "--no-cnn", *TINY, "--out", out])
    figure = tmp_path / "figures" / "sigma.png"
    cli.main(["plot-sweeps", str(tmp_path / "authors"), str(tmp_path / "lenet5"), "--out", str(figure)])
    assert figure.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit, match="not a sweep store"):
        cli.main(["plot-sweeps", str(tmp_path / "figures")])
    cli.main(["compare", "--sigma", "0.3", *TINY, "--out", str(tmp_path / "compare")])  # a compare folder too
    cli.main(["plot-sweeps", str(tmp_path / "authors"), str(tmp_path / "compare"), "--out", str(figure)])
    assert figure.read_bytes().startswith(PNG_MAGIC)
