"""``torch.rand`` and ``torch.randn`` on CPU generators: the same numbers, made faster.

A QCNN training step draws about half a million normals (estimation and backpropagation
noise) and 160 thousand uniforms (sampling). Torch's CPU generator makes them one call at a
time, about 2.2 ns a number on the CI-class machine: some 1.5 ms a step, a fifth of the
classical step's time. The numbers must stay torch's, so that a seeded run gives exactly
what torch alone gives, and what the published runs gave.

Torch's CPU generator is MT19937 (``ATen/core/MT19937RNGEngine.h``). A float32 uniform is the
low 24 bits of one tempered 32-bit output times 2⁻²⁴. A float32 normal tensor of 16 or more
entries is first filled with such uniforms, then each block of 16 goes through a Box-Muller
transform (``ATen/native/cpu/DistributionTemplates.h``) whose log and sincos are the Cephes
polynomials of ``ATen/native/cpu/avx_mathfun.h``, compiled with fused multiply-adds; an
incomplete last block is redrawn as the last 16 entries. The functions here read the
generator's state, make the same outputs in compiled loops that vectorise (the twists of
the state as one recurrence over all the words needed; the transform with the same
operations, fused where torch's build fuses them, as found by comparing outputs), and write
the state back.

Anything else is left to torch: other devices and dtypes, small draws (fewer than
``SMALLEST`` numbers; below 16 normals torch also uses another algorithm), and any torch
build that the copy does not reproduce. The first call compares both on a scratch
generator and uses the copy only if it matches torch bit for bit; elsewhere (another CPU
architecture, another torch version) the numbers are torch's, only slower. As with torch's
own functions, one generator must not be drawn from by two threads at once.
"""

from __future__ import annotations

import functools
import logging
import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

log = logging.getLogger(__name__)
_N, _M = 624, 397  # MT19937: words of state, and the offset of the word mixed into each
# Fields of the generator's state tensor (CPUGeneratorImplState, little-endian): the count
# of outputs left before the next twist (int32), the next word to output (uint64), the words.
_LEFT, _NEXT, _WORDS = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * _N)


# Fewer numbers than this are left to torch: the copy's fixed cost (reading and writing the
# state, four compiled calls) is about 12 µs alone and several times that inside a training
# step, where torch's own call for 2,450 normals took 68 µs and the copy's 160 µs.
SMALLEST = 8192


