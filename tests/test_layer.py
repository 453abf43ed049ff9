"""QConv2d and qconv2d: exactness limits, error models, sampling, backprop, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn
from torch.nn import functional as F

from qcnn import QConv2d, QuantumSGD, functional
from qcnn.accel.merge import merge_draws
from qcnn.backprop import noisy_gradient, tomography_estimate, tomography_samples
from qcnn.estimation import ae_outcome_probabilities, estimate, patch_norms, sample_ae_outcomes
from qcnn.options import QConvOptions
from qcnn.sampling import _exponentials, _keep_drawn, _search_draws, sample_
from tests.stats import ALPHA, assert_matches_distribution, assert_standard_normal

EXACT = {"epsilon": 0.0, "sigma": None, "cap": math.inf, "delta": 0.0}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_norms(x, kernel_size, stride, padding):
    """‖A_p‖ from the im2col matrix itself (what the layer must never build)."""
    columns = F.unfold(x, kernel_size, stride=stride, padding=padding)  # (B, D·h·w, P)
    return columns.norm(dim=1)


def reference_scale(x, layer, stride, padding, out_size):
    """‖A_p‖‖F_q‖ shaped like the layer's output (B, D', H', W')."""
    patches = reference_norms(x, layer.kernel_size, stride, padding).view(len(x), 1, *out_size)
    return patches * layer.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)


# --- the classical limit -------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", [None, "max", "avg"])
def test_exact_limit_equals_relu_conv(pooling):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    layer = QConv2d.from_conv(conv, pooling=pooling, **EXACT)
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    expected = F.relu(conv(x))
    if pooling == "max":
        expected = F.max_pool2d(expected, 2)
    elif pooling == "avg":
        expected = F.avg_pool2d(expected, 2)
    torch.testing.assert_close(layer(x), expected)


def test_exact_limit_gradients_pass_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: functional.qconv2d(*a, 2, 1, **EXACT), (x, w, b))


def test_exact_limit_gradients_equal_classical_block():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    layer = QConv2d.from_conv(conv, **EXACT)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    (F.relu(conv(x)) * target).sum().backward()
    expected = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    (layer(x) * target).sum().backward()
    for got, want in zip((x.grad, layer.weight.grad, layer.bias.grad), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (0, 2))])
def test_patch_norms_match_im2col(stride, padding):
    x = torch.randn(3, 4, 11, 10, dtype=torch.float64, generator=generator())
    got = patch_norms(x, (3, 3), stride if isinstance(stride, tuple) else (stride, stride),
                      padding if isinstance(padding, tuple) else (padding, padding))  # fmt: skip
    want = reference_norms(x, 3, stride, padding)
    torch.testing.assert_close(got.flatten(1), want)


def test_authors_norms_use_image_zero_channel_zero():
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64, generator=generator())
    got = patch_norms(x, (3, 3), (1, 1), (0, 0), authors=True)
    want = reference_norms(x[:1, :1], 3, 1, 0)
    assert got.shape == (1, 1, 7, 7)
    torch.testing.assert_close(got.flatten(1), want)


# --- inner-product estimation (section 2.1) ------------------------------------------------------


def test_gaussian_error_has_std_epsilon_stride_2_padding_1():
    """(Ŷ − Y) / (2‖A_p‖‖F_q‖) ~ N(0, ε²), seen through a large bias so no ReLU clips it."""
    epsilon, bias = 0.05, 1e3
    torch.manual_seed(0)
    layer = QConv2d(3, 4, 3, stride=2, padding=1, epsilon=epsilon, sigma=None, cap=math.inf,
                    dtype=torch.float64, generator=generator(1))  # fmt: skip
    with torch.no_grad():
        layer.bias.fill_(bias)
    x = torch.randn(16, 3, 10, 10, dtype=torch.float64, generator=generator(2))
    exact = F.conv2d(x, layer.weight, None, 2, 1)
    scale = reference_scale(x, layer, 2, 1, (5, 5))
    z = torch.cat([((layer(x) - bias - exact) / (2 * scale)).flatten() for _ in range(10)])
    assert_standard_normal((z / epsilon).detach().numpy())


@pytest.mark.parametrize("cosine", [-0.6, 0.1, 0.9])
def test_shots_estimate_is_binomial(cosine):
    shots, n = 40, 20000
    scale = torch.full((n,), 3.0, dtype=torch.float64)
    y = cosine * scale
    options = QConvOptions(estimator="shots", shots=shots)
    y_hat = estimate(y, scale, options, generator(3))
    counts = torch.round(shots * (y_hat / scale + 1) / 2).long()
    observed = np.bincount(counts.numpy(), minlength=shots + 1)
    assert_matches_distribution(observed, stats.binom.pmf(np.arange(shots + 1), shots, (1 + cosine) / 2))


def test_shots_default_count_matches_epsilon():
    assert QConvOptions(estimator="shots", epsilon=0.01).n_shots == 2500
    assert QConvOptions(estimator="amplitude-estimation", epsilon=0.01).n_ae_qubits == 9  # 2^9 >= π/0.01


@pytest.mark.parametrize("a", [0.0, 0.13, 0.5, 0.87, 1.0])
def test_ae_probabilities_match_phase_estimation_sum(a):
    """The Fejér-kernel closed form against the phase-estimation amplitudes summed directly."""
    m = 4
    big_m = 2**m
    theta = math.asin(math.sqrt(a))
    k = np.arange(big_m)
    probabilities = np.zeros(big_m)
    for phase in (theta / math.pi, -theta / math.pi):  # eigenphases ±2θ of the Grover operator
        amplitudes = np.exp(2j * np.pi * np.outer(np.arange(big_m) / big_m - phase, -k)).sum(1) / big_m
        probabilities += 0.5 * np.abs(amplitudes) ** 2
    got = ae_outcome_probabilities(torch.tensor([a], dtype=torch.float64), m)[0].numpy()
    np.testing.assert_allclose(got, probabilities, atol=1e-12)


@pytest.mark.parametrize("a,m", [(0.3, 3), (0.72, 4), (0.05, 5)])
def test_ae_sampler_matches_exact_distribution(a, m):
    outcomes = sample_ae_outcomes(torch.full((30000,), a, dtype=torch.float64), m, generator(4))
    observed = np.bincount(outcomes.long().numpy(), minlength=2**m)
    assert_matches_distribution(observed, ae_outcome_probabilities(torch.tensor([a]), m)[0].numpy())


def test_ae_estimate_is_exact_on_grid_points():
    m = 4
    y_grid = 3
    cosine = 2 * math.sin(math.pi * y_grid / 2**m) ** 2 - 1  # a = sin²(π·3/16): an outcome exactly
    scale = torch.full((100,), 2.0, dtype=torch.float64)
    options = QConvOptions(estimator="amplitude-estimation", ae_qubits=m)
    y_hat = estimate(cosine * scale, scale, options, generator(5))
    torch.testing.assert_close(y_hat, cosine * scale)


def test_exact_estimator_returns_y():
    y = torch.randn(10, generator=generator())
    assert estimate(y, torch.ones(10), QConvOptions(estimator="exact"), generator()) is y


# --- capped ReLU (section 2.2) -------------------------------------------------------------------


def test_cap_orders():
    """Same noise n: theory clamp(Y + n), authors clamp(clamp(Y) + n); equal where 0 < Y < C."""
    torch.manual_seed(0)
    layer = QConv2d(1, 2, 3, epsilon=0.2, cap=1.0, sigma=None, dtype=torch.float64)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=generator())
    outputs = {}
    for order in ("theory", "authors"):
        layer.configure(cap_order=order)
        layer.generator = generator(7)
        outputs[order] = layer(x).detach()
    y = F.conv2d(x, layer.weight, layer.bias).detach()
    inside = (y > 0) & (y < 1)
    torch.testing.assert_close(outputs["authors"][inside], outputs["theory"][inside])
    above = (y > 1) & (outputs["theory"] > 0) & (outputs["theory"] < 1)  # here n = theory − Y < 0
    noise = outputs["theory"][above] - y[above]
    torch.testing.assert_close(outputs["authors"][above], (1 + noise).clamp(0, 1))
    for out in outputs.values():
        assert 0 <= out.min() and out.max() <= 1


# --- quantum sampling (section 2.3) --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_sampled_positions_follow_values(mode):
    """One draw per image (σ = 1/K): the kept position is distributed ∝ f (or f²)."""
    f = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, 4.0, 0.0, 1.5, 2.5, 0.25, 3.5, 1.0])
    out = f.repeat(40000, 1)
    distinct = sample_(out, 1 / len(f), mode, generator(8))
    kept = out != 0  # a position of value 0 is never drawn
    assert (distinct == 1).all() and (kept.sum(1) == 1).all()
    weights = f if mode == "linear" else f**2
    assert_matches_distribution(kept.sum(0).numpy(), (weights / weights.sum()).numpy())


def test_exactly_floor_sigma_k_draws_with_replacement():
    """K = 10 equal values, σ = 0.55 → 5 draws: distinct count follows the occupancy law."""
    k, draws = 10, 5
    out = torch.ones(50000, k)
    distinct = sample_(out, 0.55, "linear", generator(9)).numpy()
    assert (out.sum(1).numpy() == distinct).all()
    d = np.arange(1, draws + 1)
    # P(d distinct) = S(n, d) · k!/(k−d)! / k^n, S = Stirling numbers of the second kind
    stirling = np.array([sum((-1) ** i * special.comb(j, i) * (j - i) ** draws for i in range(j + 1))
                         / math.factorial(j) for j in d])  # fmt: skip
    probabilities = stirling * special.perm(k, d) / k**draws
    assert_matches_distribution(np.bincount(distinct, minlength=draws + 1)[1:], probabilities)


def test_unsampled_pixels_are_zero_and_sampled_keep_their_value():
    torch.manual_seed(0)
    layer = QConv2d(2, 3, 3, sigma=0.3, cap=5.0, generator=generator(10))
    x = torch.randn(6, 2, 10, 10, generator=generator(11))
    layer.generator = generator(10)
    out = layer(x)
    layer.configure(sigma=None)
    layer.generator = generator(10)  # same estimation noise: drawn before the sampling
    full = layer(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], full[kept])
    distinct = kept.flatten(1).sum(1)
    assert (distinct <= math.floor(0.3 * full[0].numel())).all()


def test_all_zero_image_gives_zeros():
    values = torch.zeros(3, 4, 5, 5)
    values[1] = torch.rand(4, 5, 5, generator=generator())
    out = values.clone()
    sample_(out, 0.5, "linear", generator(12))
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0 and out[1].abs().sum() > 0


def test_compiled_and_searchsorted_samplers_agree():
    """The CPU merge kernel and the torch.searchsorted path (used on GPUs) agree draw for draw.

    33 images: the kernel merges four at a time, so the last group is incomplete. Among
    them an all-zero image, images whose weight sits only in the first or the last
    position, and long runs of zeros that draws must skip.
    """
    values = (torch.rand(33, 3, 9, 9, generator=generator()) - 0.4).clamp_min(0)
    values[5] = 0
    values[9, 1:] = 0
    values[30].view(-1)[:-1] = 0
    values[32].view(-1)[1:] = 0
    flat = values.flatten(1)
    for mode in ("linear", "quadratic"):
        mask = torch.ones(33, 243)
        _keep_drawn(mask, flat, 0.4, mode, generator(13))
        n = math.floor(0.4 * 243)
        exponentials = _exponentials(33, n + 1, generator(13), torch.device("cpu"))
        weights = flat if mode == "linear" else flat**2
        assert torch.equal(mask, searchsorted_mask(weights, exponentials, mask))


def searchsorted_mask(weights: torch.Tensor, exponentials: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask of the ``torch.searchsorted`` path for these draws, shaped and typed like ``like``."""
    return torch.zeros_like(like).scatter_(1, _search_draws(weights, exponentials), 1)


