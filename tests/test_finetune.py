"""From the command line, a trained CNN layer by layer: per-layer options in a run's
configuration, the calibrated "CNN train / QCNN test", fine-tuning (resumable) and
``evaluate --calibrate --per-layer``."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace

import pytest
import torch

from experiments import cli, train
from experiments.config import RunConfig, run_id
from experiments.models import build_model
from qcnn import QConv2d
from tests.test_experiments import CPU, PNG_MAGIC, TINY, killed_at_second_call

RESNET = RunConfig.for_net("resnet", model="cnn", train_limit=256, test_limit=100, epochs=1, batch_size=32,
                           test_batch_size=100)  # fmt: skip


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, mnist_small):
    folder = tmp_path_factory.mktemp("cnn") / run_id(RESNET)
    train.train_run(RESNET, mnist_small, folder, CPU, progress=False)
    return folder


def test_the_layers_mapping_is_part_of_a_runs_configuration():
    mapped = replace(TINY, layers={"conv2.*": None, "conv1.0": {"epsilon": 0.1}})
    assert mapped.layers == (("conv2.*", None), ("conv1.0", (("epsilon", 0.1),)))
    assert RunConfig.from_dict(json.loads(json.dumps(mapped.as_dict()))) == mapped  # JSON round trip
    assert run_id(mapped) != run_id(TINY) and "layers" not in TINY.as_dict()
    model = build_model(mapped, CPU, torch.Generator())
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
    assert list(layers) == ["conv1.0"] and layers["conv1.0"].options.epsilon == 0.1
    with pytest.raises(ValueError, match=r"unknown QConv2d option\(s\) \['temperature'\]"):
        replace(TINY, layers={"conv1.0": {"temperature": 1}})
    with pytest.raises(ValueError, match="init_from starts a QCNN"):
        replace(TINY, model="cnn", init_from="somewhere")


def test_compare_adds_a_calibrated_row_where_batch_norms_ask_for_one(tmp_path, mnist_raw_dir, capsys):
    args = ["compare", "--net", "resnet", "--model", "cnn", "--train-limit", "256", "--test-limit", "100",
            "--epochs", "1", "--calibrate", "128", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    cli.main(args)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [row["model"] for row in rows] == ["cnn", "cnn-qcnn-test", "cnn-qcnn-calibrated"]
    assert "CNN train / QCNN test, calibrated" in capsys.readouterr().out


def test_a_finetuning_run_starts_from_the_cnn_and_resumes_after_a_kill(resnet_run, mnist_small, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    config = replace(RESNET, model="qcnn", init_from=str(resnet_run), calibrate=64, epochs=2)
    reference = train.train_run(config, mnist_small, tmp_path / "reference", CPU, progress=False)
    start = reference["start"]
    assert set(start) == {"converted", "calibrated"} and start["calibrated"]["calibrate_seconds"] > 0
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        killed_at_second_call(patch, "train_epoch")  # killed in the second epoch
        train.train_run(config, mnist_small, tmp_path / "run", CPU, progress=False)
    resumed = train.train_run(config, mnist_small, tmp_path / "run", CPU, progress=False)
    assert resumed["start"]["calibrated"]["test_loss"] == start["calibrated"]["test_loss"]
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["test_loss"] == reference["test_loss"]


def test_finetune_cli_prints_each_step_and_refuses_a_qcnn_run(resnet_run, tmp_path, mnist_raw_dir, capsys):
    cli.main(["finetune", str(resnet_run), "--calibrate", "64", "--no-progress", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for step in ("CNN", "converted to a QCNN", "calibrated", "fine-tuned, 1 epoch(s)"):
        assert f"\n{step} " in printed
    with pytest.raises(SystemExit) as raised:  # more calibration images than the CNN trained on
        cli.main(["finetune", str(resnet_run), "--calibrate", "1000", "--out", str(tmp_path / "too-many")])
    assert "--calibrate 1000:" in str(raised.value.code) and "trained on 256 images" in str(raised.value.code)
    (run,) = tmp_path.glob("qcnn-resnet-*_from-cnn_*")
    with pytest.raises(SystemExit) as raised:
        cli.main(["finetune", str(run), "--out", str(tmp_path / "again")])
    assert "is not a CNN run (its model is 'qcnn')" in str(raised.value.code)
    for taken_from_the_run in (["--net", "vgg"], ["--train-limit", "100"], ["--batch-size", "8"]):
        with pytest.raises(SystemExit):  # the source run's, not an option to override silently
            cli.main(["finetune", str(resnet_run), *taken_from_the_run, "--out", str(tmp_path / "other")])
        assert f"unrecognized arguments: {' '.join(taken_from_the_run)}" in capsys.readouterr().err


def test_evaluate_calibrates_and_diagnoses_each_layer(resnet_run, tmp_path, mnist_raw_dir, capsys):
    out = tmp_path / "evaluate"
    cli.main(["evaluate", str(resnet_run), "--epsilon", "0.1", "--repeats", "1", "--calibrate", "64",
              "--per-layer", "--classical", "blocks.2.*", "--no-progress", "--out", str(out)])  # fmt: skip
    rows = list(csv.DictReader(open(out / "per_layer.csv")))
    assert [row["layer"] for row in rows] == ["stem.0", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1",
                                              "blocks.1.conv2"]  # fmt: skip
    assert all(0 <= float(row["sensitivity_accuracy"]) <= 1 for row in rows)
    assert all(float(row["relative_error"]) > 0 for row in rows)
    assert (out / "per_layer.png").read_bytes().startswith(PNG_MAGIC)


def test_evaluate_calibrate_without_batch_norm_warns(tmp_path, mnist_small, mnist_raw_dir, caplog):
    config = replace(TINY, model="cnn")
    train.train_run(config, mnist_small, tmp_path / "cnn", CPU, progress=False)
    with caplog.at_level(logging.WARNING):
        cli.main(["evaluate", str(tmp_path / "cnn"), "--repeats", "1", "--calibrate", "64", "--no-progress",
                  "--out", str(tmp_path / "evaluate")])  # fmt: skip
    assert "no BatchNorm: no calibration to do" in caplog.text


def test_finetune_states_each_step_over_several_runs():
    from experiments.compare import format_start

    def run(accuracy: float, diverged: bool = False) -> tuple[dict, dict]:
        calibrated = {"test_accuracy": 0.7, "calibrate_seconds": 2}
        metrics = {"start": {"converted": {"test_accuracy": 0.2}, "calibrated": calibrated},
                   "config": {"epochs": 1}, "test_accuracy": accuracy, "train_seconds": 10.0}  # fmt: skip
        if diverged:
            metrics["diverged"] = {"reason": "the loss became nan at batch 3"}
        return {"test_accuracy": 0.98, "train_seconds": 100.0}, metrics

    table = format_start([run(0.96), run(0.98), run(0.5, True)])
    rows = [" ".join(line.split()) for line in table.splitlines()]
    assert "calibrated 3 70.00 ± 0.00 2.0" in rows
    assert "fine-tuned, 1 epoch(s) 3 97.00 ± 1.41 10.0" in rows  # the diverged run is left out of the mean
