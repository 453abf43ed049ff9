"""The fused Triton kernels and their wrappers (see :mod:`qcnn.accel.fused`).

- :func:`estimate_cap_sample`, one program per image: ‖A_p‖ as a window sum of x² (the
  im2col matrix is never written), ‖F_q‖, Ŷ = Y + 2ε‖A_p‖‖F_q‖ξ + bias (2.1), the capped
  ReLU in either order (2.2), then ⌊σK⌋ draws with probability ∝ f or ∝ f² (2.3). The draws
  are made as in :mod:`qcnn.sampling`: sorted uniforms from the partial sums of N + 1
  exponentials, each mapped to its position by a binary search of the float64 CDF. An
  all-zero image keeps only zeros wherever its draws land. An image with a NaN or infinite
  estimate (from its input or the weights) comes out all NaN, which the loss then shows:
  the layer needs no check that makes the host wait for the GPU. On request it also sums
  up, per image, what the cost accounting reads.
- :func:`gaussian_noise`: g + δ‖g‖₂ξ for each row of a gradient (3).

Random numbers are Triton's Philox (``tl.randn``, ``tl.rand``) keyed by seeds that
:func:`draw_seeds` takes from a ``torch.Generator`` in one small launch, so a seeded run is
reproducible. They are other numbers than torch's own operations draw: the distributions
are the same, the streams are not.

Off a GPU the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before this
module is imported), which is how the tests check them on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qcnn.options import QConvOptions
from qcnn.sampling import n_samples

# Lanes of a program: outputs, positions, draws or gradient entries handled per loop step.
_BLOCK = 1024
# The seeds a layer draws per forward pass, by index: the estimation noise and the sampling
# (read by the forward kernel as seeds 0 and 1), then the noise of ∂L/∂F and of ∂L/∂X.
LAYER_SEEDS = 4
WEIGHT_GRADIENT_SEED, INPUT_GRADIENT_SEED = 2, 3
# Per image, what :func:`estimate_cap_sample` sums up for the cost accounting, in this order.
SUMMARY_FIELDS = ("largest patch norm", "sum of f", "largest f", "distinct positions kept")


def draw_seeds(
    generator: torch.Generator | None, device: torch.device, count: int = LAYER_SEEDS
) -> torch.Tensor:
    """``count`` Philox keys from ``generator``, on ``device`` (no host-device sync)."""
    return torch.randint(0, 2**62, (count,), generator=generator, device=device)


def smoke_test(device: torch.device) -> None:
    """Compile and run the kernels as training uses them on a tiny problem on ``device``;
    raise if they cannot, or if a result is out of its bounds.

    Triton can fail where torch works: no C compiler for its launcher, an unsupported GPU,
    a Triton release that rejects these kernels. Each set of options compiles on its own, so
    both cap orders run, with noise and a bias. The convolution of ones is 9 everywhere and
    ‖A_p‖‖F_q‖ = 9, so with ε = 0.01 the noise is at most 2ε · 9 · 5.68 < 1.1 (Triton's
    normals stay within √(−2 ln 10⁻⁷) ≈ 5.68): below the cap of 20, the outputs kept lie
    within 1.1 of 9, the others are 0, and 1 to 4 are kept (⌊σK⌋ = 4 draws) per image; the
    cost accounting's sums count them, and the largest ‖A_p‖ is 3. The
    δ noise of each row stays within δ‖g‖₂ · 5.68.
    """
    x, weight = torch.ones(2, 1, 4, 4, device=device), torch.ones(2, 1, 3, 3, device=device)
    bias = torch.zeros(2, device=device)
    seeds = draw_seeds(torch.Generator(device).manual_seed(0), device)
    for cap_order in ("theory", "authors"):
        options = QConvOptions(epsilon=0.01, cap=20.0, sigma=0.5, cap_order=cap_order)
        y = torch.nn.functional.conv2d(x, weight)
        summaries = torch.zeros(2, 4, dtype=torch.float64, device=device)  # as with cost accounting
        out, _ = estimate_cap_sample(x, y, weight, bias, (1, 1), (0, 0), options, seeds, summaries)
        kept = (out != 0).flatten(1).sum(1)
        if not (((out == 0) | ((out - 9).abs() < 1.1)).all() and ((kept >= 1) & (kept <= 4)).all()):
            raise RuntimeError(f"the fused forward kernel gave {out.flatten(1).tolist()} ({cap_order})")
        if not torch.equal(summaries[:, 3], kept.double()) or not (summaries[:, 0] == 3).all():
            raise RuntimeError(f"the fused forward kernel summed up {summaries.tolist()} ({cap_order})")
    noisy = gaussian_noise(out, 0.01, seeds, WEIGHT_GRADIENT_SEED, 2)
    bound = 0.01 * 5.7 * torch.linalg.vector_norm(out.flatten(1), dim=1)
    if not ((noisy - out).flatten(1).abs().amax(1) <= bound).all() or torch.equal(noisy, out):
        raise RuntimeError(f"the fused noise kernel gave {noisy.flatten(1).tolist()}")


def estimate_cap_sample(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    options: QConvOptions,
    seeds: torch.Tensor,
    summaries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """f(Ŷ) kept at the sampled positions, from Y = conv2d(x, weight) (no bias), in one kernel.

    Returns (out, inner): ``out`` shaped like ``y`` (written into ``y`` in theory order);
    ``inner`` = Y + bias for the authors' cap order, whose inner clamp gates the gradient
    (written into ``y``), else None. Inputs are float32; ``options.estimator`` is "gaussian"
    or "exact". ``summaries``, if given, a float64 (images, 4) tensor, receives per image
    what the cost accounting reads (:data:`SUMMARY_FIELDS`), from the values the kernel
    computes: accounting observes the pass, it does not change it.
    """
    x, y = x.contiguous(), y.contiguous()
    images, out_channels, out_h, out_w = y.shape
    outputs = out_channels * out_h * out_w
    authors_order = options.cap_order == "authors"
    sample = options.sigma is not None
    draws = n_samples(options.sigma, outputs) if sample else 0
    out = torch.empty_like(y) if authors_order else y
    # The CDF and the marks of the draws: scratch, read and written only by the kernel.
    cdf = torch.empty((images, outputs) if sample else 0, dtype=torch.float64, device=y.device)
    hits = torch.empty((images, outputs) if sample else 0, dtype=torch.int8, device=y.device)
    noise = options.estimator == "gaussian" and options.epsilon > 0
    authors_norms = options.norms == "authors"
    with _on_device_of(y):
        _estimate_cap_sample[(images,)](
            x, 0 if authors_norms else x.stride(0), x.stride(1), x.stride(2),
            1 if authors_norms else x.shape[1], x.shape[2], x.shape[3],
            weight.contiguous(), math.prod(weight.shape[1:]), weight.shape[2], weight.shape[3],
            y, y if bias is None else bias, out, cdf, hits, seeds,
            out_channels, out_h, out_w, stride[0], stride[1], padding[0], padding[1],
            2 * options.epsilon, options.cap, draws, outputs.bit_length(),
            y if summaries is None else summaries, SUMMARISE=summaries is not None,
            NOISE=noise, HAS_BIAS=bias is not None, AUTHORS_ORDER=authors_order, SAMPLE=sample,
            QUADRATIC=options.sampling == "quadratic",
            POSITIONS=min(_BLOCK, 1 << (out_h * out_w - 1).bit_length()), BLOCK=_BLOCK,
        )  # fmt: skip
    return out, (y if authors_order else None)


def gaussian_noise(
    gradient: torch.Tensor, delta: float, seeds: torch.Tensor, seed: int, rows: int = 1
) -> torch.Tensor:
    """g + δ‖g‖₂ξ for each of ``rows`` rows of ``gradient`` (float32), as a new tensor.

    One program per row: the whole kernel gradient is one vector, each image's ∂L/∂X one.
    """
    flat = gradient.contiguous().view(rows, -1)
    out = torch.empty_like(flat)
    with _on_device_of(flat):
        _gaussian_noise[(rows,)](flat, out, seeds, seed, flat.shape[1], delta, BLOCK=_BLOCK)
    return out.view_as(gradient)


def _on_device_of(tensor: torch.Tensor) -> torch.cuda.device:
    """Triton launches on the current CUDA device: make it the tensor's. A device without an
    index ("cuda", which is the current one, or the CPU of the interpreter) gives -1, which
    ``torch.cuda.device`` takes as a no-op."""
    index = tensor.device.index
    return torch.cuda.device(-1 if index is None else index)


@triton.jit
def _exponential(seed, offsets):
    """Exp(1) numbers −log(1 − U), U ~ U[0, 1) by Philox: finite, as in ``qcnn.sampling``."""
    return -tl.log(1.0 - tl.rand(seed, offsets))


@triton.jit
def _estimate_cap_sample(
    x_ptr, x_image_stride, x_channel_stride, x_row_stride, norm_channels, height, width,
    w_ptr, volume, kernel_h, kernel_w,
    y_ptr, bias_ptr, out_ptr, cdf_ptr, hit_ptr, seeds_ptr,
    out_channels, out_h, out_w, stride_h, stride_w, pad_h, pad_w,
    noise_scale, cap, draws, search_steps, summary_ptr, SUMMARISE: tl.constexpr,
    NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, AUTHORS_ORDER: tl.constexpr,
    SAMPLE: tl.constexpr, QUADRATIC: tl.constexpr, POSITIONS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    image = tl.program_id(0).to(tl.int64)
    positions = out_h * out_w
    outputs = out_channels * positions
    row = image * outputs  # this image's outputs, channel-major as in y
    lanes = tl.arange(0, BLOCK)
    estimation_seed = tl.load(seeds_ptr)
    largest_norm = tl.zeros([], tl.float32)
    f_sum = tl.zeros([], tl.float64)
    f_max = tl.zeros([], tl.float32)
    special = tl.zeros([], tl.int32)  # estimates that are NaN or inf

    # 1. f(Ŷ) everywhere. A block of positions takes its patch norms once, for every channel.
    for first in range(0, positions, POSITIONS):
        p = first + tl.arange(0, POSITIONS)
        live = p < positions
        top = (p // out_w) * stride_h - pad_h
        left = (p % out_w) * stride_w - pad_w
        squares = tl.zeros([POSITIONS], tl.float32)
        for c in range(norm_channels):
            plane = x_ptr + image * x_image_stride + c * x_channel_stride
            for i in range(kernel_h):
                r = top + i
                for j in range(kernel_w):
                    col = left + j
                    inside = live & (r >= 0) & (r < height) & (col >= 0) & (col < width)
                    v = tl.load(plane + r * x_row_stride + col, mask=inside, other=0.0)
                    squares += v * v
        patch_norms = tl.sqrt(squares)
        if SUMMARISE:
            largest_norm = tl.maximum(largest_norm, tl.max(tl.where(live, patch_norms, 0.0), 0))
        for q in range(out_channels):
            kernel_squares = tl.zeros([BLOCK], tl.float32)
            for start in range(0, volume, BLOCK):
                w = tl.load(w_ptr + q * volume + start + lanes, mask=start + lanes < volume, other=0.0)
                kernel_squares += w * w
            kernel_norm = tl.sqrt(tl.sum(kernel_squares, 0))
            k = row + q * positions + p
            y = tl.load(y_ptr + k, mask=live)
            y_hat = y
            if NOISE:
                y_hat = y + noise_scale * (patch_norms * kernel_norm) * tl.randn(estimation_seed, k)
            if HAS_BIAS:
                b = tl.load(bias_ptr + q)
                y, y_hat = y + b, y_hat + b
            if AUTHORS_ORDER:  # clamp(clamp(Y) + noise); Y + bias kept for the backward's gate
                tl.store(y_ptr + k, y, mask=live)
                y_hat = tl.clamp(y, 0.0, cap, propagate_nan=tl.PropagateNan.ALL) + (y_hat - y)
            special += tl.sum((live & ~(tl.abs(y_hat) < float("inf"))).to(tl.int32), 0)
            f = tl.clamp(y_hat, 0.0, cap, propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_ptr + k, f, mask=live)
            if SUMMARISE:
                counted = tl.where(live, f, 0.0)
                f_sum += tl.sum(counted.to(tl.float64), 0)
                f_max = tl.maximum(f_max, tl.max(counted, 0))
            if SAMPLE:
                tl.store(hit_ptr + k, tl.zeros([POSITIONS], tl.int8), mask=live)

    if SAMPLE:
        tl.debug_barrier()  # f of every output is stored before any lane reads another's
        # 2. The CDF of the weights, in order, in float64 (as torch.cumsum in qcnn.sampling).
        total = tl.zeros([], tl.float64)
        for first in range(0, outputs, BLOCK):
            k = first + lanes
            live = k < outputs
            f = tl.load(out_ptr + row + k, mask=live, other=0.0)
            if QUADRATIC:
                f = f * f
            weights = f.to(tl.float64)
            tl.store(cdf_ptr + row + k, tl.cumsum(weights, 0) + total, mask=live)
            total += tl.sum(weights, 0)
        tl.debug_barrier()

        # 3. Draw j is (E_1 + ... + E_j) · total / (E_1 + ... + E_{N+1}); it lands at the
        # first position whose CDF exceeds it.
        sampling_seed = tl.load(seeds_ptr + 1)
        counters = image * (draws + 1)
        spacings = tl.zeros([], tl.float64)
        for first in range(0, draws + 1, BLOCK):
            j = first + lanes
            e = tl.where(j < draws + 1, _exponential(sampling_seed, counters + j), 0.0)
            spacings += tl.sum(e.to(tl.float64), 0)
        factor = total / spacings
        partial = tl.zeros([], tl.float64)
        for first in range(0, draws, BLOCK):
            j = first + lanes
            live = j < draws
            e = tl.where(live, _exponential(sampling_seed, counters + j), 0.0).to(tl.float64)
            draw = (tl.cumsum(e, 0) + partial) * factor
            partial += tl.sum(e, 0)
            low = tl.zeros([BLOCK], tl.int32)
            high = tl.zeros([BLOCK], tl.int32) + outputs
            for _ in range(search_steps):  # ⌈log₂(K + 1)⌉ halvings close every interval
                searching = low < high
                middle = (low + high) // 2
                bound = tl.load(cdf_ptr + row + middle, mask=live & searching, other=0.0)
                above = bound <= draw
                low = tl.where(searching & above, middle + 1, low)
                high = tl.where(searching & ~above, middle, high)
            landed = tl.minimum(low, outputs - 1)  # rounding past the last entry: the last position
            tl.store(hit_ptr + row + landed, tl.full([BLOCK], 1, tl.int8), mask=live & (draw == draw))
        tl.debug_barrier()

        # 4. Keep f where a draw landed, 0 elsewhere.
        kept = tl.zeros([], tl.int32)
        for first in range(0, outputs, BLOCK):
            k = first + lanes
            live = k < outputs
            hit = tl.load(hit_ptr + row + k, mask=live, other=0)
            f = tl.load(out_ptr + row + k, mask=live)
            tl.store(out_ptr + row + k, f * hit.to(tl.float32), mask=live)
            kept += tl.sum(hit.to(tl.int32), 0)
    else:
        kept = tl.zeros([], tl.int32) + outputs
    if special > 0:  # the whole image NaN: the cap or the sampling would hide it from the loss
        for first in range(0, outputs, BLOCK):
            k = first + lanes
            tl.store(out_ptr + row + k, tl.full([BLOCK], float("nan"), tl.float32), mask=k < outputs)
    if SUMMARISE:
        summary = summary_ptr + image * 4
        tl.store(summary, largest_norm.to(tl.float64))
        tl.store(summary + 1, f_sum)
        tl.store(summary + 2, f_max.to(tl.float64))
        tl.store(summary + 3, kept.to(tl.float64))


@triton.jit
def _gaussian_noise(g_ptr, out_ptr, seeds_ptr, seed_index, length, delta, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * length
    lanes = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], tl.float32)
    for first in range(0, length, BLOCK):
        i = first + lanes
        g = tl.load(g_ptr + start + i, mask=i < length, other=0.0)
        squares += g * g
    scale = delta * tl.sqrt(tl.sum(squares, 0))
    seed = tl.load(seeds_ptr + seed_index)
    for first in range(0, length, BLOCK):
        i = first + lanes
        live = i < length
        g = tl.load(g_ptr + start + i, mask=live)
        tl.store(out_ptr + start + i, g + scale * tl.randn(seed, start + i), mask=live)
