"""Row log-sum-exp of scaled cosine similarities, never building the N x M matrix.

    lse[i] = log sum_j exp(s * cos(q_i, k_j)),   cos(q_i, k_j) = <q_i, k_j> a_i b_j,
    a_i = 1 / max(|q_i|, eps),  b_j = 1 / max(|k_j|, eps)

for queries ``q (N, D)``, keys ``k (M, D)`` and a scale ``s`` (0-dim tensor), optionally leaving
out ``j = i``. This one primitive carries every loss of the library: ``info_nce`` adds the
positive logits (a row-wise dot), its symmetric form applies the primitive both ways, hard
negatives are extra key rows.

Two implementations share the ops below:

* ``"triton"``: flash-attention style. The forward streams key blocks past a block of query
  rows, ``tl.dot`` on the raw inputs (bf16/fp16 on tensor cores, fp32 accumulation), and keeps
  a running max and sum of exponentials per row; only the (N,) log-sum-exp is saved. The
  inverse norms ``a``, ``b`` are computed once (O((N + M) D)) and applied to each tile's dot
  products rather than to normalized copies of the inputs: the dot of two bf16 vectors is exact
  in fp32, so the cosines carry no rounding of normalized copies, and no copies are stored.
* ``"torch"``: the same recomputation scheme in plain PyTorch, query rows in chunks, for CPUs
  and every device Triton does not serve.

Backward (both): with ``g = d loss / d lse`` and ``P_ij = exp(s cos_ij - lse_i)``, the logit
gradient is ``G_ij = g_i P_ij``. Recomputing tiles, two deterministic passes (no float
atomics) accumulate

    U_i = sum_j G_ij b_j k_j,  R_i = sum_j G_ij cos_ij   (pass over query blocks)
    V_j = sum_i G_ij a_i q_i,  C_j = sum_i G_ij cos_ij   (pass over key blocks)

and then, per row, ``dq_i = s a_i (U_i - [|q_i| > eps] a_i R_i q_i)``,
``dk_j = s b_j (V_j - [|k_j| > eps] b_j C_j k_j)`` and ``ds = sum_i R_i``. ``U`` and ``V`` are
(N, D) and (M, D) fp32 buffers: extra memory is O((N + M) D), never O(N M). Offsets are int64:
N * D passes 2**31 at N = 4M, D = 768.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import tl, triton

NORM_EPS = 1e-12
"""Norms are clamped at this value, as in ``torch.nn.functional.normalize``."""

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _accumulate_weighted_rows(
    out_ptr, weights, src_ptr, src_inv_norm, out_rows, out_in, src_rows, src_in, dim, stride_src,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[out_rows] += weights @ (src[src_rows] * src_inv_norm[:, None])`` for fp32
    ``out (., dim)`` (contiguous), D in ``BLOCK_D`` chunks.

    The source rows are normalized in fp32 before the cast to the dot's input dtype: folding
    the inverse norm into the weights instead would overflow fp16 for rows of tiny norm (1e12
    for a zero row). Each output row block belongs to one program, so the read-modify-write of
    ``out`` needs no atomics.
    """
    out_base = out_ptr + out_rows.to(tl.int64)[:, None] * dim
    src_base = src_ptr + src_rows.to(tl.int64)[:, None] * stride_src
    for start in range(0, dim, BLOCK_D):
        offsets = start + tl.arange(0, BLOCK_D)
        d_in = offsets < dim
        src = tl.load(src_base + offsets[None, :], mask=src_in[:, None] & d_in[None, :], other=0.0)
        unit_src = (src.to(tl.float32) * src_inv_norm[:, None]).to(src_ptr.dtype.element_ty)
        out_mask = out_in[:, None] & d_in[None, :]
        partial = tl.load(out_base + offsets[None, :], mask=out_mask, other=0.0)
        partial = tl.dot(weights, unit_src, partial, input_precision=DOT_PRECISION)
        tl.store(out_base + offsets[None, :], partial, mask=out_mask)


