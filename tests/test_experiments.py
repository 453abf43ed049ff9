"""Networks, trainer (determinism, resume, accuracy on a slice) and the CLI."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch

from classical import AuthorsNet, LeNet5
from experiments import cli, train
from experiments.config import RunConfig, run_id
from experiments.models import build_model
from experiments.runfolder import read_curve
from qcnn import QConv2d, convert

CPU = torch.device("cpu")
TINY = RunConfig(train_limit=256, test_limit=200, epochs=1, batch_size=32, test_batch_size=100)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("network", [AuthorsNet, LeNet5])
def test_networks_output_log_probabilities_classical_and_quantum(network):
    x = torch.randn(3, 1, 28, 28)
    quantum = convert(network(), generator=torch.Generator().manual_seed(0))
    for net in (network(), quantum):
        out = net(x)
        assert out.shape == (3, 10)
        torch.testing.assert_close(out.exp().sum(1), torch.ones(3))
    assert sum(isinstance(m, QConv2d) for m in quantum.modules()) == 2


def test_authors_net_flattens_2560_features():
    assert AuthorsNet().fc1.in_features == 2560 == 10 * 16 * 16


def test_cnn_and_qcnn_start_from_the_same_weights():
    g = torch.Generator().manual_seed(0)
    cnn = build_model(replace(TINY, model="cnn"), CPU, g)
    qcnn = build_model(replace(TINY, model="qcnn"), CPU, g)
    assert isinstance(qcnn.get_submodule("conv1.0"), QConv2d)  # at the conv's place: the same key
    assert torch.equal(cnn.conv1[0].weight, qcnn.get_submodule("conv1.0").weight)
    assert torch.equal(cnn.conv2[0].bias, qcnn.get_submodule("conv2.0").bias)
    assert torch.equal(cnn.fc1.weight, qcnn.fc1.weight)


def test_converted_network_in_the_exact_limit_reproduces_the_cnn():
    torch.manual_seed(0)
    cnn = AuthorsNet()
    quantum = convert(cnn, epsilon=0.0, sigma=None, cap=float("inf"), delta=0.0)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(quantum(x), cnn(x))


def test_training_is_deterministic(mnist_small, tmp_path):
    first = train.train_run(TINY, mnist_small, tmp_path / "a", CPU, progress=False)
    second = train.train_run(TINY, mnist_small, tmp_path / "b", CPU, progress=False)
    assert first["test_accuracy"] == second["test_accuracy"]
    assert first["test_loss"] == second["test_loss"]
    assert (tmp_path / "a" / "curve.csv").read_text() == (tmp_path / "b" / "curve.csv").read_text()


def killed_at_second_call(monkeypatch, name: str) -> None:
    """``experiments.train.<name>`` raises KeyboardInterrupt at its second call, as a kill
    would (for as long as ``monkeypatch`` holds)."""
    original, calls = getattr(train, name), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, name, killed)


def test_interrupted_run_resumes_to_the_same_result(mnist_small, tmp_path, monkeypatch):
    config = replace(TINY, epochs=2)
    reference = train.train_run(config, mnist_small, tmp_path / "reference", CPU, progress=False)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        killed_at_second_call(patch, "evaluate")  # killed during epoch 2's evaluation
        train.train_run(config, mnist_small, tmp_path / "run", CPU, progress=False)
    partial = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not partial["finished"] and len(partial["epochs"]) == 1
    resumed = train.train_run(config, mnist_small, tmp_path / "run", CPU, progress=False)
    assert resumed["finished"]
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["test_loss"] == reference["test_loss"]
    curve = (tmp_path / "run" / "curve.csv").read_text()
    assert curve == (tmp_path / "reference" / "curve.csv").read_text()
    # a finished run is not trained again
    monkeypatch.setattr(train, "build_optimiser", None)
    assert train.train_run(config, mnist_small, tmp_path / "run", CPU, progress=False) == resumed


@pytest.mark.parametrize("model", ["cnn", "qcnn"])
def test_short_training_on_2000_images_beats_80_percent(mnist_small, tmp_path, model):
    config = RunConfig(model=model, train_limit=2000, test_limit=1000, epochs=5, lr=0.05, momentum=0.5)
    metrics = train.train_run(config, mnist_small, tmp_path, CPU, progress=False)
    assert metrics["test_accuracy"] > 0.80, metrics["test_accuracy"]
    if model == "qcnn":
        assert set(metrics["cost"]) == {"conv1.0", "conv2.0"}
        assert 0 < metrics["cost"]["conv1.0"]["distinct_fraction"] <= 0.5


def test_compare_cli_writes_every_output(tmp_path, mnist_raw_dir, capsys):
    out = tmp_path / "compare"
    cli.main(["compare", "--train-limit", "256", "--test-limit", "200", "--epochs", "1",
              "--seeds", "2", "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "CNN train / QCNN test" in printed and "test accuracy" in printed
    runs = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert [run.split("_")[0] for run in runs] == ["cnn", "cnn", "qcnn-authors-theory", "qcnn-authors-theory"]
    assert [run.split("_")[-2] for run in runs] == ["seed1", "seed2", "seed1", "seed2"]
    for run in runs:
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert metrics["finished"] and 0 <= metrics["test_accuracy"] <= 1
        assert (out / run / "curve.csv").read_text().startswith("epoch,batch,images_seen,loss")
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = ["cnn", "cnn", "cnn-qcnn-test", "cnn-qcnn-test", "qcnn", "qcnn"]
    assert sorted(r["model"] for r in rows) == expected
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    # Other options into the same --out: new folders, the finished runs untouched.
    before = {run: (out / run / "metrics.json").read_bytes() for run in runs}
    cli.main(["compare", "--model", "qcnn", "--sigma", "0.3", "--train-limit", "256", "--test-limit", "200",
              "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    after = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert len(after) == 5 and any("sigma0.3" in run for run in after)
    assert all((out / run / "metrics.json").read_bytes() == data for run, data in before.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_compare_trains_both_models_on_cuda(tmp_path, mnist_raw_dir):
    out = tmp_path / "compare"
    cli.main(["compare", "--train-limit", "2000", "--test-limit", "500", "--epochs", "2",
              "--device", "cuda", "--no-progress", "--out", str(out)])  # fmt: skip
    for run in (path.name for path in out.iterdir() if path.is_dir()):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert metrics["finished"] and metrics["device"].startswith("cuda")
        losses = [point["loss"] for point in read_curve(out / run)]
        assert losses[-1] < losses[0], (run, losses)  # it learns on the GPU too


def test_bench_profile_breaks_down_a_step_of_every_variant(capsys):
    cli.main(["bench", "--profile", "--cpu-only", "--batch-sizes", "4"])
    printed = capsys.readouterr().out
    for variant in ("cnn", "qcnn-theory", "qcnn-authors", "qcnn-theory-unfused"):
        assert f"{variant}, batch 4, 10 steps" in printed
    assert printed.count("Self CPU time total") == 4
    assert "aten::convolution_backward" in printed


def test_cli_rejects_bad_values_before_any_work(tmp_path):
    small = ["--train-limit", "64", "--test-limit", "64", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="sigma"):
        cli.main(["compare", "--sigma", "2", "--device", "cpu", *small])
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            cli.main(["compare", "--device", "cuda", *small])
        with pytest.raises(SystemExit, match="no CUDA device"):
            cli.main(["bench", "--cuda-only"])
    with pytest.raises(SystemExit, match="exclude each other"):
        cli.main(["bench", "--cpu-only", "--cuda-only"])


def test_run_config_validates():
    with pytest.raises(ValueError, match="mode"):
        RunConfig(mode="fast")
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        RunConfig(epsilon=-1.0)
    with pytest.raises(ValueError, match="train_limit"):
        RunConfig(train_limit=0)
    with pytest.raises(ValueError, match="norms"):
        RunConfig(norms="image0")


def test_norms_and_cap_order_override_the_mode_for_one_option():
    theory, authors = RunConfig().layer_options, RunConfig(mode="authors").layer_options
    assert (theory.norms, theory.cap_order) == ("exact", "theory")
    assert (authors.norms, authors.cap_order) == ("authors", "authors")
    mixed = RunConfig(norms="authors").layer_options
    assert (mixed.norms, mixed.cap_order, mixed.delta) == ("authors", "theory", 0.01)
    # unset overrides stay out of the config dict, so stores made before them stay valid:
    # this is the id of the CNN run of the paper preset, seed 1, made before they existed
    assert "norms" not in RunConfig().as_dict() and RunConfig(cap_order="authors").as_dict()["cap_order"]
    assert run_id(RunConfig(model="cnn", cap=2.0, sigma=0.1)) == "cnn_authors_e2_nall_seed1_59345bc6"


def test_evaluate_runs_a_cnn_checkpoint_through_the_qcnn_at_each_grid_point(mnist_small, tmp_path):
    from experiments.evaluate import run_evaluate

    config = replace(TINY, model="cnn")
    cnn = train.train_run(config, mnist_small, tmp_path / "cnn", CPU, progress=False)
    rows = run_evaluate(tmp_path / "cnn", [0.0, 0.5], [None, 0.3], [math.inf], 2, mnist_small, CPU, 1,
                        tmp_path / "eval", progress=False)  # fmt: skip
    assert len(rows) == 2 * 2 * 2
    exact = [r["test_accuracy"] for r in rows if r["epsilon"] == 0.0 and r["sigma"] is None]
    assert exact == [cnn["test_accuracy"]] * 2  # the exact limit is the CNN, pass after pass
    noisy = [r["test_accuracy"] for r in rows if r["epsilon"] == 0.5 and r["sigma"] == 0.3]
    assert noisy[0] != noisy[1]  # the quantum layer stays noisy in eval mode
    assert (tmp_path / "eval" / "accuracy_vs_epsilon.png").read_bytes().startswith(PNG_MAGIC)
    with open(tmp_path / "eval" / "evaluate.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    with pytest.raises(SystemExit, match="^error: no checkpoint at"):
        cli.main(["evaluate", str(tmp_path / "missing"), "--device", "cpu", "--out", str(tmp_path / "e")])


def test_readme_recipe_trains_a_converted_model_with_the_python_api(mnist_small):
    from experiments.train import evaluate, train_epoch

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10),
    )  # fmt: skip
    model = convert(cnn, sigma=0.5, generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    data = mnist_small
    losses = train_epoch(model, optimiser, data.train_images, data.train_labels, 64,
                         loss_fn=torch.nn.functional.cross_entropy, progress=False)  # fmt: skip
    assert losses[-1] < losses[0]
    accuracy = evaluate(model, data.test_images, data.test_labels, loss_fn=torch.nn.functional.cross_entropy)
    assert accuracy["test_accuracy"] > 0.5 and set(accuracy["cost"]) == {"0"}


def test_evaluate_takes_a_qcnn_checkpoint_and_sets_the_grid_on_its_layers(mnist_small, tmp_path):
    from experiments.evaluate import run_evaluate

    train.train_run(TINY, mnist_small, tmp_path / "qcnn", CPU, progress=False)
    rows = run_evaluate(tmp_path / "qcnn", [0.0], [None, 0.2], [math.inf], 2, mnist_small, CPU, 1,
                        tmp_path / "eval", progress=False)  # fmt: skip
    exact = [r["test_accuracy"] for r in rows if r["sigma"] is None]
    sampled = [r["test_accuracy"] for r in rows if r["sigma"] == 0.2]
    assert exact[0] == exact[1] and sampled[0] != sampled[1]  # ε = 0 without sampling is deterministic
