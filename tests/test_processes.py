"""A sweep's processes end with it, and a failing disk ends a command in one line."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sweep import GRID, TINY

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> set[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(line) for line in result.stdout.split()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def start_sweep(out: Path) -> tuple[subprocess.Popen, set[int]]:
    """A two-worker sweep, once both workers train (two run folders exist)."""
    command = [sys.executable, "-m", "experiments", "sweep", *GRID, *TINY, "--workers", "2",
               "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*/curve.csv"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the sweep did not start its runs"
        time.sleep(0.1)
    return process, children(process.pid)


def wait_until_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_the_workers_of_a_killed_sweep_end_with_it(tmp_path, mnist_raw_dir):
    process, workers = start_sweep(tmp_path / "sweep")
    assert len(workers) >= 2
    process.send_signal(signal.SIGKILL)  # the sweep alone, not its process group
    process.wait()
    assert wait_until_gone(workers, 10) == set(), "orphaned workers trained on"


def test_ctrl_c_stops_a_sweep_and_its_workers_and_starts_no_run(tmp_path, mnist_raw_dir):
    """The pool used to finish every queued run first (15 s and more runs after Ctrl-C)."""
    process, workers = start_sweep(tmp_path / "sweep")
    started = set((tmp_path / "sweep" / "runs").iterdir())
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=5) == 130  # 10 tiny runs take longer than this: none was finished
    assert set((tmp_path / "sweep" / "runs").iterdir()) == started
    assert "interrupted; rerun the same command to resume" in process.stderr.read()
    assert wait_until_gone(workers, 10) == set()


@pytest.mark.parametrize("limit", [64 * 1024])
def test_a_full_disk_ends_in_one_line_naming_the_file(tmp_path, mnist_raw_dir, limit):
    """A file-size limit makes every write past it fail as a full disk would (EFBIG)."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "experiments", "compare", "--model", "cnn", *TINY,
               "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_files)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write {tmp_path}") and line.endswith("File too large"), line
    assert not list(tmp_path.glob("**/.checkpoint.pt.*")), "a half-written temporary file was left"
