"""Packed (varlen) mean/max pooling, every backend, forward and backward, against the float64
reference and against the padded ops on the same tokens (torch.compile: test_compile.py)."""

from __future__ import annotations

import pytest
import torch
from inputs import DTYPES, assert_close_to_reference, cpu_backends, random_embeddings
from test_pooling import PLACES

import simcse_fast as sf
from simcse_fast import reference

POOLS = {
    "mean": (sf.packed_mean_pool, reference.packed_mean_pool, sf.masked_mean_pool),
    "max": (sf.packed_max_pool, reference.packed_max_pool, sf.masked_max_pool),
}

LENGTHS = [
    [0, 1, 7, 513],  # empty, single-token and odd sequences, one past a 512 tile boundary
    [7],  # B = 1
    [0, 0],  # nothing at all: T = 0
    [33, 0, 384, 1, 1000],
]


def offsets(lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def pool_with_grad(pool, x, cu_seqlens, grad_out, backend):
    x = x.detach().requires_grad_()
    out = POOLS[pool][0](x, cu_seqlens, backend=backend)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out, grad


def check_against_reference(pool, x, cu_seqlens, backend, generator, dtype):
    grad_out = random_embeddings((cu_seqlens.shape[0] - 1, x.shape[1]), dtype, generator).to(x.device)
    out, grad = pool_with_grad(pool, x, cu_seqlens, grad_out, backend)
    x64 = x.detach().double().requires_grad_()
    expected = POOLS[pool][1](x64, cu_seqlens)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad_out.double())
    assert out.dtype == x.dtype and out.shape == (cu_seqlens.shape[0] - 1, x.shape[1])
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close_to_reference(out, expected, dtype, f"packed {pool} forward")
    assert_close_to_reference(grad, expected_grad, dtype, f"packed {pool} backward")


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("hidden", [1, 33, 768])
@pytest.mark.parametrize("pool", POOLS)
def test_matches_reference(pool, hidden, lengths, dtype, device, backend, generator):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take fp32, fp16 and bf16")
    cu_seqlens = offsets(lengths).to(device)
    x = random_embeddings((sum(lengths), hidden), dtype, generator).to(device)
    check_against_reference(pool, x, cu_seqlens, backend, generator, dtype)


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("pool", POOLS)
def test_equals_the_padded_op_on_the_same_tokens(pool, offset_dtype, device, backend, generator):
    """Right-padded sequences and their packed tokens pool to the same numbers: bit for bit
    through the kernels (the same tiles in the same order), within rounding through PyTorch."""
    lengths = [5, 0, 17, 1, 9]
    padded = random_embeddings((len(lengths), 17, 40), torch.float32, generator).to(device)
    mask = (torch.arange(17)[None, :] < torch.tensor(lengths)[:, None]).to(device)
    packed = padded[mask]
    expected = POOLS[pool][2](padded, mask, backend=backend)
    out = POOLS[pool][0](packed, offsets(lengths, offset_dtype).to(device), backend=backend)
    if backend == "torch":
        torch.testing.assert_close(out, expected)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("pool", POOLS)
def test_rows_with_a_stride_wider_than_hidden(pool, device, backend, generator):
    """A column slice of a wider tensor (row stride > H) and a hidden stride != 1 (copied)."""
    wide = random_embeddings((30, 80), torch.float64, generator)
    cu_seqlens = offsets([3, 20, 7]).to(device)
    check_against_reference(pool, wide[:, 8:56].to(device), cu_seqlens, backend, generator, torch.float64)
    transposed = random_embeddings((48, 30), torch.float64, generator).T
    check_against_reference(pool, transposed.to(device), cu_seqlens, backend, generator, torch.float64)


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("pool", POOLS)
def test_nan_propagates_and_empty_sequences_give_zeros(pool, device, backend, generator):
    x = random_embeddings((12, 9), torch.float32, generator)
    x[4, 2] = float("nan")  # in the second sequence (rows 3..11)
    cu_seqlens = offsets([3, 9, 0]).to(device)
    out, grad = pool_with_grad(pool, x.to(device), cu_seqlens, torch.ones(3, 9, device=device), backend)
    assert out[1, 2].isnan() and out.isnan().sum() == 1
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert not grad[:3].isnan().any()


@pytest.mark.parametrize("device, backend", PLACES)
def test_max_gradient_goes_to_the_first_tied_position(device, backend):
    x = torch.zeros(70, 4)
    x[[12, 15, 60]] = 7.0  # sequence 1 is rows 10..69: ties at its positions 2, 5 and 50
    cu_seqlens = offsets([10, 60]).to(device)
    out, grad = pool_with_grad("max", x.to(device), cu_seqlens, torch.ones(2, 4, device=device), backend)
    assert out[1].tolist() == [7.0] * 4
    assert grad[10:].nonzero()[:, 0].tolist() == [2] * 4


BAD_OFFSETS = [
    (torch.tensor([0, 5, 3, 8]), ValueError, "non-decreasing"),
    (torch.tensor([1, 4, 8]), ValueError, "0 first"),
    (torch.tensor([0, 4, 7]), ValueError, "T last"),
    (torch.tensor([0, 4, 9]), ValueError, "got first 0, last 9"),
    (torch.tensor([0.0, 8.0]), TypeError, "int32 or int64"),
    (torch.tensor([[0, 8]]), ValueError, "cu_seqlens must have 1 dimension,"),
    (torch.tensor([], dtype=torch.int64), ValueError, "B \\+ 1 >= 1"),
    ([0, 8], TypeError, "cu_seqlens must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cu_seqlens, error, message", BAD_OFFSETS)
@pytest.mark.parametrize("pool", POOLS)
def test_bad_offsets_raise_a_clear_error(pool, cu_seqlens, error, message, backend):
    with pytest.raises(error, match=message):
        POOLS[pool][0](torch.randn(8, 4), cu_seqlens, backend=backend)


@pytest.mark.parametrize("pool", POOLS)
def test_bad_token_embeddings_raise_a_clear_error(pool):
    with pytest.raises(ValueError, match="token_embeddings must have 2 dimensions"):
        POOLS[pool][0](torch.randn(2, 4, 8), offsets([4, 4]))
    with pytest.raises(TypeError, match="token_embeddings must have dtype"):
        POOLS[pool][0](torch.ones(8, 4, dtype=torch.int64), offsets([4, 4]))


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_custom_ops_pass_opcheck(generator):
    from simcse_fast import pooling

    x = random_embeddings((13, 20), torch.float32, generator).requires_grad_()
    for cu_seqlens in (offsets([4, 0, 9]), offsets([13], torch.int64)):
        torch.library.opcheck(pooling.packed_mean_pool_op, (x, cu_seqlens, "triton"))
        torch.library.opcheck(pooling.packed_max_pool_op, (x, cu_seqlens, "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("pool", POOLS)
def test_offsets_past_two_to_the_31(pool):
    """T * H > 2**31 elements: the last sequences must be pooled from the right memory."""
    lengths = [1024] * 2080
    x = torch.randn(sum(lengths), 1024, dtype=torch.bfloat16, device="cuda")
    cu_seqlens = offsets(lengths).cuda()
    expected = POOLS[pool][1](x[-3 * 1024 :].double(), offsets([1024] * 3).cuda())
    for backend in [name for name in ("triton", "cuda") if name in sf.available_backends()]:
        out = POOLS[pool][0](x, cu_seqlens, backend=backend)
        assert_close_to_reference(
            out[-3:], expected, torch.bfloat16, f"packed {pool} {backend} at large offsets"
        )
