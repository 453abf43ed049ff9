"""qcnn as a dependency: what its wheel installs, what the core needs, a clean converted model
whose weights travel both ways, one options object, the training helpers and the API's errors."""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from torch import nn
from torch.nn import functional as F

import qcnn
from classical import NETWORKS
from experiments.config import RunConfig
from experiments.models import check_network
from qcnn import QConv2d, QConvOptions, classical_state_dict, configure, convert, load_classical
from qcnn.options import OPTION_NAMES
from qcnn.training import evaluate, train_epoch
from tests.test_convert import randomise_batch_norms

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"epsilon": 0.0, "sigma": None, "cap": math.inf, "delta": 0.0}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_wheel_holds_the_library_alone(tmp_path):
    """No generic top-level name (experiments, classical) in site-packages; py.typed ships."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("qcnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"qcnn", f"qcnn-{qcnn.__version__}.dist-info"}
    assert "qcnn/py.typed" in names and "qcnn/training.py" in names


def test_a_users_own_experiments_package_is_not_shadowed(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("")
    (tmp_path / "experiments" / "data.py").write_text("MINE = True\n")
    code = "import qcnn, experiments.data; print(experiments.data.MINE, experiments.data.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", str(tmp_path / "experiments" / "data.py")]


def _distributions(requirements: list[str]) -> set[str]:
    """The installed distributions that ``requirements`` need, transitively (no extras)."""
    seen: set[str] = set()
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = importlib.metadata.distribution(requirement.name).metadata["Name"]
        if name.lower() not in seen:
            seen.add(name.lower())
            pending += [Requirement(text) for text in importlib.metadata.requires(name) or []]
    return seen


CORE_SCRIPT = """
import sys
import torch, qcnn
from torch import nn
from torch.nn import functional as F
from qcnn.training import evaluate, train_epoch

for name in ("pennylane", "qiskit", "qiskit_aer", "scipy", "matplotlib", "tqdm", "experiments", "classical"):
    try:
        __import__(name)
    except ImportError:
        continue
    sys.exit(f"{name} can be imported: the environment is not the core alone")
cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                    nn.Linear(4 * 3 * 3, 3), nn.LogSoftmax(1))
model = qcnn.convert(cnn, sigma=0.5, generator=torch.Generator().manual_seed(0))
images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
labels = torch.arange(64) % 3
optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
losses = train_epoch(model, optimiser, images, labels, 16, log_every=1)
result = evaluate(model, images, labels)
print(len(losses), 0 <= result["test_accuracy"] <= 1, sorted(result["cost"]))
"""


def test_the_core_alone_imports_qcnn_and_trains_a_converted_model(tmp_path):
    """A clean virtual environment that holds the core's dependencies (and theirs) and the
    qcnn package, nothing else: import, convert, train, evaluate."""
    core = _distributions(PYPROJECT["project"]["dependencies"])
    assert {"torch", "numpy", "numba"} <= core and not core & {"pennylane", "scipy", "matplotlib", "tqdm"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    packages = tmp_path / "packages"
    packages.mkdir()
    (packages / "qcnn").symlink_to(ROOT / "qcnn")
    for name in core:
        distribution = importlib.metadata.distribution(name)
        top = {Path(str(file)).parts[0] for file in distribution.files or []}
        for entry in top - {".."}:
            source = Path(distribution.locate_file(entry))
            if source.exists() and not (packages / entry).exists() and not entry.endswith(".pth"):
                (packages / entry).symlink_to(source)
    (site,) = (tmp_path / "venv" / "lib").glob("python*/site-packages")
    (site / "core.pth").write_text(f"{packages}\n")
    python = tmp_path / "venv" / "bin" / "python"
    result = subprocess.run([python, "-I", "-c", CORE_SCRIPT], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["4", "True", "['0']"]


def torchvision_style_resnet() -> nn.Module:
    """A small ResNet with torchvision's names and forms: one ``relu`` module used twice per
    block, ``downsample`` for the projection, a 3×3 stride-2 max pool in the stem."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                projection = nn.Conv2d(cin, cout, 1, stride, bias=False)
                self.downsample = nn.Sequential(projection, nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer1(x).mean((2, 3))
            return F.log_softmax(self.fc(x), 1)

    return ResNet()


MODELS = {**{net: NETWORKS[net] for net in NETWORKS}, "torchvision-resnet": torchvision_style_resnet}


@pytest.mark.parametrize("net", list(MODELS))
def test_a_converted_model_is_clean_and_its_weights_travel_both_ways(net):
    torch.manual_seed(0)
    cnn = randomise_batch_norms(MODELS[net]()).eval()
    quantum = convert(cnn, **EXACT).eval()
    layers = [name for name, m in quantum.named_modules() if isinstance(m, QConv2d)]
    keys, classical_keys = set(quantum.state_dict()), set(cnn.state_dict())
    # no orphan: the classical keys, less nothing, plus one _extra_state (the options) per layer
    assert len(keys) == len(classical_keys) + len(layers)
    assert sum(p.numel() for p in quantum.parameters()) == sum(p.numel() for p in cnn.parameters())
    assert repr(quantum).count("BatchNorm2d") == repr(cnn).count("BatchNorm2d")
    convolutions = {f"{name}.weight" for name, m in cnn.named_modules() if isinstance(m, nn.Conv2d)}
    assert convolutions <= keys  # every convolution keeps its key, e.g. conv1.0.weight
    assert set(classical_state_dict(quantum)) == classical_keys
    # the QCNN's weights into a fresh classical model, a classical checkpoint into a fresh QCNN
    torch.manual_seed(1)
    fresh_cnn = MODELS[net]().eval()
    fresh_cnn.load_state_dict(classical_state_dict(quantum))
    fresh_quantum = convert(fresh_cnn, **EXACT)
    torch.manual_seed(2)
    other = randomise_batch_norms(MODELS[net]()).eval()
    load_classical(fresh_quantum, other.state_dict())
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fresh_cnn(x), cnn(x))
    torch.testing.assert_close(fresh_quantum.eval()(x), other(x))


