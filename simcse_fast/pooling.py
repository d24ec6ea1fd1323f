"""Masked mean and max pooling: Triton kernels, the launchers of the Triton and CUDA kernels
(``csrc/pooling.cu``, through ``simcse_fast._C``) and the torch.library ops.

Shapes: token embeddings ``x (B, L, H)``, attention mask ``(B, L)`` -> sentence embeddings
``(B, H)``. A token is present where the mask is non-zero; the mask may be bool, integer or
floating and is read in its own dtype (bool through a zero-copy ``uint8`` view).

Work split: one program per (sequence ``b``, block of ``BLOCK_H`` hidden columns), walking the
sequence in tiles of ``BLOCK_L x BLOCK_H``. Every element of ``x`` is read at most once in the
forward pass (absent tokens are not read at all) and every element of the gradient is written
exactly once in the backward pass, the floors for these memory-bound ops. Per-tile state stays
elementwise (a ``BLOCK_L x BLOCK_H`` accumulator, reduced once at the end), so the loop body
needs no cross-thread communication.

``x`` may have any batch and sequence strides; a hidden stride other than 1 costs one
``.contiguous()`` copy, because unit stride is what lets the loads vectorize to 16 bytes.
Offsets are computed in int64: ``B * L * H`` passes 2**31 at the batch sizes this library is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._triton import tl, triton

NO_TOKEN = tl.constexpr(2**31 - 1)
"""Argmax sentinel inside the max kernel: larger than every position, so ``min`` skips it."""


@triton.jit
def _present(mask_row, positions, seq_len, stride_mask_seq):
    """``mask[b, positions] != 0`` for one sequence's mask row; positions past the end are absent."""
    return (
        tl.load(mask_row + positions.to(tl.int64) * stride_mask_seq, mask=positions < seq_len, other=0) != 0
    )


