"""The Triton kernels of the loss, their tile configurations and their grids.

Two kernels serve both GPU strategies. Each forms a tile of cosines ``cos_rc = a_r b_c <x_r,
y_c>`` and reduces it: the forward kernel to per-row partial log-sum-exps, the weights kernel to
the logit-gradient weights ``W``. Where the dot products come from is the only difference between
the strategies, a compile-time flag:

* ``PRECOMPUTED=False`` (strategy ``"fused"``): the tile recomputes ``<x_r, y_c>`` with ``tl.dot``
  on the raw inputs (bf16/fp16 tensor cores or TF32/fp32, fp32 accumulation), D in ``BLOCK_D``
  slices.
* ``PRECOMPUTED=True`` (strategy ``"gemm"``): the tile reads them from an fp32 chunk that cuBLAS
  wrote (``torch.mm(..., out_dtype=torch.float32)``: the same exact products of the half inputs,
  accumulated in fp32).

Everything after the dot products (norms, scale, exclusions, the positive, the fixed shift or
running maximum, ``W``'s terms) is the same code, so both strategies compute the same function
with the same rounding steps; only the summation order of the dot products differs.

Offsets are int64 wherever they index an input or a chunk (``N D`` and ``rows x M`` pass 2**31 at
the batch sizes this library is for); per-tile column indices stay int32 (fewer registers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .._triton import tl, triton

FIXED_SHIFT_MAX_SCALE = tl.constexpr(40.0)
"""Up to this ``|scale|`` the forward shifts every exponent by ``|scale|`` instead of a running
maximum: the smallest term, ``exp(-2 |scale|)``, is still a normal fp32 number."""

CUDA_MAX_GRID = (2**31 - 1, 65535, 65535)
"""CUDA's limits on a launch grid's x, y and z."""


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
def _tile_dots(
    x_ptr, y_ptr, dots_ptr, r, c, r_in, c_in, dim, stride_x, stride_y, stride_dots,
    PRECOMPUTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``<x_r, y_c>`` in fp32: read from the chunk ``dots`` (row ``r``, column ``c``) when
    ``PRECOMPUTED``, else recomputed from the inputs."""
    if PRECOMPUTED:
        offsets = r.to(tl.int64)[:, None] * stride_dots + c[None, :]
        return tl.load(dots_ptr + offsets, mask=r_in[:, None] & c_in[None, :], other=0.0)
    return _tile_dot(x_ptr, y_ptr, r, c, r_in, c_in, dim, stride_x, stride_y, BLOCK_R, BLOCK_C, BLOCK_D,
                     DOT_PRECISION)  # fmt: skip


@triton.jit
def _adjusted_row_logits(
    logits, cos, r, global_rows, c, r_in, c_in, positive_cols,
    gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
    guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
    HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PRECOMPUTED: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
):  # fmt: skip
    """The logits ``s cos_rc`` of a row softmax after sentence-transformers' hardness weighting and
    GIST's guided mask (the column softmaxes use the plain logits).

    ``HARDNESS`` (query_to_doc only): selected negatives get ``+ alpha cos_rc``, a stop-gradient
    term (the backward's factor stays ``s``): 1 the documents of other queries (``c mod
    own_period != row``), 2 the row's own hard negatives (``c >= own_period``, ``c mod own_period
    == row``), 3 every document but the positive (``c != row``).

    ``GUIDED``: the guide model's cosine ``gcos_rc`` (from the guide embeddings ``gx``, ``gy``, or
    the precomputed fp32 ``guide_dots``) above the row's ``threshold`` removes the term (``-inf``):
    1 with the row's positive kept (query_to_doc), 2 without (anchor-anchor, positive-positive).
    """
    if HARDNESS:
        if HARDNESS == 1:
            selected = (c % own_period)[None, :] != global_rows[:, None]
        elif HARDNESS == 2:
            selected = ((c % own_period)[None, :] == global_rows[:, None]) & (c >= own_period)[None, :]
        else:
            selected = c[None, :] != global_rows[:, None]
        logits = logits + tl.where(selected, hardness_strength * cos, 0.0)
    if GUIDED:
        masked = _guide_mask(
            r, c, r_in, c_in, positive_cols, gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr,
            threshold_ptr, guide_dim, stride_gx, stride_gy, stride_guide_dots, GUIDED, PRECOMPUTED, BLOCK_R,
            BLOCK_C, BLOCK_D, GUIDE_PRECISION,
        )  # fmt: skip
        logits = tl.where(masked, float("-inf"), logits)
    return logits


