"""The QCNN layer as a function: ``docs/algorithm.md`` sections 1 to 3.

Forward, per image and vectorised over the batch:
  Y = conv2d(X, K)                         (section 1, the matrix product A F)
  Ŷ = estimate(Y, ‖A_p‖‖F_q‖) + bias        (section 2.1, error model)
  f = min(max(Ŷ, 0), C)                    (section 2.2, capped ReLU)
  out = f at ⌊σK⌋ sampled positions, else 0 (section 2.3)
  out = pool(out)                          (section 2.4, optional)

Backward (section 3): G = ∂L/∂out gated by the sampling mask and the cap (the estimation
noise is a constant of the forward pass), then ∂L/∂F = AᵀG and ∂L/∂X = col2im(G Fᵀ)
computed exactly by ``convolution_backward``, then read out through the δ error model.

On CUDA, the steps between the convolution and the output, and the δ noise, run as fused
Triton kernels (:mod:`qcnn.accel.fused`) where they apply: a training step there is bound by the
number of operations launched, not by their size.

``torch.compile`` stops at the layer's boundary (``torch.compiler.disable``): the layer runs
eagerly, as it would without compile, and the rest of the model is compiled around it. Its
work is compiled code already (numba, Triton), and its random draws must come from the
layer's generator in its own order, which a traced copy would not keep. The decorator is
torch's lazy form of it, which imports ``torch._dynamo`` (over a second) at the first call
rather than when ``qcnn`` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
from torch._compile import _disable_dynamo
from torch.nn import functional as F

from qcnn.accel import fused
from qcnn.backprop import noisy_gradient
from qcnn.cost import LayerCost, layer_cost, summarise
from qcnn.estimation import estimate, patch_norms
from qcnn.options import QConvOptions, check_generator, conv_pair
from qcnn.sampling import capped_relu_, n_samples, sample_

CostRecorder = Callable[[LayerCost], None]


class NonFiniteError(ValueError):
    """The layer's input or weights hold NaN or inf (inside training: it diverged)."""


def check_input(x: torch.Tensor, weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """ValueError for input the layer cannot take (NaN and inf apart: :func:`check_finite`),
    before any work is done."""
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input has {x.shape[1]} channels, the layer expects in_channels={weight.shape[1]}"
        )
    if x.numel() == 0:
        raise ValueError(f"input has no elements, shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise ValueError(
            f"the layer computes in float32 or float64 (the sampling's CDF needs the precision): got "
            f"input {x.dtype} and weight {weight.dtype}; convert both with .float() or .double()"
        )
    check_generator(generator)
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"generator is on {generator.device}, input on {x.device}: they must match"
        )


def check_finite(x: torch.Tensor, weight: torch.Tensor) -> None:
    """NonFiniteError if the input or the weights hold NaN or inf.

    NaN propagates to both extremes, an infinity shows in one: one pass, no copy of x, and
    no further tensor operations (each small one costs tens of µs inside a training step).
    The compiled CPU pass needs no such pass: it finds them in the estimates it computes.
    """
    if not all(math.isfinite(extreme.item()) for extreme in torch.aminmax(x)):
        raise NonFiniteError("input contains NaN or inf")
    if not all(math.isfinite(extreme.item()) for extreme in torch.aminmax(weight.detach())):
        raise NonFiniteError("the layer's weights contain NaN or inf (did training diverge?)")


def _compiles(x: torch.Tensor, options: QConvOptions) -> bool:
    """Whether the compiled CPU pass (:func:`_compiled_estimate_cap_sample`) makes this
    forward pass: float32 on CPU, the "gaussian" or "exact" estimator, ``options.fused``."""
    return (
        options.fused and x.device.type == "cpu" and x.dtype == torch.float32
        and options.estimator in ("exact", "gaussian")
    )  # fmt: skip


