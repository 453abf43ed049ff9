"""The layer's element-wise forward on CPU, compiled: ``docs/algorithm.md`` sections 2.1 and
2.2 in one pass over the convolution's output, instead of a chain of torch operations.

:func:`estimate_cap` gives the f(Ŷ) of ``qcnn.functional._estimate_cap_sample`` bit for bit
(the tests compare them): the same float32 operations in the same order, where torch's
chain wrote the noise, the noise scale, the noisy estimate, the biased estimate and the
capped one as five tensors, each a pass over memory and most a fresh allocation. The
normals are made from the generator's words a chunk at a time, in cache, where they are
added. The pass also checks that the estimates are finite, which spares the layer a pass
over its input and its weights.

Serial on purpose, as :mod:`qcnn.accel.merge`: torch's OpenMP threads spin for a while after
each of its parallel operations, and a second thread of ours, started then, ran slower than
one (measured: 13.8 against 11.8 ms for a million normals after a convolution).
"""

from __future__ import annotations

import numba
import numpy as np

from qcnn.accel.rng import _bits, _fma, normals

# Normals made at a time from the generator's words: 8 KiB, which stays in the L1 cache.
CHUNK = 2048


@numba.njit(cache=True, nogil=True)
def estimate_cap(
    y: np.ndarray,
    words: np.ndarray,
    noise: np.ndarray,
    out: np.ndarray,
    norms: np.ndarray,
    kernel_norms: np.ndarray,
    bias: np.ndarray,
    noise_scale: np.float32,
    cap: np.float32,
    authors_order: bool,
) -> bool:
    """f(Ŷ) into ``out`` (B, C', P) from Y = ``y`` (B, C', P); False if an estimate is NaN
    or infinite.

    Ŷ = Y + 2ε‖A_p‖‖F_q‖ξ + b, with ``noise_scale`` = 2ε, ‖A_p‖ = ``norms`` (B or 1, P),
    ‖F_q‖ = ``kernel_norms`` and b = ``bias`` (empty: none). ξ is ``torch.randn(y.shape)``
    made here from its generator ``words`` (:func:`qcnn.accel.rng.normal_words`) if given,
    else read from ``noise``; with neither, there is no noise. The theory order caps Ŷ; the
    authors' caps Y + b first, adds the noise, caps again, and leaves Y + b in ``y`` (the
    inner clamp's input, which gates the gradient). ``out`` shares no memory with ``y`` or
    ``noise``, so that the loops vectorise; it may be the words' own memory: each chunk of
    words is made into normals before its outputs are written.
    """
    images, channels, positions = y.shape
    size = y.size
    with_noise, with_bias = words.size > 0 or noise.size > 0, bias.size > 0
    flat_y, flat_out = y.reshape(size), out.reshape(size)
    buffer = np.empty(CHUNK, np.float32)
    special = np.uint32(0)  # 1 once an estimate is NaN or inf
    b = q = p = 0  # the output at flat index i
    for start in range(0, size, CHUNK):
        stop = min(start + CHUNK, size)
        if words.size > 0:
            normals(words, size, start, buffer[: stop - start])
        elif with_noise:
            buffer[: stop - start] = noise.reshape(size)[start:stop]
        i = start
        while i < stop:  # the chunk, one run along a channel's row at a time
            length = min(positions - p, stop - i)
            norm_row = norms[b if norms.shape[0] > 1 else 0]
            special |= _row(
                flat_y[i : i + length], buffer[i - start : i - start + length], flat_out[i : i + length],
                with_noise, norm_row[p : p + length], kernel_norms[q], noise_scale,
                with_bias, bias[q] if with_bias else np.float32(0.0), cap, authors_order,
            )  # fmt: skip
            i, p = i + length, p + length
            if p == positions:
                p, q = 0, q + 1
                if q == channels:
                    q, b = 0, b + 1
    return special == np.uint32(0)


@numba.njit(cache=True, inline="always")
def _row(
    exact, noise, out, with_noise, norms, kernel_norm, noise_scale, with_bias, shift, cap, authors_order
):
    """A run of one image's channel in :func:`estimate_cap`; returns 1 if an estimate is NaN
    or inf (all exponent bits set), else 0. Unsigned indices and branches that do not
    change along the run let the loop vectorise."""
    special = np.uint32(0)
    exponent = np.uint32(0x7F800000)
    for p in range(np.uint64(len(out))):
        y = exact[p]
        estimate = y
        if with_noise:  # torch's addcmul: (value · scale) · ξ, fused into the addition
            estimate = _fma(noise_scale * (norms[p] * kernel_norm), noise[p], y)
        if with_bias:
            y, estimate = y + shift, estimate + shift
        special |= np.uint32((_bits(estimate) & exponent) == exponent)
        if authors_order:
            exact[p] = y
            estimate = _clamp(y, cap) + (estimate - y)
        out[p] = _clamp(estimate, cap)
    return special


@numba.njit(cache=True, inline="always")
def _clamp(value: np.float32, cap: np.float32) -> np.float32:
    """min(max(value, 0), cap) with NaN kept, as ``torch.clamp``."""
    if value < 0:
        return np.float32(0.0)
    return cap if value > cap else value
