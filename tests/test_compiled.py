"""The layer's compiled CPU pass (``qcnn.accel.estimate``) against the torch operations it
replaces (``fused=False``): the same numbers, bit for bit, forward and backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcnn import QConv2d
from qcnn.accel import estimate, rng
from qcnn.functional import NonFiniteError

# (batch, in channels, size, out channels, kernel, stride, padding): the authors' two layers
# (outputs above rng.SMALLEST, so the normals come from the generator's words, in chunks
# that straddle images and channels), a strided and padded one, and one small enough that
# the normals come from torch.randn.
SHAPES = [
    (8, 1, 28, 5, 7, 1, 0),
    (8, 5, 22, 10, 7, 1, 0),
    (6, 3, 15, 4, 3, 2, 1),
    (2, 2, 8, 3, 3, 1, 0),
]
OPTIONS = [
    {},
    {"cap_order": "authors", "norms": "authors"},
    {"sigma": None, "cap": math.inf},
    {"epsilon": 0.0},
    {"estimator": "exact", "sampling": "quadratic", "cap": 1.0},
    {"pooling": "max", "epsilon": 0.1},
]


def run(shape: tuple, options: dict, fused: bool, bias: bool = True, track_cost: bool = False) -> dict:
    """One forward and backward of a layer; everything they made, and the generator after."""
    batch, channels, size, out_channels, kernel, stride, padding = shape
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(7)
    options = {"generator": generator, "fused": fused, **options}
    layer = QConv2d(channels, out_channels, kernel, stride, padding, bias, **options)
    layer.track_cost = track_cost
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    out = layer(x)
    (out.square().sum() + out.sum()).backward()
    made = {"out": out.detach(), "x.grad": x.grad, "state": generator.get_state(), "cost": layer.last_cost}
    return made | {name: p.grad for name, p in layer.named_parameters()}


@pytest.fixture
def compiled_calls(monkeypatch) -> list:
    """Counts the compiled pass's calls, so a test knows that it compared it and not torch with torch."""
    calls = []
    original = estimate.estimate_cap

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(estimate, "estimate_cap", counted)
    return calls


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS)
def test_compiled_pass_gives_the_torch_operations_numbers(shape, options, compiled_calls):
    compiled, plain = run(shape, options, fused=True), run(shape, options, fused=False)
    assert len(compiled_calls) == 1
    for key in ("out", "x.grad", "weight", "bias", "state"):
        assert torch.equal(compiled[key], plain[key]), key


def test_compiled_pass_without_bias_and_with_normals_from_words(compiled_calls):
    shape = SHAPES[1]
    outputs = shape[0] * shape[3] * 16 * 16
    assert outputs >= rng.SMALLEST  # the normals are made in the compiled pass, from the words
    compiled, plain = run(shape, {}, fused=True, bias=False), run(shape, {}, fused=False, bias=False)
    assert len(compiled_calls) == 1
    assert all(torch.equal(compiled[key], plain[key]) for key in ("out", "x.grad", "weight", "state"))


def test_channels_last_input_gives_the_same_numbers(compiled_calls):
    def forward(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        layer = QConv2d(3, 4, 3, padding=1, generator=torch.Generator().manual_seed(0), fused=fused)
        x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        return layer(x.to(memory_format=torch.channels_last))

    assert torch.equal(forward(True), forward(False))
    assert len(compiled_calls) == 1


def test_cost_accounting_observes_the_compiled_pass(compiled_calls):
    shape, options = SHAPES[0], {"epsilon": 0.1}
    untracked = run(shape, options, fused=True)
    tracked = run(shape, options, fused=True, track_cost=True)
    reference = run(shape, options, fused=False, track_cost=True)["cost"]
    assert len(compiled_calls) == 2  # tracking the cost leaves the computation as it was
    assert torch.equal(untracked["out"], tracked["out"]) and torch.equal(untracked["state"], tracked["state"])
    cost = tracked["cost"]
    for field in ("images", "outputs", "samples", "distinct_fraction", "eta", "classical_cost"):
        assert getattr(cost, field) == getattr(reference, field), field
    for field in ("max_norm_product", "mean_activation", "quantum_cost"):  # float64 sums in another order
        assert getattr(cost, field) == pytest.approx(getattr(reference, field), rel=1e-12), field


@pytest.mark.parametrize(
    "where,value,message",
    [
        ("input", math.nan, "input contains NaN or inf"),
        ("input", math.inf, "input contains NaN or inf"),
        ("weight", math.nan, "weights contain NaN or inf"),
    ],
)
@pytest.mark.parametrize("options", [{}, {"estimator": "exact"}])
def test_compiled_pass_finds_nan_and_inf(where, value, message, options, compiled_calls):
    layer = QConv2d(2, 3, 3, generator=torch.Generator().manual_seed(0), **options)
    x = torch.rand(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (x if where == "input" else layer.weight)[0, 0, 2, 2] = value
    with pytest.raises(NonFiniteError, match=message):
        layer(x)
    assert len(compiled_calls) == 1  # found by the compiled pass, not by a pass over x before it


def test_estimates_that_overflow_are_named():
    layer = QConv2d(1, 1, 1, bias=False, estimator="exact", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.fill_(1e30)
    with pytest.raises(NonFiniteError, match="overflowed"):
        layer(torch.full((1, 1, 2, 2), 1e30))


@pytest.mark.parametrize("size", [rng.SMALLEST, rng.SMALLEST + 8, rng.SMALLEST + 2048 * 3 + 5, 160_007])
def test_normals_made_in_chunks_are_torchs(size):
    ours, torchs = torch.Generator().manual_seed(size), torch.Generator().manual_seed(size)
    words = rng.normal_words((size,), ours, torch.device("cpu"), torch.float32)
    made = np.empty(size, np.float32)
    for start in range(0, size, estimate.CHUNK):
        rng.normals(words, size, start, made[start : start + estimate.CHUNK])
    assert np.array_equal(made, torch.randn(size, generator=torchs).numpy())
    assert torch.equal(ours.get_state(), torchs.get_state())