def _fused_kernels(x: torch.Tensor, weight: torch.Tensor, options: QConvOptions) -> ModuleType | None:
    """:mod:`qcnn.accel.fused.kernels` where they apply to this forward pass (see
    ``QConvOptions.fused``), else None."""
    if options.fused and options.estimator in ("exact", "gaussian"):
        return fused.kernels_for(x, weight)
    return None


def _fused_estimate_cap_sample(kernels, x, y, weight, bias, stride, padding, options, seeds, record):
    """Sections 2.1 to 2.3 by the fused kernels; with ``record``, the section 4 accounting
    from the per-image sums the kernel adds up as it computes (the same pass either way)."""
    summaries = None if record is None else torch.empty(len(y), 4, dtype=torch.float64, device=y.device)
    f, inner = kernels.estimate_cap_sample(x, y, weight, bias, stride, padding, options, seeds, summaries)
    if record is not None:
        largest_norm, f_sum, f_max, kept = summaries.unbind(1)
        outputs = f[0].numel()
        m = largest_norm * torch.linalg.vector_norm(weight.flatten(1), dim=1).amax().double()
        c = f_max if math.isinf(options.cap) else torch.full_like(f_max, options.cap)
        distinct = None if options.sigma is None else kept.long()
        _record(record, (m, f_sum / outputs, c), distinct, outputs, options, weight[0].numel())
    return f, inner


def _estimate(x, y, weight, stride, padding, options, generator):
    """Section 2.1 in torch operations: (Ŷ without bias, ‖A_p‖‖F_q‖)."""
    kernel_norms = torch.linalg.vector_norm(weight.flatten(1), dim=1).view(1, -1, 1, 1)
    norms = patch_norms(x, weight.shape[2:], stride, padding, options.norms == "authors")
    scale = norms * kernel_norms
    return estimate(y, scale, options, generator), scale


def _sample(f, summary, options, generator, record, kernel_volume):
    """Section 2.3 on f(Ŷ) (made in this pass, sampled in place); with ``record``, the
    section 4 accounting from the per-image ``summary`` of f(Ŷ) (:func:`qcnn.cost.summarise`)."""
    distinct = None
    if options.sigma is not None:
        f = f.contiguous()
        distinct = sample_(f, options.sigma, options.sampling, generator)
    if record is not None:
        _record(record, summary, distinct, f[0].numel(), options, kernel_volume)
    return f


def _record(record, summary, distinct, outputs, options, kernel_volume):
    """Hand ``record`` the section 4 cost of this pass, from the per-image M, E and C of
    ``summary`` and the distinct positions kept (None without sampling)."""
    samples = outputs if distinct is None else n_samples(options.sigma, outputs)
    record(layer_cost(*summary, distinct, outputs, samples, options.epsilon, kernel_volume))


def _estimate_cap_sample(x, y, weight, bias, stride, padding, options, generator, record):
    """Sections 2.1 to 2.3 in torch operations: (f sampled, the inner clamp's input or None)."""
    y_hat, scale = _estimate(x, y, weight, stride, padding, options, generator)
    if bias is not None:
        y_hat = y_hat + bias.view(1, -1, 1, 1)
    # In-place steps below write only tensors made in this pass (y_hat may be y itself,
    # which the theory order no longer needs): fewer large temporaries, fewer page faults.
    inner = None
    if options.cap_order == "authors":
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        inner = y  # the inner clamp's input: its flat parts stop the gradient too
    f = capped_relu_(y_hat, y, options.cap, options.cap_order)
    summary = summarise(scale, f, options.cap) if record is not None else None
    return _sample(f, summary, options, generator, record, weight[0].numel()), inner


