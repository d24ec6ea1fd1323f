"""Masked and packed mean/max pooling: the Triton kernels, the launchers of the Triton and CUDA
kernels (``csrc/pooling.cu`` through ``simcse_fast._C``), the backend table, and the
torch.library ops.

Layouts (``x`` = token embeddings, ``H`` = hidden size):

* padded: ``x (B, L, H)`` with an attention mask ``(B, L)`` (bool, integer or floating; a token
  is present where it is non-zero, bool read through a zero-copy ``uint8`` view);
* packed (varlen): ``x (T, H)`` holding ``B`` sequences back to back, sequence ``b`` being rows
  ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` of ``cu_seqlens (B + 1,)`` int32/int64.

Both pool into ``(B, H)``; one kernel per kind (mean/max, forward/backward) serves both layouts
through the ``PACKED`` constexpr. Work split: one program per (sequence, block of ``BLOCK_H``
hidden columns) walks its sequence in ``BLOCK_L x BLOCK_H`` tiles with elementwise state
(reduced once at the end), so the loop body needs no cross-thread communication.

Load schedule: ``x`` is loaded under its bounds only (padding rows are in bounds), never under
the mask's value, and masked in registers. The tile's ``x`` loads then do not wait on the mask
load of the same tile: the SASS issues every 16-byte load of a tile before the first use
(``tests/test_aot.py`` checks it). The forward pass therefore reads the padding too: ``B L H``
elements, the size of its input. The backward pass writes every element of the gradient once.

``x`` may have any batch and sequence strides; a hidden stride other than 1 costs one
``.contiguous()`` copy (unit stride is what lets loads vectorize to 16 bytes). Offsets are int64:
``B L H`` passes 2**31 at the batch sizes this library is for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference
from ._triton import launch_device, tl, triton

NO_TOKEN = tl.constexpr(2**31 - 1)
"""Argmax sentinel inside the max kernel: larger than every position, so ``min`` skips it."""


@triton.jit
def _sequence(row, cu_seqlens_ptr, seq_len, stride_x_batch, stride_x_seq, PACKED: tl.constexpr):
    """Sequence ``row``: (offset of its first token in ``x``, its first row in the contiguous
    ``(tokens, H)`` gradient, its token count); padded rows are ``seq_len`` long."""
    if PACKED:
        first = tl.load(cu_seqlens_ptr + row).to(tl.int64)
        n_tokens = tl.load(cu_seqlens_ptr + row + 1).to(tl.int64) - first
        return first * stride_x_seq, first, n_tokens
    else:
        return row * stride_x_batch, row * seq_len, seq_len


@triton.jit
def _present(mask_row, positions, n_tokens, stride_mask_seq, PACKED: tl.constexpr):
    """Which of ``positions`` hold a token: in the sequence and (padded) non-zero in the mask."""
    in_sequence = positions < n_tokens
    if PACKED:
        return in_sequence
    else:
        mask = tl.load(mask_row + positions.to(tl.int64) * stride_mask_seq, mask=in_sequence, other=0)
        return mask != 0


@triton.jit
def _token_count(mask_row, n_tokens, stride_mask_seq, PACKED: tl.constexpr, BLOCK_L: tl.constexpr):
    """``max(1, number of present tokens)``: the sequence length when packed, else a recount of
    the mask (``L`` one-byte loads, cheaper than saving the count from the forward pass)."""
    if PACKED:
        return tl.maximum(n_tokens, 1).to(tl.int32)
    else:
        count = tl.zeros((BLOCK_L,), dtype=tl.int32)
        for start in range(0, n_tokens, BLOCK_L):
            positions = start + tl.arange(0, BLOCK_L)
            count += _present(mask_row, positions, n_tokens, stride_mask_seq, False).to(tl.int32)
        return tl.maximum(tl.sum(count, axis=0), 1)


@triton.jit
def _mean_pool_forward_kernel(
    x_ptr, mask_ptr, cu_seqlens_ptr, out_ptr, seq_len, hidden,
    stride_x_batch, stride_x_seq, stride_mask_batch, stride_mask_seq,
    PACKED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, ACC_DTYPE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """``out[b, h] = sum_{l present} x[b, l, h] / max(1, number present)``; ``out (B, H)``
    contiguous, sums in ``ACC_DTYPE`` (fp32, fp64 for fp64 inputs)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    x_start, _, n_tokens = _sequence(row, cu_seqlens_ptr, seq_len, stride_x_batch, stride_x_seq, PACKED)
    x_row = x_ptr + x_start
    mask_row = mask_ptr + row * stride_mask_batch
    total = tl.zeros((BLOCK_L, BLOCK_H), dtype=ACC_DTYPE)
    count = tl.zeros((BLOCK_L,), dtype=tl.int32)
    for start in tl.range(0, n_tokens, BLOCK_L, num_stages=NUM_STAGES):
        positions = start + tl.arange(0, BLOCK_L)
        # Bounds only, not the mask's value: the load then does not wait for the mask's (module
        # docstring); ``where`` keeps padding out of the sum, NaN included.
        x = tl.load(
            x_row + positions.to(tl.int64)[:, None] * stride_x_seq + cols[None, :],
            mask=(positions < n_tokens)[:, None] & col_in[None, :],
            other=0.0,
        )
        present = _present(mask_row, positions, n_tokens, stride_mask_seq, PACKED)
        total += tl.where(present[:, None], x.to(ACC_DTYPE), 0.0)
        count += present.to(tl.int32)
    token_count = tl.maximum(tl.sum(count, axis=0), 1)
    mean = tl.sum(total, axis=0) / token_count.to(ACC_DTYPE)
    tl.store(out_ptr + row * hidden + cols, mean.to(out_ptr.dtype.element_ty), mask=col_in)


