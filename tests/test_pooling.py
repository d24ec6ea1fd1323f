"""Masked mean/max pooling, every backend, forward and backward, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inputs import DTYPES, assert_close_to_reference, cpu_backends, random_embeddings, random_mask

import simcse_fast as sf
from simcse_fast import reference
from simcse_fast._backends import CUDA_EXTENSION

POOLS = {
    "mean": (sf.masked_mean_pool, reference.masked_mean_pool),
    "max": (sf.masked_max_pool, reference.masked_max_pool),
}

PLACES = [("cpu", backend) for backend in cpu_backends()] + [
    pytest.param("cuda", backend, marks=pytest.mark.gpu, id=f"cuda-{backend}")
    for backend in ("torch", "triton")
]
PLACES.append(
    pytest.param(
        "cuda", "cuda", id="cuda-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(CUDA_EXTENSION is None, reason="no simcse_fast._C")],
    )
)  # fmt: skip

# (B, L, H, padding layout): sizes of 1, odd sizes, H not a power of two, L up to 8192.
SHAPES = [
    (1, 1, 1, "right"),
    (7, 33, 1000, "left"),
    (33, 7, 384, "random"),
    (4, 1000, 7, "right"),
    (3, 384, 768, "left"),
    (2, 8192, 33, "random"),
    (5, 33, 1, "left"),
    (1, 7, 768, "right"),
]


def pool_with_grad(pool: str, x: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor, backend: str):
    """Our op's output and the gradient of ``<out, grad_out>`` with respect to ``x``."""
    x = x.detach().requires_grad_()
    out = POOLS[pool][0](x, mask, backend=backend)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out, grad