def _compiled_estimate_cap_sample(x, y, weight, bias, stride, padding, options, generator, record):
    """:func:`_estimate_cap_sample` on CPU, the same numbers: f(Ŷ) in one compiled pass over
    Y (:mod:`qcnn.accel.estimate`), which also checks it is finite, then the sampling."""
    from qcnn.accel import rng  # compiled with numba: imported at first use, not with qcnn
    from qcnn.accel.estimate import estimate_cap

    y = y.contiguous()  # e.g. from a channels_last input
    kernel_norms = torch.linalg.vector_norm(weight.flatten(1), dim=1)
    norms = patch_norms(x, weight.shape[2:], stride, padding, options.norms == "authors").flatten(1)
    noisy = options.estimator == "gaussian" and options.epsilon > 0
    words = rng.normal_words(y.shape, generator, y.device, y.dtype) if noisy else None
    noise = rng.randn(y.shape, generator, y.device, y.dtype) if noisy and words is None else _NOTHING
    if words is None:
        f = torch.empty_like(y)
    else:  # f takes the words' memory (see estimate_cap)
        f = torch.from_numpy(words[: y.numel()].view(np.float32)).view(y.shape)
    finite = estimate_cap(
        _by_channel(y), _NO_WORDS if words is None else words, noise.numpy().reshape(-1), _by_channel(f),
        norms.numpy(), kernel_norms.numpy(), (bias if bias is not None else _NOTHING).detach().numpy(),
        np.float32(2 * options.epsilon), np.float32(options.cap), options.cap_order == "authors",
    )  # fmt: skip
    if not finite:
        check_finite(x, weight)  # names the input or the weights where it can
        raise NonFiniteError("the layer's estimates overflowed to inf")
    summary = None
    if record is not None:  # the largest ‖A_p‖‖F_q‖ of an image is its largest ‖A_p‖ times max ‖F_q‖
        largest_scale = (norms.amax(1) * kernel_norms.amax()).view(-1, 1, 1, 1)
        summary = summarise(largest_scale, f, options.cap)
    inner = y if options.cap_order == "authors" else None
    return _sample(f, summary, options, generator, record, weight[0].numel()), inner


_NOTHING, _NO_WORDS = torch.empty(0), np.empty(0, np.uint32)  # "none" for the compiled pass's arrays


def _by_channel(t: torch.Tensor) -> np.ndarray:
    """A (B, C, H, W) tensor as a (B, C, H·W) array sharing its memory."""
    return t.detach().view(*t.shape[:2], -1).numpy()


class _QConv2d(torch.autograd.Function):
    """Estimation, cap and sampling forward; exact gated backward plus the δ model."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, options, generator, record):
        y = F.conv2d(x, weight, None, stride, padding)
        kernels = _fused_kernels(x, weight, options)
        seeds = None
        if kernels is None:
            passes = _compiled_estimate_cap_sample if _compiles(x, options) else _estimate_cap_sample
            f, inner = passes(x, y, weight, bias, stride, padding, options, generator, record)
        else:  # the backward's δ noise takes its seeds from the same draw
            seeds = kernels.draw_seeds(generator, x.device)
            conv = (stride, padding)
            f, inner = _fused_estimate_cap_sample(kernels, x, y, weight, bias, *conv, options, seeds, record)
        # Saved as torch's ReLU saves its result: changing it in place is an autograd error.
        ctx.save_for_backward(x, weight, f, inner)
        ctx.conv = (stride, padding, bias is not None)
        ctx.options, ctx.generator, ctx.kernels, ctx.seeds = options, generator, kernels, seeds
        return f

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out, inner = ctx.saved_tensors
        options = ctx.options
        # The gradient passes where 0 < out < C: sampled (else out = 0), not cut by the ReLU
        # and not capped. hardtanh's backward is exactly that gate, in one pass.
        grad_y = torch.ops.aten.hardtanh_backward(grad_out, out, 0.0, options.cap)
        if inner is not None:
            grad_y = torch.ops.aten.hardtanh_backward(grad_y, inner, 0.0, options.cap)
        return (*_conv_backward(ctx, grad_y, x, weight, ctx.conv[2]), None, None, None, None, None)


class _Estimate(torch.autograd.Function):
    """Section 2.1 alone, for a layer with classical terms between Ŷ and f (BatchNorm, a
    residual shortcut): forward (Ŷ without bias, ‖A_p‖‖F_q‖), backward exact plus the δ model.
    The gate of the cap and the sampling reaches it through :class:`_CapSample` and the
    classical terms' own autograd."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, options, generator):
        y = F.conv2d(x, weight, None, stride, padding)
        y_hat, scale = _estimate(x, y, weight, stride, padding, options, generator)
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding)
        ctx.options, ctx.generator, ctx.kernels = options, generator, None
        ctx.mark_non_differentiable(scale)
        return y_hat, scale

    @staticmethod
    def backward(ctx, grad_y_hat, _grad_scale):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, _ = _conv_backward(ctx, grad_y_hat, x, weight, False)
        return grad_x, grad_w, None, None, None, None