@triton.jit
def _mean_pool_backward_kernel(
    grad_out_ptr, mask_ptr, cu_seqlens_ptr, grad_x_ptr, seq_len, hidden,
    stride_grad_batch, stride_grad_hidden, stride_mask_batch, stride_mask_seq,
    PACKED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """``grad_x[b, l, h] = present[b, l] grad_out[b, h] / max(1, number present)``; ``grad_x``
    contiguous (``(B, L, H)`` or ``(T, H)``), every element written, zeros included."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    _, first_token, n_tokens = _sequence(row, cu_seqlens_ptr, seq_len, 0, 0, PACKED)
    mask_row = mask_ptr + row * stride_mask_batch
    token_count = _token_count(mask_row, n_tokens, stride_mask_seq, PACKED, BLOCK_L)
    grad = tl.load(
        grad_out_ptr + row * stride_grad_batch + cols.to(tl.int64) * stride_grad_hidden,
        mask=col_in,
        other=0.0,
    )
    grad = grad.to(ACC_DTYPE) / token_count.to(ACC_DTYPE)
    grad_row = grad_x_ptr + first_token * hidden
    for start in range(0, n_tokens, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        present = _present(mask_row, positions, n_tokens, stride_mask_seq, PACKED)
        value = tl.where(present[:, None], grad[None, :], 0.0)
        tl.store(
            grad_row + positions.to(tl.int64)[:, None] * hidden + cols[None, :],
            value.to(grad_x_ptr.dtype.element_ty),
            mask=(positions < n_tokens)[:, None] & col_in[None, :],
        )


@triton.jit
def _max_pool_forward_kernel(
    x_ptr, mask_ptr, cu_seqlens_ptr, out_ptr, argmax_ptr, seq_len, hidden,
    stride_x_batch, stride_x_seq, stride_mask_batch, stride_mask_seq,
    PACKED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, ACC_DTYPE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """``out[b, h] = max_{l present} x[b, l, h]``, ``argmax[b, h]`` = the first such ``l``
    (position within the sequence).

    NaN ranks above every number (the first NaN wins, as in ``torch.max``); a sequence with no
    present token gives ``out = 0`` and ``argmax = -1``. ``out`` and ``argmax`` (int32) are
    contiguous ``(B, H)``. Each of the ``BLOCK_L`` slots keeps the first maximum among the
    positions it sees (strict ``>``), so the final minimum over slot positions gives the first.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    x_start, _, n_tokens = _sequence(row, cu_seqlens_ptr, seq_len, stride_x_batch, stride_x_seq, PACKED)
    x_row = x_ptr + x_start
    mask_row = mask_ptr + row * stride_mask_batch
    best = tl.full((BLOCK_L, BLOCK_H), float("-inf"), dtype=ACC_DTYPE)
    best_pos = tl.full((BLOCK_L, BLOCK_H), NO_TOKEN, dtype=tl.int32)
    for start in tl.range(0, n_tokens, BLOCK_L, num_stages=NUM_STAGES):
        positions = start + tl.arange(0, BLOCK_L)
        x = tl.load(
            x_row + positions.to(tl.int64)[:, None] * stride_x_seq + cols[None, :],
            mask=(positions < n_tokens)[:, None] & col_in[None, :],
            other=float("-inf"),
        ).to(ACC_DTYPE)
        present = _present(mask_row, positions, n_tokens, stride_mask_seq, PACKED)
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
def _max_pool_backward_kernel(
    grad_out_ptr, argmax_ptr, cu_seqlens_ptr, grad_x_ptr, seq_len, hidden,
    stride_grad_batch, stride_grad_hidden,
    PACKED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``grad_x[b, l, h] = grad_out[b, h] if l == argmax[b, h] else 0``; ``grad_x`` contiguous,
    every element written. ``argmax = -1`` (empty sequence) matches no position."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < hidden
    _, first_token, n_tokens = _sequence(row, cu_seqlens_ptr, seq_len, 0, 0, PACKED)
    grad = tl.load(
        grad_out_ptr + row * stride_grad_batch + cols.to(tl.int64) * stride_grad_hidden,
        mask=col_in,
        other=0.0,
    )
    argmax = tl.load(argmax_ptr + row * hidden + cols, mask=col_in, other=-1)
    grad_row = grad_x_ptr + first_token * hidden
    for start in range(0, n_tokens, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        value = tl.where(positions[:, None] == argmax[None, :], grad[None, :], 0.0)
        tl.store(
            grad_row + positions.to(tl.int64)[:, None] * hidden + cols[None, :],
            value.to(grad_x_ptr.dtype.element_ty),
            mask=(positions < n_tokens)[:, None] & col_in[None, :],
        )


@dataclass(frozen=True)
class PoolingConfig:
    """Block sizes and warp count of one pooling launch."""

    block_l: int
    block_h: int
    num_warps: int


KINDS = ("mean_forward", "mean_backward", "max_forward", "max_backward")

TILE_ELEMENTS = {"mean_forward": 4096, "mean_backward": 4096, "max_forward": 2048, "max_backward": 4096}
"""Elements per ``BLOCK_L x BLOCK_H`` tile of each kernel kind: 32 per thread at 4 warps, four
16-byte loads of a half-precision tile per thread, all in flight before any is used. The max
forward kernel keeps a value and a position per element, so it takes half the tile (two loads a
thread, more CTAs per SM: the same bytes in flight) and stays clear of spills on older Tritons."""

BLOCK_WIDTHS = (64, 128, 256)

POOLING_CONFIGS = {
    (kind, block_h): PoolingConfig(block_l=TILE_ELEMENTS[kind] // block_h, block_h=block_h, num_warps=4)
    for kind in KINDS
    for block_h in BLOCK_WIDTHS
}
"""Every configuration the launchers can pick, by (kernel kind, ``BLOCK_H``); the ahead-of-time
compile test builds them all."""

PIPELINED_STAGES = 2
"""``tl.range`` stages of the forward loops when ``x`` allows 16-byte accesses: Triton's pipeliner
then issues the next tile's loads as asynchronous copies (``LDGSTS``) while this tile is summed.
Unaligned rows load element by element, which the pipeliner would stage in registers (spilling
at 64 rows a tile), so they run one stage."""


def _forward_stages(x: Tensor) -> int:
    vector = 16 // x.element_size()
    aligned = x.data_ptr() % 16 == 0 and all(size % vector == 0 for size in (*x.stride()[:-1], x.shape[-1]))
    return PIPELINED_STAGES if aligned else 1


H100_SMS = 132

CTAS_PER_SM = {
    ("mean_forward", 64): 9, ("mean_forward", 128): 9, ("mean_forward", 256): 9,
    ("max_forward", 64): 8, ("max_forward", 128): 8, ("max_forward", 256): 7,
    ("mean_backward", 64): 16, ("mean_backward", 128): 16, ("mean_backward", 256): 16,
    ("max_backward", 64): 8, ("max_backward", 128): 16, ("max_backward", 256): 8,
}  # fmt: skip
"""CTAs of each kernel (kind, ``BLOCK_H``) one H100 SM holds at once, from the registers of its
sm_90 compile (bf16, padded, Triton 3.9): ``65536 / (registers rounded up to 8 x 128 threads)``, at most 16
(2048 threads). ``tests/test_aot.py`` recomputes them from the compiled kernels."""


def wave_efficiency(ctas: int, ctas_per_sm: int, sms: int = H100_SMS) -> float:
    """Share of the SMs' CTA slots kept busy over a launch, ``waves / ceil(waves)`` with
    ``waves = ctas / (sms x ctas_per_sm)``: while a partly full last wave runs, the idle slots
    leave bandwidth unused. A launch of at most one wave is full when every SM gets a CTA."""
    slots = sms * ctas_per_sm
    if ctas <= slots:
        return min(1.0, ctas / sms)
    return ctas / slots / -(-ctas // slots)


@functools.lru_cache(maxsize=1024)
def pooling_config(kind: str, batch: int, hidden: int) -> PoolingConfig:
    """The launch configuration of kernel ``kind`` (``"mean_forward"``, ...) for ``batch``
    sequences of hidden size ``hidden``: among the blocks no wider than needed to cover
    ``hidden`` (64, 128 or 256 columns), the widest whose grid comes within 5% of the best wave
    efficiency on an H100 (:func:`wave_efficiency`). At SimCSE's shape (B = 512, H = 768) the
    mean forward pass would run 1.29 waves (65%) of 256-column blocks, so it takes 128 columns
    (2.6 waves, 86%); at B = 256, H = 1024 its 1024 CTAs of 256 columns fit one wave."""
    configs = [POOLING_CONFIGS[kind, block_h] for block_h in BLOCK_WIDTHS]
    candidates = [config for config in configs if config.block_h < hidden]
    candidates += [config for config in configs if config.block_h >= hidden][:1]
    efficiency = {
        config: wave_efficiency(batch * -(-hidden // config.block_h), CTAS_PER_SM[kind, config.block_h])
        for config in candidates
    }
    good_enough = [config for config in candidates if efficiency[config] >= 0.95 * max(efficiency.values())]
    return max(good_enough, key=lambda config: config.block_h)


def pooling_grid(batch: int, hidden: int, config: PoolingConfig) -> tuple[int, int]:
    """``(sequences, column blocks)``: the sequences on grid x, which CUDA allows up to 2**31 - 1,
    the column blocks on y (65,535 blocks of 64 columns is far past any hidden size)."""
    return batch, -(-hidden // config.block_h)


def _accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _unit_hidden_stride(token_embeddings: Tensor) -> Tensor:
    return token_embeddings if token_embeddings.stride(-1) == 1 else token_embeddings.contiguous()


def _kernel_mask(layout: Tensor) -> Tensor:
    """The layout as the Triton kernels read it: a bool mask through a zero-copy uint8 view."""
    return layout.view(torch.uint8) if layout.dtype == torch.bool else layout


def _geometry(x: Tensor, layout: Tensor, packed: bool) -> tuple[int, int, int, int]:
    """``(batch, seq_len, stride_x_batch, stride_x_seq)``; packed sequences have no common length."""
    if packed:
        return layout.shape[0] - 1, 0, 0, x.stride(0)
    return x.shape[0], x.shape[1], x.stride(0), x.stride(1)


def _pooled_outputs(mode: str, batch: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(pooled (B, H), argmax)``: the int32 argmax ``(B, H)`` for max, ``None`` for mean."""
    pooled = torch.empty((batch, x.shape[-1]), dtype=x.dtype, device=x.device)
    return pooled, torch.empty(pooled.shape, dtype=torch.int32, device=x.device) if mode == "max" else None


def triton_forward(
    mode: str, token_embeddings: Tensor, layout: Tensor, packed: bool
) -> tuple[Tensor, Tensor]:
    """Pool by the Triton kernels: ``mode`` ``"mean"`` or ``"max"``, ``layout`` the mask
    ``(B, L)`` or (``packed``) ``cu_seqlens (B + 1,)``; returns ``(pooled, argmax)``."""
    x = _unit_hidden_stride(token_embeddings)
    batch, seq_len, stride_x_batch, stride_x_seq = _geometry(x, layout, packed)
    pooled, argmax = _pooled_outputs(mode, batch, x)
    if pooled.numel() == 0:
        return pooled, argmax
    hidden = x.shape[-1]
    config = pooling_config(f"{mode}_forward", batch, hidden)
    # Both pointer arguments take the layout tensor; the kernel reads only the one its layout uses.
    mask = _kernel_mask(layout)
    mask_strides = (0, 0) if packed else mask.stride()
    outputs = (pooled, argmax) if mode == "max" else (pooled,)
    kernel = _max_pool_forward_kernel if mode == "max" else _mean_pool_forward_kernel
    with launch_device(x.device):
        kernel[pooling_grid(batch, hidden, config)](
            x, mask, layout, *outputs, seq_len, hidden, stride_x_batch, stride_x_seq, *mask_strides,
            PACKED=packed, BLOCK_L=config.block_l, BLOCK_H=config.block_h,
            ACC_DTYPE=_accumulation_dtype(x.dtype), NUM_STAGES=_forward_stages(x), num_warps=config.num_warps,
        )  # fmt: skip
    return pooled, argmax


def triton_backward(
    mode: str, grad_out: Tensor, layout: Tensor, argmax: Tensor, token_shape: list[int], packed: bool
) -> Tensor:
    """Gradient of :func:`triton_forward` with respect to the token embeddings, contiguous of
    shape ``token_shape`` (``(B, L, H)`` or ``(T, H)``)."""
    grad_x = torch.empty(token_shape, dtype=grad_out.dtype, device=grad_out.device)
    batch, hidden = grad_out.shape
    if batch == 0 or hidden == 0:
        return grad_x
    config = pooling_config(f"{mode}_backward", batch, hidden)
    seq_len = 0 if packed else token_shape[1]
    grid = pooling_grid(batch, hidden, config)
    blocks = {"PACKED": packed, "BLOCK_L": config.block_l, "BLOCK_H": config.block_h}
    grad_strides = grad_out.stride()
    with launch_device(grad_out.device):
        if mode == "max":
            _max_pool_backward_kernel[grid](
                grad_out, argmax, layout, grad_x, seq_len, hidden, *grad_strides, **blocks,
                num_warps=config.num_warps,
            )  # fmt: skip
            return grad_x
        mask = _kernel_mask(layout)
        mask_strides = (0, 0) if packed else mask.stride()
        _mean_pool_backward_kernel[grid](
            grad_out, mask, layout, grad_x, seq_len, hidden, *grad_strides, *mask_strides,
            **blocks, ACC_DTYPE=_accumulation_dtype(grad_out.dtype), num_warps=config.num_warps,
        )  # fmt: skip
    return grad_x


# The "cuda" backend: the kernels of csrc/pooling.cu through simcse_fast._C, which takes one
# argument struct (raw pointers, sizes, element strides, the stream) and a kernel name.

CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _extension():
    from ._backends import CUDA_EXTENSION

    return CUDA_EXTENSION


def _launch_cuda(kernel: str, device: torch.device, **fields) -> None:
    extension = _extension()
    args = extension.PoolingArgs()
    for name, value in fields.items():
        setattr(args, name, value)
    args.stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        extension.launch(kernel, args)


def _cuda_layout(layout: Tensor, packed: bool) -> tuple[Tensor, dict]:
    """The layout as the CUDA kernels read it: int64 offsets, or a uint8 mask (bool viewed for
    free, other dtypes cost one ``(B, L)`` comparison), with its argument fields."""
    if packed:
        offsets = layout.to(torch.int64)
        return offsets, {"cu_seqlens": offsets.data_ptr()}
    if layout.dtype == torch.bool:
        mask = layout.view(torch.uint8)
    elif layout.dtype == torch.uint8:
        mask = layout
    else:
        mask = (layout != 0).view(torch.uint8)
    fields = {"mask": mask.data_ptr(), "stride_mask_batch": mask.stride(0), "stride_mask_seq": mask.stride(1)}
    return mask, fields


def cuda_forward(
    mode: str, token_embeddings: Tensor, layout: Tensor, packed: bool
) -> tuple[Tensor, Tensor | None]:
    """Pool by the CUDA kernels; arguments and results as :func:`triton_forward`."""
    x = _unit_hidden_stride(token_embeddings)
    batch, seq_len, stride_x_batch, stride_x_seq = _geometry(x, layout, packed)
    pooled, argmax = _pooled_outputs(mode, batch, x)
    kept_alive, layout_fields = _cuda_layout(layout, packed)
    _launch_cuda(
        f"{mode}_forward", x.device, x=x.data_ptr(), out=pooled.data_ptr(),
        argmax=0 if argmax is None else argmax.data_ptr(),
        batch=batch, seq_len=seq_len, hidden=x.shape[-1], stride_x_batch=stride_x_batch,
        stride_x_seq=stride_x_seq, dtype=CUDA_DTYPES[x.dtype], **layout_fields,
    )  # fmt: skip
    del kept_alive  # the launch is enqueued; the caching allocator keeps the memory for the stream
    return pooled, argmax


def cuda_backward(
    mode: str, grad_out: Tensor, layout: Tensor, argmax: Tensor, token_shape: list[int], packed: bool
) -> Tensor:
    """Gradient of :func:`cuda_forward`; arguments and result as :func:`triton_backward`."""
    grad_x = torch.empty(token_shape, dtype=grad_out.dtype, device=grad_out.device)
    kept_alive, layout_fields = _cuda_layout(layout, packed)
    _launch_cuda(
        f"{mode}_backward", grad_out.device, grad_out=grad_out.data_ptr(), grad_x=grad_x.data_ptr(),
        argmax=0 if argmax is None else argmax.data_ptr(), batch=grad_out.shape[0],
        seq_len=0 if packed else token_shape[1],
        hidden=grad_out.shape[1], stride_grad_batch=grad_out.stride(0), stride_grad_hidden=grad_out.stride(1),
        dtype=CUDA_DTYPES[grad_out.dtype], **layout_fields,
    )  # fmt: skip
    del kept_alive
    return grad_x


@dataclass(frozen=True)
class PoolingBackend:
    """What one backend runs for the pooling ops and on which dtypes. ``forward(mode,
    token_embeddings, layout, packed) -> (pooled, argmax)`` and ``backward(mode, grad_out,
    layout, argmax, token_shape, packed) -> grad_x`` run behind the custom ops; a backend without
    them runs the reference functions under PyTorch's autograd."""

    dtypes: tuple[torch.dtype, ...]
    forward: Callable | None = None
    backward: Callable | None = None


ALL_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

POOLING_BACKENDS = {
    "triton": PoolingBackend(ALL_FLOAT_DTYPES, triton_forward, triton_backward),
    "cuda": PoolingBackend(tuple(CUDA_DTYPES), cuda_forward, cuda_backward),
    # "torch" is the reference itself: plain PyTorch ops, differentiated by autograd.
    "torch": PoolingBackend(ALL_FLOAT_DTYPES),
}
"""The one declaration of what each backend supports for pooling; ``resolve_backend``, the
argument checks, ``simcse-fast info`` and the README's table read it."""

# torch.library ops: opaque to torch.compile (no graph break), with fake kernels for tracing
# and autograd formulas that call the backward ops. One helper registers the four.


def _register_pooling_op(name: str, mode: str, packed: bool):
    """Register ``simcse_fast::{name}`` ``(token_embeddings, layout, implementation) -> (pooled,
    argmax)`` and its backward op ``simcse_fast::{name}_backward``; returns the forward op."""

    # A custom op returns tensors only: mean's missing argmax travels as an empty tensor.
    def with_argmax(pooled: Tensor, argmax: Tensor | None) -> tuple[Tensor, Tensor]:
        return pooled, pooled.new_empty((0,), dtype=torch.int32) if argmax is None else argmax

    def forward(token_embeddings: Tensor, layout: Tensor, implementation: str) -> tuple[Tensor, Tensor]:
        return with_argmax(*POOLING_BACKENDS[implementation].forward(mode, token_embeddings, layout, packed))

    def forward_fake(token_embeddings: Tensor, layout: Tensor, implementation: str) -> tuple[Tensor, Tensor]:
        batch = layout.shape[0] - 1 if packed else token_embeddings.shape[0]
        return with_argmax(*_pooled_outputs(mode, batch, token_embeddings))

    def backward(
        grad_out: Tensor, layout: Tensor, argmax: Tensor, token_shape: list[int], implementation: str
    ) -> Tensor:
        return POOLING_BACKENDS[implementation].backward(mode, grad_out, layout, argmax, token_shape, packed)

    def backward_fake(grad_out, layout, argmax, token_shape: list[int], implementation) -> Tensor:
        return grad_out.new_empty(token_shape)

    forward.__doc__ = f"{mode} pooling of the {'packed' if packed else 'padded'} layout by a kernel backend."
    backward.__doc__ = f"Gradient of simcse_fast::{name} with respect to the token embeddings."
    forward_op = torch.library.custom_op(f"simcse_fast::{name}", forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"simcse_fast::{name}_backward", backward, mutates_args=())
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output) -> None:
        token_embeddings, layout, implementation = inputs
        ctx.save_for_backward(layout, output[1])
        ctx.token_shape = list(token_embeddings.shape)
        ctx.implementation = implementation

    def differentiate(ctx, grad_out: Tensor, grad_argmax: Tensor | None):
        layout, argmax = ctx.saved_tensors
        return backward_op(grad_out, layout, argmax, ctx.token_shape, ctx.implementation), None, None

    forward_op.register_autograd(differentiate, setup_context=setup_context)
    return forward_op


masked_mean_pool_op = _register_pooling_op("masked_mean_pool", "mean", packed=False)
masked_max_pool_op = _register_pooling_op("masked_max_pool", "max", packed=False)
packed_mean_pool_op = _register_pooling_op("packed_mean_pool", "mean", packed=True)
packed_max_pool_op = _register_pooling_op("packed_max_pool", "max", packed=True)
OPS = {
    ("mean", False): masked_mean_pool_op,
    ("max", False): masked_max_pool_op,
    ("mean", True): packed_mean_pool_op,
    ("max", True): packed_max_pool_op,
}


class _EagerPool(torch.autograd.Function):
    """The custom ops' launchers and autograd formula without the torch.library dispatcher, for
    eager calls: the dispatcher adds ~19 µs a call without gradient and ~45 µs with it (CPU, the
    kernel launch stubbed: ``benchmarks/dispatch_overhead.py``), more than the kernels take at
    SimCSE's shape."""

    @staticmethod
    def forward(ctx, token_embeddings, layout, mode, packed, implementation):
        backend = POOLING_BACKENDS[implementation]
        pooled, argmax = backend.forward(mode, token_embeddings, layout, packed)
        ctx.save_for_backward(layout, argmax)
        ctx.arguments = (mode, list(token_embeddings.shape), packed, backend)
        return pooled

    @staticmethod
    def backward(ctx, grad_out):
        layout, argmax = ctx.saved_tensors
        mode, token_shape, packed, backend = ctx.arguments
        return backend.backward(mode, grad_out, layout, argmax, token_shape, packed), None, None, None, None


def pool(mode: str, packed: bool, token_embeddings: Tensor, layout: Tensor, implementation: str) -> Tensor:
    """``(B, H)`` pooled by backend ``implementation`` (inputs already checked): the custom op
    when ``torch.compile`` traces, the same launchers through :class:`_EagerPool` otherwise."""
    if POOLING_BACKENDS[implementation].forward is None:
        return getattr(reference, f"{'packed' if packed else 'masked'}_{mode}_pool")(token_embeddings, layout)
    if torch.compiler.is_compiling():
        pooled, _ = OPS[mode, packed](token_embeddings, layout, implementation)
        return pooled
    return _EagerPool.apply(token_embeddings, layout, mode, packed, implementation)
