"""User errors end in one clear line and a non-zero exit; results are never lost, mixed or
mislabelled (diverged runs, unreadable run files, grouping of sweep summaries, data faults)."""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import cli, data, train
from experiments.config import RunConfig
from experiments.sweep import summarise, summary_markdown
from qcnn import QConv2d, functional

TINY = ["--train-limit", "256", "--test-limit", "100", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def fails_with(argv: list[str], message: str) -> None:
    """``python -m experiments argv`` (in-process) exits with one line, ``error: ...``."""
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    text = str(raised.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text


def test_an_error_is_one_line_on_stderr_and_exit_status_1():
    result = subprocess.run(
        [sys.executable, "-m", "experiments", "compare", "--seeds", "0"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --seeds must be >= 1, got 0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["compare", "--sigma", "0.0001"], "sigma=0.0001 draws no sample from K=2420 outputs"),
        (["compare", "--momentum", "-1"], "momentum must be a finite number >= 0, got -1.0"),
        (["compare", "--momentum", "nan"], "momentum must be a finite number >= 0, got nan"),
        (["compare", "--optimizer", "adam", "--momentum", "0.9"], "momentum is an SGD option"),
        (["compare", "--net", "resnet", "--mode", "authors"], "cap_order='authors' clamps the exact Y"),
        (["sweep", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["sweep", "--sigma", "0.0001"], "draws no sample"),
        (["validate", "layer", "--shots", "0"], "shots must be a positive integer or None, got 0"),
        (["validate", "layer", "--sigma", "-1"], "sigma must be in (0, 1]"),
        (["validate", "layer", "--sigma", "2"], "sigma must be in (0, 1]"),
        (["validate", "layer", "--sigma", "0.0001"], "draws no sample"),
        (["validate", "layer", "--cap", "-1"], "cap must be > 0"),
        (["bench", "--batch-sizes", "0"], "--batch-sizes must be >= 1, got 0"),
        (["evaluate", "no/such/run"], "no checkpoint at no/such/run (give a run folder"),
        (["evaluate", "no/such/run", "--calibrate", "-1"], "--calibrate must be >= 0 (training images)"),
        (["compare", "--classical", "conv9.*"], "layers key(s) ['conv9.*'] match no convolution; they are"),
        (["compare", "--layer-options", "no.json"], "--layer-options no.json: No such file or directory"),
        (["sweep", "--classical", "conv1.0", "--sigma", "0.0001"], "draws no sample"),
        (["finetune", "no/such/run"], "no checkpoint at no/such/run"),
    ],
)
def test_bad_options_fail_before_any_work(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_with(argv, message)
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no output folder


def test_out_that_is_a_file_or_below_one(tmp_path):
    (tmp_path / "file").write_text("")
    fails_with(["compare", "--out", str(tmp_path / "file")], "exists and is not a folder")
    fails_with(["sweep", "--out", str(tmp_path / "file" / "sub")], "cannot write there")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"grid": {"sigmaa": [0.1]}}', "unknown field(s) ['sigmaa']"),
        ('{"colour": "red"}', "unknown field(s) ['colour']"),
        ('{"grid": {"sigma": 0.1}}', "grid axis 'sigma' must be a non-empty list: 0.1"),
        ('{"grid": {"sigma": []}}', "grid axis 'sigma' must be a non-empty list"),
        ('{"seeds": []}', '"seeds" must be a non-empty list of integers'),
        ('{"seeds": [1.5]}', '"seeds" must be a non-empty list of integers'),
        ('{"grid": {"sigma": [0.1]}, "sigma": 0.2}', "['sigma'] given both as a grid axis and as a single"),
        ('{"lr": "fast"}', "lr must be a finite number > 0, got 'fast'"),
        ('{"epochs": 1.5}', "epochs must be an integer >= 1, got 1.5"),
    ],
)
def test_sweep_config_mistakes(content, message, tmp_path):
    (tmp_path / "grid.json").write_text(content)
    fails_with(["sweep", "--config", str(tmp_path / "grid.json"), "--out", str(tmp_path / "out")], message)
    fails_with(["sweep", "--config", str(tmp_path / "missing.json")], "No such file")


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_bench", interrupted)
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench"])
    assert raised.value.code == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_ray_launcher_without_ray(monkeypatch, tmp_path):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    fails_with(["sweep", "--launcher", "ray", "--out", str(tmp_path / "out")], "--launcher ray needs Ray")


# --- results never lost, mixed or mislabelled ---------------------------------------------------