@triton.jit
def _similarity_lse_forward_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, lse_ptr,
    n_queries, n_keys, dim, stride_q, stride_k,
    EXCLUDE_DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``lse[i] = log sum_j exp(s <q_i, k_j> a_i b_j)`` for one block of ``BLOCK_N`` rows.

    Online log-sum-exp in base 2 (``exp2`` is the hardware instruction): running max ``m`` and
    sum ``l``. A row with no term yet keeps ``m = -inf``; shifting by 0 then avoids
    ``-inf - -inf``, and a row with no term at all ends with ``-inf``, as ``torch.logsumexp``.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_queries
    scale = tl.load(scale_ptr).to(tl.float32)
    row_factor = tl.load(inv_norm_q_ptr + rows, mask=row_in, other=0.0) * (scale * LOG2E)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for col_start in range(0, n_keys, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_in = cols < n_keys
        dots = _tile_dot(
            q_ptr, k_ptr, rows, cols, row_in, col_in, dim, stride_q, stride_k,
            BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        inv_norm_k = tl.load(inv_norm_k_ptr + cols, mask=col_in, other=0.0)
        logits2 = dots * row_factor[:, None] * inv_norm_k[None, :]
        valid = col_in[None, :]
        if EXCLUDE_DIAGONAL:
            valid = valid & (rows[:, None] != cols[None, :])
        logits2 = tl.where(valid, logits2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits2, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(
            tl.exp2(logits2 - shift[:, None]), axis=1
        )
        running_max = new_max
    lse = (running_max + tl.log2(running_sum)) * LN2
    tl.store(lse_ptr + rows, lse, mask=row_in)


@triton.jit
def _similarity_lse_backward_kernel(
    rows_ptr, cols_ptr, inv_norm_rows_ptr, inv_norm_cols_ptr, scale_ptr, lse_ptr, grad_lse_ptr,
    grad_acc_ptr, cos_weight_ptr,
    n_rows, n_cols, dim, stride_rows, stride_cols,
    ROWS_ARE_QUERIES: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One backward pass for a block of ``BLOCK_R`` rows of ``rows_ptr`` against all of
    ``cols_ptr``: ``acc[r] += sum_c G_rc inv_norm_cols[c] cols[c]`` and
    ``cos_weight[r] = sum_c G_rc cos_rc``.

    ``ROWS_ARE_QUERIES``: rows are the queries (U, R of the module docstring) and ``lse`` /
    ``grad_lse`` are indexed by row; otherwise rows are the keys (V, C), the tile is the
    transpose, and ``lse`` / ``grad_lse`` are indexed by column.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    inv_norm_rows = tl.load(inv_norm_rows_ptr + rows, mask=row_in, other=0.0)
    if ROWS_ARE_QUERIES:
        row_lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
        row_grad = tl.load(grad_lse_ptr + rows, mask=row_in, other=0.0)
    cos_weight = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for col_start in range(0, n_cols, BLOCK_C):
        cols = col_start + tl.arange(0, BLOCK_C)
        col_in = cols < n_cols
        dots = _tile_dot(
            rows_ptr, cols_ptr, rows, cols, row_in, col_in, dim, stride_rows, stride_cols,
            BLOCK_R, BLOCK_C, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        inv_norm_cols = tl.load(inv_norm_cols_ptr + cols, mask=col_in, other=0.0)
        cos = dots * inv_norm_rows[:, None] * inv_norm_cols[None, :]
        if ROWS_ARE_QUERIES:
            log_prob = scale * cos - row_lse[:, None]
            upstream = row_grad[:, None]
        else:
            col_lse = tl.load(lse_ptr + cols, mask=col_in, other=0.0)
            log_prob = scale * cos - col_lse[None, :]
            upstream = tl.load(grad_lse_ptr + cols, mask=col_in, other=0.0)[None, :]
        valid = row_in[:, None] & col_in[None, :]
        if EXCLUDE_DIAGONAL:
            valid = valid & (rows[:, None] != cols[None, :])
        grad_logits = tl.where(valid, upstream * tl.exp2(log_prob * LOG2E), 0.0)
        cos_weight += tl.sum(grad_logits * cos, axis=1)
        weights = grad_logits.to(cols_ptr.dtype.element_ty)
        _accumulate_weighted_rows(
            grad_acc_ptr, weights, cols_ptr, inv_norm_cols, rows, row_in, cols, col_in, dim, stride_cols,
            BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
    tl.store(cos_weight_ptr + rows, cos_weight, mask=row_in)


@dataclass(frozen=True)
class SimilarityConfig:
    """Block sizes, warps and pipeline stages of one similarity kernel launch."""

    block_rows: int
    block_cols: int
    block_d: int
    num_warps: int
    num_stages: int


SIMILARITY_CONFIGS = {
    # (kernel, bytes per input element) -> configuration. fp32 tiles hold twice the bytes per
    # element, so they take half the D chunk to stay clear of register spills on sm_90.
    ("forward", 2): SimilarityConfig(block_rows=128, block_cols=64, block_d=64, num_warps=8, num_stages=3),
    ("backward", 2): SimilarityConfig(block_rows=64, block_cols=64, block_d=64, num_warps=4, num_stages=2),
    ("forward", 4): SimilarityConfig(block_rows=64, block_cols=64, block_d=32, num_warps=4, num_stages=3),
    ("backward", 4): SimilarityConfig(block_rows=64, block_cols=32, block_d=32, num_warps=4, num_stages=2),
}
"""Every configuration the launchers use; the ahead-of-time compile test builds them all."""

ALIGNMENT = 16
"""D and the row stride are made multiples of 16 elements (zero padding, see ``_Side``): Triton
then knows every row starts 16-byte aligned and vectorizes the loads feeding the tensor cores;
with a ragged D the kernels need more registers than sm_90 has and spill."""


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow PyTorch's matmul setting: TF32 only where the user allowed it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def inverse_norms(x: Tensor) -> Tensor:
    """``1 / max(|x_i|, eps)`` per row, fp32, shape (rows,)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal()


# Each implementation provides two functions over row-contiguous inputs, their fp32 inverse
# norms and a 1-element fp32 scale:
#   forward(q, k, inv_q, inv_k, scale, exclude_diagonal) -> lse (N,)
#   backward(q, k, inv_q, inv_k, scale, lse, grad_lse, exclude_diagonal, u, v) -> R, C  (fp32)
# The backward adds U and V into the caller's fp32 buffers u (N, D) and v (M, D), so that the
# passes of one op share a single (N + M) x D accumulator instead of each allocating its own.


def _triton_forward(q, k, inv_q, inv_k, scale, exclude_diagonal):
    n_queries, dim = q.shape
    lse = torch.empty(n_queries, dtype=torch.float32, device=q.device)
    if n_queries == 0:
        return lse
    config = SIMILARITY_CONFIGS["forward", q.element_size()]
    _similarity_lse_forward_kernel[(triton.cdiv(n_queries, config.block_rows),)](
        q, k, inv_q, inv_k, scale, lse, n_queries, k.shape[0], dim, q.stride(0), k.stride(0),
        EXCLUDE_DIAGONAL=exclude_diagonal, BLOCK_N=config.block_rows, BLOCK_M=config.block_cols,
        BLOCK_D=config.block_d, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return lse


def _triton_backward_pass(
    rows, cols, inv_rows, inv_cols, scale, lse, grad_lse, rows_are_queries, exclude_diagonal, grad_acc
):
    n_rows, dim = rows.shape
    cos_weight = torch.zeros(n_rows, dtype=torch.float32, device=rows.device)
    if n_rows == 0:
        return cos_weight
    config = SIMILARITY_CONFIGS["backward", rows.element_size()]
    _similarity_lse_backward_kernel[(triton.cdiv(n_rows, config.block_rows),)](
        rows, cols, inv_rows, inv_cols, scale, lse, grad_lse, grad_acc, cos_weight,
        n_rows, cols.shape[0], dim, rows.stride(0), cols.stride(0),
        ROWS_ARE_QUERIES=rows_are_queries, EXCLUDE_DIAGONAL=exclude_diagonal,
        BLOCK_R=config.block_rows, BLOCK_C=config.block_cols, BLOCK_D=config.block_d,
        DOT_PRECISION=_dot_precision(rows.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return cos_weight


def _triton_backward(q, k, inv_q, inv_k, scale, lse, grad_lse, exclude_diagonal, u, v):
    r = _triton_backward_pass(q, k, inv_q, inv_k, scale, lse, grad_lse, True, exclude_diagonal, u)
    c = _triton_backward_pass(k, q, inv_k, inv_q, scale, lse, grad_lse, False, exclude_diagonal, v)
    return r, c


CHUNK_ELEMENTS = 1 << 21
"""Logit elements per chunk of the torch path (8 MiB in fp32): a few such temporaries are the
whole extra memory beyond O((N + M) D)."""


def _chunks(n_queries: int, n_keys: int):
    step = max(1, CHUNK_ELEMENTS // max(n_keys, 1))
    return ((start, min(start + step, n_queries)) for start in range(0, n_queries, step))


def _chunk_cos_and_logits(q_unit, k_unit, start, scale, exclude_diagonal):
    """``(cos, logits)`` of unit query rows ``start : start + len(q_unit)`` against all keys."""
    cos = q_unit @ k_unit.T
    logits = scale * cos
    if exclude_diagonal:
        rows = torch.arange(q_unit.shape[0], device=q_unit.device)
        logits[rows, rows + start] = float("-inf")
    return cos, logits


def _torch_forward(q, k, inv_q, inv_k, scale, exclude_diagonal):
    q_unit, k_unit = q.float() * inv_q[:, None], k.float() * inv_k[:, None]
    lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for start, stop in _chunks(q.shape[0], k.shape[0]):
        _, logits = _chunk_cos_and_logits(q_unit[start:stop], k_unit, start, scale, exclude_diagonal)
        lse[start:stop] = torch.logsumexp(logits, dim=1)
    return lse


def _torch_backward(q, k, inv_q, inv_k, scale, lse, grad_lse, exclude_diagonal, u, v):
    q_unit, k_unit = q.float() * inv_q[:, None], k.float() * inv_k[:, None]
    r = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    c = torch.zeros(k.shape[0], dtype=torch.float32, device=q.device)
    for start, stop in _chunks(q.shape[0], k.shape[0]):
        cos, logits = _chunk_cos_and_logits(q_unit[start:stop], k_unit, start, scale, exclude_diagonal)
        grad_logits = logits.sub_(lse[start:stop, None]).exp_().mul_(grad_lse[start:stop, None])
        if exclude_diagonal:
            # Explicit zeros: a row whose only term is excluded has lse = -inf, and exp(nan).
            rows = torch.arange(stop - start, device=q.device)
            grad_logits[rows, rows + start] = 0.0
        u[start:stop] += grad_logits @ k_unit
        v += grad_logits.T @ q_unit[start:stop]
        weighted_cos = cos.mul_(grad_logits)
        r[start:stop] = weighted_cos.sum(dim=1)
        c += weighted_cos.sum(dim=0)
    return r, c


IMPLEMENTATIONS = {"triton": (_triton_forward, _triton_backward), "torch": (_torch_forward, _torch_backward)}


def _normalization_backward(
    x: Tensor, inv_norm: Tensor, weighted_sum: Tensor, cos_weight: Tensor, scale: Tensor
):
    """``dx_i = s a_i (W_i - [|x_i| > eps] a_i c_i x_i)`` in fp32, cast once to ``x.dtype``: the
    gradient through ``x / max(|x|, eps)`` from ``W`` (U or V) and ``c`` (R or C)."""
    radial = torch.where(inv_norm < 1.0 / NORM_EPS, inv_norm * cos_weight, torch.zeros_like(cos_weight))
    grad = scale * inv_norm[:, None] * (weighted_sum - radial[:, None] * x.float())
    return grad.to(x.dtype)


class _Side:
    """One input matrix with its inverse norms, fp32 gradient accumulators (W, c) and the
    contributions of every pass it takes part in, summed in fp32 before one final cast."""

    def __init__(self, x: Tensor):
        self.dim = x.shape[1]
        padding = -self.dim % ALIGNMENT
        if padding or x.stride(1) != 1 or x.stride(0) % ALIGNMENT:
            # One O(rows x D) copy; zero columns change neither dot products nor norms.
            x = F.pad(x, (0, padding))
        self.x = x
        self.inv_norm = inverse_norms(self.x)

    @functools.cached_property
    def weighted_sum(self) -> Tensor:
        return torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)

    @functools.cached_property
    def cos_weight(self) -> Tensor:
        return torch.zeros(self.x.shape[0], dtype=torch.float32, device=self.x.device)

    def rows(self, stop: int) -> tuple[Tensor, Tensor]:
        return self.x[:stop], self.inv_norm[:stop]

    def unit_rows(self, index: Tensor | None, count: int) -> Tensor:
        """Rows ``index`` (or the first ``count``) divided by their clamped norms, fp32."""
        if index is None:
            return self.x[:count].float() * self.inv_norm[:count, None]
        return self.x.index_select(0, index).float() * self.inv_norm.index_select(0, index)[:, None]

    def gradient(self, scale: Tensor) -> Tensor:
        grad = _normalization_backward(self.x, self.inv_norm, self.weighted_sum, self.cos_weight, scale)
        return grad[:, : self.dim]


def _lse_forward(queries: _Side, keys: _Side, n_queries: int, scale, exclude_diagonal, implementation):
    """Log-sum-exp of the first ``n_queries`` rows of ``queries`` against all ``keys``."""
    q, inv_q = queries.rows(n_queries)
    return IMPLEMENTATIONS[implementation][0](q, keys.x, inv_q, keys.inv_norm, scale, exclude_diagonal)


def _lse_backward(
    queries: _Side, keys: _Side, n_queries: int, scale, lse, grad_lse, exclude_diagonal, implementation
):
    """Add one log-sum-exp's gradient (first ``n_queries`` rows of ``queries`` against all
    ``keys``) to both sides' accumulators; returns its share of ``d scale`` (sum of R)."""
    backward = IMPLEMENTATIONS[implementation][1]
    q, inv_q = queries.rows(n_queries)
    r, c = backward(
        q, keys.x, inv_q, keys.inv_norm, scale, lse, grad_lse.float().contiguous(), exclude_diagonal,
        queries.weighted_sum[:n_queries], keys.weighted_sum,
    )  # fmt: skip
    queries.cos_weight[:n_queries] += r
    keys.cos_weight += c
    return r.sum()


def _scale32(scale: Tensor) -> Tensor:
    return scale.to(torch.float32).reshape(1)


# torch.library ops: opaque to torch.compile (no graph break), fake kernels for tracing,
# autograd formulas calling the backward ops.


@torch.library.custom_op("simcse_fast::similarity_logsumexp", mutates_args=())
def similarity_logsumexp_op(
    queries: Tensor, keys: Tensor, scale: Tensor, exclude_diagonal: bool, implementation: str
) -> Tensor:
    """``lse[i] = logsumexp_j(scale * cos(q_i, k_j))``: ``(N, D), (M, D), () -> (N,)`` fp32, by
    the ``"triton"`` or ``"torch"`` implementation; inputs already checked."""
    q, k = _Side(queries), _Side(keys)
    return _lse_forward(q, k, q.x.shape[0], _scale32(scale), exclude_diagonal, implementation)


@similarity_logsumexp_op.register_fake
def _similarity_logsumexp_fake(queries, keys, scale, exclude_diagonal, implementation):
    return queries.new_empty((queries.shape[0],), dtype=torch.float32)


@torch.library.custom_op("simcse_fast::similarity_logsumexp_backward", mutates_args=())
def similarity_logsumexp_backward_op(
    grad_lse: Tensor, queries: Tensor, keys: Tensor, scale: Tensor, lse: Tensor,
    exclude_diagonal: bool, implementation: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`similarity_logsumexp_op` in queries, keys and scale."""
    q, k, scale32 = _Side(queries), _Side(keys), _scale32(scale)
    grad_scale = _lse_backward(q, k, q.x.shape[0], scale32, lse, grad_lse, exclude_diagonal, implementation)
    return q.gradient(scale32), k.gradient(scale32), grad_scale.to(scale.dtype)


@similarity_logsumexp_backward_op.register_fake
def _similarity_logsumexp_backward_fake(
    grad_lse, queries, keys, scale, lse, exclude_diagonal, implementation
):
    return torch.empty_like(queries), torch.empty_like(keys), torch.empty_like(scale)


def _similarity_setup_context(ctx, inputs, output) -> None:
    queries, keys, scale, exclude_diagonal, implementation = inputs
    ctx.save_for_backward(queries, keys, scale, output)
    ctx.exclude_diagonal = exclude_diagonal
    ctx.implementation = implementation


def _similarity_backward(ctx, grad_lse: Tensor):
    queries, keys, scale, lse = ctx.saved_tensors
    grads = similarity_logsumexp_backward_op(
        grad_lse, queries, keys, scale, lse, ctx.exclude_diagonal, ctx.implementation
    )
    return *grads, None, None


similarity_logsumexp_op.register_autograd(_similarity_backward, setup_context=_similarity_setup_context)


# info_nce as one op, so that the gradients of its log-sum-exps and of its positive logits,
# which nearly cancel for an easy positive, are summed in fp32 and rounded to the input dtype
# once, as in the reference; composing public ops would round each term separately.


def _unit_pairs(anchors: _Side, candidates: _Side, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Unit anchors, their unit positives (fp32, (N, D)) and the positive cosines (N,)."""
    n = anchors.x.shape[0]
    unit_anchors = anchors.unit_rows(None, n)
    unit_positives = candidates.unit_rows(labels, n)
    return unit_anchors, unit_positives, (unit_anchors * unit_positives).sum(dim=1)


@torch.library.custom_op("simcse_fast::info_nce", mutates_args=())
def info_nce_op(
    anchors: Tensor,
    candidates: Tensor,
    scale: Tensor,
    labels: Tensor | None,
    symmetric: bool,
    implementation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor InfoNCE loss ``(N,)`` fp32 and the log-sum-exps its backward reuses (forward
    direction (N,), backward direction (N,) or empty): see ``simcse_fast.info_nce``."""
    a, c, scale32 = _Side(anchors), _Side(candidates), _scale32(scale)
    n = a.x.shape[0]
    forward_lse = _lse_forward(a, c, n, scale32, False, implementation)
    positive_logits = scale32 * _unit_pairs(a, c, labels)[2]
    if not symmetric:
        return forward_lse - positive_logits, forward_lse, forward_lse.new_empty(0)
    backward_lse = _lse_forward(c, a, n, scale32, False, implementation)
    return (forward_lse + backward_lse) / 2 - positive_logits, forward_lse, backward_lse


@info_nce_op.register_fake
def _info_nce_fake(anchors, candidates, scale, labels, symmetric, implementation):
    n = anchors.shape[0]
    vector = anchors.new_empty((n,), dtype=torch.float32)
    return vector, torch.empty_like(vector), anchors.new_empty((n if symmetric else 0,), dtype=torch.float32)


@torch.library.custom_op("simcse_fast::info_nce_backward", mutates_args=())
def info_nce_backward_op(
    grad_loss: Tensor, anchors: Tensor, candidates: Tensor, scale: Tensor, labels: Tensor | None,
    forward_lse: Tensor, backward_lse: Tensor, symmetric: bool, implementation: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`info_nce_op`'s per-anchor loss in anchors, candidates and scale."""
    a, c, scale32 = _Side(anchors), _Side(candidates), _scale32(scale)
    n = a.x.shape[0]
    grad_loss = grad_loss.float()
    lse_weight = grad_loss / 2 if symmetric else grad_loss
    grad_scale = _lse_backward(a, c, n, scale32, forward_lse, lse_weight, False, implementation)
    if symmetric:
        grad_scale = grad_scale + _lse_backward(
            c, a, n, scale32, backward_lse, lse_weight, False, implementation
        )
    # The positive logit s * cos(a_i, c_{l_i}) enters with weight -grad_loss_i.
    unit_anchors, unit_positives, positive_cos = _unit_pairs(a, c, labels)
    a.weighted_sum -= grad_loss[:, None] * unit_positives
    a.cos_weight -= grad_loss * positive_cos
    if labels is None:
        c.weighted_sum[:n] -= grad_loss[:, None] * unit_anchors
        c.cos_weight[:n] -= grad_loss * positive_cos
    else:
        c.weighted_sum.index_add_(0, labels, -grad_loss[:, None] * unit_anchors)
        c.cos_weight.index_add_(0, labels, -grad_loss * positive_cos)
    grad_scale = grad_scale - (grad_loss * positive_cos).sum()
    return a.gradient(scale32), c.gradient(scale32), grad_scale.to(scale.dtype)


@info_nce_backward_op.register_fake
def _info_nce_backward_fake(
    grad_loss, anchors, candidates, scale, labels, forward_lse, backward_lse, symmetric, implementation
):
    return torch.empty_like(anchors), torch.empty_like(candidates), torch.empty_like(scale)


def _info_nce_setup_context(ctx, inputs, output) -> None:
    anchors, candidates, scale, labels, symmetric, implementation = inputs
    _, forward_lse, backward_lse = output
    ctx.save_for_backward(anchors, candidates, scale, labels, forward_lse, backward_lse)
    ctx.symmetric = symmetric
    ctx.implementation = implementation
    ctx.mark_non_differentiable(forward_lse, backward_lse)


def _info_nce_backward(ctx, grad_loss: Tensor, _grad_forward_lse, _grad_backward_lse):
    anchors, candidates, scale, labels, forward_lse, backward_lse = ctx.saved_tensors
    grads = info_nce_backward_op(
        grad_loss,
        anchors,
        candidates,
        scale,
        labels,
        forward_lse,
        backward_lse,
        ctx.symmetric,
        ctx.implementation,
    )
    return *grads, None, None, None


info_nce_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup_context)