def merged_mask(weights: torch.Tensor, exponentials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of the compiled merge for these draws (ones multiplied by it), and its
    count of distinct positions per row."""
    mask, distinct = torch.ones(weights.shape), torch.empty(len(weights), dtype=torch.int64)
    merge_draws(weights.numpy(), exponentials.numpy(), mask.numpy(), distinct.numpy())
    return mask, distinct


@pytest.mark.parametrize(("positions", "draws"), [(1, 1), (1, 5), (7, 1), (3, 40), (200, 3)])
def test_compiled_merge_agrees_at_extreme_shapes(positions, draws):
    """One position, one draw, and far more draws than positions: the merge must still
    place every draw, in its fixed number of steps, where searchsorted does."""
    weights = (torch.rand(6, positions, generator=generator(21)) - 0.3).clamp_min(0)
    weights[2] = 0
    exponentials = _exponentials(6, draws + 1, generator(22), torch.device("cpu"))
    mask, distinct = merged_mask(weights, exponentials)
    assert torch.equal(mask, searchsorted_mask(weights, exponentials, mask))
    assert torch.equal(distinct, mask.sum(1, dtype=torch.int64))


def test_compiled_merge_handles_an_image_with_nan_weights():
    """NaN weights (a diverged network) make NaN draws, which land nowhere: that image's
    row becomes 0 and the images merged beside it keep their draws. The output is a view
    into a wider array, whose extra columns the merge must not touch."""
    weights = torch.rand(6, 50, generator=generator(23))
    weights[2, 7] = math.nan
    exponentials = _exponentials(6, 31, generator(24), torch.device("cpu"))
    wide = torch.full((6, 90), -1.0)
    wide[:, :50] = 1
    merge_draws(weights.numpy(), exponentials.numpy(), wide[:, :50].numpy(), np.empty(6, np.int64))
    expected = searchsorted_mask(weights, exponentials, wide[:, :50])
    rows = [0, 1, 3, 4, 5]
    assert torch.equal(wide[rows, :50], expected[rows])
    assert (wide[2, :50] == 0).all() and (wide[:, 50:] == -1).all()


def test_draw_at_the_end_of_the_cdf_keeps_the_last_position():
    """A last exponential of 0 puts the last draw exactly at the total weight; both samplers
    must map it to the last position (searchsorted alone would say one past the end)."""
    weights = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    exponentials = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.25, 0.0]])
    mask, _ = merged_mask(weights, exponentials)
    assert torch.equal(mask, searchsorted_mask(weights, exponentials, mask))
    assert mask[:, -1].all()


# --- quantum backpropagation (section 3) ---------------------------------------------------------


def test_gradient_is_zero_at_unsampled_and_capped_positions():
    torch.manual_seed(0)
    cap = 0.5
    layer = QConv2d(2, 3, 3, sigma=0.4, cap=cap, delta=0.0, dtype=torch.float64, generator=generator(14))
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64, generator=generator(15), requires_grad=True)
    out = layer(x)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=generator(16))
    (out * upstream).sum().backward()
    gate = (out > 0) & (out < cap)  # sampled, and neither zeroed by the ReLU nor capped
    assert (~gate & (out == cap)).any() and (out == 0).any()
    w = layer.weight.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    (F.conv2d(xr, w) * upstream * gate).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(x.grad, xr.grad)


def test_gaussian_gradient_noise_has_std_delta_norm():
    """Layer backward: per image, (g̃ − g) / (δ‖g‖₂) ~ N(0, 1)."""
    delta = 0.1
    torch.manual_seed(0)
    layer = QConv2d(2, 3, 3, sigma=None, delta=0.0, dtype=torch.float64)
    x = torch.randn(8, 2, 9, 9, dtype=torch.float64, generator=generator(17))
    grads = []
    for d in (0.0, delta):
        layer.configure(delta=d)
        layer.generator = generator(18)
        xg = x.clone().requires_grad_()
        layer(xg).pow(2).sum().backward()
        grads.append(xg.grad)
    exact, noisy = grads
    norms = exact.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert_standard_normal(((noisy - exact) / (delta * norms)).numpy())


def test_tomography_error_within_delta_norm_with_theorem_probability():
    """ℓ∞ tomography: |g̃ − g|∞ <= δ‖g‖₂ with probability >= 1 − 1/d^0.83."""
    d, delta, trials = 64, 0.2, 400
    vectors = torch.randn(trials, d, dtype=torch.float64, generator=generator(19))
    estimates = tomography_estimate(vectors, delta, generator(20))
    errors = (estimates - vectors).abs().amax(1) / vectors.norm(dim=1)
    failures = int((errors > delta).sum())
    bound = stats.binom.ppf(1 - ALPHA, trials, 1 / d**0.83)
    assert failures <= bound, f"{failures} failures of {trials}, theorem allows {bound}"
    assert tomography_samples(d, delta) == math.ceil(36 * math.log(d) / delta**2)
    assert torch.equal(torch.sign(estimates), torch.sign(vectors) * (estimates != 0))


def test_noisy_gradient_exact_cases():
    g = torch.randn(5, 7, generator=generator())
    assert noisy_gradient(g, 0.0, "gaussian", None) is g
    assert noisy_gradient(g, 0.3, "exact", None) is g


def test_quantum_sgd_adds_delta_norm_noise():
    delta = 0.05
    p = nn.Parameter(torch.zeros(2000, dtype=torch.float64))
    p.grad = torch.randn(2000, dtype=torch.float64, generator=generator(21))
    grad = p.grad.clone()
    QuantumSGD([p], lr=1.0, delta=delta, generator=generator(22)).step()
    assert_standard_normal(((-p.detach()) - grad).numpy() / (delta * grad.norm().item()))


# --- module behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["gaussian", "shots", "amplitude-estimation"])
@pytest.mark.parametrize("backprop", ["gaussian", "tomography"])
def test_same_seed_gives_identical_outputs_and_gradients(estimator, backprop):
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        layer = QConv2d(2, 3, 3, estimator=estimator, epsilon=0.1, backprop=backprop, delta=0.1,
                        generator=generator(23))  # fmt: skip
        x = torch.randn(4, 2, 8, 8, generator=generator(24), requires_grad=True)
        out = layer(x)
        out.sum().backward()
        results.append((out.detach(), x.grad, layer.weight.grad))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_initialisation_matches_conv2d_and_state_dict_round_trip():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 4)
    torch.manual_seed(4)
    layer = QConv2d(3, 5, 4)
    torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, conv.bias, rtol=0, atol=0)
    copy = QConv2d(3, 5, 4)
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 9, 9, generator=generator())
    layer.generator, copy.generator = generator(25), generator(25)
    assert torch.equal(layer(x), copy(x))


def test_from_conv_copies_weights_and_geometry():
    conv = nn.Conv2d(2, 4, (3, 5), stride=(2, 1), padding=(1, 2))
    layer = QConv2d.from_conv(conv, sigma=0.2)
    assert (layer.kernel_size, layer.stride, layer.padding) == ((3, 5), (2, 1), (1, 2))
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert layer.options.sigma == 0.2
    assert "sigma=0.2" in repr(layer)
    with pytest.raises(ValueError, match="groups"):
        QConv2d.from_conv(nn.Conv2d(2, 4, 3, groups=2))


def test_cost_accounting():
    torch.manual_seed(0)
    layer = QConv2d(2, 3, 3, epsilon=0.1, cap=2.0, sigma=0.5, generator=generator(26))
    x = torch.randn(5, 2, 8, 8, generator=generator(27))
    layer(x)
    assert layer.last_cost is None
    layer.track_cost = True
    out = layer(x)
    cost = layer.last_cost
    k = 3 * 6 * 6
    assert (cost.images, cost.outputs, cost.samples) == (5, k, k // 2)
    assert cost.classical_cost == k * 2 * 3 * 3
    assert 0 < cost.distinct_fraction <= 0.5
    assert cost.distinct_fraction == pytest.approx((out != 0).float().mean().item(), abs=0.05)
    assert cost.eta == pytest.approx(math.sqrt(math.log(k) / (k // 2)))
    scale = reference_scale(x, layer, 1, 0, (6, 6))
    assert cost.max_norm_product == pytest.approx(scale.flatten(1).amax(1).mean().item(), rel=1e-5)
    expected = cost.samples * cost.max_norm_product * math.sqrt(2.0) / (0.1 * math.sqrt(cost.mean_activation))
    assert cost.quantum_cost == pytest.approx(expected, rel=0.2)  # mean of ratios vs ratio of means


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": 1.5}, "sigma"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"cap": 0.0}, "cap"),
        ({"delta": -1.0}, "delta"),
        ({"estimator": "magic"}, "estimator"),
        ({"backprop": "magic"}, "backprop"),
        ({"sampling": "cubic"}, "sampling"),
        ({"norms": "cheap"}, "norms"),
        ({"pooling": "min"}, "pooling"),
        ({"shots": 0, "estimator": "shots"}, "shots"),
        ({"fused": 1}, "fused"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QConv2d(1, 2, 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        functional.qconv2d(torch.zeros(1, 1, 5, 5), torch.zeros(2, 1, 3, 3), **kwargs)


def test_sampling_off_accepts_no_sigma():
    assert QConv2d(1, 2, 3, sigma=None).options.sigma is None


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(1, 5, 5), "4-D"),
        (torch.zeros(1, 2, 5, 5), "channels"),
        (torch.full((1, 1, 5, 5), float("nan")), "NaN"),
        (torch.full((1, 1, 5, 5), float("inf")), "inf"),
        (torch.zeros(2, 1, 5, 5).index_fill_(2, torch.tensor([3]), -math.inf), "inf"),
        (torch.zeros(0, 1, 5, 5), "no elements"),
    ],
)
def test_bad_input_raises(x, match):
    with pytest.raises(ValueError, match=match):
        QConv2d(1, 2, 3)(x)


def test_sigma_too_small_for_layer_raises():
    with pytest.raises(ValueError, match="sigma"):
        QConv2d(1, 1, 3, sigma=0.01)(torch.ones(1, 1, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu_in_the_exact_limit_and_runs_noisy():
    conv = nn.Conv2d(2, 3, 3).double()
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64, generator=generator())
    cpu = QConv2d.from_conv(conv, **EXACT)(x)
    cuda = QConv2d.from_conv(conv.cuda(), **EXACT)(x.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu)
    layer = QConv2d.from_conv(conv.cuda(), generator=torch.Generator("cuda").manual_seed(0))
    xg = x.cuda().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad.shape == x.shape and torch.isfinite(xg.grad).all()
