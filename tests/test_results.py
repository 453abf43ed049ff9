"""Numbers that say what they are: an unfinished run is no result, a configuration records
the data it used, a damaged curve is rebuilt or left out, a CNN row has no layer options,
every run and benchmark records its machine and versions."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace

import pytest
import torch

from experiments import cli, train
from experiments.runfolder import read_curve
from experiments.sweep import collect, summarise
from tests.test_errors import TINY, fails_with
from tests.test_experiments import CPU, killed_at_second_call
from tests.test_experiments import TINY as TINY_CONFIG


def test_evaluate_refuses_a_run_killed_after_its_first_epoch(tmp_path, mnist_small, monkeypatch):
    config = replace(TINY_CONFIG, model="cnn", epochs=3)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        killed_at_second_call(patch, "evaluate")  # killed in epoch 2's evaluation
        train.train_run(config, mnist_small, tmp_path / "run", CPU, progress=False)
    fails_with(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "evaluate")],
               "is not a finished run: it trained 1 of 3 epochs; rerun its command to finish it")  # fmt: skip


def test_a_limit_beyond_the_data_is_refused_not_recorded(tmp_path, mnist_raw_dir):
    fails_with(["compare", "--test-limit", "20000", "--out", str(tmp_path)],
               "--test-limit 20000: the data has 10000 images")  # fmt: skip


def test_a_damaged_or_missing_curve_of_a_finished_run_is_rebuilt_from_the_checkpoint(tmp_path, mnist_small,
                                                                                      caplog):  # fmt: skip
    folder = tmp_path / "run"
    train.train_run(TINY_CONFIG, mnist_small, folder, CPU, progress=False)
    whole = (folder / "curve.csv").read_text()
    (folder / "curve.csv").write_text(whole[: whole.rindex(",")])  # the last line cut short
    with caplog.at_level(logging.WARNING):
        assert len(read_curve(folder)) == len(whole.splitlines()) - 1
    assert "rebuilt from the checkpoint" in caplog.text and (folder / "curve.csv").read_text() == whole
    (folder / "curve.csv").unlink()
    assert read_curve(folder) is not None and (folder / "curve.csv").read_text() == whole
    (folder / "curve.csv").unlink()
    (folder / "checkpoint.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert read_curve(folder) is None
    assert "no checkpoint to rebuild it from: left out" in caplog.text
    assert train.train_run(TINY_CONFIG, mnist_small, folder, CPU, progress=False)["finished"]  # not rerun


def test_a_cnn_row_has_no_layer_options_and_every_run_records_its_provenance(tmp_path, mnist_raw_dir):
    out = tmp_path / "sweep"
    cli.main(["sweep", "--sigma", "0.2", *TINY, "--out", str(out)])
    rows = {row["model"]: row for row in collect(out)}
    assert rows["cnn"]["sigma"] is None and rows["cnn"]["epsilon"] is None and rows["qcnn"]["sigma"] == 0.2
    cnn = next(entry for entry in summarise(list(rows.values())) if entry["model"] == "cnn")
    assert cnn["sigma"] is None and cnn["epsilon"] is None
    with open(out / "summary.csv") as handle:
        assert next(row for row in csv.DictReader(handle) if row["model"] == "cnn")["sigma"] == ""
    metrics = json.loads(next(out.glob("runs/cnn_*/metrics.json")).read_text())
    (session,) = metrics["provenance"]
    assert session["versions"]["torch"] == torch.__version__ and session["threads"] == torch.get_num_threads()
    assert session["cpu"] and session["commit"] is None or len(session["commit"].split("+")[0]) == 40


def test_bench_writes_every_figure_with_its_spread(tmp_path):
    cli.main(["bench", "--cpu-only", "--batch-sizes", "2", "--rounds", "2", "--repeat", "1", "--ablation",
              "--out", str(tmp_path)])  # fmt: skip
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["provenance"]["threads"] == torch.get_num_threads()
    row = next(row for row in record["rows"] if row["variant"] == "qcnn-theory")
    assert row["ms_min"] <= row["ms_median"] <= row["ms_max"] and row["ratio_min"] <= row["ratio_max"]
    steps = {row["variant"] for row in record["rows"] if row["timed"] == "training step"}
    assert steps == {"cnn", "qcnn-theory", "qcnn-authors", "qcnn-theory-unfused", "qcnn-theory-no-delta",
                     "qcnn-theory-no-noise", "qcnn-theory-bare"}  # fmt: skip



def test_help_shows_the_defaults_and_compare_takes_shots(tmp_path, mnist_raw_dir, capsys):
    for command in (["compare"], ["sweep"], ["evaluate"], ["validate", "layer"], ["bench"], ["finetune"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        assert "(default: " in capsys.readouterr().out, command
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert "inner-product error ε (default: 0.01)" in " ".join(capsys.readouterr().out.split())
    cli.main(["compare", "--model", "qcnn", "--estimator", "shots", "--epsilon", "0", "--shots", "100", *TINY,
              "--out", str(tmp_path)])  # fmt: skip
    (run,) = tmp_path.glob("qcnn-*")
    assert json.loads((run / "metrics.json").read_text())["config"]["shots"] == 100


def test_a_run_that_ends_near_chance_says_why(tmp_path, mnist_raw_dir, capsys):
    cli.main(["compare", "--model", "cnn", "--train-limit", "64", "--test-limit", "100", "--epochs", "1",
              "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "near chance (10 %): 1 step(s) of batch 64 at lr 0.01 (sgd) are too few" in printed
    assert "--train-limit 2000 --epochs 5 --lr 0.05 --momentum 0.5 learns" in printed


def test_a_run_writes_tensorboard_events_that_read_back(tmp_path, mnist_raw_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli.main(["sweep", "--sigma", "0.5", "--no-cnn", "--tensorboard", *TINY, "--out", str(tmp_path)])
    (run,) = tmp_path.glob("runs/qcnn-*")
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    (accuracy,) = events.Scalars("test/accuracy")
    assert (accuracy.step, accuracy.value) == (1, pytest.approx(metrics["test_accuracy"]))
    curve = read_curve(run)
    losses = events.Scalars("train/loss")
    assert [(point.step, point.value) for point in losses] == [
        (point["images_seen"], pytest.approx(point["loss"])) for point in curve
    ]
    sessions = events.PluginTagToContent("hparams")  # TensorBoard's HParams view reads these
    tags = ("experiment", "session_start_info", "session_end_info")
    assert {f"_hparams_/{tag}" for tag in tags} <= set(sessions)
    (final,) = events.Scalars("hparam/test_accuracy")
    assert final.value == pytest.approx(metrics["test_accuracy"])


def test_the_sigma_figure_draws_the_cnn_and_counts_the_seeds_that_trained():
    from experiments.sweep import sigma_panel

    def entry(model: str, sigma, mean: float, seeds: int = 3, diverged: int = 0) -> dict:
        options = {"epsilon": 0.01, "cap": 10.0, "delta": 0.01, "mode": "theory"}
        return {"model": model, "sigma": sigma, **options, "accuracy_mean": mean, "accuracy_std": 0.01,
                "seeds": seeds, "diverged": diverged}  # fmt: skip

    cnn = {**entry("cnn", None, 0.95), **{key: None for key in ("epsilon", "cap", "delta", "mode")}}
    panel = sigma_panel([cnn, entry("qcnn", 0.2, 0.9, diverged=1), entry("qcnn", 0.5, 0.93),
                         entry("qcnn", None, 0.94)], ())  # fmt: skip
    (baseline,) = panel.baselines
    assert (baseline.label, baseline.mean, baseline.count) == ("CNN", 0.95, 3)
    (points,) = panel.series.values()
    assert points == [(0.2, 0.9, 0.01, 2), (0.5, 0.93, 0.01, 3)]  # the diverged seed is not counted
    assert list(panel.unsampled.values()) == [(0.94, 0.01, 3)]  # "no sampling": a line, not σ = None


def test_compare_takes_several_nets_into_one_table(tmp_path, mnist_raw_dir, capsys):
    cli.main(["compare", "--net", "authors", "lenet5", *TINY, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for net in ("authors", "lenet5"):
        assert f"\n{net}: CNN " in printed and f"\n{net}: CNN train / QCNN test " in printed
        assert (tmp_path / net / "summary.csv").is_file() and list((tmp_path / net).glob(f"cnn_{net}_*"))


def test_a_checkpoint_of_an_older_layout_is_named_not_a_traceback(tmp_path, mnist_small, caplog, monkeypatch):
    """Before the converted layers kept their convolutions' names, a QCNN saved ``conv1.weight``
    where the network now has ``conv1.0.weight``."""
    folder = tmp_path / "run"
    config = replace(TINY_CONFIG, epochs=2)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        killed_at_second_call(patch, "evaluate")  # one epoch saved
        train.train_run(config, mnist_small, folder, CPU, progress=False)
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    state["model"] = {key.replace("conv1.0.", "conv1."): value for key, value in state["model"].items()}
    torch.save(state, folder / "checkpoint.pt")
    fails_with(["evaluate", str(folder / "checkpoint.pt"), "--out", str(tmp_path / "evaluate")],
               "is not a finished run")  # fmt: skip
    state["metrics"]["finished"] = True
    torch.save(state, folder / "checkpoint.pt")
    fails_with(["evaluate", str(folder / "checkpoint.pt"), "--out", str(tmp_path / "evaluate")],
               "holds weights of another layout than this version's network")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert train.train_run(config, mnist_small, folder, CPU, progress=False)["finished"]
    assert "another layout" in caplog.text and (folder / "checkpoint.pt.unreadable").is_file()
