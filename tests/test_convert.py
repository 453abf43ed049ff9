"""qcnn.convert and qcnn.configure: every supported pattern exact in the classical limit, the
report, BatchNorm and shortcuts, options in checkpoints, and torch.compile."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from classical import deep
from qcnn import QConv2d, configure, convert

EXACT = {"epsilon": 0.0, "sigma": None, "cap": math.inf, "delta": 0.0}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their identity initial values."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 2)
            nn.init.uniform_(module.bias, -1, 1)
    return model


class FunctionalReLU(nn.Module):
    def __init__(self, relu) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = relu

    def forward(self, x):
        return self.relu(self.conv(x))


class BasicBlock(deep.BasicBlock):
    """classical.deep's ResNet block, its forward spelled the other way: ``nn.ReLU(inplace)``
    modules and ``out += shortcut``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class Untraceable(nn.Module):
    """Control flow on a tensor's value: fx cannot trace it, the module walk must."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU6())
        self.loose = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = self.features(x)
        return F.relu(self.loose(x)) if x.sum() > 0 else x


PATTERNS = {
    "sequential conv-relu": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()),
    "conv-bn-relu": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True)),
    "conv-relu6": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU6()),
    "conv-hardtanh": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Hardtanh(0.0, 0.5)),
    "conv-relu-maxpool": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
    "conv-relu-avgpool": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)),
    "F.relu": lambda: FunctionalReLU(F.relu),
    "torch.relu": lambda: FunctionalReLU(torch.relu),
    "relu_ method": lambda: FunctionalReLU(lambda y: y.relu_()),
    "F.relu6": lambda: FunctionalReLU(F.relu6),
    "resnet identity block": lambda: BasicBlock(2, 2),
    "resnet projection block": lambda: BasicBlock(2, 4, stride=2),
    "untraceable forward": Untraceable,
}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_exact_limit_reproduces_every_pattern_in_eval_mode(pattern):
    torch.manual_seed(0)
    model = randomise_batch_norms(PATTERNS[pattern]()).eval()
    quantum = convert(model, **EXACT).eval()
    assert quantum.conversion_report.converted
    x = torch.randn(3, 2, 8, 8, generator=generator())
    torch.testing.assert_close(quantum(x), model(x))


def test_caps_come_from_relu6_and_hardtanh():
    cases = ((PATTERNS["conv-relu6"], 6.0), (PATTERNS["conv-hardtanh"], 0.5), (PATTERNS["F.relu6"], 6.0))
    for make, cap in cases:
        layers = [m for m in convert(make(), cap=10.0).modules() if isinstance(m, QConv2d)]
        assert [layer.options.cap for layer in layers] == [cap]


def test_pooling_becomes_the_layers_and_the_original_is_untouched():
    model = PATTERNS["conv-relu-maxpool"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantum = convert(model, sigma=0.3)
    (layer,) = [m for m in quantum.modules() if isinstance(m, QConv2d)]
    assert (layer.options.pooling, layer.options.pool_size, layer.options.sigma) == ("max", 2, 0.3)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[2], nn.MaxPool2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resnet_block_takes_the_main_path_and_the_shortcut_as_classical_input():
    quantum = convert(BasicBlock(2, 4, stride=2))
    report = quantum.conversion_report
    assert report.converted == {
        "conv1": "Conv2d → BatchNorm2d → ReLU",
        "conv2": "Conv2d → BatchNorm2d → + shortcut → ReLU",
    }
    assert "shortcut" in report.skipped["shortcut.0"] and "deeper" in report.skipped["shortcut.0"]


def test_exact_limit_gradients_through_batch_norm_and_shortcut_match_in_training_mode():
    torch.manual_seed(0)
    model = randomise_batch_norms(BasicBlock(2, 4, stride=2)).train()
    quantum = convert(model, **EXACT).train()
    x = torch.randn(4, 2, 8, 8, generator=generator())
    x_model, x_quantum = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(4, 4, 4, 4, generator=generator(1))
    (model(x_model) * target).sum().backward()
    (quantum(x_quantum) * target).sum().backward()
    torch.testing.assert_close(x_quantum.grad, x_model.grad)
    torch.testing.assert_close(quantum.conv2.weight.grad, model.conv2.weight.grad)
    torch.testing.assert_close(quantum.conv2.norm.weight.grad, model.bn2.weight.grad)
    # training mode normalised with the batch's statistics and updated the running ones alike
    torch.testing.assert_close(quantum.conv2.norm.running_var, model.bn2.running_var)


def test_a_zero_shortcut_leaves_the_noisy_layer_unchanged_forward_and_backward():
    """The staged path (estimate, classical terms, cap and sampling) draws the same random
    numbers in the same order as the layer without them."""
    layer = QConv2d(2, 3, 3, epsilon=0.1, sigma=0.5, delta=0.1, generator=generator(3))
    x = torch.randn(4, 2, 8, 8, generator=generator(4))
    outputs, gradients = [], []
    for shortcut in (None, torch.zeros(4, 3, 6, 6)):
        layer.generator.manual_seed(3)
        layer.zero_grad()
        out = layer(x, shortcut)
        out.square().sum().backward()
        outputs.append(out)
        gradients.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(gradients[1], gradients[0])


def test_classical_terms_refuse_what_they_cannot_do():
    layer = QConv2d(2, 3, 3, cap_order="authors")
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="cap_order='authors'"):
        layer(x, torch.zeros(1, 3, 3, 3))
    layer.configure(cap_order="theory")
    with pytest.raises(ValueError, match=r"shortcut has shape \(1, 3, 2, 2\)"):
        layer(x, torch.zeros(1, 3, 2, 2))


def test_report_names_what_was_not_converted_and_why(caplog):
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grouped = nn.Conv2d(2, 2, 3, padding=1, groups=2)
            self.dilated = nn.Conv2d(2, 2, 3, padding=2, dilation=2)
            self.plain = nn.Conv2d(2, 2, 3, padding=1)
            self.last = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            x = F.relu(self.grouped(x))
            x = F.relu(self.dilated(x))
            x = F.relu(self.plain(x))
            return torch.sigmoid(self.last(x))

    with caplog.at_level(logging.DEBUG, logger="qcnn.convert"):
        report = convert(Mixed()).conversion_report
    assert list(report.converted) == ["plain"]
    assert "grouped convolution (groups=2)" in report.skipped["grouped"]
    assert "dilated convolution" in report.skipped["dilated"]
    assert "no ReLU after it" in report.skipped["last"] and "sigmoid" in report.skipped["last"]
    summary, full = [record for record in caplog.records if record.name == "qcnn.convert"]
    assert (summary.levelname, full.levelname) == ("INFO", "DEBUG")  # one line, the report at DEBUG
    assert summary.getMessage() == (
        "convert: 1 of 4 Conv2d converted to QConv2d; 3 left classical (1 grouped convolution, "
        "1 dilated convolution, 1 no ReLU after it); see conversion_report"
    )
    assert "last: left classical" in full.getMessage() and "plain: QConv2d" in full.getMessage()


def test_untraceable_model_is_walked_and_the_hidden_relu_reported():
    report = convert(Untraceable()).conversion_report
    assert report.converted == {"features.0": "Conv2d → ReLU", "features.2": "Conv2d → capped ReLU (C=6)"}
    assert "does not trace" in report.skipped["loose"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("not a model", "needs a torch.nn.Module, got str"),
        (nn.Sequential(nn.Linear(2, 2)), "no convolution that can become a QConv2d .*no Conv2d"),
        (nn.Sequential(nn.Conv2d(1, 1, 3), nn.Sigmoid()), "no convolution .*0: no ReLU after it"),
    ],
)
def test_convert_rejects_bad_input_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        convert(bad)


def test_convert_and_configure_reject_unknown_and_invalid_options():
    with pytest.raises(ValueError, match=r"unknown QConv2d option\(s\) \['sigmaa'\]"):
        convert(PATTERNS["conv-relu6"](), sigmaa=0.1)
    with pytest.raises(ValueError, match="sigma must be in"):
        convert(PATTERNS["conv-relu6"](), sigma=2.0)
    quantum = convert(BasicBlock(2, 2))
    with pytest.raises(ValueError, match="epsilon must be"):
        configure(quantum, epsilon=-1.0)
    assert all(m.options.epsilon == 0.01 for m in quantum.modules() if isinstance(m, QConv2d))
    with pytest.raises(ValueError, match="holds no QConv2d"):
        configure(nn.Linear(2, 2), sigma=0.1)


def test_configure_reaches_every_layer():
    quantum = convert(nn.Sequential(BasicBlock(2, 2), BasicBlock(2, 4, stride=2)))
    names = configure(quantum, epsilon=0.1, sigma=0.2)
    layers = {n: m for n, m in quantum.named_modules() if isinstance(m, QConv2d)}
    assert sorted(names) == sorted(layers) and len(layers) == 4
    assert all((m.options.epsilon, m.options.sigma) == (0.1, 0.2) for m in layers.values())


def test_options_survive_a_checkpoint_round_trip_and_a_mismatch_is_restored_with_a_warning(caplog):
    saved = convert(BasicBlock(2, 2), epsilon=0.1, sigma=0.3)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    loaded = convert(BasicBlock(2, 2))  # default options
    with caplog.at_level(logging.WARNING, logger="qcnn.layer"):
        loaded.load_state_dict(torch.load(buffer, weights_only=True))
    layers = [m for m in loaded.modules() if isinstance(m, QConv2d)]
    assert all((m.options.epsilon, m.options.sigma) == (0.1, 0.3) for m in layers)
    assert "restoring the options" in caplog.text and "'sigma': (0.5, 0.3)" in caplog.text


def test_a_state_dict_without_options_loads_and_keeps_the_layers():
    layer = QConv2d(1, 2, 3, sigma=0.2)
    layer.load_state_dict(nn.Conv2d(1, 2, 3).state_dict())
    assert layer.options.sigma == 0.2


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_after_an_eager_step_matches_eager(backend):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 7), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 22 * 22, 3))
    model = convert(cnn, epsilon=0.1, sigma=0.5, generator=generator(5))
    # 16 images: enough noise draws (15,488) for the layer's compiled random numbers (qcnn.accel.rng)
    x = torch.randn(16, 1, 28, 28, generator=generator(6))
    model(x).sum().backward()  # eager first: the order the crash needed
    compiled = torch.compile(model, backend=backend)
    results = []
    for run in (model, compiled):
        model.zero_grad()
        model[0].generator.manual_seed(7)
        out = run(x)
        out.square().sum().backward()
        results.append((out.detach(), model[0].weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("net", ["authors", "lenet5", "alexnet", "vgg", "googlenet", "resnet"])
def test_every_course_network_converts_exactly(net):
    from classical import NETWORKS

    torch.manual_seed(0)
    model = randomise_batch_norms(NETWORKS[net]()).eval()
    quantum = convert(model, **EXACT).eval()
    report = quantum.conversion_report
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    projections = [name for name in convs if "shortcut" in name]
    assert sorted(report.converted) == sorted(set(convs) - set(projections))
    assert all("residual shortcut" in report.skipped[name] for name in projections)
    x = torch.randn(2, 1, 28, 28, generator=generator())
    out = quantum(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, model(x))