@triton.jit
def _guide_mask(
    r, c, r_in, c_in, positive_cols, gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
    guide_dim, stride_gx, stride_gy, stride_guide_dots, GUIDED: tl.constexpr, PRECOMPUTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
):  # fmt: skip
    """The terms GIST's guide removes from a ``(BLOCK_R, BLOCK_C)`` tile of a row softmax (bool):
    the guide's cosine ``gcos_rc`` above the row's ``threshold``, the row's positive kept for
    ``GUIDED`` 1 (``_adjusted_row_logits``)."""
    guide_dots = _tile_dots(
        gx_ptr, gy_ptr, guide_dots_ptr, r, c, r_in, c_in, guide_dim, stride_gx, stride_gy,
        stride_guide_dots, PRECOMPUTED, BLOCK_R, BLOCK_C, BLOCK_D, GUIDE_PRECISION,
    )  # fmt: skip
    g_inv_x = tl.load(g_inv_x_ptr + r, mask=r_in, other=0.0)
    g_inv_y = tl.load(g_inv_y_ptr + c, mask=c_in, other=0.0)
    guide_cos = g_inv_x[:, None] * guide_dots * g_inv_y[None, :]
    threshold = tl.load(threshold_ptr + r, mask=r_in, other=0.0)
    masked = guide_cos > threshold[:, None]
    if GUIDED == 1:
        masked = masked & (c[None, :] != positive_cols[:, None])
    return masked


