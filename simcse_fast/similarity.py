"""Normalized-similarity cross-entropy without the N x M matrix: one engine for
``similarity_logsumexp``, ``info_nce`` and sentence-transformers' in-batch-negatives losses.

Notation: queries ``q (Nq, D)``, documents ``d (Nd, D)``, inverse norms
``a_i = 1 / max(|q_i|, eps)`` and ``b_j = 1 / max(|d_j|, eps)``, cosines
``cos_ij = <q_i, d_j> a_i b_j`` and logits ``s cos_ij`` for the scale ``s``. The first ``n``
queries (and documents) are this process's rows; queries ``n..Nq-1`` are negatives gathered from
other processes. For each local row ``i < n``

    loss_i = log_z_i - [with_positive] s cos(q_i, d_{label_i})      (label_i = i by default)

where ``log_z_i`` combines the row log-sum-exps of the chosen directions

    query_to_doc    lse_j s cos(q_i, d_j), all documents (``exclude_diagonal``: j != i)
    query_to_query  lse_{k != i} s cos(q_i, q_k)
    doc_to_query    lse_k s cos(d_i, q_k)
    doc_to_doc      lse_{j : j mod Nq != i} s cos(d_i, d_j)  (not d_i's own column blocks)

jointly (one softmax over all their terms: ``log_z = logsumexp`` of the direction values) or per
direction (their mean). ``similarity_logsumexp`` is query_to_doc alone without the positive;
``info_nce`` is query_to_doc, plus doc_to_query per direction when symmetric; the
sentence-transformers drop-ins use any combination.

Forward (``"triton"``): flash-attention style. A program holds a block of query rows and streams
one *range* of key blocks through ``tl.dot`` on the raw inputs (bf16/fp16 tensor cores, fp32
accumulation), applying ``a_i b_j`` to each tile in fp32: the products of half inputs are exact
in fp32, so the cosines carry no rounding of normalized copies. The grid is
(query blocks) x (key ranges), so that every batch size launches about two waves on the GPU; each
program writes a partial (shift, sum of exponentials) per row and the partials are merged in a
fixed order (deterministic). Since ``|cos| <= 1``, when ``|s| <= 40`` the fixed shift ``|s|``
replaces the running maximum (no term exceeds it by more than rounding, and ``exp(-2|s|)`` stays a
normal fp32 number); above that the running maximum is kept. Rows with a positive also keep the
sum without it: ``1 - P_positive`` is the ratio of the two, with no cancellation.

Backward: with ``g`` the upstream gradient of ``loss``, the gradient of the logits is
``W / c``, where ``c`` is a power of two chosen below and, for an entry that is neither a
positive nor left out,

    W_ij = c * sum over the softmaxes containing it of  weight * exp(s cos_ij - lse)

(row softmaxes are indexed by i, the doc_to_query softmax by the column; joint: lse = log_z and
weight = g; per direction: the direction's lse and weight g / #directions). ``W`` is formed in
fp32 and only then rounded to the inputs' dtype. Two choices keep it exact in half precision
where SimCSE lives (``P_ii`` of 0.999+, so a row's gradient is a small difference):

* A positive's entry is ``-c g (1 - P_ii)`` (per direction: a sum of such terms), and
  ``1 - P_ii = exp(lse_without_positive - lse)`` comes from the forward's two sums: a ratio of
  sums of positive terms, accurate to a few fp32 ulps for any ``P_ii``, where ``1 - exp(x)`` (or
  ``expm1`` of a difference of two logits near ``|s|``) keeps only ``ulp(|s|) / (1 - P_ii)``.
* ``c`` brings the largest entry of ``W`` near 2**15 (a bound from the same O(N) statistics), so
  fp16 weights keep the 30 binades of fp16's normal range below it, with or without a loss
  scale; dividing by ``max |g|`` alone would leave the entries of easy rows (1e-7 and below)
  among fp16's subnormals.

``W`` is formed a chunk of rows at a time (a Triton kernel recomputes the chunk's cosines and
writes ``W``; on the torch path, plain tensor ops), and the heavy products go to the vendor GEMM
(cuBLAS on a GPU) with fp32 accumulation and an fp32 result:

    U_rows[chunk] += W @ unit(cols),   U_cols += W^T @ unit(rows[chunk])

into one fp32 ``(rows, D)`` buffer per input. The normalization backward is then the projection
``dx_i = (s / c) a_i (U_i - [|x_i| > eps] <x^_i, U_i> x^_i)``: the row and column sums of
``W cos`` it needs come out of the GEMM results, so the kernel writes no partial-sum buffers for
them. ``ds = (1 / c) sum W cos`` is summed in fp32 from the unrounded ``W`` (one float per tile,
added in a fixed order), only when the scale needs a gradient. No float atomics anywhere: bitwise
deterministic, duplicate labels included (a positive is an entry of ``W``, not a scatter).

Memory: beyond the inputs, their gradients and O((Nq + Nd) D) buffers, one chunk of ``W`` and its
temporaries, sized by a byte budget (default: the size of the fp32 buffers, at least
``DEFAULT_BUDGET_FLOOR``; ``SIMCSE_FAST_LOSS_CHUNK_MB`` or the ``chunk_mb`` argument override it).
When every direction's cosine matrix fits the budget, the torch path keeps them from the forward
and the backward does not recompute them (as eager PyTorch keeps its logits).

Offsets into the inputs are int64 (N * D passes 2**31 at N = 4M, D = 768).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

NORM_EPS = 1e-12
"""Norms are clamped at this value, as in ``torch.nn.functional.normalize``."""

FIXED_SHIFT_MAX_SCALE = tl.constexpr(40.0)
"""Up to this ``|scale|`` the forward shifts every exponent by ``|scale|`` instead of a running
maximum: the smallest term, ``exp(-2 |scale|)``, is still a normal fp32 number."""

DEFAULT_BUDGET_FLOOR = 32 << 20
"""Bytes of N x M intermediates (a chunk of ``W`` and its temporaries) the default budget
always allows, however small the inputs."""

CHUNK_ENV_VAR = "SIMCSE_FAST_LOSS_CHUNK_MB"

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

def _ceil_div(numerator: int, denominator: int) -> int:
    # Not triton.cdiv: from Python it runs through Triton's JIT dispatch, ~6 µs a call.
    return -(-numerator // denominator)


LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOSS_BACKENDS = {"triton": LOSS_DTYPES, "torch": LOSS_DTYPES}
"""The one declaration of the loss's backends and the dtypes they take: the Triton kernels and
the chunked PyTorch path (``"torch"``: never N x M unless the budget allows). The compiled
extension has pooling only. ``resolve_backend``, ``simcse-fast info`` and the README read it."""

LOSS_STRATEGIES = ("fused", "gemm", "torch")
"""How the loss runs on a GPU: ``"fused"`` (Triton tiles recompute the cosines), ``"gemm"``
(cuBLAS computes each row chunk's cosines, one fused Triton pass reduces them) or ``"torch"``
(cuBLAS and PyTorch ops: the eager-equivalent candidate). CPU tensors run ``"torch"`` only."""

STRATEGY_ENV_VAR = "SIMCSE_FAST_LOSS_STRATEGY"
"""``auto`` (default: time the candidates once per device, dtype and shape bucket) or one of
:data:`LOSS_STRATEGIES` to pin it."""

_STRATEGY_CHOICES: dict[str, str] = {}


def loss_strategies(device: torch.device) -> tuple[str, ...]:
    """The strategies that can run the loss on ``device``."""
    if torch.device(device).type == "cuda" and HAS_TRITON:
        return LOSS_STRATEGIES
    return ("torch",)


def strategy_choices() -> dict[str, str]:
    """What ``"auto"`` chose so far in this process: ``{case: strategy}``, the case naming the
    device, dtype and shape bucket."""
    return dict(_STRATEGY_CHOICES)



@triton.jit
def _tile_dot(
    a_ptr, b_ptr, a_rows, b_rows, a_in, b_in, dim, stride_a, stride_b,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``<a[a_rows], b[b_rows]>`` as a ``(BLOCK_A, BLOCK_B)`` fp32 tile, D in ``BLOCK_D`` chunks.
    Rows outside the inputs (``a_in``/``b_in`` false) read as zeros."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_a
    b_base = b_ptr + b_rows.to(tl.int64)[None, :] * stride_b
    for start in range(0, dim, BLOCK_D):
        offsets = start + tl.arange(0, BLOCK_D)
        d_in = offsets < dim
        a = tl.load(a_base + offsets[None, :], mask=a_in[:, None] & d_in[None, :], other=0.0)
        b_t = tl.load(b_base + offsets[:, None], mask=d_in[:, None] & b_in[None, :], other=0.0)
        acc = tl.dot(a, b_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lse_partial_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, labels_ptr,
    partial_shift_ptr, partial_sum_ptr, partial_negative_sum_ptr,
    n_queries, n_keys, keys_per_split, dim, stride_q, stride_k, exclude_period,
    EXCLUDE: tl.constexpr, POSITIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial log-sum-exp of ``BLOCK_N`` query rows over the key range of split
    ``program_id(1)``: ``shift[r]`` and ``sum[r] = sum_j exp(s cos_rj - shift[r])``, so that
    ``lse = shift + log sum`` once the splits are merged. ``EXCLUDE`` leaves out the keys ``j``
    with ``j mod exclude_period == r``. With a positive per row (``POSITIVE`` 1: key ``r``; 2: key
    ``labels[r]``) the same sum without it is kept too: ``1 - P_positive`` is then a ratio of two
    sums of positive terms, free of the cancellation of ``1 - exp(x)``.

    The logits are formed by the very expression of ``_gradient_weights_kernel``, so that the
    backward's ``exp(logit - lse)`` sums to 1 over a row up to the rounding of the sum, not of
    two differently rounded logits near ``|s|``. ``|s| <= 40``: fixed shift ``|s|`` (no row
    maximum per tile). Otherwise an online maximum; a row with no term yet keeps ``-inf`` and
    shifts by 0, which avoids ``-inf - -inf``; a row with no term at all ends with sum 0, i.e.
    ``lse = -inf`` as ``torch.logsumexp``.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_queries
    split = tl.program_id(1)
    col_begin = split * keys_per_split
    col_end = tl.minimum(col_begin + keys_per_split, n_keys)
    scale = tl.load(scale_ptr).to(tl.float32)
    inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=row_in, other=0.0)
    if POSITIVE == 2:
        # int32 compares on the tile: labels index keys, fewer than 2**31.
        positive_cols = tl.load(labels_ptr + rows, mask=row_in, other=-1).to(tl.int32)
    else:
        positive_cols = rows
    fixed_shift = tl.abs(scale) <= FIXED_SHIFT_MAX_SCALE
    bound = tl.abs(scale)
    running_shift = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.where(fixed_shift, bound, float("-inf"))
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    negative_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for col_start in range(col_begin, col_end, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_in = cols < col_end
        dots = _tile_dot(
            q_ptr, k_ptr, rows, cols, row_in, col_in, dim, stride_q, stride_k,
            BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        inv_norm_k = tl.load(inv_norm_k_ptr + cols, mask=col_in, other=0.0)
        logits = scale * (inv_norm_q[:, None] * dots * inv_norm_k[None, :])
        valid = col_in[None, :]
        if EXCLUDE:
            valid = valid & ((cols % exclude_period)[None, :] != rows[:, None])
        logits = tl.where(valid, logits, float("-inf"))
        if fixed_shift:
            terms = tl.exp(logits - bound)
            running_sum += tl.sum(terms, axis=1)
            if POSITIVE:
                negatives = tl.where(cols[None, :] == positive_cols[:, None], 0.0, terms)
                negative_sum += tl.sum(negatives, axis=1)
        else:
            new_max = tl.maximum(running_shift, tl.max(logits, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_shift - shift)
            terms = tl.exp(logits - shift[:, None])
            running_sum = running_sum * rescale + tl.sum(terms, axis=1)
            if POSITIVE:
                negatives = tl.where(cols[None, :] == positive_cols[:, None], 0.0, terms)
                negative_sum = negative_sum * rescale + tl.sum(negatives, axis=1)
            running_shift = new_max
    out = split.to(tl.int64) * n_queries + rows
    tl.store(partial_shift_ptr + out, running_shift, mask=row_in)
    tl.store(partial_sum_ptr + out, running_sum, mask=row_in)
    if POSITIVE:
        tl.store(partial_negative_sum_ptr + out, negative_sum, mask=row_in)


@triton.jit
def _gradient_weights_kernel(
    x_ptr, y_ptr, inv_norm_x_ptr, inv_norm_y_ptr, scale_ptr,
    row_lse_ptr, row_weight_ptr, col_lse_ptr, col_weight_ptr, positive_value_ptr, labels_ptr, w_ptr,
    w_cos_ptr, n_rows, n_cols, n_col_terms, dim, stride_x, stride_y, stride_w, first_row, exclude_period,
    ROW_TERMS: tl.constexpr, COL_TERMS: tl.constexpr, POSITIVE: tl.constexpr, EXCLUDE: tl.constexpr,
    SCALE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One ``(BLOCK_R, BLOCK_C)`` tile of the logit-gradient weights ``W`` (module docstring) of
    rows ``x[0 : n_rows]`` (global row index ``first_row + r``) against ``y[0 : n_cols]``, formed
    in fp32 and written to ``w`` in its dtype:

        W_rc = [ROW_TERMS] w_r exp(s cos_rc - lse_r) + [COL_TERMS, c < n_col_terms] w_c exp(s cos_rc - lse_c)

    except at a row's positive (``POSITIVE`` 1: ``c == first_row + r``; 2: ``c == labels[r]``),
    which takes the row's precomputed fp32 ``positive_value``, and at the columns left out
    (``EXCLUDE``: ``c mod exclude_period == first_row + r``), which are 0. Row arrays are indexed
    by ``r``, column arrays by ``c``. ``SCALE_GRAD``: the tile's ``sum W_rc cos_rc`` in fp32, before
    ``W`` is rounded, goes to ``w_cos[program]`` (``d scale`` without the rounding of ``W``).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_in = r < n_rows
    c_in = c < n_cols
    dots = _tile_dot(
        x_ptr, y_ptr, r, c, r_in, c_in, dim, stride_x, stride_y, BLOCK_R, BLOCK_C, BLOCK_D, DOT_PRECISION
    )
    inv_norm_x = tl.load(inv_norm_x_ptr + r, mask=r_in, other=0.0)
    inv_norm_y = tl.load(inv_norm_y_ptr + c, mask=c_in, other=0.0)
    cos = inv_norm_x[:, None] * dots * inv_norm_y[None, :]
    logits = tl.load(scale_ptr).to(tl.float32) * cos
    weights = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if ROW_TERMS:
        row_lse = tl.load(row_lse_ptr + r, mask=r_in, other=0.0)
        row_weight = tl.load(row_weight_ptr + r, mask=r_in, other=0.0)
        weights += row_weight[:, None] * tl.exp(logits - row_lse[:, None])
    if COL_TERMS:
        c_terms = c < n_col_terms
        col_lse = tl.load(col_lse_ptr + c, mask=c_terms, other=0.0)
        col_weight = tl.load(col_weight_ptr + c, mask=c_terms, other=0.0)
        weights += tl.where(c_terms[None, :], col_weight[None, :] * tl.exp(logits - col_lse[None, :]), 0.0)
    global_rows = first_row + r
    if POSITIVE:
        if POSITIVE == 2:
            positive_cols = tl.load(labels_ptr + r, mask=r_in, other=-1).to(tl.int32)
        else:
            positive_cols = global_rows
        positive_value = tl.load(positive_value_ptr + r, mask=r_in, other=0.0)
        weights = tl.where(c[None, :] == positive_cols[:, None], positive_value[:, None], weights)
    valid = r_in[:, None] & c_in[None, :]
    if EXCLUDE:
        valid = valid & ((c % exclude_period)[None, :] != global_rows[:, None])
    weights = tl.where(valid, weights, 0.0)
    if SCALE_GRAD:
        program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(w_cos_ptr + program, tl.sum(tl.sum(weights * cos, axis=1), axis=0))
    out = w_ptr + r.to(tl.int64)[:, None] * stride_w + c[None, :]
    tl.store(out, weights.to(w_ptr.dtype.element_ty), mask=r_in[:, None] & c_in[None, :])


@dataclass(frozen=True)
class SimilarityConfig:
    """Block sizes, warps and pipeline stages of one similarity kernel launch."""

    block_rows: int
    block_cols: int
    block_d: int
    num_warps: int
    num_stages: int


SIMILARITY_CONFIGS = {
    # (kernel, bytes per input element) -> configuration; D only sets the trip count of the inner
    # loop. fp32 tiles hold twice the bytes per element, so they take half the D chunk to stay
    # clear of register spills on sm_90. From the AOT compile (Triton 3.9): the half forward
    # needs 122-147 registers and 72 KB of shared memory (two CTAs per SM without exclusion),
    # the half weights kernel 64-152 (three CTAs per SM for info_nce's 80).
    ("forward", 2): SimilarityConfig(block_rows=128, block_cols=64, block_d=64, num_warps=8, num_stages=3),
    ("weights", 2): SimilarityConfig(block_rows=128, block_cols=64, block_d=64, num_warps=8, num_stages=3),
    ("forward", 4): SimilarityConfig(block_rows=64, block_cols=64, block_d=32, num_warps=4, num_stages=3),
    ("weights", 4): SimilarityConfig(block_rows=64, block_cols=64, block_d=32, num_warps=4, num_stages=3),
}
"""Every configuration the launchers use; the ahead-of-time compile test builds them all."""

ALIGNMENT = 16
"""D and the row stride are made multiples of 16 elements and the base address 16-byte aligned
(zero padding or a copy, see ``_Side``): Triton then knows every row starts aligned and
vectorizes the loads feeding the tensor cores; with a ragged D the kernels need more registers
than sm_90 has and spill."""

TARGET_WAVES = 2
"""Forward programs per SM the key-range split aims for (two CTAs of the forward fit an SM)."""

MIN_KEY_BLOCKS_PER_SPLIT = 4
"""A key range holds at least this many key blocks: fewer would spend more on the merge and the
query-block loads than on the products."""


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow PyTorch's matmul setting: TF32 only where the user allowed it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:
        return 132  # the H100 SXM: the interpreter's launches are sized as for the GPU they model
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _sm_count(None)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_mm_has_fp32_output() -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for half CUDA operands (PyTorch
    2.8 and later): the GEMM then accumulates and returns fp32 without a rounding of its result."""
    try:
        probe = torch.ones(16, 32, device="cuda", dtype=torch.bfloat16)
        torch.mm(probe, probe.T, out_dtype=torch.float32)  # both layouts the backward uses
        torch.mm(probe.T, probe, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as error:
        warnings.warn(
            f"torch.mm(..., out_dtype=torch.float32) is unavailable ({error}); the loss backward "
            "runs its products in fp32 instead (slower; PyTorch >= 2.8 avoids this)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in fp32 for operands in the inputs' dtype: on a GPU the
    half-precision tensor-core GEMM with an fp32 result, elsewhere the same values upcast."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _cuda_mm_has_fp32_output():
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def inverse_norms(x: Tensor) -> Tensor:
    """``1 / max(|x_i|, eps)`` per row, fp32, shape (rows,)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal()


class _Side:
    """One input matrix: an aligned (padded) copy if needed, inverse norms, its unit rows (in the
    input dtype for the backward GEMMs, in fp32 for the torch path's cosines and the epilogue)
    and the fp32 accumulator ``U`` of its gradient."""

    def __init__(self, x: Tensor):
        self.dim = x.shape[1]
        padding = -self.dim % ALIGNMENT
        aligned = x.stride(1) == 1 and x.stride(0) % ALIGNMENT == 0 and x.data_ptr() % 16 == 0
        if padding or not aligned:
            # One O(rows x D) copy; zero columns change neither dot products nor norms.
            padded = x.new_zeros((x.shape[0], self.dim + padding))
            padded[:, : self.dim] = x
            x = padded
        self.x = x
        self.rows = x.shape[0]
        self.inv_norm = inverse_norms(x)
        # CPU GEMMs take fp32 copies of half operands (same values, fp32 accumulation); a GPU
        # multiplies the half operands themselves.
        self._upcast = x.dtype != torch.float32 and not x.is_cuda

    def _operand(self, tensor: Tensor) -> Tensor:
        return tensor.float() if self._upcast else tensor

    @functools.cached_property
    def unit(self) -> Tensor:
        """``x_i a_i`` rounded once to the input dtype: the operand of the backward GEMMs (on a
        CPU, half inputs give an fp32 copy of those rounded values)."""
        return self._operand((self.x.float() * self.inv_norm[:, None]).to(self.x.dtype))

    @functools.cached_property
    def grad_acc(self) -> Tensor:
        return torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)

    @functools.cached_property
    def unit32(self) -> Tensor:
        """``x_i a_i`` in fp32 (torch path on a CPU or for fp32 inputs)."""
        return self.x.float() * self.inv_norm[:, None]

    def cosines(self, rows: slice, other: _Side, n_cols: int, out: Tensor | None = None) -> Tensor:
        """``cos(x[rows], other.x[:n_cols])`` in fp32 (torch path). Half inputs on a GPU: the
        tensor-core GEMM of the raw rows (exact products, fp32 accumulation) times ``a_i b_j``;
        otherwise the fp32 GEMM of fp32 unit rows, whose rounding (2**-24) is below that of the
        accumulation."""
        if self.x.is_cuda and self.x.dtype != torch.float32:
            dots = _matmul_fp32(self.x[rows], other.x[:n_cols].T)
            dots = dots.mul_(self.inv_norm[rows, None]).mul_(other.inv_norm[None, :n_cols])
            return dots if out is None else out.copy_(dots)
        return torch.matmul(self.unit32[rows], other.unit32[:n_cols].T, out=out)

    def gradient(self, factor: Tensor) -> Tensor:
        """The gradient through ``x / max(|x|, eps)`` from the accumulated ``U`` times ``factor``
        (the scale over ``W``'s scaling), cast once to ``x.dtype``. Works in place on ``U``: the
        epilogue adds no (rows, D) buffer but the fp32 unit rows."""
        self.__dict__.pop("unit", None)  # the GEMM operand is no longer needed
        unit, acc = self.unit32, self.grad_acc
        radial = torch.linalg.vecdot(unit, acc)
        # A norm below eps is clamped: the unit vector is then x / eps, with no radial term.
        projected = torch.where(self.inv_norm < 1.0 / NORM_EPS, radial, torch.zeros_like(radial))
        acc.addcmul_(unit, projected[:, None], value=-1.0).mul_(factor * self.inv_norm[:, None])
        # Contiguous whatever the padding or the input's layout: the fake kernel promises it.
        return acc[:, : self.dim].to(self.x.dtype).contiguous()


def _exclusion_mask(global_rows: Tensor, n_cols: int, period: int) -> Tensor:
    cols = torch.arange(n_cols, device=global_rows.device)
    return (cols % period)[None, :] == global_rows[:, None]


def _budget_rows(budget: int, bytes_per_row: int, n_rows: int) -> int:
    return max(1, min(n_rows, budget // max(bytes_per_row, 1)))


# Forward: row log-sum-exps of one direction, rows[:n_rows] against cols[:n_cols].


def _merge_partials(partial_shift: Tensor, partial_sum: Tensor) -> Tensor:
    """``m + log sum_k sum_k exp(shift_k - m)``, ``m = max_k shift_k``, over the splits ``k``
    (dim 0), in a fixed order."""
    top = partial_shift.amax(dim=0)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (partial_sum * torch.exp(partial_shift - top)).sum(dim=0)
    return top + torch.log(total)


def _triton_row_lse(rows, n_rows, cols, n_cols, period, positive, scale):
    config = SIMILARITY_CONFIGS["forward", rows.x.element_size()]
    row_blocks = _ceil_div(n_rows, config.block_rows)
    col_blocks = _ceil_div(n_cols, config.block_cols)
    wanted = _ceil_div(TARGET_WAVES * _device_sm_count(rows.x.device), row_blocks)
    splits = max(1, min(wanted, col_blocks // MIN_KEY_BLOCKS_PER_SPLIT))
    blocks_per_split = max(1, _ceil_div(col_blocks, splits))
    splits = max(1, _ceil_div(col_blocks, blocks_per_split))
    partials = torch.empty((3, splits, n_rows), dtype=torch.float32, device=rows.x.device)
    mode, labels = positive
    _lse_partial_kernel[(row_blocks, splits)](
        rows.x, cols.x, rows.inv_norm, cols.inv_norm, scale, rows.inv_norm if labels is None else labels,
        partials[0], partials[1], partials[2],
        n_rows, n_cols, blocks_per_split * config.block_cols, rows.x.shape[1], rows.x.stride(0),
        cols.x.stride(0), max(period, 1),
        EXCLUDE=period > 0, POSITIVE=mode, BLOCK_N=config.block_rows, BLOCK_M=config.block_cols,
        BLOCK_D=config.block_d, DOT_PRECISION=_dot_precision(rows.x.dtype), num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    lse = _merge_partials(partials[0], partials[1])
    return lse, (_merge_partials(partials[0], partials[2]) if mode else None)


def _positive_columns(mode: int, labels: Tensor | None, start: int, stop: int, first_row: int, device):
    """Column of the positive of rows ``start:stop``, shape (rows, 1): the row's global index
    ``first_row + r`` (mode 1) or its label (mode 2)."""
    if mode == 2:
        return labels[start:stop, None]
    return torch.arange(first_row + start, first_row + stop, device=device)[:, None]


def _torch_row_lse(rows, n_rows, cols, n_cols, period, positive, scale, budget, cache):
    mode, labels = positive
    lse = torch.empty(n_rows, dtype=torch.float32, device=rows.x.device)
    negative_lse = torch.empty_like(lse) if mode else None
    step = n_rows if cache is not None else _budget_rows(budget, 12 * n_cols, n_rows)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        out = None if cache is None else cache.view(n_rows, n_cols)[start:stop]
        terms = rows.cosines(slice(start, stop), cols, n_cols, out=out) * scale
        if period:
            global_rows = torch.arange(start, stop, device=lse.device)
            terms.masked_fill_(_exclusion_mask(global_rows, n_cols, period), float("-inf"))
        shift = terms.amax(dim=1, keepdim=True) if n_cols else terms.new_zeros((stop - start, 1))
        shift = torch.where(shift == float("-inf"), torch.zeros_like(shift), shift)
        terms.sub_(shift).exp_()
        shift = shift.squeeze(1)
        if not mode:
            lse[start:stop] = shift + terms.sum(dim=1).log()
            continue
        # The sum without the positive comes first and the positive is added to it: no
        # difference of nearly equal sums, whatever P_positive.
        columns = _positive_columns(mode, labels, start, stop, 0, lse.device)
        positive_terms = terms.gather(1, columns).squeeze(1)
        negatives = terms.scatter_(1, columns, 0.0).sum(dim=1)
        lse[start:stop] = shift + (negatives + positive_terms).log()
        negative_lse[start:stop] = shift + negatives.log()
    return lse, negative_lse


def _row_lse(rows, n_rows, cols, n_cols, period, positive, scale, implementation, budget, cache):
    """``(lse, lse without the positive or None)`` of ``rows[:n_rows]`` against ``cols[:n_cols]``;
    ``positive = (mode, labels)``, mode 0 (none), 1 (column = row) or 2 (column = label)."""
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.x.device)
        return empty, (empty if positive[0] else None)
    if implementation == "triton":
        return _triton_row_lse(rows, n_rows, cols, n_cols, period, positive, scale)
    return _torch_row_lse(rows, n_rows, cols, n_cols, period, positive, scale, budget, cache)


# Backward: blocks of W, each a rectangle of logits with the loss terms it carries.


@dataclass
class _Block:
    """Logits of ``rows.x[row_start : row_start + n_rows]`` against ``cols.x[:n_cols]`` and the
    terms of ``W`` they carry (see ``_gradient_weights_kernel``): row terms (lse, weight) indexed
    by block row, column terms for the first ``n_col_terms`` columns, each row's positive value
    (at column ``labels[r]``, or the row's global index), columns left out (``exclude_period``)."""

    rows: _Side
    row_start: int
    n_rows: int
    cols: _Side
    n_cols: int
    row_lse: Tensor | None = None
    row_weight: Tensor | None = None
    col_lse: Tensor | None = None
    col_weight: Tensor | None = None
    positive_value: Tensor | None = None
    labels: Tensor | None = None
    exclude_period: int = 0
    cached_cos: Tensor | None = None

    @property
    def n_col_terms(self) -> int:
        return 0 if self.col_lse is None else self.col_lse.shape[0]

    @property
    def positive_mode(self) -> int:
        if self.positive_value is None:
            return 0
        return 1 if self.labels is None else 2


def _triton_weights(block: _Block, start: int, stop: int, scale: Tensor, out: Tensor, scale_grad: bool):
    config = SIMILARITY_CONFIGS["weights", block.rows.x.element_size()]
    n_rows = stop - start
    weights = out[: n_rows * block.n_cols].view(n_rows, block.n_cols)
    x = block.rows.x[block.row_start + start :]
    inv_x = block.rows.inv_norm[block.row_start + start :]

    def rows_of(tensor):  # an unused pointer argument takes any tensor
        return inv_x if tensor is None else tensor[start:stop]

    grid = (_ceil_div(n_rows, config.block_rows), _ceil_div(block.n_cols, config.block_cols))
    w_cos = torch.empty(grid[0] * grid[1] if scale_grad else 0, dtype=torch.float32, device=x.device)
    _gradient_weights_kernel[grid](
        x, block.cols.x, inv_x, block.cols.inv_norm, scale,
        rows_of(block.row_lse), rows_of(block.row_weight),
        inv_x if block.col_lse is None else block.col_lse,
        inv_x if block.col_weight is None else block.col_weight,
        rows_of(block.positive_value), rows_of(block.labels), weights, w_cos if scale_grad else inv_x,
        n_rows, block.n_cols, block.n_col_terms, x.shape[1], x.stride(0), block.cols.x.stride(0),
        weights.stride(0), block.row_start + start, max(block.exclude_period, 1),
        ROW_TERMS=block.row_lse is not None, COL_TERMS=block.col_lse is not None,
        POSITIVE=block.positive_mode, EXCLUDE=block.exclude_period > 0, SCALE_GRAD=scale_grad,
        BLOCK_R=config.block_rows, BLOCK_C=config.block_cols, BLOCK_D=config.block_d,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return weights, (w_cos.sum() if scale_grad else None)


def _torch_weights(block: _Block, start: int, stop: int, scale: Tensor, scale_grad: bool):
    """The same ``W`` (and ``sum W cos``) as ``_gradient_weights_kernel``, in PyTorch ops."""
    rows = slice(block.row_start + start, block.row_start + stop)
    if block.cached_cos is not None:
        cos = block.cached_cos[start:stop]
    else:
        cos = block.rows.cosines(rows, block.cols, block.n_cols)
    logits = cos * scale
    n_terms = block.n_col_terms
    col_part = None
    if block.col_lse is not None:
        col_part = (logits[:, :n_terms] - block.col_lse[None, :]).exp_().mul_(block.col_weight[None, :])
    if block.row_lse is None:
        weights = col_part  # a block of column terms only spans exactly those columns
    else:
        weights = logits.sub_(block.row_lse[start:stop, None]).exp_().mul_(block.row_weight[start:stop, None])
        if col_part is not None:
            weights[:, :n_terms] += col_part
    if block.positive_mode:
        mode, labels = block.positive_mode, block.labels
        columns = _positive_columns(mode, labels, start, stop, block.row_start, cos.device)
        weights.scatter_(1, columns, block.positive_value[start:stop, None])
    if block.exclude_period:
        global_rows = torch.arange(rows.start, rows.stop, device=cos.device)
        weights.masked_fill_(_exclusion_mask(global_rows, block.n_cols, block.exclude_period), 0.0)
    w_cos = torch.vdot(weights.reshape(-1), cos.reshape(-1)) if scale_grad else None
    return weights.to(block.rows.x.dtype), w_cos


def _accumulate_block(block: _Block, scale: Tensor, implementation: str, budget: int, scale_grad: bool):
    """``U_rows += W @ unit(cols)`` and ``U_cols += W^T @ unit(rows)``, a chunk of rows at a time;
    returns ``sum W cos`` in fp32 (for ``d scale``) when ``scale_grad``, else None."""
    if block.n_rows == 0 or block.n_cols == 0:
        return None
    element = block.rows.x.element_size()
    temporaries = 0 if implementation == "triton" else 12  # fp32 cosines or logits, column terms
    step = _budget_rows(budget, block.n_cols * (element + temporaries), block.n_rows)
    buffer = None
    if implementation == "triton":
        buffer = block.rows.x.new_empty(step * block.n_cols)
    cols_unit = block.cols.unit[: block.n_cols]
    w_cos = []
    for start in range(0, block.n_rows, step):
        stop = min(start + step, block.n_rows)
        if implementation == "triton":
            weights, chunk_w_cos = _triton_weights(block, start, stop, scale, buffer, scale_grad)
        else:
            weights, chunk_w_cos = _torch_weights(block, start, stop, scale, scale_grad)
        w_cos.append(chunk_w_cos)
        rows = slice(block.row_start + start, block.row_start + stop)
        block.rows.grad_acc[rows] += _matmul_fp32(weights, cols_unit)
        block.cols.grad_acc[: block.n_cols] += _matmul_fp32(weights.T, block.rows.unit[rows])
    return torch.stack(w_cos).sum() if scale_grad else None


# The op: forward log-sum-exps, loss, and the backward through the blocks of W.


@dataclass(frozen=True)
class _Direction:
    name: str
    rows_are_queries: bool
    cols_are_queries: bool
    exclude: bool
    has_positive: bool


def _directions(
    query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive
) -> list[_Direction]:
    """query_to_doc first; the positive pair (q_i, d_i) is a term of query_to_doc and of
    doc_to_query."""
    directions = [_Direction("query_to_doc", True, False, exclude_diagonal, with_positive)]
    if query_to_query:
        directions.append(_Direction("query_to_query", True, True, True, False))
    if doc_to_query:
        directions.append(_Direction("doc_to_query", False, True, False, with_positive))
    if doc_to_doc:
        directions.append(_Direction("doc_to_doc", False, False, True, False))
    return directions


def _direction_geometry(direction: _Direction, n_queries: int, n_docs: int) -> tuple[int, int]:
    """``(n_cols, exclude_period)``: query_to_query excludes ``k == i``, doc_to_doc every column
    ``j`` with ``j mod Nq == i`` (the positive's own position in each document column), and
    query_to_doc with ``exclude_diagonal`` ``j == i`` (period Nd >= Nq)."""
    n_cols = n_queries if direction.cols_are_queries else n_docs
    if not direction.exclude:
        return n_cols, 0
    return n_cols, (n_docs if direction.name == "query_to_doc" else n_queries)


def _cache_elements(n_local, n_queries, n_docs, directions, implementation, budget) -> int:
    """Size of the cosines the torch path keeps from the forward: all directions or nothing."""
    if implementation != "torch":
        return 0
    total = sum(n_local * _direction_geometry(d, n_queries, n_docs)[0] for d in directions)
    return total if 4 * total <= budget else 0


def _positive_cosines(q: _Side, d: _Side, n_local: int, labels: Tensor | None) -> Tensor:
    """``cos(q_i, d_{label_i})`` in fp32 from the raw rows, as the kernels form cosines."""
    if labels is None:
        positives, inv_positives = d.x[:n_local], d.inv_norm[:n_local]
    else:
        positives, inv_positives = d.x.index_select(0, labels), d.inv_norm.index_select(0, labels)
    dots = (q.x[:n_local].float() * positives.float()).sum(dim=1)
    return dots * q.inv_norm[:n_local] * inv_positives


def _split_stats(stats: Tensor, directions) -> tuple[Tensor, Tensor]:
    """``(lse (#directions, n), lse without the positive (#directions with one, n))``."""
    return stats[: len(directions)], stats[len(directions) :]


def _negatives_lse(lse: Tensor, negative_lse: Tensor, directions) -> Tensor:
    """Per direction, the log-sum-exp without the positive's term where it has one."""
    rows, k = [], 0
    for index, direction in enumerate(directions):
        if direction.has_positive:
            rows.append(negative_lse[k])
            k += 1
        else:
            rows.append(lse[index])
    return torch.stack(rows)


def _positive_slots(directions) -> int:
    return sum(direction.has_positive for direction in directions)


def _scale32(scale: Tensor) -> Tensor:
    return scale.to(torch.float32).reshape(1)


@torch.library.custom_op("simcse_fast::contrastive_loss", mutates_args=())
def contrastive_loss_op(
    queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None, n_local: int,
    query_to_query: bool, doc_to_query: bool, doc_to_doc: bool, joint: bool, with_positive: bool,
    exclude_diagonal: bool, implementation: str, budget: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per-row loss ``(n_local,)`` fp32 (module docstring); the row statistics the backward
    reuses, ``(#directions + #directions with a positive, n_local)`` fp32 (each direction's
    log-sum-exp, then the log-sum-exp without the positive); the cosines the torch path keeps
    for the backward (flat fp32, empty unless they fit ``budget`` bytes). Inputs already
    checked; ``implementation`` is ``"triton"`` or ``"torch"``."""
    q, d, scale32 = _Side(queries), _Side(docs), _scale32(scale)
    directions = _directions(query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive)
    cache = torch.empty(
        _cache_elements(n_local, q.rows, d.rows, directions, implementation, budget),
        dtype=torch.float32, device=queries.device,
    )  # fmt: skip
    lses, negative_lses, offset = [], [], 0
    for direction in directions:
        n_cols, period = _direction_geometry(direction, q.rows, d.rows)
        piece = cache[offset : offset + n_local * n_cols] if cache.numel() else None
        offset += n_local * n_cols
        rows, cols = (q if direction.rows_are_queries else d), (q if direction.cols_are_queries else d)
        positive = (0, None)
        if direction.has_positive:
            positive = (1, None) if labels is None or direction.name != "query_to_doc" else (2, labels)
        lse, negative_lse = _row_lse(
            rows, n_local, cols, n_cols, period, positive, scale32, implementation, budget, piece
        )
        lses.append(lse)
        if negative_lse is not None:
            negative_lses.append(negative_lse)
    lse = torch.stack(lses)
    stats = torch.cat([lse, torch.stack(negative_lses)]) if negative_lses else lse
    if not with_positive:
        loss = torch.logsumexp(lse, dim=0) if joint else lse.mean(dim=0)
        return loss, stats, cache
    # loss_i = log_z_i - l_ii from the log-sum-exp of the terms other than the positive's:
    # log(1 + exp(y)) keeps the relative accuracy of a small loss, where log_z - l_ii would lose
    # it to the cancellation of two numbers near |s|.
    positive_logits = scale32 * _positive_cosines(q, d, n_local, labels)
    negatives = _negatives_lse(lse, _split_stats(stats, directions)[1], directions)
    if joint:
        excess = torch.logsumexp(negatives, dim=0) - positive_logits
        loss = torch.logaddexp(excess, excess.new_tensor(math.log(_positive_slots(directions))))
    else:
        has_positive = torch.tensor([direction.has_positive for direction in directions], device=lse.device)
        per_direction = torch.where(
            has_positive[:, None],
            F.softplus(negatives - positive_logits),
            lse - positive_logits,
        )
        loss = per_direction.mean(dim=0)
    return loss, stats, cache


@contrastive_loss_op.register_fake
def _contrastive_loss_fake(
    queries, docs, scale, labels, n_local, query_to_query, doc_to_query, doc_to_doc, joint,
    with_positive, exclude_diagonal, implementation, budget,
):  # fmt: skip
    directions = _directions(query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive)
    cached = _cache_elements(n_local, queries.shape[0], docs.shape[0], directions, implementation, budget)
    n_stats = len(directions) + _positive_slots(directions)
    return (
        queries.new_empty((n_local,), dtype=torch.float32),
        queries.new_empty((n_stats, n_local), dtype=torch.float32),
        queries.new_empty((cached,), dtype=torch.float32),
    )


def _complement(lse, negative_lse, directions, joint) -> Tensor:
    """Per row, the probability outside the positive's terms, from the forward's sums without
    them (no ``1 - P`` cancellation). Joint: ``1 - slots P`` of the one softmax; per direction:
    ``sum_k (1 - P_k)`` over the directions that hold the positive (0 without a positive)."""
    negatives = _negatives_lse(lse, negative_lse, directions)
    if joint:
        return torch.exp(torch.logsumexp(negatives, dim=0) - torch.logsumexp(lse, dim=0))
    with_positive = [k for k, direction in enumerate(directions) if direction.has_positive]
    return torch.exp(negatives[with_positive] - lse[with_positive]).sum(dim=0)


def _positive_values(complement, directions, scaled_grad, joint) -> Tensor:
    """``W`` at each row's positive, in fp32 without cancellation. Joint: the positive logit
    holds ``slots`` terms of one softmax, ``W = g (slots P - 1) = -g complement``. Per direction:
    ``W = -(g / n) sum_k (1 - P_k) - g (1 - slots / n)``."""
    if joint:
        return -scaled_grad * complement
    n = len(directions)
    return -(scaled_grad / n) * complement - scaled_grad * (1 - _positive_slots(directions) / n)


def _weight_scale(complement, directions, grad, joint) -> Tensor:
    """A power of two (0-dim fp32 tensor) that brings the largest entry of ``W`` near 2**15:
    half-precision weights then keep the 30 binades of fp16's normal range below it, whatever
    the loss scale. Bound per row: ``|W_ij| <= sum over its softmaxes of |w| (1 - P_positive)``
    (``1`` for a softmax without a positive) plus ``|W_positive|``; an entry carries a row
    softmax and at most one column softmax, so ``|W| <= 2 max_i bound_i``."""
    if grad.numel() == 0:
        return grad.new_ones(())
    magnitude = grad.abs()
    n = len(directions)
    if joint:
        bound = magnitude * n * complement
    else:
        bound = magnitude / n * (complement + (n - _positive_slots(directions)))
    largest = (bound + magnitude * 2).amax()
    exponent = torch.floor(torch.log2(2.0**14 / largest)).clamp(-126.0, 126.0)
    # A zero or non-finite bound (zero upstream gradient; NaN in, NaN out) keeps scale 1.
    return torch.where(largest.isfinite() & (largest > 0), torch.exp2(exponent), torch.ones_like(largest))


def _blocks(q, d, n_local, directions, lse, complement, cache, scaled_grad, labels, joint) -> list[_Block]:
    """The blocks of ``W``. doc_to_query's softmax over queries ``k`` for document ``i`` sits in
    column ``i`` of the query_to_doc rectangle (rows ``k < n``) and of the rectangle of gathered
    queries ``k >= n`` against ``d[:n]``: each positive's whole weight is formed in one place."""
    if joint:
        log_z = torch.logsumexp(lse, dim=0)
        terms = {direction.name: (log_z, scaled_grad) for direction in directions}
    else:
        per_direction = scaled_grad / len(directions)
        terms = {direction.name: (lse[k], per_direction) for k, direction in enumerate(directions)}
    cached, offset = {}, 0
    for direction in directions:
        n_cols, _ = _direction_geometry(direction, q.rows, d.rows)
        if cache.numel():
            cached[direction.name] = cache[offset : offset + n_local * n_cols].view(n_local, n_cols)
        offset += n_local * n_cols
    row_lse, row_weight = terms["query_to_doc"]
    n_cols, period = _direction_geometry(directions[0], q.rows, d.rows)
    positive_value = None
    if directions[0].has_positive:
        positive_value = _positive_values(complement, directions, scaled_grad, joint)
    main = _Block(
        q, 0, n_local, d, n_cols, row_lse, row_weight, exclude_period=period,
        positive_value=positive_value, labels=labels, cached_cos=cached.get("query_to_doc"),
    )  # fmt: skip
    blocks = [main]
    if "doc_to_query" in terms:
        main.col_lse, main.col_weight = terms["doc_to_query"]
        transposed = cached.get("doc_to_query")
        blocks.append(
            _Block(
                q,
                n_local,
                q.rows - n_local,
                d,
                n_local,
                col_lse=main.col_lse,
                col_weight=main.col_weight,
                cached_cos=None if transposed is None else transposed[:, n_local:].T,
            )
        )
    for name, rows, cols in (("query_to_query", q, q), ("doc_to_doc", d, d)):
        if name in terms:
            block_lse, block_weight = terms[name]
            blocks.append(
                _Block(
                    rows,
                    0,
                    n_local,
                    cols,
                    cols.rows,
                    block_lse,
                    block_weight,
                    exclude_period=q.rows,
                    cached_cos=cached.get(name),
                )
            )
    return blocks


@torch.library.custom_op("simcse_fast::contrastive_loss_backward", mutates_args=())
def contrastive_loss_backward_op(
    grad_loss: Tensor, queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None,
    stats: Tensor, cache: Tensor, n_local: int, query_to_query: bool, doc_to_query: bool,
    doc_to_doc: bool, joint: bool, with_positive: bool, exclude_diagonal: bool, implementation: str,
    budget: int, scale_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`contrastive_loss_op`'s per-row loss in queries, docs and scale (zero
    unless ``scale_grad``: ``sum W cos`` costs a pass over ``W`` on the torch path)."""
    q, d, scale32 = _Side(queries), _Side(docs), _scale32(scale)
    directions = _directions(query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive)
    lse, negative_lse = _split_stats(stats, directions)
    complement = _complement(lse, negative_lse, directions, joint)
    grad = grad_loss.float()
    weight_scale = _weight_scale(complement, directions, grad, joint)
    scaled_grad = (grad * weight_scale).contiguous()
    w_cos = torch.zeros((), dtype=torch.float32, device=queries.device)
    for block in _blocks(q, d, n_local, directions, lse, complement, cache, scaled_grad, labels, joint):
        block_w_cos = _accumulate_block(block, scale32, implementation, budget, scale_grad)
        if block_w_cos is not None:
            w_cos = w_cos + block_w_cos
    factor = scale32 / weight_scale
    grad_scale = (w_cos / weight_scale).reshape(scale.shape).to(scale.dtype)
    return q.gradient(factor), d.gradient(factor), grad_scale


@contrastive_loss_backward_op.register_fake
def _contrastive_loss_backward_fake(grad_loss, queries, docs, scale, *_args):
    return queries.new_empty(queries.shape), docs.new_empty(docs.shape), scale.new_empty(scale.shape)


_FLAGS = (
    "n_local", "query_to_query", "doc_to_query", "doc_to_doc", "joint", "with_positive",
    "exclude_diagonal", "implementation", "budget",
)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    queries, docs, scale, labels, *flags = inputs
    _, stats, cache = output
    ctx.save_for_backward(queries, docs, scale, labels, stats, cache)
    ctx.flags = dict(zip(_FLAGS, flags, strict=True))
    ctx.mark_non_differentiable(stats, cache)


def _backward(ctx, grad_loss: Tensor, _grad_stats, _grad_cache):
    queries, docs, scale, labels, stats, cache = ctx.saved_tensors
    flags = ctx.flags
    grads = contrastive_loss_backward_op(
        grad_loss, queries, docs, scale, labels, stats, cache, flags["n_local"], flags["query_to_query"],
        flags["doc_to_query"], flags["doc_to_doc"], flags["joint"], flags["with_positive"],
        flags["exclude_diagonal"], flags["implementation"], flags["budget"], ctx.needs_input_grad[2],
    )  # fmt: skip
    return *grads, None, None, None, None, None, None, None, None, None, None


contrastive_loss_op.register_autograd(_backward, setup_context=_setup_context)


def memory_budget(chunk_mb, n_queries: int, n_docs: int, dim: int) -> int:
    """Bytes of N x M intermediates one call may hold: ``chunk_mb`` MiB if given, else
    ``SIMCSE_FAST_LOSS_CHUNK_MB``, else the size of the fp32 gradient buffers,
    ``4 (Nq + Nd) D``, and at least ``DEFAULT_BUDGET_FLOOR``. Raises ``ValueError`` for a value
    that is not a positive number."""
    source = "chunk_mb"
    if chunk_mb is None and os.environ.get(CHUNK_ENV_VAR, "").strip():
        source, chunk_mb = f"environment variable {CHUNK_ENV_VAR}", os.environ[CHUNK_ENV_VAR].strip()
        try:
            chunk_mb = float(chunk_mb)
        except ValueError:
            raise ValueError(f"{source} must be a positive number of MiB; got {chunk_mb!r}") from None
    if chunk_mb is None:
        return max(4 * (n_queries + n_docs) * dim, DEFAULT_BUDGET_FLOOR)
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)):
        raise TypeError(f"{source} must be a number of MiB, got {type(chunk_mb).__name__}")
    if not chunk_mb > 0 or chunk_mb == float("inf"):
        raise ValueError(f"{source} must be a positive, finite number of MiB; got {chunk_mb}")
    return max(1, int(chunk_mb * (1 << 20)))