class _CapSample(torch.autograd.Function):
    """Sections 2.2 and 2.3 on the pre-activation z: f(z) sampled; backward gated where
    0 < f < C, as in :class:`_QConv2d`."""

    @staticmethod
    def forward(ctx, z, scale, options, generator, record, kernel_volume):
        f = z.clamp(0, options.cap)
        summary = summarise(scale, f, options.cap) if record is not None else None
        f = _sample(f, summary, options, generator, record, kernel_volume)
        ctx.save_for_backward(f)
        ctx.cap = options.cap
        return f

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad_out, out, 0.0, ctx.cap), None, None, None, None, None


def _conv_backward(ctx, grad_y, x, weight, has_bias):
    """(∂L/∂X, ∂L/∂F, ∂L/∂b) from G = ∂L/∂Y, the first two read out through the δ model."""
    stride, padding = ctx.conv[:2]
    need_x, need_w = ctx.needs_input_grad[:2]
    need_b = has_bias and ctx.needs_input_grad[2]
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_y, x, weight, [weight.shape[0]] if has_bias else None,
        stride, padding, (1, 1), False, (0, 0), 1, (need_x, need_w, need_b),
    )  # fmt: skip
    if need_w:
        grad_w = _read_out(grad_w, ctx, "weight")
    if need_x:  # each image's ∂L/∂X is read out by its own tomography
        grad_x = _read_out(grad_x, ctx, "input", rows=len(x))
    return grad_x, grad_w, grad_b


def _read_out(gradient: torch.Tensor, ctx, which: str, rows: int = 1) -> torch.Tensor:
    """``gradient`` through the δ model: by a fused kernel if the forward pass used them."""
    options, kernels = ctx.options, ctx.kernels
    if kernels is not None and options.backprop == "gaussian" and options.delta > 0:
        seed = kernels.WEIGHT_GRADIENT_SEED if which == "weight" else kernels.INPUT_GRADIENT_SEED
        return kernels.gaussian_noise(gradient, options.delta, ctx.seeds, seed, rows)
    return noisy_gradient(gradient, options.delta, options.backprop, ctx.generator, rows)


