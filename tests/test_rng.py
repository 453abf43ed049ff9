"""qcnn.accel.rng gives exactly torch's random numbers and leaves the generator as torch would."""

from __future__ import annotations

import platform

import pytest
import torch

from qcnn.accel import rng

CPU = torch.device("cpu")
# Around the Box-Muller blocks of 16 and the 624-word blocks of MT19937's state, then a
# training step's sizes.
SIZES = (1, 2, 15, 16, 17, 31, 32, 33, 623, 624, 625, 1247, 1248, 1249, 1264, 160_000)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 3])
def test_the_copy_draws_torchs_numbers_and_leaves_its_state(seed):
    # The compiled copy itself, at every size: the public functions send small draws to torch.
    ours, torchs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for size in SIZES:
        drawn = rng._uniform_float32((size,), ours)
        assert torch.equal(drawn, torch.rand(size, generator=torchs)), ("rand", size)
        assert torch.equal(ours.get_state(), torchs.get_state()), ("rand", size)
        if size >= 16:  # fewer normals: torch uses another algorithm, and so does rng.randn
            drawn = rng._normal_float32((size,), ours)
            assert torch.equal(drawn, torch.randn(size, generator=torchs)), ("randn", size)
            assert torch.equal(ours.get_state(), torchs.get_state()), ("randn", size)


def test_public_functions_equal_torchs_small_and_large_with_shapes():
    ours, torchs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for shape in [(3,), (1, 245), (1, 2450), (64, 5, 22, 22), (64, 1281), (rng.SMALLEST,)]:
        assert torch.equal(rng.randn(shape, ours, CPU), torch.randn(shape, generator=torchs)), shape
        assert torch.equal(rng.rand(shape, ours, CPU), torch.rand(shape, generator=torchs)), shape
        # torch's own draws in between stay in step
        assert torch.equal(torch.rand(7, generator=ours), torch.rand(7, generator=torchs))
    assert torch.equal(ours.get_state(), torchs.get_state())


def test_four_million_normals_equal_torchs():
    ours, torchs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(rng.randn((1 << 22,), ours, CPU), torch.randn(1 << 22, generator=torchs))


def test_default_generator_is_used_when_none_is_given():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        drawn = rng.randn((10_000,), None, CPU), rng.rand((10_000,), None, CPU)
        torch.manual_seed(3)
        assert torch.equal(drawn[0], torch.randn(10_000))
        assert torch.equal(drawn[1], torch.rand(10_000))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_are_torchs(dtype):
    ours, torchs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    size = 2 * rng.SMALLEST
    assert torch.equal(rng.randn((size,), ours, CPU, dtype), torch.randn(size, generator=torchs, dtype=dtype))
    assert torch.equal(rng.rand((size,), ours, CPU, dtype), torch.rand(size, generator=torchs, dtype=dtype))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the copy reproduces torch's x86-64 AVX2 and AVX512 kernels; elsewhere torch's own are used",
)
def test_the_compiled_copy_is_in_use_on_x86_64_with_avx2():
    # Without it the public functions above would pass on torch's own numbers alone.
    assert rng._reproduces_torch()