def test_a_diverging_run_is_stored_and_reported_as_diverged(tmp_path, mnist_raw_dir):
    out = tmp_path / "out"
    argv = ["compare", "--model", "cnn", "--lr", "1e6", *TINY, "--train-limit", "512", "--out", str(out)]
    fails_with(argv, "1 run(s) diverged (the loss became NaN or inf): cnn seed 1")
    (run,) = [path for path in out.iterdir() if path.is_dir()]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["finished"] and metrics["test_accuracy"] is None
    assert "the loss became nan" in metrics["diverged"]["reason"]
    losses = [float(line.split(",")[-1]) for line in (run / "curve.csv").read_text().splitlines()[1:]]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert metrics["diverged"]["last_finite_loss"] == losses[-1]
    fails_with(argv, "1 run(s) diverged")  # rerun: found finished as diverged, not retrained


def strict_json(path) -> dict:
    """``path`` read as strict JSON: a bare NaN or Infinity token is an error."""

    def refuse(token: str):
        raise AssertionError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_run_that_diverges_between_logged_batches_is_diverged_not_a_result(tmp_path, mnist_raw_dir):
    """At lr 1e6 the QCNN's loss turns NaN between two logged batches; its evaluation used
    to report 7.81 % with a NaN test loss and bare NaN tokens in metrics.json."""
    out = tmp_path / "out"
    argv = ["compare", "--model", "qcnn", "--lr", "1e6", *TINY, "--out", str(out)]
    fails_with(argv, "1 run(s) diverged")
    (run,) = [path for path in out.iterdir() if path.is_dir()]
    metrics = strict_json(run / "metrics.json")
    assert metrics["test_accuracy"] is None and metrics["diverged"]["epoch"] == 1


@pytest.mark.parametrize("model", ["cnn", "qcnn"])
def test_a_layers_nan_error_inside_a_run_is_divergence_and_the_sweep_goes_on(tmp_path, mnist_raw_dir, model):
    """The layer's own NaN-weight error (the CNN through the QCNN, or σ = 0.3 at lr 1e6) used
    to abort the command on every rerun; now the run is diverged and the other runs train."""
    out = tmp_path / "out"
    if model == "cnn":
        argv = ["compare", "--model", "cnn", "--lr", "1e6", *TINY, "--out", str(out)]
        fails_with(argv, "1 run(s) diverged")
        return
    argv = ["sweep", "--sigma", "0.3", "0.5", "--lr", "1e6", "--no-cnn", *TINY, "--out", str(out)]
    fails_with(argv, "2 run(s) diverged")
    metrics = [strict_json(path) for path in sorted(out.glob("runs/*/metrics.json"))]
    assert len(metrics) == 2 and all(m["finished"] and m["diverged"] for m in metrics)


def test_sweep_summary_keeps_configurations_that_differ_in_any_field_apart():
    rows = []
    for lr, accuracies in ((0.01, [0.9, 0.92]), (0.1, [0.5, None])):
        for seed, accuracy in enumerate(accuracies, 1):
            config = RunConfig(lr=lr, seed=seed).as_dict()
            rows.append({**config, "test_accuracy": accuracy, "test_loss": 1.0, "train_seconds": 1.0,
                         "diverged": accuracy is None})  # fmt: skip
    summary = summarise(rows)
    assert [(e["lr"], e["seeds"], e["diverged"]) for e in summary] == [(0.01, 2, 0), (0.1, 2, 1)]
    table = summary_markdown(summary)
    assert "theory, lr=0.01" in table and "91.00 ± 1.41" in table
    assert "theory, lr=0.1" in table and "50.00 ± 0.00 (1 diverged)" in table


def test_unreadable_run_files_are_named_set_aside_and_retrained(tmp_path, mnist_small, caplog):
    config = RunConfig(train_limit=256, test_limit=100, epochs=2, batch_size=32)
    run = tmp_path / "run"
    first = train.train_run(config, mnist_small, run, torch.device("cpu"), progress=False)
    (run / "metrics.json").write_text('{"config": {"mod')  # truncated
    with caplog.at_level(logging.WARNING, logger="experiments.train"):
        again = train.train_run(config, mnist_small, run, torch.device("cpu"), progress=False)
    assert f"{run / 'metrics.json'} cannot be read" in caplog.text
    assert (run / "metrics.json.unreadable").is_file()
    assert again["test_accuracy"] == first["test_accuracy"]  # resumed from the checkpoint: same run
    (run / "metrics.json").unlink()
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="experiments.train"):
        retrained = train.train_run(config, mnist_small, run, torch.device("cpu"), progress=False)
    assert f"{run / 'checkpoint.pt'} cannot be read" in caplog.text
    assert retrained["test_accuracy"] == first["test_accuracy"]  # trained again, deterministically