def reference_with_grad(pool: str, x: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor):
    """The reference's output and gradient, computed in float64 on the same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    out = POOLS[pool][1](x64, mask)
    (grad,) = torch.autograd.grad(out, x64, grad_out.double())
    return out, grad


def check_against_reference(pool, x, mask, backend, generator, dtype):
    grad_out = random_embeddings((x.shape[0], x.shape[2]), dtype, generator).to(x.device)
    out, grad = pool_with_grad(pool, x, mask, grad_out, backend)
    expected_out, expected_grad = reference_with_grad(pool, x, mask, grad_out)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], x.shape[2])
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close_to_reference(out, expected_out, dtype, f"{pool} forward")
    assert_close_to_reference(grad, expected_grad, dtype, f"{pool} backward")


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq_len, hidden, layout", SHAPES)
@pytest.mark.parametrize("pool", POOLS)
def test_matches_reference(pool, batch, seq_len, hidden, layout, dtype, device, backend, generator):
    x = random_embeddings((batch, seq_len, hidden), dtype, generator).to(device)
    mask = random_mask(batch, seq_len, layout, generator).to(device)
    check_against_reference(pool, x, mask, backend, generator, dtype)


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16], ids=str
)
@pytest.mark.parametrize("pool", POOLS)
def test_any_mask_dtype_means_nonzero_is_present(pool, mask_dtype, device, backend, generator):
    x = random_embeddings((6, 19, 40), torch.float64, generator).to(device)
    present = random_mask(6, 19, "random", generator)
    # Non-zero values other than 1 (0.5, 3) still mean "present": the mask is not a weight.
    values = torch.where(torch.rand(6, 19, generator=generator) < 0.5, 3.0, 0.5)
    mask = (
        (present.double() * values).to(mask_dtype) if mask_dtype.is_floating_point else present.to(mask_dtype)
    )
    if not mask_dtype.is_floating_point and mask_dtype != torch.bool:
        mask = mask * 3
    check_against_reference(pool, x, mask.to(device), backend, generator, torch.float64)


def strided_layouts(generator: torch.Generator):
    """(name, x, mask) with non-contiguous x or mask, shape (5, 21, 48)."""
    batch, seq_len, hidden = 5, 21, 48
    mask = random_mask(batch, seq_len, "random", generator)
    base = random_embeddings((2 * batch, seq_len + 7, hidden), torch.float64, generator)
    yield "x sliced in batch and sequence", base[::2, 3 : 3 + seq_len], mask
    transposed = random_embeddings((batch, hidden, seq_len), torch.float64, generator).transpose(1, 2)
    yield "x with hidden stride != 1", transposed, mask
    yield "x broadcast over the batch", base[:1, :seq_len].expand(batch, -1, -1), mask
    yield "mask transposed", base[:batch, :seq_len], mask.T.contiguous().T
    yield "mask broadcast over the batch", base[:batch, :seq_len], mask[1:2].expand(batch, -1)


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("pool", POOLS)
def test_non_contiguous_inputs(pool, device, backend, generator):
    for name, x, mask in strided_layouts(generator):
        assert not (x.is_contiguous() and mask.is_contiguous()), name
        check_against_reference(pool, x.to(device), mask.to(device), backend, generator, torch.float64)


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("pool", POOLS)
def test_empty_rows_give_zeros_and_zero_gradient(pool, device, backend, generator):
    x = random_embeddings((3, 9, 20), torch.float32, generator).to(device)
    mask = torch.zeros(3, 9, dtype=torch.bool, device=device)
    out, grad = pool_with_grad(pool, x, mask, torch.ones(3, 20, device=device), backend)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("pool", POOLS)
def test_nan_propagates_from_present_tokens_only(pool, device, backend, generator):
    x = random_embeddings((2, 70, 33), torch.float32, generator)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[:, 50:] = False
    x[0, 45, 3] = float("nan")  # present: column 3 of row 0 must be NaN
    x[1, 60, 5] = float("nan")  # padding: must not leak
    out, grad = pool_with_grad(pool, x.to(device), mask.to(device), torch.ones(2, 33, device=device), backend)
    assert out[0, 3].isnan()
    assert out.isnan().sum() == 1
    expected_out, expected_grad = reference_with_grad(pool, x, mask, torch.ones(2, 33))
    assert_close_to_reference(out, expected_out, torch.float32, f"{pool} forward with NaN")
    assert_close_to_reference(grad, expected_grad, torch.float32, f"{pool} backward with NaN")


@pytest.mark.parametrize("device, backend", PLACES)
def test_max_gradient_goes_to_first_tied_position(device, backend):
    # Row 0: ties at 2, 5 and 40 (across tiles); position 1 is larger but padding.
    # Row 1: every present token is -inf; the first present one (3) takes the gradient.
    x = torch.zeros(2, 64, 4)
    x[0, [2, 5, 40]] = 7.0
    x[0, 1] = 9.0
    x[1] = float("-inf")
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[0, 1] = False
    mask[1, :3] = False
    out, grad = pool_with_grad("max", x.to(device), mask.to(device), torch.ones(2, 4, device=device), backend)
    assert out[0].tolist() == [7.0] * 4
    assert out[1].tolist() == [float("-inf")] * 4
    assert grad[0].nonzero()[:, 0].tolist() == [2] * 4
    assert grad[1].nonzero()[:, 0].tolist() == [3] * 4


@pytest.mark.parametrize("device, backend", PLACES)
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("shape", [(0, 5, 8), (3, 0, 8), (3, 5, 0)])
def test_empty_dimensions(pool, shape, device, backend):
    x = torch.randn(shape, device=device, requires_grad=True)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    out = POOLS[pool][0](x, mask, backend=backend)
    assert out.shape == (shape[0], shape[2])
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("pool", POOLS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 9),
    seq_len=st.integers(1, 80),
    hidden=st.integers(1, 300),
    layout=st.sampled_from(["left", "right", "random"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(pool, backend, batch, seq_len, hidden, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    x = random_embeddings((batch, seq_len, hidden), torch.float64, generator)
    mask = random_mask(batch, seq_len, layout, generator, empty_row=False)
    check_against_reference(pool, x, mask, backend, generator, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("pool", POOLS)
def test_offsets_past_two_to_the_31(pool, generator):
    """B * L * H > 2**31 elements: the last sequences must be pooled from the right memory."""
    batch, seq_len, hidden = 1040, 2048, 1024
    x = torch.randn(batch, seq_len, hidden, dtype=torch.bfloat16, device="cuda")
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device="cuda")
    mask[-1, seq_len // 2 :] = False
    expected = POOLS[pool][1](x[-3:].double(), mask[-3:])
    for backend in [name for name in ("triton", "cuda") if name in sf.available_backends()]:
        out = POOLS[pool][0](x, mask, backend=backend)
        assert_close_to_reference(
            out[-3:], expected, torch.bfloat16, f"{pool} {backend} forward at large offsets"
        )