def test_defaults_live_in_the_options_alone():
    options = QConvOptions()
    for name in ("epsilon", "cap", "sigma", "delta", "estimator", "sampling", "backprop"):
        assert getattr(RunConfig(), name) == getattr(options, name)
    for function in (QConv2d.__init__, QConv2d.from_conv, qcnn.functional.qconv2d, convert, configure):
        assert not set(inspect.signature(function).parameters) & set(OPTION_NAMES), function
    layer = QConv2d(1, 2, 3, options=QConvOptions(epsilon=0.1), sigma=0.2)
    assert (layer.options.epsilon, layer.options.sigma, layer.options.cap) == (0.1, 0.2, options.cap)
    config = RunConfig()
    assert config.layer_options is config.layer_options  # built once, passed on


def test_the_public_api_documents_itself():
    assert qcnn.__version__ == importlib.metadata.version("qcnn")
    assert (ROOT / "qcnn" / "py.typed").is_file()
    for text in (QConv2d.__doc__, qcnn.functional.qconv2d.__doc__):
        assert all(name in text for name in OPTION_NAMES), [n for n in OPTION_NAMES if n not in text]
    assert "shortcut" in QConv2d.forward.__doc__
    assert inspect.signature(QConv2d.forward).return_annotation in ("torch.Tensor", torch.Tensor)


def logits_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


def test_training_helpers_restore_the_mode_and_name_a_logits_model():
    model = convert(logits_model(), **EXACT)
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    for mode in (True, False):
        model.train(mode)
        evaluate(model, images, labels, loss_fn=F.cross_entropy)
        assert model.training is mode
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="logits.*cross_entropy"):
        train_epoch(model, optimiser, images, labels, 4)
    with pytest.raises(ValueError, match="logits.*cross_entropy"):
        evaluate(model, images, labels)
    train_epoch(model, optimiser, images, labels, 4, loss_fn=F.cross_entropy)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: QConv2d(1, 2, 7)(torch.ones(1, 1, 5, 5)), r"kernel_size \(7, 7\) is larger than the input"),
        (lambda: QConv2d(1, 2, 3, pooling="max", pool_size=4)(torch.ones(1, 1, 5, 5)),
         "pool_size 4 is larger than the convolution's output 3×3"),
        (lambda: QConv2d(True, 4, 3), "in_channels must be a positive integer, got True"),
        (lambda: QConv2d(1, 4, (3, True)), "kernel_size must be an int"),
        (lambda: configure(convert(logits_model()), sigma=True), "sigma must be in"),
        (lambda: QConv2d(1, 2, 3, epsilon=False), "epsilon must be a finite number"),
        (lambda: QConv2d(1, 2, 3, shots=True, estimator="shots"), "shots must be a positive integer"),
        (lambda: QConv2d(1, 2, 3, options={"sigma": 0.1}), "options must be a QConvOptions"),
        (lambda: convert(torch.jit.script(logits_model())), "TorchScript RecursiveScriptModule"),
    ],
)  # fmt: skip
def test_api_errors_are_value_errors_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_state_dict_with_an_unknown_saved_option_is_a_value_error():
    layer = QConv2d(1, 2, 3)
    state = layer.state_dict()
    state["_extra_state"] = {"options": {**state["_extra_state"]["options"], "temperature": 1.0}}
    with pytest.raises(ValueError, match=r"unknown QConv2d option\(s\) \['temperature'\]"):
        layer.load_state_dict(state)


def test_check_network_runs_on_the_datas_image_shape():
    check_network(RunConfig(), (1, 28, 28))
    with pytest.raises(ValueError, match="kernel_size .* is larger than the input"):
        check_network(RunConfig(), (1, 12, 12))  # the second 7×7 convolution meets a 6×6 map


def test_every_command_is_quiet_by_default_and_verbose_on_request(tmp_path, mnist_raw_dir):
    """convert's summary line is INFO: shown with -v, not by default; -q leaves errors only."""
    argv = [sys.executable, "-m", "experiments", "compare", "--model", "qcnn", "--train-limit", "64",
            "--test-limit", "32", "--epochs", "1", "--no-progress", "--device", "cpu"]  # fmt: skip

    def stderr(*flags: str) -> str:
        out = tmp_path / "-".join(flags or ("default",))
        result = subprocess.run([*argv, *flags, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "convert:" not in stderr()
    assert "INFO qcnn.convert: convert: 2 of 2 Conv2d converted to QConv2d" in stderr("-v")
    assert "DEBUG qcnn.convert: convert: the conversion report" in stderr("-vv")
    assert stderr("-q") == ""
    from experiments import cli

    commands = cli.parsers(cli.build_parser())[1:]  # every command's parser, validate's jobs too
    assert all({"-v", "-q"} <= set(command._option_string_actions) for command in commands if command.prog
               != "python -m experiments validate")  # fmt: skip