def rand(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torch.rand(shape, generator=generator, device=device, dtype=dtype)``."""
    return _draw(_uniform_float32, torch.rand, shape, generator, device, dtype)


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torch.randn(shape, generator=generator, device=device, dtype=dtype)``."""
    return _draw(_normal_float32, torch.randn, shape, generator, device, dtype)


def normal_words(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> np.ndarray | None:
    """The generator's words that ``torch.randn(shape, ...)`` would turn into normals, drawn
    from it (as that call would), for :func:`normals` to transform where they are used;
    None where the copy does not apply (the caller then draws with :func:`randn`).

    A compiled consumer that makes its normals a chunk at a time from these words, in cache,
    spares the passes over memory that writing them all out and reading them back cost.
    """
    if not _applies(shape, generator, device, dtype):
        return None
    size = math.prod(shape)
    return _next_words(_generator(generator), size + (16 if size % 16 else 0))


@numba.njit(cache=True, nogil=True)
def normals(words: np.ndarray, size: int, start: int, out: np.ndarray) -> None:
    """Normals start, start + 1, ... of ``torch.randn(size)`` into ``out``, from the words
    of :func:`normal_words`. ``start`` is a multiple of 16, and so is ``len(out)`` unless
    the range ends at ``size``.

    As :func:`_normal_float32`: whole blocks of 16 from their own words, and when 16 does not
    divide ``size``, the last 16 normals from the 16 words after the others.
    """
    stop = start + len(out)
    whole = min(stop, size - size % 16)  # the blocks of 16 that the range holds
    if whole > start:
        _uniforms(words[start:whole], out[: whole - start])
        _box_muller(out[: whole - start])
    if size % 16 and stop > size - 16:
        last = np.empty(16, np.float32)
        _uniforms(words[size:], last)
        _box_muller(last)
        first = max(start, size - 16)
        out[first - start : stop - start] = last[first - (size - 16) : stop - (size - 16)]


def _applies(shape, generator, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the copy makes these numbers: float32 on CPU, large enough, verified."""
    on_cpu = device.type == "cpu" and _generator(generator).device.type == "cpu"
    # math.prod, not np.prod: numpy takes 10-100 µs to read a torch.Size inside a training step
    return on_cpu and dtype == torch.float32 and math.prod(shape) >= SMALLEST and _reproduces_torch()


def _draw(copy, original, shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The copy's numbers where it applies, else torch's."""
    if _applies(shape, generator, device, dtype):
        return copy(shape, _generator(generator))
    return original(shape, generator=generator, device=device, dtype=dtype)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.default_generator if generator is None else generator


@functools.cache
def _reproduces_torch() -> bool:
    """Whether the copies give torch's numbers and leave its state, on a scratch generator.

    About a million normals, once per process (a few milliseconds): a step rounded
    differently shows if it changes one normal in 100 thousand or more, as all but one of
    the wrong variants tried while writing the copy did (the last changed one in 4 million).
    """
    ours, torchs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    pairs = []
    try:
        for size in (1, 17, 700, 1000, (1 << 20) + 15):  # within and across 624-word blocks
            pairs.append((_uniform_float32((size,), ours), torch.rand(size, generator=torchs)))
            if size >= 16:
                pairs.append((_normal_float32((size,), ours), torch.randn(size, generator=torchs)))
    except RuntimeError:  # torch refused the state written back: a layout this copy misreads
        reproduces = False
    else:
        pairs.append((ours.get_state(), torchs.get_state()))
        reproduces = all(torch.equal(copy, original) for copy, original in pairs)
    if not reproduces:
        log.warning(
            "qcnn.accel.rng does not reproduce torch %s's CPU random numbers on this machine: "
            "they come from torch itself (the same numbers, drawn more slowly)", torch.__version__
        )
    return reproduces


def _uniform_float32(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """torch.rand's float32 numbers, from the copy."""
    out = np.empty(shape, np.float32)
    _uniforms(_next_words(generator, out.size), out.reshape(-1))
    return torch.from_numpy(out)


def _normal_float32(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """torch.randn's float32 numbers, from the copy: 16 or more (for fewer, torch differs)."""
    out = np.empty(shape, np.float32)
    flat, size = out.reshape(-1), out.size
    tail = size % 16  # torch redraws the last 16 entries when the blocks do not fill them
    words = _next_words(generator, size + (16 if tail else 0))
    _uniforms(words[:size], flat)
    _box_muller(flat[: size - tail])
    if tail:
        _uniforms(words[size:], flat[size - 16 :])
        _box_muller(flat[size - 16 :])
    return torch.from_numpy(out)


def _next_words(generator: torch.Generator, count: int) -> np.ndarray:
    """The next ``count`` state words that ``generator`` will output, untempered.

    Advances the generator past them, as drawing them in torch would.
    """
    state = generator.get_state()
    raw = state.numpy()
    left = int(raw[_LEFT].view(np.int32)[0])
    start = _N if left == 1 else int(raw[_NEXT].view(np.uint64)[0])  # torch twists at left == 1
    twists = max(0, -(-(start + count - _N) // _N))
    words = np.empty((twists + 1) * _N, np.uint32)
    words[:_N] = raw[_WORDS].view(np.uint64)
    _twist_blocks(words)
    end = start + count - twists * _N  # words of the last block output so far
    raw[_WORDS].view(np.uint64)[:] = words[twists * _N :]
    raw[_LEFT].view(np.int32)[0] = _N + 1 - end
    raw[_NEXT].view(np.uint64)[0] = end
    generator.set_state(state)
    return words[start : start + count]


@numba.njit(cache=True)
def _twist_blocks(words: np.ndarray) -> None:
    """Fill each 624-word block of ``words`` after the first with the twist of the one before.

    Block after block, torch's next_state() is the recurrence x[k + 624] = x[k + 397] ^
    twist(x[k], x[k + 1]) over the words as one sequence: one loop, which vectorises (each
    word it reads was written at least 227 steps before) given unsigned indices.
    """
    n, m, one = np.uint64(_N), np.uint64(_M), np.uint64(1)
    for k in range(np.uint64(len(words)) - n):
        words[k + n] = words[k + m] ^ _twist(words[k], words[k + one])


@numba.njit(cache=True)
def _twist(u: np.uint32, v: np.uint32) -> np.uint32:
    """MT19937's twist of the top bit of u and the low 31 bits of v, as torch's twist()."""
    mixed = (u & np.uint32(0x80000000)) | (v & np.uint32(0x7FFFFFFF))
    return (mixed >> np.uint32(1)) ^ (np.uint32(0x9908B0DF) * (v & np.uint32(1)))


@numba.njit(cache=True)
def _uniforms(words: np.ndarray, out: np.ndarray) -> None:
    """out[i] = torch's float32 uniform of words[i]: its tempered low 24 bits times 2⁻²⁴."""
    scale = np.float32(2.0**-24)
    for i in range(len(out)):
        y = words[i]
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        out[i] = np.float32(np.int32(y & np.uint32(0xFFFFFF))) * scale


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once, as the fused multiply-adds in torch's compiled transform."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        single = ir.FloatType()
        function = ir.FunctionType(single, [single, single, single])
        return builder.call(builder.module.declare_intrinsic("llvm.fma", [single], function), args)

    return signature, codegen


@intrinsic
def _bits(typingctx, x):
    """The bits of a float32, as a uint32."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, x):
    """The float32 whose bits are the uint32 ``x``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(cache=True)
def _box_muller(data: np.ndarray) -> None:
    """Torch's float32 Box-Muller transform, in place, on each full block of 16 uniforms.

    Entry j < 8 of a block becomes r·cos θ and entry j + 8 becomes r·sin θ, where
    r = sqrt(−2 log(1 − u_j)) and θ = 2π u_{j+8}. log and sincos follow ``log256_ps`` and
    ``sincos256_ps`` of ``avx_mathfun.h`` step by step. Where the compiler fused a product
    into the addition after it, so does ``_fma``; which product it fused, where the addition
    had two, was read off torch's outputs. 1 − u lies in [2⁻²⁴, 1] and θ in [0, 2π), so the
    branches for zero, negative and denormal arguments are left out.
    """
    f = np.float32
    for block in range(len(data) // 16):
        for j in range(np.uint64(8)):
            first = np.uint64(16) * np.uint64(block) + j
            # log(1 - u): x = m · 2^e with m in [0.5, 1), then log(m) by polynomial.
            x = f(1.0) - data[first]
            bits = _bits(x)
            e = f(np.int32(bits >> np.uint32(23)) - np.int32(0x7F)) + f(1.0)
            x = _float((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000))
            below = x < f(0.707106781186547524)  # then log(m) = log(2m) - log 2
            shift = x if below else f(0.0)
            x = x - f(1.0)
            e = e - (f(1.0) if below else f(0.0))
            x = x + shift
            z = x * x
            y = _fma(f(7.0376836292e-2), x, f(-1.1514610310e-1))
            y = _fma(y, x, f(1.1676998740e-1))
            y = _fma(y, x, f(-1.2420140846e-1))
            y = _fma(y, x, f(1.4249322787e-1))
            y = _fma(y, x, f(-1.6668057665e-1))
            y = _fma(y, x, f(2.0000714765e-1))
            y = _fma(y, x, f(-2.4999993993e-1))
            y = _fma(y, x, f(3.3333331174e-1))
            y = y * x
            y = _fma(y, z, e * f(-2.12194440e-4))
            y = _fma(-z, f(0.5), y)
            x = x + y
            log = _fma(e, f(0.693359375), x)
            radius = np.sqrt(f(-2.0) * log)
            # sincos(θ): reduce by multiples of π/4 (Cody-Waite, three parts), then the
            # sine or the cosine polynomial, as the octant says.
            theta = f(2.0 * np.pi) * data[first + np.uint64(8)]
            octant = (np.uint32(np.int32(theta * f(1.27323954473516))) + np.uint32(1)) & np.uint32(0xFFFFFFFE)
            y = f(np.int32(octant))
            sin_sign = (octant & np.uint32(4)) << np.uint32(29)
            cos_sign = (~(octant - np.uint32(2)) & np.uint32(4)) << np.uint32(29)
            sine_first = (octant & np.uint32(2)) == np.uint32(0)
            x = _fma(y, f(-0.78515625), theta)
            x = _fma(y, f(-2.4187564849853515625e-4), x)
            x = _fma(y, f(-3.77489497744594108e-8), x)
            z = x * x
            cos_poly = _fma(f(2.443315711809948e-5), z, f(-1.388731625493765e-3))
            cos_poly = _fma(cos_poly, z, f(4.166664568298827e-2))
            cos_poly = cos_poly * z
            cos_poly = _fma(cos_poly, z, -(z * f(0.5)))
            cos_poly = cos_poly + f(1.0)
            sin_poly = _fma(f(-1.9515295891e-4), z, f(8.3321608736e-3))
            sin_poly = _fma(sin_poly, z, f(-1.6666654611e-1))
            sin_poly = sin_poly * z
            sin_poly = _fma(sin_poly, x, x)
            # The selection by masks, kept as written: it turns a -0 into +0.
            sin_part = sin_poly if sine_first else f(0.0)
            cos_part = f(0.0) if sine_first else cos_poly
            sine = _float(_bits(cos_part + sin_part) ^ sin_sign)
            cosine = _float(_bits((cos_poly - cos_part) + (sin_poly - sin_part)) ^ cos_sign)
            # Torch then computes fma(r·cos θ, std, mean) with std 1 and mean 0.
            data[first] = _fma(radius * cosine, f(1.0), f(0.0))
            data[first + np.uint64(8)] = _fma(radius * sine, f(1.0), f(0.0))