def check_geometry(
    input: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    options: QConvOptions,
) -> None:
    """ValueError for a kernel larger than the padded input, or a pooling larger than the
    convolution's output, naming both sizes (torch would fail later, in its own words)."""
    padded = tuple(size + 2 * pad for size, pad in zip(input.shape[2:], padding, strict=True))
    if any(k > size for k, size in zip(kernel_size, padded, strict=True)):
        raise ValueError(
            f"kernel_size {kernel_size} is larger than the input {tuple(input.shape[2:])} with "
            f"padding {padding} ({padded[0]}×{padded[1]})"
        )
    if options.pooling is not None:
        out = tuple((size - k) // step + 1 for size, k, step in zip(padded, kernel_size, stride, strict=True))
        if options.pool_size > min(out):
            raise ValueError(
                f"pool_size {options.pool_size} is larger than the convolution's output {out[0]}×{out[1]}"
            )


@_disable_dynamo  # torch.compiler.disable, imported lazily: see the module docstring
def qconv2d_with_options(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    options: QConvOptions,
    generator: torch.Generator | None = None,
    record: CostRecorder | None = None,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`qconv2d` with options already validated (what ``QConv2d.forward`` calls).

    ``norm`` (a per-channel map such as ``nn.BatchNorm2d``) and ``shortcut`` (a tensor of
    the convolution's output shape) are the classical terms applied to the estimate before
    the non-linearity: f(norm(Ŷ + bias) + shortcut) is capped and sampled
    (``docs/algorithm.md``, *Classical terms before the non-linearity*).
    """
    check_input(input, weight, generator)
    plain = norm is not None or shortcut is not None or options.backend != "torch"
    # The compiled CPU pass raises on NaN and inf estimates, the fused CUDA kernel makes
    # their image NaN: neither needs a pass over the input, nor (on CUDA) a wait for the GPU.
    if plain or not (_compiles(input, options) or _fused_kernels(input, weight, options)):
        check_finite(input, weight)
    stride, padding = conv_pair("stride", stride, 1), conv_pair("padding", padding, 0)
    check_geometry(input, tuple(weight.shape[2:]), stride, padding, options)
    if norm is not None or shortcut is not None:
        terms = (norm, shortcut)
        out = _with_classical_terms(input, weight, bias, stride, padding, options, generator, record, *terms)
    elif options.backend == "torch":
        out = _QConv2d.apply(input, weight, bias, stride, padding, options, generator, record)
    else:
        from qcnn.backends.circuit_layer import circuit_qconv2d, without_gradient  # imports the circuits

        out = circuit_qconv2d(input, weight, bias, stride, padding, options, generator)
        out = without_gradient(out, (input, weight, bias), options.backend)
    if options.pooling == "max":
        out = F.max_pool2d(out, options.pool_size)
    elif options.pooling == "avg":
        out = F.avg_pool2d(out, options.pool_size)
    return out


def _with_classical_terms(x, weight, bias, stride, padding, options, generator, record, norm, shortcut):
    """f(norm(Ŷ + bias) + shortcut), sampled: the estimate from :class:`_Estimate`, the
    classical terms as torch operations (their own autograd), then :class:`_CapSample`."""
    if options.backend != "torch":
        raise ValueError(f"backend {options.backend!r} runs no BatchNorm or shortcut; use backend='torch'")
    if options.cap_order != "theory":
        raise ValueError(
            "cap_order='authors' clamps the exact Y before adding the noise, which has no meaning "
            "once a BatchNorm or a shortcut comes between them; use cap_order='theory'"
        )
    y_hat, scale = _Estimate.apply(x, weight, stride, padding, options, generator)
    z = y_hat if bias is None else y_hat + bias.view(1, -1, 1, 1)
    if norm is not None:
        z = norm(z)
    if shortcut is not None:
        if shortcut.shape != z.shape:
            raise ValueError(
                f"shortcut has shape {tuple(shortcut.shape)}, the convolution's output {tuple(z.shape)}"
            )
        z = z + shortcut
    return _CapSample.apply(z, scale, options, generator, record, weight[0].numel())


def qconv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    *,
    options: QConvOptions | None = None,
    generator: torch.Generator | None = None,
    record: CostRecorder | None = None,
    **overrides: object,
) -> torch.Tensor:
    """Quantum convolution + capped ReLU + sampling (+ pooling) of ``input`` (N, D, H, W).

    ``weight`` is (D', D, h, w) as for ``torch.nn.functional.conv2d``; the output is
    (N, D', H', W'), pooled if ``pooling`` is set. ``options`` is a
    :class:`qcnn.options.QConvOptions` (its defaults if None), ``overrides`` change some of
    its fields (epsilon, cap, sigma, estimator, shots, ae_qubits, norms, cap_order,
    sampling, pooling, pool_size, delta, backprop, backend, backend_device, fused).
    Randomness comes from ``generator`` (the global RNG if None). ``record``, if given, is
    called with the :class:`qcnn.cost.LayerCost` of this forward pass.
    """
    validated = (options or QConvOptions()).with_changes(**overrides)
    return qconv2d_with_options(input, weight, bias, stride, padding, validated, generator, record)
