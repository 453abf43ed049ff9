"""The fused Triton kernels of ``qcnn.accel.fused`` against the torch operations they replace.

With CUDA they run compiled on the GPU; without it, in Triton's interpreter on CPU tensors
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``). The kernels draw Philox numbers, not
torch's, so each test makes the kernel's own numbers again with the same Triton calls and
feeds them to the torch formula: outputs must then agree to float32 rounding, and the
sampled positions exactly. That the Philox numbers have the right distributions is tested
on its own, so the statistical tests of ``test_layer.py`` carry over.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.nn import functional as F

# In the dev extra on Linux, and torch's CUDA builds bring it; elsewhere these tests skip.
triton = pytest.importorskip("triton")
import triton.language as tl

from qcnn import QConv2d, add_gradient_noise
from qcnn.accel import fused
from qcnn.accel.fused import kernels
from qcnn.accel.fused.kernels import _exponential
from qcnn.cost import layer_cost, summarise
from qcnn.estimation import patch_norms
from qcnn.options import QConvOptions
from qcnn.sampling import _search_draws, n_samples
from tests.stats import ALPHA, assert_standard_normal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STRIDE, PADDING = (2, 1), (1, 0)
EXACT = {"epsilon": 0.0, "sigma": None, "cap": math.inf, "delta": 0.0}


@pytest.fixture(autouse=True)
def float32_arithmetic(monkeypatch):
    """Compared at float32 tolerance, so no TF32 in cuDNN's convolutions on a GPU (on by
    default, unlike in matmuls): the layer's convolution and the reference's may differ."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@triton.jit
def _philox_numbers(seeds_ptr, seed_index, out_ptr, count, EXPONENTIAL: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + seed_index)
    if EXPONENTIAL:
        numbers = _exponential(seed, i)
    else:
        numbers = tl.randn(seed, i)
    tl.store(out_ptr + i, numbers, mask=i < count)


def philox_numbers(seeds: torch.Tensor, index: int, count: int, exponential: bool = False) -> torch.Tensor:
    """The numbers the kernels draw for counters 0..count − 1 under seed ``seeds[index]``."""
    out = torch.empty(count, device=seeds.device)
    grid = (triton.cdiv(count, 1024),)
    _philox_numbers[grid](seeds, index, out, count, EXPONENTIAL=exponential, BLOCK=1024)
    return out


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def conv_inputs(seed: int, shape=(3, 2, 9, 8), out_channels: int = 3, kernel: int = 3):
    """x, kernels and bias on DEVICE, and Y = conv2d(x, kernels) without bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_channels, shape[1], kernel, kernel, generator=g) / kernel
    bias = torch.randn(out_channels, generator=g)
    x, weight, bias = x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)
    return x, weight, bias, F.conv2d(x, weight, None, STRIDE, PADDING)


def torch_formula(x, y, weight, bias, options, normals):
    """f(Ŷ) by the torch operations of qcnn.functional, given the estimation's normals."""
    norms = patch_norms(x, weight.shape[2:], STRIDE, PADDING, options.norms == "authors")
    scale = norms * weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    y_hat = y + 2 * options.epsilon * scale * normals
    if bias is not None:
        y, y_hat = y + bias.view(1, -1, 1, 1), y_hat + bias.view(1, -1, 1, 1)
    if options.cap_order == "authors":
        y_hat = y.clamp(0, options.cap) + (y_hat - y)
    return y_hat.clamp(0, options.cap), y


# --- the kernels ---------------------------------------------------------------------------------


def test_philox_numbers_are_standard_normal_and_exponential():
    seeds = kernels.draw_seeds(generator(1), DEVICE)
    assert_standard_normal(philox_numbers(seeds, 0, 100_000).cpu().numpy())
    exponentials = philox_numbers(seeds, 1, 100_000, exponential=True).cpu().numpy()
    assert stats.kstest(exponentials, "expon").pvalue > ALPHA


