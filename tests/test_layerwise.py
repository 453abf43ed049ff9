"""A trained CNN made quantum layer by layer: per-layer options in convert and configure, one
matcher for every model form, calibration of the quantum layers' BatchNorms, and the
per-layer diagnosis (error against the exact limit, SQNR, sampling, cost, sensitivity)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qcnn import QConv2d, calibrate, configure, convert, diagnose
from qcnn.estimation import patch_norms
from tests.stats import ALPHA
from tests.test_convert import randomise_batch_norms

EXACT = {"epsilon": 0.0, "sigma": None, "cap": math.inf, "delta": 0.0}


def four_convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = four_convs()

    def forward(self, x):
        return self.features(x)


def test_the_mapping_takes_names_then_patterns_in_order_then_types_then_the_global_options():
    layers = {
        "features.5": {"epsilon": 0.3},  # exact name: wins over the patterns
        "features.[05]": {"epsilon": 0.2},  # first pattern
        "features.*": {"epsilon": 0.1},
        nn.Conv2d: {"sigma": 0.9},  # type: only where no name or pattern applies
        "features.7": None,  # classical
    }
    model = convert(Named(), layers=layers, sigma=0.4)
    report = model.conversion_report
    options = {name: m.options for name, m in model.named_modules() if isinstance(m, QConv2d)}
    assert {name: o.epsilon for name, o in options.items()} == {
        "features.0": 0.2, "features.2": 0.1, "features.5": 0.3
    }  # fmt: skip
    assert all(o.sigma == 0.4 for o in options.values())  # the type rule never applied
    assert report.rules == {"features.0": "pattern 'features.[05]'", "features.2": "pattern 'features.*'",
                            "features.5": "name 'features.5'", "features.7": "name 'features.7'"}  # fmt: skip
    assert report.skipped == {"features.7": "kept classical by the layers mapping (name 'features.7')"}
    assert "features.0: QConv2d (Conv2d → ReLU), options by pattern 'features.[05]'" in str(report)
    by_type = convert(Named(), layers={nn.Conv2d: {"sigma": 0.9}, "features.2": None}).conversion_report
    assert by_type.rules["features.0"] == "type Conv2d" and "features.2" in by_type.skipped


def test_configure_takes_the_same_mapping():
    model = convert(Named())
    changed = configure(model, layers={"features.0": {"epsilon": 0.2}, "features.[57]": None}, sigma=0.3)
    assert changed == ["features.0", "features.2"]
    options = {name: m.options for name, m in model.named_modules() if isinstance(m, QConv2d)}
    assert (options["features.0"].epsilon, options["features.0"].sigma) == (0.2, 0.3)
    assert (options["features.2"].epsilon, options["features.2"].sigma) == (0.01, 0.3)
    assert options["features.5"].sigma == 0.5  # left as it was


@pytest.mark.parametrize(
    "layers, message",
    [
        ({"features.9": {}}, r"layers key 'features.9' names no convolution; they are \['features.0'"),
        ({"blocks.*": {}}, r"layers key\(s\) \['blocks.\*'\] match no convolution"),
        ({nn.ConvTranspose2d: {}}, r"\['ConvTranspose2d'\] match no convolution"),
        ({"features.0": {"temperature": 1}}, r"unknown QConv2d option\(s\) \['temperature'\]"),
        ({"features.0": {"sigma": 2.0}}, r"sigma must be in \(0, 1\]"),
        ({"features.0": 0.1}, "layers\\['features.0'\\] must be a dict of options or None"),
        ({3: {}}, "layers keys are names, patterns or module types, got 3"),
    ],
)
def test_a_bad_mapping_is_named(layers, message):
    with pytest.raises(ValueError, match=message):
        convert(Named(), layers=layers)


# Each pattern's steps after a Conv2d(2, 3, 3): as Sequential children, and as forward code.
PATTERNS = {
    "relu": ([nn.ReLU()], lambda self, y: F.relu(y)),
    "bn relu": ([nn.BatchNorm2d(3), nn.ReLU()], lambda self, y: torch.relu(self.s1(y))),
    "bn without statistics": ([nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU()],
                              lambda self, y: F.relu(self.s1(y))),
    "bn of other width": ([nn.BatchNorm2d(4), nn.ReLU()], lambda self, y: F.relu(self.s1(y))),
    "relu6": ([nn.ReLU6()], lambda self, y: F.relu6(y)),
    "hardtanh": ([nn.Hardtanh(0, 4)], lambda self, y: F.hardtanh(y, 0, 4)),
    "relu maxpool": ([nn.ReLU(), nn.MaxPool2d(2)], lambda self, y: self.s2(y.relu())),
    "relu overlapping pool": ([nn.ReLU(), nn.AvgPool2d(3, 2)], lambda self, y: self.s2(F.relu(y))),
    "sigmoid": ([nn.Sigmoid()], lambda self, y: torch.sigmoid(y)),
    "bn alone": ([nn.BatchNorm2d(3)], lambda self, y: self.s1(y)),
    "nothing": ([], lambda self, y: y),
}  # fmt: skip


def traced_form(steps: list[nn.Module], forward) -> nn.Module:
    class Traced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s0 = nn.Conv2d(2, 3, 3)
            for index, step in enumerate(steps, start=1):
                self.add_module(f"s{index}", step)

        def forward(self, x):
            return forward(self, self.s0(x))

    return Traced()


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_sequential_and_traced_forms_of_a_pattern_get_one_decision(pattern):
    steps, forward = PATTERNS[pattern]

    def decision(model: nn.Module) -> tuple[str, str]:
        try:
            report = convert(model).conversion_report
        except ValueError as error:  # no convolution converted: the reason is in the message
            return "classical", str(error).split("(", 1)[1].split(": ", 1)[1]
        name = next(iter({**report.converted, **report.skipped}))
        converted = bool(report.converted)
        return ("quantum", report.converted[name]) if converted else ("classical", report.skipped[name])

    sequential = decision(nn.Sequential(nn.Conv2d(2, 3, 3), *steps))
    traced = decision(traced_form(list(steps), forward))
    assert sequential[0] == traced[0], (sequential, traced)
    if sequential[0] == "quantum":
        assert sequential == traced
    assert ("converted" if sequential[0] == "quantum" else "kept") == (
        "converted" if pattern in ("relu", "bn relu", "bn without statistics", "relu6", "hardtanh",
                                   "relu maxpool", "relu overlapping pool") else "kept"
    )  # fmt: skip


def test_calibration_changes_only_the_quantum_layers_batch_norm_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(four_convs(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.Flatten())
    quantum = convert(randomise_batch_norms(model), generator=torch.Generator().manual_seed(0)).train()
    before = {key: value.clone() for key, value in quantum.state_dict().items() if torch.is_tensor(value)}
    momentum = quantum[0][2].norm.momentum
    images = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    assert calibrate(quantum, [(images[:32], None), images[32:]]) is quantum
    after = quantum.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"0.2.norm.running_mean", "0.2.norm.running_var", "0.2.norm.num_batches_tracked"}
    assert int(after["0.2.norm.num_batches_tracked"]) == 2  # cumulative, over both batches
    assert quantum.training and all(m.training for m in quantum.modules())  # modes restored
    assert quantum[0][2].norm.momentum == momentum


def test_calibrating_a_model_without_batch_norm_leaves_it_as_it_was(caplog):
    model = convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    before = {key: value.clone() for key, value in model.state_dict().items() if torch.is_tensor(value)}
    with caplog.at_level(logging.WARNING, logger="qcnn.tuning"):
        calibrate(model, [torch.randn(4, 1, 5, 5)])
    assert "nothing to calibrate" in caplog.text
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_diagnosis_in_the_exact_limit_has_no_error():
    torch.manual_seed(0)
    model = convert(randomise_batch_norms(nn.Sequential(four_convs(), nn.Flatten(), nn.Linear(144, 3),
                                                         nn.LogSoftmax(1))), **EXACT)  # fmt: skip
    images = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 3
    result = diagnose(model, images, labels)
    assert [row["layer"] for row in result["layers"]] == ["0.0", "0.2", "0.5", "0.7"]
    for row in result["layers"]:
        assert row["relative_error"] == 0 and row["sqnr_db"] == math.inf and row["distinct_fraction"] == 1
        assert row["sensitivity_accuracy"] == result["exact_accuracy"] == result["quantum_accuracy"]


def test_diagnosis_at_small_epsilon_finds_the_error_the_estimator_predicts():
    """Without sampling and with every estimate far above 0 (no ReLU, no cap), the layer's
    error is 2ε‖A_p‖‖F_q‖ξ per output: the squared error summed over the outputs has mean
    Σ(2εs)² and variance 2Σ(2εs)⁴; the diagnosis must fall within a z-bound of it."""
    epsilon = 1e-3
    layer = QConv2d(2, 3, 3, padding=1, epsilon=epsilon, sigma=None, cap=math.inf, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        layer.bias.fill_(100.0)
    x = torch.randn(32, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    row = diagnose(nn.Sequential(layer), x)["layers"][0]
    exact = F.conv2d(x, layer.weight, layer.bias, 1, 1)
    kernel_norms = layer.weight.detach().flatten(1).norm(dim=1).view(1, -1, 1, 1)
    variance = (2 * epsilon * patch_norms(x, (3, 3), (1, 1), (1, 1), False) * kernel_norms).square()
    variance = variance.expand_as(exact)
    measured = row["relative_error"] ** 2 * exact.square().sum().item()
    z = (measured - variance.sum().item()) / math.sqrt(2 * variance.square().sum().item())
    assert abs(z) < torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - ALPHA / 2)).item()
    assert row["sqnr_db"] == pytest.approx(-20 * math.log10(row["relative_error"]))
    assert row["nonzero_fraction"] == 1 and 0 < row["cost_ratio"] < math.inf