@triton.jit
def _masked_mean_pool_forward_kernel(
    x_ptr,
    mask_ptr,
    out_ptr,
    seq_len,
    hidden,
    stride_x_batch,
    stride_x_seq,
    stride_mask_batch,
    stride_mask_seq,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``out[b, h] = sum_l present[b, l] x[b, l, h] / max(1, sum_l present[b, l])``.

    ``out`` is contiguous ``(B, H)``. Sums run in ``ACC_DTYPE`` (fp32, fp64 for fp64 inputs).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    x_row = x_ptr + row * stride_x_batch
    mask_row = mask_ptr + row * stride_mask_batch
    total = tl.zeros((BLOCK_L, BLOCK_H), dtype=ACC_DTYPE)
    count = tl.zeros((BLOCK_L,), dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        present = _present(mask_row, positions, seq_len, stride_mask_seq)
        x = tl.load(
            x_row + positions.to(tl.int64)[:, None] * stride_x_seq + cols[None, :],
            mask=present[:, None] & col_in[None, :],
            other=0.0,
        )
        total += x.to(ACC_DTYPE)
        count += present.to(tl.int32)
    token_count = tl.maximum(tl.sum(count, axis=0), 1)
    mean = tl.sum(total, axis=0) / token_count.to(ACC_DTYPE)
    tl.store(out_ptr + row * hidden + cols, mean.to(out_ptr.dtype.element_ty), mask=col_in)


@triton.jit
def _masked_mean_pool_backward_kernel(
    grad_out_ptr,
    mask_ptr,
    grad_x_ptr,
    seq_len,
    hidden,
    stride_grad_batch,
    stride_grad_hidden,
    stride_mask_batch,
    stride_mask_seq,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``grad_x[b, l, h] = present[b, l] * grad_out[b, h] / max(1, sum_l present[b, l])``.

    ``grad_x`` is contiguous ``(B, L, H)`` and every element is written, zeros included. The
    token count is recounted from the mask (``L`` small loads) instead of being saved.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    mask_row = mask_ptr + row * stride_mask_batch
    count = tl.zeros((BLOCK_L,), dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        present = _present(mask_row, positions, seq_len, stride_mask_seq)
        count += present.to(tl.int32)
    token_count = tl.maximum(tl.sum(count, axis=0), 1)
    grad = tl.load(
        grad_out_ptr + row * stride_grad_batch + cols.to(tl.int64) * stride_grad_hidden,
        mask=col_in,
        other=0.0,
    )
    grad = grad.to(ACC_DTYPE) / token_count.to(ACC_DTYPE)
    grad_row = grad_x_ptr + row * seq_len * hidden
    for start in range(0, seq_len, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        in_seq = positions < seq_len
        present = _present(mask_row, positions, seq_len, stride_mask_seq)
        value = tl.where(present[:, None], grad[None, :], 0.0)
        tl.store(
            grad_row + positions.to(tl.int64)[:, None] * hidden + cols[None, :],
            value.to(grad_x_ptr.dtype.element_ty),
            mask=in_seq[:, None] & col_in[None, :],
        )


@triton.jit
def _masked_max_pool_forward_kernel(
    x_ptr,
    mask_ptr,
    out_ptr,
    argmax_ptr,
    seq_len,
    hidden,
    stride_x_batch,
    stride_x_seq,
    stride_mask_batch,
    stride_mask_seq,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``out[b, h] = max_{l present} x[b, l, h]``, ``argmax[b, h]`` = the first such ``l``.

    NaN ranks above every number (the first NaN wins, as in ``torch.max``); rows with no present
    token give ``out = 0`` and ``argmax = -1``. ``out`` and ``argmax`` (int32) are contiguous
    ``(B, H)``. Each of the ``BLOCK_L`` slots keeps the first maximum among the positions it
    sees (strict ``>``), so the final minimum over slot positions gives the global first.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    x_row = x_ptr + row * stride_x_batch
    mask_row = mask_ptr + row * stride_mask_batch
    best = tl.full((BLOCK_L, BLOCK_H), float("-inf"), dtype=ACC_DTYPE)
    best_pos = tl.full((BLOCK_L, BLOCK_H), NO_TOKEN, dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        present = _present(mask_row, positions, seq_len, stride_mask_seq)
        x = tl.load(
            x_row + positions.to(tl.int64)[:, None] * stride_x_seq + cols[None, :],
            mask=present[:, None] & col_in[None, :],
            other=float("-inf"),
        ).to(ACC_DTYPE)
        take = present[:, None] & (best == best) & ((x != x) | (x > best) | (best_pos == NO_TOKEN))
        best = tl.where(take, x, best)
        best_pos = tl.where(take, positions[:, None].to(tl.int32), best_pos)
    is_nan = best != best
    first_nan_pos = tl.min(tl.where(is_nan, best_pos, NO_TOKEN), axis=0)
    top = tl.max(tl.where(is_nan, float("-inf"), best), axis=0)
    top_pos = tl.min(tl.where(best == top[None, :], best_pos, NO_TOKEN), axis=0)
    has_nan = first_nan_pos != NO_TOKEN
    pos = tl.where(has_nan, first_nan_pos, top_pos)
    value = tl.where(has_nan, float("nan"), top)
    has_token = pos != NO_TOKEN
    value = tl.where(has_token, value, 0.0)
    pos = tl.where(has_token, pos, -1)
    tl.store(out_ptr + row * hidden + cols, value.to(out_ptr.dtype.element_ty), mask=col_in)
    tl.store(argmax_ptr + row * hidden + cols, pos, mask=col_in)


@triton.jit
def _masked_max_pool_backward_kernel(
    grad_out_ptr,
    argmax_ptr,
    grad_x_ptr,
    seq_len,
    hidden,
    stride_grad_batch,
    stride_grad_hidden,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``grad_x[b, l, h] = grad_out[b, h] if l == argmax[b, h] else 0``; contiguous
    ``(B, L, H)``, every element written. ``argmax = -1`` (empty row) matches no position."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    grad = tl.load(
        grad_out_ptr + row * stride_grad_batch + cols.to(tl.int64) * stride_grad_hidden,
        mask=col_in,
        other=0.0,
    )
    argmax = tl.load(argmax_ptr + row * hidden + cols, mask=col_in, other=-1)
    grad_row = grad_x_ptr + row * seq_len * hidden
    for start in range(0, seq_len, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        in_seq = positions < seq_len
        value = tl.where(positions[:, None] == argmax[None, :], grad[None, :], 0.0)
        tl.store(
            grad_row + positions.to(tl.int64)[:, None] * hidden + cols[None, :],
            value.to(grad_x_ptr.dtype.element_ty),
            mask=in_seq[:, None] & col_in[None, :],
        )


@dataclass(frozen=True)
class PoolingConfig:
    """Block sizes and warp count of one pooling launch."""

    block_l: int
    block_h: int
    num_warps: int


TILE_ELEMENTS = 4096
"""Elements per ``BLOCK_L x BLOCK_H`` tile: 32 per thread at 4 warps, several 16-byte loads in
flight per thread while the accumulator state stays in registers."""


def pooling_config(hidden: int) -> PoolingConfig:
    """The launch configuration for hidden size ``hidden``: the narrowest of 64/128/256
    columns that covers it (wider blocks for the usual 384-4096), ``BLOCK_L`` filling the tile."""
    block_h = 64 if hidden <= 64 else 128 if hidden <= 128 else 256
    return PoolingConfig(block_l=TILE_ELEMENTS // block_h, block_h=block_h, num_warps=4)


POOLING_CONFIGS = tuple(pooling_config(hidden) for hidden in (64, 128, 256))
"""Every configuration the launchers can pick; the ahead-of-time compile test builds them all."""


def _accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _kernel_mask(attention_mask: Tensor) -> Tensor:
    return attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask


def _unit_hidden_stride(token_embeddings: Tensor) -> Tensor:
    return token_embeddings if token_embeddings.stride(-1) == 1 else token_embeddings.contiguous()


def _grid(batch: int, hidden: int, config: PoolingConfig) -> tuple[int, int]:
    # Batch on grid axis 0, whose limit is 2**31 - 1; axis 1 is limited to 65535.
    return (batch, triton.cdiv(hidden, config.block_h))


def masked_mean_pool_forward(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Launch the mean-pooling forward kernel: ``(B, L, H), (B, L) -> (B, H)``."""
    x = _unit_hidden_stride(token_embeddings)
    mask = _kernel_mask(attention_mask)
    batch, seq_len, hidden = x.shape
    out = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    config = pooling_config(hidden)
    _masked_mean_pool_forward_kernel[_grid(batch, hidden, config)](
        x, mask, out, seq_len, hidden,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        BLOCK_L=config.block_l, BLOCK_H=config.block_h, ACC_DTYPE=_accumulation_dtype(x.dtype),
        num_warps=config.num_warps,
    )  # fmt: skip
    return out


def masked_mean_pool_backward(grad_out: Tensor, attention_mask: Tensor, seq_len: int) -> Tensor:
    """Launch the mean-pooling backward kernel: ``(B, H), (B, L) -> (B, L, H)``."""
    mask = _kernel_mask(attention_mask)
    batch, hidden = grad_out.shape
    grad_x = torch.empty((batch, seq_len, hidden), dtype=grad_out.dtype, device=grad_out.device)
    if batch == 0 or hidden == 0:
        return grad_x
    config = pooling_config(hidden)
    _masked_mean_pool_backward_kernel[_grid(batch, hidden, config)](
        grad_out, mask, grad_x, seq_len, hidden,
        grad_out.stride(0), grad_out.stride(1), mask.stride(0), mask.stride(1),
        BLOCK_L=config.block_l, BLOCK_H=config.block_h, ACC_DTYPE=_accumulation_dtype(grad_out.dtype),
        num_warps=config.num_warps,
    )  # fmt: skip
    return grad_x


def masked_max_pool_forward(token_embeddings: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the max-pooling forward kernel: ``(B, L, H), (B, L) -> (B, H), (B, H) int32``."""
    x = _unit_hidden_stride(token_embeddings)
    mask = _kernel_mask(attention_mask)
    batch, seq_len, hidden = x.shape
    out = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    argmax = torch.empty((batch, hidden), dtype=torch.int32, device=x.device)
    if out.numel() == 0:
        return out, argmax
    config = pooling_config(hidden)
    _masked_max_pool_forward_kernel[_grid(batch, hidden, config)](
        x, mask, out, argmax, seq_len, hidden,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        BLOCK_L=config.block_l, BLOCK_H=config.block_h, ACC_DTYPE=_accumulation_dtype(x.dtype),
        num_warps=config.num_warps,
    )  # fmt: skip
    return out, argmax


def masked_max_pool_backward(grad_out: Tensor, argmax: Tensor, seq_len: int) -> Tensor:
    """Launch the max-pooling backward kernel: ``(B, H), (B, H) int32 -> (B, L, H)``."""
    batch, hidden = grad_out.shape
    grad_x = torch.empty((batch, seq_len, hidden), dtype=grad_out.dtype, device=grad_out.device)
    if batch == 0 or hidden == 0:
        return grad_x
    config = pooling_config(hidden)
    _masked_max_pool_backward_kernel[_grid(batch, hidden, config)](
        grad_out, argmax, grad_x, seq_len, hidden, grad_out.stride(0), grad_out.stride(1),
        BLOCK_L=config.block_l, BLOCK_H=config.block_h, num_warps=config.num_warps,
    )  # fmt: skip
    return grad_x


# The "cuda" backend: the kernels of csrc/pooling.cu through simcse_fast._C, which takes raw
# pointers, sizes, element strides and the stream. Its mask is uint8: bool masks are viewed as
# uint8 for free, other dtypes cost one (B, L) comparison.

CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _uint8_mask(attention_mask: Tensor) -> Tensor:
    if attention_mask.dtype == torch.bool:
        return attention_mask.view(torch.uint8)
    if attention_mask.dtype == torch.uint8:
        return attention_mask
    return (attention_mask != 0).view(torch.uint8)


def _extension():
    from ._backends import CUDA_EXTENSION

    return CUDA_EXTENSION


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def cuda_masked_mean_pool_forward(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, L, H), (B, L) -> (B, H)`` by the CUDA kernel."""
    x, mask = _unit_hidden_stride(token_embeddings), _uint8_mask(attention_mask)
    batch, seq_len, hidden = x.shape
    out = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _extension().masked_mean_pool_forward(
            x.data_ptr(), mask.data_ptr(), out.data_ptr(), batch, seq_len, hidden, x.stride(0), x.stride(1),
            mask.stride(0), mask.stride(1), CUDA_DTYPES[x.dtype], _stream(x.device),
        )  # fmt: skip
    return out


def cuda_masked_mean_pool_backward(grad_out: Tensor, attention_mask: Tensor, seq_len: int) -> Tensor:
    """``(B, H), (B, L) -> (B, L, H)`` by the CUDA kernel."""
    mask = _uint8_mask(attention_mask)
    batch, hidden = grad_out.shape
    grad_x = torch.empty((batch, seq_len, hidden), dtype=grad_out.dtype, device=grad_out.device)
    with torch.cuda.device(grad_out.device):
        _extension().masked_mean_pool_backward(
            grad_out.data_ptr(), mask.data_ptr(), grad_x.data_ptr(), batch, seq_len, hidden,
            grad_out.stride(0), grad_out.stride(1), mask.stride(0), mask.stride(1),
            CUDA_DTYPES[grad_out.dtype], _stream(grad_out.device),
        )  # fmt: skip
    return grad_x


def cuda_masked_max_pool_forward(token_embeddings: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, L, H), (B, L) -> (B, H), (B, H) int32`` by the CUDA kernel."""
    x, mask = _unit_hidden_stride(token_embeddings), _uint8_mask(attention_mask)
    batch, seq_len, hidden = x.shape
    out = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    argmax = torch.empty((batch, hidden), dtype=torch.int32, device=x.device)
    with torch.cuda.device(x.device):
        _extension().masked_max_pool_forward(
            x.data_ptr(), mask.data_ptr(), out.data_ptr(), argmax.data_ptr(), batch, seq_len, hidden,
            x.stride(0), x.stride(1), mask.stride(0), mask.stride(1), CUDA_DTYPES[x.dtype], _stream(x.device),
        )  # fmt: skip
    return out, argmax


def cuda_masked_max_pool_backward(grad_out: Tensor, argmax: Tensor, seq_len: int) -> Tensor:
    """``(B, H), (B, H) int32 -> (B, L, H)`` by the CUDA kernel."""
    batch, hidden = grad_out.shape
    grad_x = torch.empty((batch, seq_len, hidden), dtype=grad_out.dtype, device=grad_out.device)
    with torch.cuda.device(grad_out.device):
        _extension().masked_max_pool_backward(
            grad_out.data_ptr(), argmax.data_ptr(), grad_x.data_ptr(), batch, seq_len, hidden,
            grad_out.stride(0), grad_out.stride(1), CUDA_DTYPES[grad_out.dtype], _stream(grad_out.device),
        )  # fmt: skip
    return grad_x


LAUNCHERS = {
    "triton": {
        "mean_forward": masked_mean_pool_forward,
        "mean_backward": masked_mean_pool_backward,
        "max_forward": masked_max_pool_forward,
        "max_backward": masked_max_pool_backward,
    },
    "cuda": {
        "mean_forward": cuda_masked_mean_pool_forward,
        "mean_backward": cuda_masked_mean_pool_backward,
        "max_forward": cuda_masked_max_pool_forward,
        "max_backward": cuda_masked_max_pool_backward,
    },
}


# torch.library ops: opaque to torch.compile (no graph break), with fake kernels for tracing
# and autograd formulas that call the backward ops.


@torch.library.custom_op("simcse_fast::masked_mean_pool", mutates_args=())
def masked_mean_pool_op(token_embeddings: Tensor, attention_mask: Tensor, implementation: str) -> Tensor:
    """Masked mean pooling by the ``"triton"`` or ``"cuda"`` kernels, ``(B, L, H), (B, L) ->
    (B, H)``; inputs already checked."""
    return LAUNCHERS[implementation]["mean_forward"](token_embeddings, attention_mask)


@masked_mean_pool_op.register_fake
def _masked_mean_pool_fake(token_embeddings: Tensor, attention_mask: Tensor, implementation: str) -> Tensor:
    batch, _, hidden = token_embeddings.shape
    return token_embeddings.new_empty((batch, hidden))


@torch.library.custom_op("simcse_fast::masked_mean_pool_backward", mutates_args=())
def masked_mean_pool_backward_op(
    grad_out: Tensor, attention_mask: Tensor, seq_len: int, implementation: str
) -> Tensor:
    """Gradient of :func:`masked_mean_pool_op` with respect to the token embeddings."""
    return LAUNCHERS[implementation]["mean_backward"](grad_out, attention_mask, seq_len)


def _token_gradient_fake(grad_out: Tensor, seq_len: int) -> Tensor:
    batch, hidden = grad_out.shape
    return grad_out.new_empty((batch, seq_len, hidden))


@masked_mean_pool_backward_op.register_fake
def _masked_mean_pool_backward_fake(grad_out, attention_mask, seq_len: int, implementation) -> Tensor:
    return _token_gradient_fake(grad_out, seq_len)


def _mean_setup_context(ctx, inputs, output) -> None:
    token_embeddings, attention_mask, implementation = inputs
    ctx.save_for_backward(attention_mask)
    ctx.seq_len = token_embeddings.shape[1]
    ctx.implementation = implementation


def _mean_backward(ctx, grad_out: Tensor):
    (attention_mask,) = ctx.saved_tensors
    return masked_mean_pool_backward_op(grad_out, attention_mask, ctx.seq_len, ctx.implementation), None, None


masked_mean_pool_op.register_autograd(_mean_backward, setup_context=_mean_setup_context)


@torch.library.custom_op("simcse_fast::masked_max_pool", mutates_args=())
def masked_max_pool_op(
    token_embeddings: Tensor, attention_mask: Tensor, implementation: str
) -> tuple[Tensor, Tensor]:
    """Masked max pooling by the ``"triton"`` or ``"cuda"`` kernels: the pooled ``(B, H)`` and
    the int32 argmax its backward uses."""
    return LAUNCHERS[implementation]["max_forward"](token_embeddings, attention_mask)


@masked_max_pool_op.register_fake
def _masked_max_pool_fake(token_embeddings, attention_mask, implementation) -> tuple[Tensor, Tensor]:
    batch, _, hidden = token_embeddings.shape
    return (
        token_embeddings.new_empty((batch, hidden)),
        token_embeddings.new_empty((batch, hidden), dtype=torch.int32),
    )


@torch.library.custom_op("simcse_fast::masked_max_pool_backward", mutates_args=())
def masked_max_pool_backward_op(
    grad_out: Tensor, argmax: Tensor, seq_len: int, implementation: str
) -> Tensor:
    """Gradient of :func:`masked_max_pool_op` with respect to the token embeddings."""
    return LAUNCHERS[implementation]["max_backward"](grad_out, argmax, seq_len)


@masked_max_pool_backward_op.register_fake
def _masked_max_pool_backward_fake(grad_out, argmax, seq_len: int, implementation) -> Tensor:
    return _token_gradient_fake(grad_out, seq_len)


def _max_setup_context(ctx, inputs, output) -> None:
    token_embeddings, _, implementation = inputs
    _, argmax = output
    ctx.save_for_backward(argmax)
    ctx.seq_len = token_embeddings.shape[1]
    ctx.implementation = implementation


def _max_backward(ctx, grad_out: Tensor, grad_argmax: Tensor | None):
    (argmax,) = ctx.saved_tensors
    return masked_max_pool_backward_op(grad_out, argmax, ctx.seq_len, ctx.implementation), None, None


masked_max_pool_op.register_autograd(_max_backward, setup_context=_max_setup_context)