@triton.jit
def _lse_partial_kernel(
    q_ptr, k_ptr, dots_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, labels_ptr,
    partial_shift_ptr, partial_sum_ptr, partial_negative_sum_ptr,
    gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
    n_queries, n_keys, keys_per_split, dim, stride_q, stride_k, stride_dots, first_row, partial_stride,
    exclude_period, guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
    EXCLUDE: tl.constexpr, POSITIVE: tl.constexpr, PRECOMPUTED: tl.constexpr, HARDNESS: tl.constexpr,
    GUIDED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial log-sum-exp of ``BLOCK_N`` query rows over the key range of split
    ``program_id(1)``: ``shift[r]`` and ``sum[r] = sum_j exp(s cos_rj - shift[r])``, so that
    ``lse = shift + log sum`` once the splits are merged; written at ``split * partial_stride +
    r``. Query ``r`` of this launch is row ``first_row + r`` of the loss. ``EXCLUDE`` leaves out
    the keys ``j`` with ``j mod exclude_period == first_row + r``: 1 when the period is at least
    the number of keys (the one key ``j = first_row + r``: exclude_diagonal, query_to_query),
    2 otherwise (doc_to_doc's every document column; a remainder per key, which costs registers:
    Triton 3.9 fits one CTA of the 128 x 64 tile per SM instead of two). With a positive per row
    (``POSITIVE`` 1: key ``first_row + r``; 2: key ``labels[r]``) the same sum without it is kept
    too: ``1 - P_positive`` is then a ratio of two sums of positive terms, free of the
    cancellation of ``1 - exp(x)``. ``HARDNESS`` and ``GUIDED`` adjust the logits as
    ``_adjusted_row_logits`` says.

    The logits are formed by the very expression of ``_gradient_weights_kernel``, so that the
    backward's ``exp(logit - lse)`` sums to 1 over a row up to the rounding of the sum, not of
    two differently rounded logits near ``|s|``. ``|s| <= 40``: fixed shift ``|s|`` (no row
    maximum per tile). Otherwise an online maximum; a row with no term yet keeps ``-inf`` and
    shifts by 0, which avoids ``-inf - -inf``; a row with no term at all ends with sum 0, i.e.
    ``lse = -inf`` as ``torch.logsumexp``.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_queries
    global_rows = first_row + rows
    split = tl.program_id(1)
    col_begin = split * keys_per_split
    col_end = tl.minimum(col_begin + keys_per_split, n_keys)
    scale = tl.load(scale_ptr).to(tl.float32)
    inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=row_in, other=0.0)
    if POSITIVE == 2:
        # int32 compares on the tile: labels index keys, fewer than 2**31.
        positive_cols = tl.load(labels_ptr + rows, mask=row_in, other=-1).to(tl.int32)
    else:
        positive_cols = global_rows
    fixed_shift = tl.abs(scale) <= FIXED_SHIFT_MAX_SCALE
    bound = tl.abs(scale)
    running_shift = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.where(fixed_shift, bound, float("-inf"))
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    negative_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for col_start in range(col_begin, col_end, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_in = cols < col_end
        dots = _tile_dots(
            q_ptr, k_ptr, dots_ptr, rows, cols, row_in, col_in, dim, stride_q, stride_k, stride_dots,
            PRECOMPUTED, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        inv_norm_k = tl.load(inv_norm_k_ptr + cols, mask=col_in, other=0.0)
        cos = inv_norm_q[:, None] * dots * inv_norm_k[None, :]
        logits = _adjusted_row_logits(
            scale * cos, cos, rows, global_rows, cols, row_in, col_in, positive_cols,
            gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
            guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
            HARDNESS, GUIDED, PRECOMPUTED, BLOCK_N, BLOCK_M, BLOCK_D, GUIDE_PRECISION,
        )  # fmt: skip
        logits = tl.where(col_in[None, :], logits, float("-inf"))
        if EXCLUDE == 1:
            logits = tl.where(cols[None, :] == global_rows[:, None], float("-inf"), logits)
        if EXCLUDE == 2:
            excluded_row = cols % exclude_period
            logits = tl.where(excluded_row[None, :] == global_rows[:, None], float("-inf"), logits)
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
    out = split.to(tl.int64) * partial_stride + rows
    tl.store(partial_shift_ptr + out, running_shift, mask=row_in)
    tl.store(partial_sum_ptr + out, running_sum, mask=row_in)
    if POSITIVE:
        tl.store(partial_negative_sum_ptr + out, negative_sum, mask=row_in)


@triton.jit
def _gradient_weights_kernel(
    x_ptr, y_ptr, dots_ptr, inv_norm_x_ptr, inv_norm_y_ptr, scale_ptr,
    row_lse_ptr, row_weight_ptr, col_lse_ptr, col_weight_ptr, positive_value_ptr, labels_ptr, w_ptr,
    w_cos_ptr, gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
    n_rows, n_cols, n_col_terms, dim, stride_x, stride_y, stride_dots, stride_w, first_row,
    exclude_period, guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
    ROW_TERMS: tl.constexpr, COL_TERMS: tl.constexpr, POSITIVE: tl.constexpr, EXCLUDE: tl.constexpr,
    SCALE_GRAD: tl.constexpr, PRECOMPUTED: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
):  # fmt: skip
    """One ``(BLOCK_R, BLOCK_C)`` tile of the logit-gradient weights ``W`` (the package docstring)
    of rows ``x[0 : n_rows]`` (row ``first_row + r`` of the loss) against ``y[0 : n_cols]``, formed
    in fp32 and written to ``w`` in its dtype:

        W_rc = [ROW_TERMS] w_r exp(s cos_rc - lse_r) + [COL_TERMS, c < n_col_terms] w_c exp(s cos_rc - lse_c)

    except at a row's positive (``POSITIVE`` 1: ``c == first_row + r``; 2: ``c == labels[r]``),
    which takes the row's precomputed fp32 ``positive_value``, and at the columns left out
    (``EXCLUDE``: ``c mod exclude_period == first_row + r``, 1 and 2 as in ``_lse_partial_kernel``),
    which are 0. The row terms' logits are adjusted by ``HARDNESS`` and ``GUIDED``
    (``_adjusted_row_logits``), the column terms' are not. Row arrays are indexed
    by ``r``, column arrays by ``c``. ``SCALE_GRAD``: the tile's ``sum W_rc cos_rc`` in fp32, before
    ``W`` is rounded, goes to ``w_cos[program]`` (``d scale`` without the rounding of ``W``).

    One-dimensional grid (CUDA's x allows 2**31 - 1 programs; a y of column blocks would stop at
    65,535), in groups of ``GROUP_R`` row blocks that walk the column blocks together: the CTAs
    resident at one time share their column (key) tiles and a few row tiles in L2.
    """
    program = tl.program_id(0)
    row_blocks = tl.cdiv(n_rows, BLOCK_R)
    col_blocks = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP_R * col_blocks
    first_row_block = (program // per_group) * GROUP_R
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_R)
    row_block = first_row_block + (program % per_group) % group_rows
    col_block = (program % per_group) // group_rows
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    r_in = r < n_rows
    c_in = c < n_cols
    dots = _tile_dots(
        x_ptr, y_ptr, dots_ptr, r, c, r_in, c_in, dim, stride_x, stride_y, stride_dots,
        PRECOMPUTED, BLOCK_R, BLOCK_C, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    inv_norm_x = tl.load(inv_norm_x_ptr + r, mask=r_in, other=0.0)
    inv_norm_y = tl.load(inv_norm_y_ptr + c, mask=c_in, other=0.0)
    cos = inv_norm_x[:, None] * dots * inv_norm_y[None, :]
    logits = tl.load(scale_ptr).to(tl.float32) * cos
    weights = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    global_rows = first_row + r
    if POSITIVE == 2:
        positive_cols = tl.load(labels_ptr + r, mask=r_in, other=-1).to(tl.int32)
    else:
        positive_cols = global_rows
    if ROW_TERMS:
        row_logits = _adjusted_row_logits(
            logits, cos, r, global_rows, c, r_in, c_in, positive_cols,
            gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
            guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
            HARDNESS, GUIDED, PRECOMPUTED, BLOCK_R, BLOCK_C, BLOCK_D, GUIDE_PRECISION,
        )  # fmt: skip
        row_lse = tl.load(row_lse_ptr + r, mask=r_in, other=0.0)
        row_weight = tl.load(row_weight_ptr + r, mask=r_in, other=0.0)
        weights += row_weight[:, None] * tl.exp(row_logits - row_lse[:, None])
    if COL_TERMS:
        c_terms = c < n_col_terms
        col_lse = tl.load(col_lse_ptr + c, mask=c_terms, other=0.0)
        col_weight = tl.load(col_weight_ptr + c, mask=c_terms, other=0.0)
        weights += tl.where(c_terms[None, :], col_weight[None, :] * tl.exp(logits - col_lse[None, :]), 0.0)
    if POSITIVE:
        positive_value = tl.load(positive_value_ptr + r, mask=r_in, other=0.0)
        weights = tl.where(c[None, :] == positive_cols[:, None], positive_value[:, None], weights)
    if EXCLUDE == 1:
        weights = tl.where(c[None, :] == global_rows[:, None], 0.0, weights)
    if EXCLUDE == 2:
        excluded_row = c % exclude_period
        weights = tl.where(excluded_row[None, :] == global_rows[:, None], 0.0, weights)
    weights = tl.where(r_in[:, None] & c_in[None, :], weights, 0.0)
    if SCALE_GRAD:
        tl.store(w_cos_ptr + program, tl.sum(tl.sum(weights * cos, axis=1), axis=0))
    out = w_ptr + r.to(tl.int64)[:, None] * stride_w + c[None, :]
    tl.store(out, weights.to(w_ptr.dtype.element_ty), mask=r_in[:, None] & c_in[None, :])


@dataclass(frozen=True)
class TileConfig:
    """Block sizes, warps, pipeline stages and launch grouping of one kernel launch."""

    name: str
    block_rows: int
    block_cols: int
    block_d: int
    num_warps: int
    num_stages: int
    group_rows: int = 8


FUSED_CONFIGS = {
    # Bytes per input element -> the tiles the fused strategy may use, its default first. D only
    # sets the trip count of the inner loop. An R x C tile re-reads (R + C) x D input elements
    # from L2 per R x C x D products, so its arithmetic intensity against L2 is R C / (R + C)
    # FLOPs per byte in half precision: 43 (128 x 64) or 64 (128 x 128); at ~7 TB/s of L2 that
    # caps a tile at ~300 or ~450 TFLOP/s. The 128 x 128 tile takes 16 warps (64 accumulators
    # a thread at 8 warps left its epilogue at 215-247 registers, one CTA of 8 warps per SM).
    # A 128 x 256 tile spills at any warp count: 16 warps allow 128 registers a thread, half of
    # them accumulators, and the epilogue's tiles need the rest twice over. "-s4" tiles keep
    # four loads in flight instead of three (more registers: fewer CTAs per SM). Which tile is
    # fastest is measured on the GPU (``"auto"`` times them). fp32 tiles hold twice the bytes per
    # element and take half the D slice to stay clear of register spills on sm_90.
    2: (
        TileConfig("128x64", block_rows=128, block_cols=64, block_d=64, num_warps=8, num_stages=3),
        TileConfig("128x64-s4", block_rows=128, block_cols=64, block_d=64, num_warps=8, num_stages=4),
        TileConfig("128x128", block_rows=128, block_cols=128, block_d=64, num_warps=16, num_stages=3),
        TileConfig("128x128-s4", block_rows=128, block_cols=128, block_d=64, num_warps=16, num_stages=4),
    ),
    4: (TileConfig("64x64", block_rows=64, block_cols=64, block_d=32, num_warps=4, num_stages=3),),
}
"""The tile space of the fused strategy; the ahead-of-time compile test builds every entry."""

PASS_CONFIGS = {
    # The gemm strategy's pass is memory-bound: it reads a chunk of fp32 dot products once, in
    # 16-byte vectors along the rows. Few rows a program keep the row statistics and the
    # labels' compares few (4 x 512: 63 registers, where 16 x 256 took 153-246).
    "forward": TileConfig("pass", block_rows=4, block_cols=512, block_d=16, num_warps=4, num_stages=1),
    "weights": TileConfig("pass", block_rows=8, block_cols=256, block_d=16, num_warps=4, num_stages=1),
}
"""The gemm strategy's pass over a chunk of precomputed dot products (``BLOCK_D`` is unused)."""


def weights_tile(config: TileConfig, row_and_col_terms: bool) -> TileConfig:
    """The tile of a weights launch: ``config``, at half the width for a block that carries both
    row and column softmax terms (symmetric losses, doc_to_query). Its two more per-column
    vectors (lse, weight) cost 16 registers each a thread at 64 columns; at 32 the 128-row tile
    keeps two CTAs per SM (92 registers instead of 165)."""
    if not row_and_col_terms or config.block_cols <= 32:
        return config
    return replace(config, name=f"{config.name}/cols", block_cols=config.block_cols // 2)


CTAS_PER_SM = {
    # (kernel, tile) -> the fewest CTAs of the bf16 kernel, over the flags the launchers use with
    # that tile, that fit one sm_90 SM (64K registers, 228 KB of shared memory less 1 KB per CTA,
    # 2048 threads), as the ahead-of-time compile test recomputes them (Triton 3.9; one CTA of
    # difference is tolerated across releases). The 128 x 64 tile fits two for every plain loss
    # (the test checks it); hardness weighting, the guide's tile and doc_to_doc's remainder take
    # one.
    ("forward", "128x64"): 1,
    ("weights", "128x64"): 1,
    ("weights", "128x64/cols"): 2,
    ("forward", "128x64-s4"): 1,
    ("weights", "128x64-s4"): 2,
    ("weights", "128x64-s4/cols"): 2,
    ("forward", "128x128"): 1,
    ("weights", "128x128"): 1,
    ("weights", "128x128/cols"): 1,
    ("forward", "128x128-s4"): 1,
    ("weights", "128x128-s4"): 1,
    ("weights", "128x128-s4/cols"): 1,
    ("forward", "pass"): 7,
    ("weights", "pass"): 6,
    ("weights", "pass/cols"): 10,
}
"""The occupancy table of the loss kernels."""


def fused_config(element_size: int, name: str | None = None) -> TileConfig:
    """The fused tile ``name`` for inputs of ``element_size`` bytes (default: the first)."""
    configs = FUSED_CONFIGS[element_size]
    if name is None:
        return configs[0]
    for config in configs:
        if config.name == name:
            return config
    raise KeyError(f"no fused tile {name!r} for {element_size}-byte inputs; have {[c.name for c in configs]}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow PyTorch's matmul setting (``torch.backends.cuda.matmul.fp32_precision``,
    which also reflects the global ``torch.backends.fp32_precision`` and the legacy
    ``allow_tf32`` / ``set_float32_matmul_precision``): TF32 only where the user allowed it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32":
        return "tf32"
    return "ieee"


def exclusion(period: int, n_cols: int) -> int:
    """The kernels' ``EXCLUDE`` for columns left out with ``period`` (0: none) among ``n_cols``."""
    if period == 0:
        return 0
    return 1 if period >= n_cols else 2


def ceil_div(numerator: int, denominator: int) -> int:
    # Not triton.cdiv: from Python it runs through Triton's JIT dispatch, ~6 µs a call.
    return -(-numerator // denominator)


TARGET_WAVES = 2
"""Forward programs per SM the key-range split aims for (two CTAs of the forward fit an SM)."""

MIN_KEY_BLOCKS_PER_SPLIT = 4
"""A key range holds at least this many key blocks: fewer would spend more on the merge and the
query-block loads than on the products."""


def forward_grid(n_rows: int, n_cols: int, config: TileConfig, sms: int) -> tuple[tuple[int, int], int]:
    """``((row blocks, splits), keys per split)`` of a forward launch: the keys are split into
    ranges so that every batch size launches about ``TARGET_WAVES`` programs per SM. The splits
    stay within CUDA's 65,535 of grid y: at most ``TARGET_WAVES x SMs`` of them."""
    row_blocks = ceil_div(n_rows, config.block_rows)
    col_blocks = ceil_div(n_cols, config.block_cols)
    wanted = ceil_div(TARGET_WAVES * sms, row_blocks)
    splits = max(1, min(wanted, col_blocks // MIN_KEY_BLOCKS_PER_SPLIT))
    blocks_per_split = max(1, ceil_div(col_blocks, splits))
    splits = max(1, ceil_div(col_blocks, blocks_per_split))
    return (row_blocks, splits), blocks_per_split * config.block_cols


def weights_grid(n_rows: int, n_cols: int, config: TileConfig) -> tuple[int]:
    """The one-dimensional grid of a weights launch: one program per ``(BLOCK_R, BLOCK_C)`` tile."""
    return (ceil_div(n_rows, config.block_rows) * ceil_div(n_cols, config.block_cols),)


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:
        return 132  # the H100 SXM: the interpreter's launches are sized as for the GPU they model
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return _sm_count(None)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