@pytest.mark.parametrize("cap_order", ["theory", "authors"])
@pytest.mark.parametrize("norms", ["exact", "authors"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_estimate_and_cap_match_the_torch_formula(cap_order, norms, with_bias):
    """Multi-channel input, stride (2, 1), padding (1, 0): f(Ŷ) with the kernel's normals."""
    x, weight, bias, y = conv_inputs(2)
    bias = bias if with_bias else None
    options = QConvOptions(epsilon=0.1, cap=1.0, sigma=None, cap_order=cap_order, norms=norms)
    seeds = kernels.draw_seeds(generator(3), DEVICE)
    out, inner = kernels.estimate_cap_sample(x, y.clone(), weight, bias, STRIDE, PADDING, options, seeds)
    normals = philox_numbers(seeds, 0, y.numel()).view_as(y)
    expected, y_with_bias = torch_formula(x, y, weight, bias, options, normals)
    torch.testing.assert_close(out, expected)
    assert ((0 < out) & (out < 1)).any() and (out == 1).any() and (out == 0).any()
    if cap_order == "authors":
        torch.testing.assert_close(inner, y_with_bias)
    else:
        assert inner is None


def test_exact_estimator_adds_no_noise():
    x, weight, bias, y = conv_inputs(4)
    options = QConvOptions(estimator="exact", cap=math.inf, sigma=None)
    seeds = kernels.draw_seeds(generator(5), DEVICE)
    out, _ = kernels.estimate_cap_sample(x, y.clone(), weight, bias, STRIDE, PADDING, options, seeds)
    torch.testing.assert_close(out, F.relu(y + bias.view(1, -1, 1, 1)))


@pytest.mark.parametrize("sampling", ["linear", "quadratic"])
@pytest.mark.parametrize(
    ("shape", "kernel"),
    [((5, 2, 9, 8), 3), ((3, 1, 80, 40), 3)],  # the second: more positions and draws than a block
)
def test_sampling_draws_where_searchsorted_does(sampling, shape, kernel):
    """Given the kernel's exponentials, the torch.searchsorted sampler of qcnn.sampling keeps
    exactly the same positions; an all-zero image (zero input, no bias) stays all zero."""
    x, weight, _, _ = conv_inputs(6, shape, kernel=kernel)
    x[1] = 0
    y = F.conv2d(x, weight, None, STRIDE, PADDING)
    seeds = kernels.draw_seeds(generator(7), DEVICE)
    unsampled = QConvOptions(epsilon=0.1, cap=2.0, sigma=None, sampling=sampling)
    full, _ = kernels.estimate_cap_sample(x, y.clone(), weight, None, STRIDE, PADDING, unsampled, seeds)
    sampled = QConvOptions(epsilon=0.1, cap=2.0, sigma=0.4, sampling=sampling)
    out, _ = kernels.estimate_cap_sample(x, y.clone(), weight, None, STRIDE, PADDING, sampled, seeds)
    images, outputs = len(x), full[0].numel()
    draws = n_samples(0.4, outputs)
    exponentials = philox_numbers(seeds, 1, images * (draws + 1), exponential=True).view(images, -1)
    weights = full.flatten(1) if sampling == "linear" else full.flatten(1).square()
    mask = torch.zeros_like(weights).scatter_(1, _search_draws(weights, exponentials), 1)
    assert torch.equal(out.flatten(1), full.flatten(1) * mask)
    assert out[1].abs().sum() == 0 and (out[[0, 2]].flatten(1) > 0).any(1).all()


@pytest.mark.parametrize("rows", [1, 3])
def test_gaussian_noise_matches_the_torch_formula(rows):
    """g + δ‖g‖₂ξ per row, rows longer than a block."""
    gradient = torch.randn(rows, 2500, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    seeds = kernels.draw_seeds(generator(9), DEVICE)
    out = kernels.gaussian_noise(gradient, 0.1, seeds, kernels.INPUT_GRADIENT_SEED, rows)
    normals = philox_numbers(seeds, kernels.INPUT_GRADIENT_SEED, gradient.numel()).view_as(gradient)
    expected = gradient + 0.1 * gradient.norm(dim=1, keepdim=True) * normals
    torch.testing.assert_close(out, expected)


# --- the layer on the fused kernels --------------------------------------------------------------


def count_fused_forwards(monkeypatch) -> list:
    """A list that gets one entry per call of ``kernels.estimate_cap_sample`` by the layer.

    The kernels' smoke test on DEVICE, which the layer runs once before it first uses them,
    must have passed first (and is not counted).
    """
    assert fused.kernels_for(torch.ones(1, device=DEVICE)) is kernels
    calls, kernel = [], kernels.estimate_cap_sample

    def counted(*args):
        calls.append(args)
        return kernel(*args)

    monkeypatch.setattr(kernels, "estimate_cap_sample", counted)
    return calls


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """The layer takes the fused path on this test's device too; the list counts its calls."""
    monkeypatch.setattr(fused, "DEVICE_TYPES", (DEVICE.type,))
    return count_fused_forwards(monkeypatch)


def layer_and_input(seed: int, **options) -> tuple[QConv2d, torch.Tensor]:
    torch.manual_seed(seed)
    layer = QConv2d(2, 3, 3, stride=STRIDE, padding=PADDING, device=DEVICE, **options)
    x = torch.randn(4, 2, 9, 8, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return layer, x.requires_grad_()


def test_fused_layer_in_the_exact_limit_is_the_classical_block(fused_calls):
    layer, x = layer_and_input(10, **EXACT)
    upstream = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    (layer(x) * upstream).sum().backward()
    got = (x.grad, layer.weight.grad, layer.bias.grad)
    conv = torch.nn.Conv2d(2, 3, 3, stride=STRIDE, padding=PADDING, device=DEVICE)
    conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    xr = x.detach().requires_grad_()
    out = F.relu(conv(xr))
    (out * upstream).sum().backward()
    for grad, want in zip(got, (xr.grad, conv.weight.grad, conv.bias.grad), strict=True):
        torch.testing.assert_close(grad, want)
    torch.testing.assert_close(layer(x), out)
    assert len(fused_calls) == 2


@pytest.mark.parametrize("cap_order", ["theory", "authors"])
def test_fused_layer_gradient_is_zero_at_unsampled_and_capped_positions(fused_calls, cap_order):
    layer, x = layer_and_input(12, sigma=0.4, cap=0.5, delta=0.0, cap_order=cap_order)
    layer.generator = generator(13)
    out = layer(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    (out * upstream).sum().backward()
    gate = (out > 0) & (out < 0.5)  # sampled, neither cut by the ReLU nor capped
    assert (out == 0.5).any() and (out == 0).any() and gate.any()
    w, xr = layer.weight.detach().requires_grad_(), x.detach().requires_grad_()
    y = F.conv2d(xr, w, layer.bias.detach(), STRIDE, PADDING)
    if cap_order == "authors":  # the inner clamp stops the gradient too
        gate &= (y > 0) & (y < 0.5)
    (y * upstream * gate).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(x.grad, xr.grad)
    assert len(fused_calls) == 1


def test_fused_layer_backward_adds_delta_norm_noise_from_its_seeds(fused_calls):
    """∂L/∂F and each image's ∂L/∂X get δ‖g‖₂ξ, ξ the Philox normals of the seeds the
    forward pass drew (the generator's first draw)."""
    delta, grads = 0.1, []
    for d in (0.0, delta):
        layer, x = layer_and_input(15, sigma=0.5, delta=d, generator=generator(16))
        layer(x).sum().backward()
        grads.append((x.grad.flatten(1), layer.weight.grad.flatten()))
    (exact_x, exact_w), (noisy_x, noisy_w) = grads
    seeds = kernels.draw_seeds(generator(16), DEVICE)
    normals_x = philox_numbers(seeds, kernels.INPUT_GRADIENT_SEED, exact_x.numel()).view_as(exact_x)
    normals_w = philox_numbers(seeds, kernels.WEIGHT_GRADIENT_SEED, exact_w.numel())
    torch.testing.assert_close(noisy_x, exact_x + delta * exact_x.norm(dim=1, keepdim=True) * normals_x)
    torch.testing.assert_close(noisy_w, exact_w + delta * exact_w.norm() * normals_w)


def test_fused_layer_is_reproducible(fused_calls):
    results = []
    for _ in range(2):
        layer, x = layer_and_input(17, epsilon=0.1, delta=0.1, generator=generator(18))
        out = layer(x)
        out.sum().backward()
        results.append((out.detach(), x.grad, layer.weight.grad, layer.bias.grad))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_optimiser_step_noise_is_delta_norm_times_the_kernels_normals(monkeypatch):
    """add_gradient_noise (QuantumSGD's step): one seed per parameter with a gradient."""
    monkeypatch.setattr(fused, "DEVICE_TYPES", (DEVICE.type,))
    g = torch.Generator().manual_seed(24)
    params = [torch.zeros(shape, device=DEVICE, requires_grad=True) for shape in ((30, 40), (5,), (2,))]
    grads = [torch.randn(p.shape, generator=g).to(DEVICE) for p in params[:2]]
    for p, grad in zip(params[:2], grads, strict=True):  # params[2] has no gradient: skipped
        p.grad = grad.clone()
    add_gradient_noise(params, 0.1, generator(25))
    seeds = kernels.draw_seeds(generator(25), DEVICE, 2)
    for index, (p, grad) in enumerate(zip(params[:2], grads, strict=True)):
        normals = philox_numbers(seeds, index, grad.numel()).view_as(grad)
        torch.testing.assert_close(p.grad, grad + 0.1 * grad.norm() * normals)
    assert params[2].grad is None


@pytest.mark.parametrize("options", [{}, {"estimator": "exact"}, {"cap_order": "authors", "sigma": None}])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf − inf
def test_a_nan_or_inf_input_makes_its_image_nan_without_a_check_on_the_host(fused_calls, options, value):
    """The layer checked its input with .item(), which makes the host wait for the GPU; the
    kernel now makes the image NaN instead of letting the cap or the sampling hide it."""
    layer, x = layer_and_input(28, generator=generator(29), **options)
    with torch.no_grad():
        x[1, 0, 4, 4] = value
    out = layer(x)
    assert len(fused_calls) == 1
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("options", [{"fused": False}, {"estimator": "shots"}, {"dtype": torch.float64}])
def test_layer_keeps_torch_operations_where_the_kernels_do_not_apply(fused_calls, options):
    layer, x = layer_and_input(19, **options)
    layer(x.to(layer.weight.dtype))
    assert fused_calls == []


@pytest.mark.parametrize("options", [{"sigma": 0.5, "cap": 1.0}, {"sigma": None, "cap": math.inf}])
def test_cost_accounting_observes_the_fused_pass(fused_calls, options):
    """Tracking the cost used to send the layer to torch operations, which draw other
    numbers: an evaluation with accounting on did not compute what training computed."""
    options = {"epsilon": 0.1, **options}
    outputs = []
    for track_cost in (False, True):
        layer, x = layer_and_input(26, generator=generator(27), **options)
        layer.track_cost = track_cost
        outputs.append(layer(x).detach())
    assert len(fused_calls) == 2 and torch.equal(*outputs)
    cost = layer.last_cost
    # The reference: the torch formula on the kernel's own normals, before the sampling.
    seeds = kernels.draw_seeds(generator(27), DEVICE)
    y = F.conv2d(x.detach(), layer.weight.detach(), None, STRIDE, PADDING)
    normals = philox_numbers(seeds, 0, y.numel()).view_as(y)
    weight = layer.weight.detach()
    f, _ = torch_formula(x.detach(), y, weight, layer.bias.detach(), layer.options, normals)
    scale = patch_norms(x.detach(), (3, 3), STRIDE, PADDING) * weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    expected = layer_cost(*summarise(scale, f, layer.options.cap), None, f[0].numel(), 1, 0.1, 18)
    assert (cost.images, cost.outputs, cost.classical_cost) == (4, 3 * 5 * 6, 3 * 5 * 6 * 18)
    assert cost.max_norm_product == pytest.approx(expected.max_norm_product, rel=1e-5)
    assert cost.mean_activation == pytest.approx(expected.mean_activation, rel=1e-5)
    if options["sigma"] is None:
        assert cost.samples == cost.outputs and cost.distinct_fraction == 1.0
    else:
        kept = (outputs[1] != 0).flatten(1).sum(1).double() / cost.outputs  # f > 0 where kept here
        assert cost.samples == n_samples(0.5, cost.outputs)
        assert cost.distinct_fraction >= kept.mean().item() and cost.distinct_fraction <= 0.5


def test_layer_falls_back_to_torch_operations_when_the_smoke_test_fails(monkeypatch, caplog):
    def fails(device):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(fused, "DEVICE_TYPES", (DEVICE.type,))
    monkeypatch.setattr(kernels, "smoke_test", fails)
    fused._kernels_on.cache_clear()
    try:
        layer, x = layer_and_input(22, generator=generator(23))
        with caplog.at_level("WARNING", logger="qcnn.accel.fused"):
            layer(x).sum().backward()
        assert "no C compiler" in caplog.text and "torch operations" in caplog.text
        assert fused.kernels_for(x) is None and torch.isfinite(x.grad).all()
    finally:
        fused._kernels_on.cache_clear()  # the next test runs the real smoke test again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_layer_takes_the_fused_path_by_default(monkeypatch):
    calls = count_fused_forwards(monkeypatch)
    layer, x = layer_and_input(20, generator=generator(21))
    layer(x).sum().backward()
    assert len(calls) == 1 and torch.isfinite(x.grad).all()