# --- data ---------------------------------------------------------------------------------------


def write_idx(folder: Path, key: str, gz: bool = False) -> Path:
    """A small, well-formed IDX file under the name of ``key`` (its MD5 is not MNIST's)."""
    idx = data.FILES[key]
    shape = (idx.count, 28, 28) if idx.magic == 2051 else (idx.count,)
    header = idx.magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    payload = header + bytes(math.prod(shape))
    path = folder / (idx.name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def test_data_faults_name_the_folder_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("QCNN_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_with(["compare", "--data-dir", str(empty)], f"--data-dir {empty}: no MNIST files there")
    fails_with(["compare", "--data-dir", str(tmp_path / "nowhere")], "no such folder")
    partial = tmp_path / "partial"
    partial.mkdir()
    write_idx(partial, "train_images")
    fails_with(["compare", "--data-dir", str(partial)], "incomplete MNIST folder, missing t10k-images")
    folder = tmp_path / "generated"
    folder.mkdir()
    for key in data.FILES:
        write_idx(folder, key, gz=key == "test_labels")
    fails_with(["compare", "--data-dir", str(folder)], "train-images-idx3-ubyte: checksum mismatch")
    corrupt = folder / "t10k-labels-idx1-ubyte.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:20])
    with pytest.raises(data.MnistError, match=f"{corrupt}: cannot be read or decompressed"):
        data.read_verified(corrupt, data.FILES["test_labels"])
    monkeypatch.setenv("QCNN_DATA", str(empty))
    fails_with(["compare"], f"$QCNN_DATA {empty}: no MNIST files there")


def test_a_tampered_parsed_cache_is_set_aside_and_parsed_again(tmp_path, monkeypatch, mnist_raw_dir, caplog):
    monkeypatch.delenv("QCNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = data.cache_dir()
    cache.mkdir(parents=True)
    for path in data.locate(mnist_raw_dir).values():
        (cache / path.name).symlink_to(path)
    arrays = data.load_uint8()  # parses the files and writes the cache
    tampered = {**arrays, "train_labels": torch.zeros_like(arrays["train_labels"])}
    torch.save(tampered, cache / data.CACHE_NAME)
    with caplog.at_level(logging.WARNING, logger="experiments.data"):
        again = data.load_uint8()
    assert "does not match the MNIST files' MD5s (['train_labels'])" in caplog.text
    assert torch.equal(again["train_labels"], arrays["train_labels"])
    assert (cache / (data.CACHE_NAME + ".bad")).is_file()
    shutil.rmtree(cache)


# --- the layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: QConv2d(1, 3, 0), "kernel_size must be an int >= 1 or a pair of them, got 0"),
        (lambda: QConv2d(1, 3, 3, stride=0), "stride must be an int >= 1"),
        (lambda: QConv2d(1, 3, 3, generator=5), "generator must be a torch.Generator or None, got 5"),
        (lambda: QConv2d(1, 3, 3)(torch.ones(1, 1, 5, 5, dtype=torch.float16)), "got input torch.float16"),
        (lambda: QConv2d(1, 3, 3)(torch.ones(1, 1, 5, 5, dtype=torch.bfloat16)), "got input torch.bfloat16"),
        (lambda: functional.qconv2d(torch.ones(1, 1, 5, 5), torch.ones(2, 1, 3, 3), padding="same"),
         "padding must be an int >= 0 or a pair of them, got 'same'"),
    ],
)
def test_layer_errors_name_the_bad_value(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_nan_weights_are_an_error_not_a_nan_output():
    layer = QConv2d(1, 2, 3)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="weights contain NaN or inf"):
        layer(torch.ones(1, 1, 5, 5))


def test_a_layer_on_circuits_refuses_to_train_but_evaluates():
    layer = QConv2d(1, 2, 3, estimator="shots", epsilon=0.1, sigma=None, backend="qiskit-aer",
                    backend_device="cpu", generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = layer(torch.ones(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="computes no gradient: train with backend='torch'"):
        out.sum().backward()
    with torch.no_grad():
        assert layer(torch.ones(1, 1, 4, 4)).grad_fn is None


def test_the_rng_copy_says_once_when_it_falls_back_to_torch(monkeypatch, caplog):
    from qcnn.accel import rng

    monkeypatch.setattr(rng, "_normal_float32", lambda shape, generator: torch.zeros(shape))
    with caplog.at_level(logging.WARNING, logger="qcnn.accel.rng"):
        assert rng._reproduces_torch.__wrapped__() is False
    assert "does not reproduce torch" in caplog.text
