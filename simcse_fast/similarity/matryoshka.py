"""The loss at several Matryoshka dimensions in one pass: ``sum_k w_k loss_k``, where ``loss_k``
is the package's loss (every direction, partition mode, labels, gathered rows) on the embeddings
truncated to their first ``d_k`` columns, ``cos_k(x_i, y_j) = <x_i[:d_k], y_j[:d_k]> a^k_i b^k_j``
with the prefix inverse norms ``a^k_i = 1 / max(|x_i[:d_k]|, eps)`` (sentence-transformers'
``MatryoshkaLoss``: truncate, normalize, score). Cost: the products of one full-dimension loss and
O(N M) elementwise work per dimension, where computing each dimension's loss separately costs the
products of every dimension (2.25x for 768, 512, 256, 128, 64).

Dimensions sorted ascending, ``d_0 < ... < d_{K-1}``; segment ``s`` is the columns
``[d_{s-1}, d_s)`` (``d_{-1} = 0``). Columns past ``d_{K-1}`` get no gradient.

Forward, a chunk of rows at a time: the prefix dot products are partial sums of the full D loop,
``dots_k = dots_{k-1} + x[:, seg_k] y[:, seg_k]^T``, accumulated inside the vendor GEMM (fp32
result: ``addmm_``; half operands on a GPU: ``addmm(..., out_dtype=float32)``), so all K
dimensions cost the products of one GEMM with ``D = d_{K-1}``. After each segment the
dimension's row statistics (log-sum-exp, and the sum without the positive) come from that
chunk, by the strategy's own pass: ``"gemm"`` runs the package's forward pass kernel
(``_lse_partial_kernel`` with ``PRECOMPUTED=True``) with the prefix inverse norms, ``"torch"``
tensor ops.

Backward: per dimension the logit-gradient weights ``W_k`` of the package (``W_k = g_k (P_k -
onehot)`` for the plain loss, ``g_k = w_k g``; every direction's row and column terms, the
positive's ``1 - P`` from the forward's sums without it), formed in fp32. Through the
normalization of the prefix, dimension ``k`` adds to the first ``d_k`` columns of ``x_i``

    s a^k_i (sum_j W_k,ij b^k_j y_j[:d_k] - r^k_i a^k_i x_i[:d_k]),   r^k_i = sum_j W_k,ij cos_k,ij

(``r^k`` is 0 for a prefix whose norm is clamped), and the same with rows and columns swapped
for ``y``. Summed over the dimensions that contain segment ``s``, with the ratios
``rho^k_i = a^k_i / a_i >= 1`` to the full-dimension inverse norm ``a_i``:

    dx[:, seg_s] = s a_i (What_s unit(y))[:, seg_s] - s x[:, seg_s] sum_{k >= s} (a^k_i)^2 r^k_i,
    What_s = sum_{k >= s} (rho^k sigma^k) o W_k                                    (o: elementwise)

with ``unit(y) = y b`` the full-dimension unit rows (the operand the package's single-dimension
backward uses). ``What_s`` is a suffix sum, formed in fp32 from the unrounded ``W_k`` (largest
dimension first) and rounded once to the inputs' dtype; its GEMM against ``unit(y)[:, seg_s]``
has K = M, so the backward's products again total one full-dimension GEMM, accumulated inside the
GEMM into one fp32 buffer per segment. The radial terms need only the O(N M) row (and column) sums
``r^k``, from the unrounded ``W_k``. ``d scale = (1 / c) sum_k sum_i r^k_i`` (row sums in fp32,
their total in fp64). ``c`` is one power of two for all dimensions, bringing a bound on
``|What_s|`` near 2**15 (``sum_k max(rho^k)^2 bound(W_k)``, the bound of the single-dimension
loss per dimension): fp16 weights stay out of the subnormals.

The ratios keep ``What`` independent of the embeddings' absolute norms (``rho`` is about
``sqrt(D / d)`` for typical embeddings), so the one scale stays tight. No float atomics (row and
column sums are written per tile and added in a fixed order), int64 offsets, no host
synchronization.

Accuracy: the single-dimension backward takes its radial term from the GEMM's result
(``<x^, U>``), so the rounding of ``W`` and of the products cancels in the projection. Here the
radial sums come from ``W_k`` and the cosines (``What_s`` mixes the dimensions, so no per-dimension
``U`` exists): when every embedding of a batch points the same way (cosines of 0.99, an untrained
encoder), the gradient's error is 2-3x the single-dimension loss's (fp32: about 1e-6 of a row;
half precision stays within the eager rule the tests hold it to).

Strategies: ``"torch"`` (any device; tensor ops form ``W_k`` and ``What``) and ``"gemm"`` (cuBLAS
for the products; Triton passes: the package's forward pass kernel per dimension, and
``_matryoshka_weights_kernel`` below, which reads every dimension's prefix dot products of a tile
and writes every ``What_s`` with the row and column sums of ``W_k cos_k``). The fused tiles of the
single-dimension loss recompute the products in-tile; here the products belong to cuBLAS, so
:func:`implementation_for` runs ``"gemm"`` wherever the selection picks a fused tile.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from .._triton import launch_device, tl, triton
from .fused import ForwardPartials, adjustment_arguments
from .gemm import _guide_dots, dot_chunk_rows
from .kernels import PASS_CONFIGS, TileConfig, _adjusted_row_logits, _guide_mask, ceil_div, exclusion
from .numerics import (
    CHUNK_ENV_VAR,
    NORM_EPS,
    Adjustment,
    Block,
    Side,
    accumulate_product,
    blocks,
    budget_rows,
    complement,
    direction_geometry,
    direction_positive,
    directions,
    inverse_norms,
    memory_budget,
    positive_columns,
    positive_slots,
    power_of_two_scale,
    row_loss,
    split_stats,
    weight_bound,
)
from .op import _Layout, _scale32
from .torch_path import adjust, guide_mask

MATRYOSHKA_PASS = TileConfig(
    "matryoshka", block_rows=16, block_cols=64, block_d=16, num_warps=4, num_stages=1
)
"""The tile of ``_matryoshka_weights_kernel``, a memory-bound pass over K fp32 chunks of dot
products: 8 elements a thread keep the heaviest flags at 92 registers on Triton 3.9 and 96 on
3.6 (32 x 64 took 140, three CTAs per SM), and 16 rows a tile keep the column sums it writes (a
row of them per row block) at 1/16 of what it reads."""

MATRYOSHKA_CTAS_PER_SM = {"bf16": 5, "bf16 adjusted": 4}
"""CTAs of the weights kernel (bf16, the heaviest flags) that fit one sm_90 SM, as the
ahead-of-time compile test recomputes them (Triton 3.9 and 3.6; one CTA of difference
tolerated): the plain losses, and with hardness weighting or GIST's guide (the symmetric block
with hardness, 106 registers on Triton 3.9 and 108 on 3.6, is the heaviest)."""

ROW_FIELDS = 5
"""Per-row values of one dimension, in this order: inverse norm, ratio to the full-dimension
inverse norm, row log-sum-exp, row weight, positive value (``_row_data``)."""
COL_FIELDS = 4
"""Per-column values of one dimension: inverse norm, ratio, column log-sum-exp, column weight."""

MATRYOSHKA_STRATEGIES = ("gemm", "torch")

TEMPORARY_BYTES = 16
"""Bytes per element of a torch chunk's fp32 temporaries on a GPU (cosines or logits, ``W``,
column terms), where a chunk is processed whole."""

LOG2E = math.log2(math.e)
"""The torch strategy forms its logits in base 2 (``log2(e) s cos``, the constant folded into the
per-row factor it multiplies by anyway) and exponentiates with ``exp2``: on a CPU ``torch.exp2``
runs 2.75x faster than ``torch.exp`` (0.30 against 0.83 ns an element with AVX-512), and the
loss takes 2K exponentials an element. Log-sum-exps are stored in natural units."""

SUB_BLOCK_ELEMENTS = 1 << 18
"""On a CPU the torch strategy runs its elementwise work on sub-blocks of about this many
elements (1 MiB of fp32) of a chunk: each dimension's dozen passes then run in the core's
cache instead of memory, about 2.5x faster, while the GEMMs keep their large chunks (a GEMM's
rate drops by a quarter from 512 rows to 227). A GPU processes the whole chunk at once."""


@triton.jit
def _matryoshka_weights_kernel(
    dots_ptr, row_data_ptr, col_data_ptr, scale_ptr, labels_ptr, w_ptr, row_sums_ptr, col_sums_ptr,
    gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
    n_rows, n_cols, n_col_terms, n_dims, stride_dots_dim, stride_dots, stride_w_dim, stride_w, first_row,
    exclude_period, guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
    ROW_TERMS: tl.constexpr, COL_TERMS: tl.constexpr, POSITIVE: tl.constexpr, EXCLUDE: tl.constexpr,
    HARDNESS: tl.constexpr, GUIDED: tl.constexpr, GUIDE_PRECISION: tl.constexpr, ROW_FIELDS: tl.constexpr,
    COL_FIELDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One ``(BLOCK_R, BLOCK_C)`` tile of every segment's ``What`` (module docstring). For
    ``k = n_dims - 1`` down to 0: ``cos_k = a^k_r dots_k[r, c] b^k_c`` from the chunk of prefix dot
    products of dimension ``k`` (``dots + k stride_dots_dim``), ``W_k`` by the formula of
    ``_gradient_weights_kernel`` (row terms, column terms for ``c < n_col_terms``, the row's
    positive value at its positive, 0 at the columns left out; ``EXCLUDE`` and ``POSITIVE`` as
    there), in fp32; ``What_k = What_{k+1} + rho^k_r sigma^k_c W_k`` is written to ``w + k
    stride_w_dim`` in its dtype, and the tile's row and column sums of ``W_k cos_k`` to
    ``row_sums[k, column block, r]`` and ``col_sums[k, row block, c]``.

    The row terms' logits are adjusted as ``_adjusted_row_logits`` says, at every dimension:
    ``HARDNESS`` with that dimension's cosines ``cos_k``; ``GUIDED`` by one mask of the tile, formed
    before the loop from the chunk's fp32 guide dot products (``guide_dots``, rows of the launch),
    since the guide's embeddings are not truncated. ``gx``, ``gy`` and ``GUIDE_PRECISION`` are
    unused (the guide's products are always precomputed).

    ``row_data`` is ``(n_dims, ROW_FIELDS, n_rows)`` fp32 (inverse norm, ratio, lse, weight,
    positive value), ``col_data`` ``(n_dims, COL_FIELDS, n_cols)`` (inverse norm, ratio, lse,
    weight). Row ``r`` of the launch is row ``first_row + r`` of the loss. One-dimensional grid
    (row blocks x column blocks).
    """
    program = tl.program_id(0)
    col_blocks = tl.cdiv(n_cols, BLOCK_C)
    row_blocks = tl.cdiv(n_rows, BLOCK_R)
    row_block = program // col_blocks
    col_block = program % col_blocks
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    r_in = r < n_rows
    c_in = c < n_cols
    keep = r_in[:, None] & c_in[None, :]
    global_rows = first_row + r
    if EXCLUDE == 1:
        keep = keep & (c[None, :] != global_rows[:, None])
    if EXCLUDE == 2:
        keep = keep & ((c % exclude_period)[None, :] != global_rows[:, None])
    if POSITIVE == 2:
        positive_cols = tl.load(labels_ptr + r, mask=r_in, other=-1).to(tl.int32)
    else:
        positive_cols = global_rows
    if GUIDED:
        guide_masked = _guide_mask(
            r, c, r_in, c_in, positive_cols, gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr,
            threshold_ptr, guide_dim, stride_gx, stride_gy, stride_guide_dots, GUIDED, True, BLOCK_R, BLOCK_C,
            16, GUIDE_PRECISION,
        )  # fmt: skip
    scale = tl.load(scale_ptr).to(tl.float32)
    # int64 per row, not per element: a chunk of dot products passes 2**31 elements at M = 10**7.
    dots_rows = dots_ptr + r.to(tl.int64) * stride_dots
    w_rows = w_ptr + r.to(tl.int64) * stride_w
    in_tile = r_in[:, None] & c_in[None, :]
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for step in range(0, n_dims):
        k = n_dims - 1 - step
        dots = tl.load(
            (dots_rows + k.to(tl.int64) * stride_dots_dim)[:, None] + c[None, :], mask=in_tile, other=0.0
        )
        # The per-row and per-column tables of a sub-chunk stay far below 2**31 entries.
        row_base = row_data_ptr + k * (ROW_FIELDS * n_rows)
        col_base = col_data_ptr + k * (COL_FIELDS * n_cols)
        inv_norm_x = tl.load(row_base + r, mask=r_in, other=0.0)
        inv_norm_y = tl.load(col_base + c, mask=c_in, other=0.0)
        cos = inv_norm_x[:, None] * dots * inv_norm_y[None, :]
        logits = scale * cos
        weights = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        if ROW_TERMS:
            row_logits = _adjusted_row_logits(
                logits, cos, r, global_rows, c, r_in, c_in, positive_cols,
                gx_ptr, gy_ptr, guide_dots_ptr, g_inv_x_ptr, g_inv_y_ptr, threshold_ptr,
                guide_dim, stride_gx, stride_gy, stride_guide_dots, hardness_strength, own_period,
                HARDNESS, 0, True, BLOCK_R, BLOCK_C, 16, GUIDE_PRECISION,
            )  # fmt: skip
            if GUIDED:
                row_logits = tl.where(guide_masked, float("-inf"), row_logits)
            row_lse = tl.load(row_base + 2 * n_rows + r, mask=r_in, other=0.0)
            row_weight = tl.load(row_base + 3 * n_rows + r, mask=r_in, other=0.0)
            weights += row_weight[:, None] * tl.exp(row_logits - row_lse[:, None])
        if COL_TERMS:
            c_terms = c < n_col_terms
            col_lse = tl.load(col_base + 2 * n_cols + c, mask=c_terms, other=0.0)
            col_weight = tl.load(col_base + 3 * n_cols + c, mask=c_terms, other=0.0)
            weights += tl.where(
                c_terms[None, :], col_weight[None, :] * tl.exp(logits - col_lse[None, :]), 0.0
            )
        if POSITIVE:
            positive_value = tl.load(row_base + 4 * n_rows + r, mask=r_in, other=0.0)
            weights = tl.where(c[None, :] == positive_cols[:, None], positive_value[:, None], weights)
        weights = tl.where(keep, weights, 0.0)
        products = weights * cos
        row_sums = row_sums_ptr + (k * col_blocks + col_block).to(tl.int64) * n_rows
        tl.store(row_sums + r, tl.sum(products, axis=1), mask=r_in)
        col_sums = col_sums_ptr + (k * row_blocks + row_block).to(tl.int64) * n_cols
        tl.store(col_sums + c, tl.sum(products, axis=0), mask=c_in)
        ratio_x = tl.load(row_base + n_rows + r, mask=r_in, other=0.0)
        ratio_y = tl.load(col_base + n_cols + c, mask=c_in, other=0.0)
        total += weights * (ratio_x[:, None] * ratio_y[None, :])
        out = (w_rows + k.to(tl.int64) * stride_w_dim)[:, None] + c[None, :]
        tl.store(out, total.to(w_ptr.dtype.element_ty), mask=in_tile)


def segments(dims: list[int]) -> list[tuple[int, int]]:
    """``[(0, d_0), (d_0, d_1), ...]`` of ascending ``dims``: the columns each dimension adds."""
    return list(zip([0, *dims[:-1]], dims, strict=True))


SINGLE_DIMENSION_CHUNK_BYTES = 16
"""Bytes per N x M element of the single-dimension loss's backward chunk on a CPU (``W`` and the
torch strategy's fp32 temporaries): the default budget of this op keeps as many rows a chunk."""


def matryoshka_budget(chunk_mb, n_queries: int, n_docs: int, dim: int, n_dims: int) -> int:
    """Bytes of N x M intermediates one call may hold: ``chunk_mb`` MiB or
    ``SIMCSE_FAST_LOSS_CHUNK_MB`` when given (exactly), else the single-dimension loss's default
    (``numerics.memory_budget``) grown so that a chunk keeps that loss's rows: the backward holds
    one buffer per dimension (``4 K`` bytes an element where the single-dimension loss holds 16),
    and a GEMM over fewer rows runs a quarter slower on a CPU. Five dimensions: 1.25x."""
    budget = memory_budget(chunk_mb, n_queries, n_docs, dim)
    if chunk_mb is not None or os.environ.get(CHUNK_ENV_VAR, "").strip():
        return budget
    return budget * max(SINGLE_DIMENSION_CHUNK_BYTES, 4 * n_dims) // SINGLE_DIMENSION_CHUNK_BYTES


def implementation_for(chosen: str) -> str:
    """The strategy of this op for the single-dimension loss's choice ``chosen``
    (``select.choose_implementation``): ``"torch"`` stays, everything else (``"gemm"``, a fused
    tile) runs ``"gemm"``: the products of several dimensions are shared through cuBLAS's
    accumulation, which in-tile recomputation cannot do."""
    return "torch" if chosen == "torch" else "gemm"


class Prefixes:
    """One input's prefix geometry: per dimension ``k`` the inverse norms ``a^k`` of
    ``x[:, :d_k]`` and their ratios ``a^k / a`` to the full-dimension inverse norm,
    ``(n_dims, rows)`` fp32 each, and ``x`` as a GEMM operand (an fp32 copy of half rows on a
    CPU, made once)."""

    def __init__(self, side: Side, dims: list[int]):
        self.side = side
        self.inv_norm = torch.stack([inverse_norms(side.x[:, :dim]) for dim in dims])
        self.ratio = self.inv_norm / side.inv_norm

    @functools.cached_property
    def operand(self) -> Tensor:
        return self.side.operand(self.side.x)

    @functools.cached_property
    def unit_operand(self) -> Tensor | None:
        """``x a``, the full-dimension unit rows in fp32, as the torch strategy's row operand
        where its GEMMs multiply fp32 anyway (a CPU, or fp32 inputs): the dot products then come
        out times ``a``, one elementwise pass less per dimension (fp32's rounding of the unit
        rows, 2**-24, is below the accumulation's). None for half inputs on a GPU, whose exact
        products the strategy keeps."""
        if self.side.x.is_cuda and self.side.x.dtype != torch.float32:
            return None
        return self.side.unit32

    def view(self, k: int) -> _PrefixView:
        return _PrefixView(self.side.x, self.inv_norm[k])


class _PrefixView:
    """What the forward pass kernel's launcher reads of a ``Side`` (its rows and inverse norms),
    with dimension ``k``'s prefix inverse norms."""

    def __init__(self, x: Tensor, inv_norm: Tensor):
        self.x, self.inv_norm = x, inv_norm


def _product(a: Tensor, b: Tensor, out: Tensor, previous: Tensor | None = None) -> Tensor:
    """``out = previous + a @ b`` (``out = a @ b`` without ``previous``) with an fp32 result:
    half operands on a GPU multiply exactly and accumulate in fp32."""
    if previous is None:
        if a.dtype == torch.float32:
            return torch.mm(a, b, out=out)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if a.dtype == torch.float32:
        return torch.addmm(previous, a, b, out=out)
    return torch.addmm(previous, a, b, out_dtype=torch.float32, out=out)


def prefix_dots(
    rows: Prefixes, row_slice: slice, cols: Prefixes, n_cols: int, bounds, out: Tensor, row_operand=None
):
    """Yields ``(k, <x[row_slice, :d_k], y[:n_cols, :d_k]>)`` for each dimension in ascending
    order, the fp32 dot products accumulated segment by segment inside the GEMM into ``out``
    ``(rows, n_cols)`` (the same buffer each time). ``row_operand``: the rows' operand in place
    of ``x`` (``Prefixes.unit_operand``)."""
    a_all = (rows.operand if row_operand is None else row_operand)[row_slice]
    b_all = cols.operand[:n_cols]
    for k, (lo, hi) in enumerate(bounds):
        a, b = a_all[:, lo:hi], b_all[:, lo:hi].T
        if k == 0:
            _product(a, b, out)
        else:
            accumulate_product(out, a, b)
        yield k, out


# Forward: each direction's row statistics at every dimension.


def _excluded_columns(first_row: int, n_rows: int, n_cols: int, period: int, device) -> Tensor:
    """The columns left out of rows ``first_row ..`` (``c mod period == row``; every row is below
    the period), as a ``(n_rows, ceil(n_cols / period))`` index for ``scatter_``: row ``i``'s
    columns ``i, i + period, ...``, padded with ``i`` itself."""
    rows = torch.arange(first_row, first_row + n_rows, device=device)[:, None]
    columns = rows + period * torch.arange(-(-n_cols // period), device=device)[None, :]
    return torch.where(columns < n_cols, columns, rows)


def _sub_rows(n_rows: int, n_cols: int, device: torch.device) -> int:
    """Rows of the sub-blocks a chunk's elementwise work runs on (``SUB_BLOCK_ELEMENTS``)."""
    if device.type == "cuda":
        return max(n_rows, 1)
    return max(1, min(n_rows, SUB_BLOCK_ELEMENTS // max(n_cols, 1)))


def _torch_chunk_rows(budget: int, bytes_per_element: int, n_rows: int, n_cols: int, device) -> int:
    """Rows of a chunk: the budget covers ``bytes_per_element`` of chunk buffers per element,
    plus on a GPU the whole chunk's temporaries (a CPU's sub-blocks are small). The rows are
    spread evenly over the chunks: a last chunk of a few rows would cost a GEMM call's whole
    overhead (packing the other operand) for little work."""
    if device.type == "cuda":
        bytes_per_element += TEMPORARY_BYTES
    step = budget_rows(budget, bytes_per_element * n_cols, n_rows)
    return -(-n_rows // -(-n_rows // step)) if n_rows else step


def _scaled_cosines(dots: Tensor, row_scale: Tensor | None, col_scale: Tensor, out: Tensor) -> Tensor:
    """``cos_k / rho^k = (dots a) b^k`` into ``out``, the one expression the torch strategy's
    forward and backward form them by; ``row_scale`` (``a``) is None where the GEMM's row operand
    already carries it."""
    if row_scale is None:
        return torch.mul(dots, col_scale, out=out)
    return torch.mul(dots, row_scale, out=out).mul_(col_scale)


def _torch_row_lse(
    rows: Prefixes, n_rows, cols: Prefixes, n_cols, period, positive, scale, bounds, budget, adjusted
):  # fmt: skip
    """Per chunk of rows the prefix dot products, dimension by dimension; each dimension's
    base-2 logits ``((dots a) b^k) (log2(e) s rho^k)`` (the expression of the backward), adjusted
    by ``adjusted`` (:func:`_adjuster`), reduced a sub-block at a time, the sum without the
    positive kept beside the positive's term. A guided softmax's mask is formed once per chunk,
    its guide cosines in the buffer the dot products then overwrite."""
    mode, labels = positive
    n_dims, device = len(bounds), rows.side.x.device
    guided = adjusted.guided > 0
    step = _torch_chunk_rows(budget, 4 + guided, n_rows, n_cols, device)
    sub = _sub_rows(step, n_cols, device)
    buffer = torch.empty(step * n_cols, dtype=torch.float32, device=device)
    mask_buffer = torch.empty(step * n_cols if guided else 0, dtype=torch.bool, device=device)
    cos_buffer, logits_buffer = (
        torch.empty(sub * n_cols, dtype=torch.float32, device=device) for _ in range(2)
    )
    # Per dimension and row: the shift, the sum of the terms other than the positive, its term.
    sums = torch.zeros((3, n_dims, n_rows), dtype=torch.float32, device=device)
    row_factor = rows.ratio[:, :n_rows] * (scale * LOG2E)
    adjuster = _adjuster(adjusted, rows.ratio[:, :n_rows])
    lowest = torch.finfo(torch.float32).min
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        out = buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
        columns = positive_columns(mode, labels, start, stop, 0, device) if mode else None
        excluded = _excluded_columns(start, stop - start, n_cols, period, device) if period else None
        masked = None
        if guided:
            mask = mask_buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
            masked = guide_mask(adjusted, slice(start, stop), n_cols, columns, out=mask, cos_out=out)
        chunk_dots = prefix_dots(rows, slice(start, stop), cols, n_cols, bounds, out, rows.unit_operand)
        for k, dots in chunk_dots:
            for first in range(start, stop, sub):
                last = min(first + sub, stop)
                here = slice(first - start, last - start)
                cos = cos_buffer[: (last - first) * n_cols].view(last - first, n_cols)
                logits = logits_buffer[: (last - first) * n_cols].view(last - first, n_cols)
                row_scale = None if rows.unit_operand is not None else rows.side.inv_norm[first:last, None]
                _scaled_cosines(dots[here], row_scale, cols.inv_norm[k, None, :n_cols], cos)
                torch.mul(cos, row_factor[k, first:last, None], out=logits)
                if adjuster is not None:
                    columns_here = None if columns is None else columns[here]
                    masked_here = None if masked is None else masked[here]
                    adjuster(logits, cos, k, slice(first, last), columns_here, masked_here)
                if excluded is not None:
                    logits.scatter_(1, excluded[here], float("-inf"))
                shift = sums[0, k, first:last, None]
                if n_cols:
                    # A row with no term keeps a finite shift (its sum is 0: lse -inf); NaN stays.
                    torch.amax(logits, dim=1, keepdim=True, out=shift).clamp_min_(lowest)
                terms = torch.exp2(logits.sub_(shift), out=logits)
                if mode:
                    torch.gather(terms, 1, columns[here], out=sums[2, k, first:last, None])
                    terms.scatter_(1, columns[here], 0.0)
                torch.sum(terms, dim=1, out=sums[1, k, first:last])
    shift, negatives, positive_terms = sums
    # The sum without the positive first, the positive added to it: no difference of sums.
    lse = (shift + (negatives + positive_terms).log2()) / LOG2E
    return lse, ((shift + negatives.log2()) / LOG2E if mode else None)


def _adjuster(adjusted: Adjustment, ratio: Tensor):
    """How the torch strategy adjusts dimension ``k``'s base-2 row logits (``torch_path.adjust``,
    in place), or None for a plain softmax: called as ``(logits, cos, k, rows, positive columns,
    the guide's mask of the rows or None)`` with ``cos = cos_k / rho^k`` (``_scaled_cosines``) of
    rows ``rows`` of the loss (``ratio``: ``rho^k`` of rows ``0..``). Hardness adds
    ``alpha log2(e) cos_k = cos (alpha log2(e) rho^k)``, a per-row strength like the scale's
    factor; the guide's mask is the same at every dimension."""
    if not (adjusted.hardness or adjusted.guided):
        return None
    strength = ratio * (adjusted.hardness_strength * LOG2E) if adjusted.hardness else None

    def apply(logits, cos, k, rows, columns, masked):
        row_strength = None if strength is None else strength[k, rows, None]
        adjust(logits, cos, rows, adjusted, columns, masked, row_strength)

    return apply


def _gemm_row_lse(
    rows: Prefixes, n_rows, cols: Prefixes, n_cols, period, positive, scale, bounds, budget, adjusted
):  # fmt: skip
    """Per chunk of rows the prefix dot products and, for a guided softmax, the guide's (cuBLAS,
    once per chunk); each dimension's forward pass kernel reads the chunk's guide products."""
    device = rows.side.x.device
    guided = adjusted.guided > 0
    step = dot_chunk_rows(n_rows, n_cols, budget // (2 if guided else 1), device)
    buffer = torch.empty(step * n_cols, dtype=torch.float32, device=device)
    guide_buffer = torch.empty(step * n_cols if guided else 0, dtype=torch.float32, device=device)
    partials = [
        ForwardPartials(n_rows, step, n_cols, PASS_CONFIGS["forward"], device) for _ in range(len(bounds))
    ]
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        out = buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
        guide_dots = _guide_dots(adjusted, start, stop, n_cols, guide_buffer)
        for k, dots in prefix_dots(rows, slice(start, stop), cols, n_cols, bounds, out):
            partials[k].launch(
                rows.view(k), start, stop, cols.view(k), n_cols, period, positive, scale, adjusted,
                dots=dots, guide_dots=guide_dots,
            )  # fmt: skip
    merged = [partial.merge(bool(positive[0])) for partial in partials]
    lse = torch.stack([pair[0] for pair in merged])
    return lse, (torch.stack([pair[1] for pair in merged]) if positive[0] else None)


def _row_lse(strategy, rows, n_rows, cols, n_cols, period, positive, scale, bounds, budget, adjusted):
    """``(lse (n_dims, n_rows), lse without the positive (n_dims, n_rows) or None)``."""
    if n_rows == 0:
        empty = torch.empty((len(bounds), 0), dtype=torch.float32, device=rows.side.x.device)
        return empty, (empty if positive[0] else None)
    row_lse = _torch_row_lse if strategy == "torch" else _gemm_row_lse
    return row_lse(rows, n_rows, cols, n_cols, period, positive, scale, bounds, budget, adjusted)


def _positive_logits(q: Prefixes, d: Prefixes, n_local: int, labels, bounds, scale) -> Tensor:
    """``s cos_k(q_i, d_{label_i})`` for every dimension, ``(n_dims, n_local)`` fp32: the exact
    products summed in fp32 segment by segment (O(N D))."""
    docs = d.side.x[:n_local] if labels is None else d.side.x.index_select(0, labels)
    inv_docs = d.inv_norm[:, :n_local] if labels is None else d.inv_norm.index_select(1, labels)
    products = q.side.x[:n_local].float() * docs.float()
    sums = torch.stack([products[:, lo:hi].sum(dim=1) for lo, hi in bounds]).cumsum(dim=0)
    return scale * (sums * q.inv_norm[:, :n_local] * inv_docs)


def _setup(queries, docs, dims, scale, n_local, flags, hardness, hardness_strength, doc_block, guide_args):
    """The op's and its backward's common start: ``(q, d, pq, pd, bounds, scale32, layout)``: the
    sides, their prefixes, the segments' bounds, the scale as a one-element fp32 tensor and the
    directions' layout with their adjustments."""
    q, d = Side(queries), Side(docs)
    scale32 = _scale32(scale)
    layout = _Layout(n_local, flags, hardness, hardness_strength, doc_block, guide_args)
    return q, d, Prefixes(q, dims), Prefixes(d, dims), segments(dims), scale32, layout


def _check_implementation(implementation: str) -> None:
    if implementation not in MATRYOSHKA_STRATEGIES:
        raise ValueError(f"the Matryoshka loss runs {MATRYOSHKA_STRATEGIES}; got {implementation!r}")


@torch.library.custom_op("simcse_fast::matryoshka_loss", mutates_args=())
def matryoshka_loss_op(
    queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None, dims: list[int],
    weights: list[float], n_local: int, query_to_query: bool, doc_to_query: bool, doc_to_doc: bool,
    joint: bool, with_positive: bool, exclude_diagonal: bool, implementation: str, budget: int,
    hardness: int, hardness_strength: float, doc_block: int, guide_queries: Tensor | None,
    guide_docs: Tensor | None, margin: float, relative_margin: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``sum_k weights[k] loss_k`` per row, ``(n_local,)`` fp32, where ``loss_k`` is
    ``contrastive_loss_op``'s per-row loss (same flags and adjustment) on the first ``dims[k]``
    columns (``dims`` ascending, distinct, in ``[1, D]``); and the row statistics the backward
    reuses, ``(n_dims, #directions + #directions with a positive, n_local)`` fp32.
    ``implementation``: ``"torch"`` or ``"gemm"``. Inputs already checked.

    ``hardness``/``hardness_strength``, ``doc_block`` and GIST's guide (``guide_queries``,
    ``guide_docs``, ``margin``, ``relative_margin``) as in ``contrastive_loss_op``: hardness weighting
    adds ``hardness_strength cos_k`` with each dimension's own cosines; the guide's embeddings are
    not truncated (sentence-transformers' ``MatryoshkaLoss`` truncates the model's only), so its
    thresholds and mask are the same at every dimension and are formed once per chunk."""
    _check_implementation(implementation)
    flags = (query_to_query, doc_to_query, doc_to_doc, joint, with_positive, exclude_diagonal)
    guide_args = (guide_queries, guide_docs, margin, relative_margin)
    q, d, pq, pd, bounds, scale32, layout = _setup(
        queries, docs, dims, scale, n_local, flags, hardness, hardness_strength, doc_block, guide_args
    )
    chosen = layout.chosen
    lses, negative_lses = [], []
    for direction in chosen:
        n_cols, period = direction_geometry(direction, q.rows, d.rows, doc_block)
        rows, cols = (pq if direction.rows_are_queries else pd), (pq if direction.cols_are_queries else pd)
        positive = direction_positive(direction, labels)
        lse, negative_lse = _row_lse(
            implementation, rows, n_local, cols, n_cols, period, positive, scale32, bounds, budget,
            layout.adjustments[direction.name],
        )  # fmt: skip
        lses.append(lse)
        if negative_lse is not None:
            negative_lses.append(negative_lse)
    stats = torch.stack(lses + negative_lses, dim=1)  # (n_dims, #statistics, n_local)
    positive_logits = _positive_logits(pq, pd, n_local, labels, bounds, scale32) if with_positive else None
    loss = torch.zeros(n_local, dtype=torch.float32, device=queries.device)
    for k, weight in enumerate(weights):
        lse, negative_lse = split_stats(stats[k], chosen)
        positive_k = None if positive_logits is None else positive_logits[k]
        loss = loss + weight * row_loss(lse, negative_lse, chosen, positive_k, joint)
    return loss, stats


@matryoshka_loss_op.register_fake
def _matryoshka_loss_fake(
    queries, docs, scale, labels, dims, weights, n_local, query_to_query, doc_to_query, doc_to_doc, joint,
    with_positive, exclude_diagonal, implementation, budget, hardness, hardness_strength, doc_block,
    guide_queries, guide_docs, margin, relative_margin,
):  # fmt: skip
    chosen = directions(
        query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive, hardness > 0,
        guide_queries is not None,
    )  # fmt: skip
    n_stats = len(chosen) + positive_slots(chosen)
    return (
        queries.new_empty((n_local,), dtype=torch.float32),
        queries.new_empty((len(dims), n_stats, n_local), dtype=torch.float32),
    )


# Backward: every dimension's W, the segments' What, the GEMMs, the epilogue.


class _Gradient:
    """One input's backward accumulators: ``U_s`` ``(rows, width of segment s)`` fp32 per
    segment (the GEMM results) and the row sums ``r^k`` ``(n_dims, rows)`` fp32."""

    def __init__(self, prefixes: Prefixes, bounds):
        x = prefixes.side.x
        self.prefixes = prefixes
        self.u = [
            torch.zeros((x.shape[0], hi - lo), dtype=torch.float32, device=x.device) for lo, hi in bounds
        ]
        self.radial = torch.zeros(prefixes.inv_norm.shape, dtype=torch.float32, device=x.device)

    def result(self, factor: Tensor, bounds) -> Tensor:
        """``dx`` in ``x``'s dtype, ``(rows, D)``: per segment ``factor (a U_s - x[:, seg_s]
        sum_{k >= s} (a^k)^2 r^k)``, no radial term for a clamped prefix norm; zero past the
        largest dimension."""
        side, inv_norm = self.prefixes.side, self.prefixes.inv_norm
        radial = torch.where(
            inv_norm < 1.0 / NORM_EPS, inv_norm * inv_norm * self.radial, torch.zeros_like(inv_norm)
        )
        # Suffix sums over the dimensions: segment s lies in every dimension k >= s.
        radial = radial.flip(0).cumsum(dim=0).flip(0)
        grad = torch.zeros((side.rows, side.dim), dtype=side.x.dtype, device=side.x.device)
        for s, (lo, hi) in enumerate(bounds):
            u = self.u[s].mul_(side.inv_norm[:, None])
            u.addcmul_(side.x[:, lo:hi].float(), radial[s, :, None], value=-1.0).mul_(factor)
            grad[:, lo:hi] = u
        return grad


class _RowTerms:
    """One dimension's values of a block for the torch strategy: the row and column
    log-sum-exps in base 2, the row factor ``rho^k`` folded into the row weight and the positive
    value, ``rho^k`` itself (for the column terms)."""

    def __init__(self, block: Block, ratio: Tensor):
        self.block, self.ratio = block, ratio
        self.lse = None if block.row_lse is None else block.row_lse * LOG2E
        self.col_lse = None if block.col_lse is None else block.col_lse * LOG2E
        self.weight = None if block.row_weight is None else block.row_weight * ratio
        self.positive = None if block.positive_value is None else (block.positive_value * ratio)[:, None]


def _torch_weights(
    terms: _RowTerms, logits: Tensor, rows: slice, columns, excluded, adjust_rows=None
) -> Tensor:
    """``rho^k W_k`` of the block's rows ``rows`` in fp32, in place of their base-2 ``logits``
    (except for a block of column terms only): the formula of ``_gradient_weights_kernel`` in
    tensor ops. ``columns``: each row's positive column; ``excluded``: its columns left out (or
    None); ``adjust_rows``: adjusts the row terms' logits in place (the column terms' stay plain),
    or None."""
    block = terms.block
    n_terms = block.n_col_terms
    col_part = None
    if terms.col_lse is not None:
        col_part = torch.exp2(logits[:, :n_terms] - terms.col_lse[None, :]).mul_(block.col_weight[None, :])
        col_part.mul_(terms.ratio[rows, None])
    if terms.lse is None:
        weights = col_part  # a block of column terms only spans exactly those columns
    else:
        if adjust_rows is not None:
            adjust_rows(logits)
        weights = torch.exp2(logits.sub_(terms.lse[rows, None]), out=logits).mul_(terms.weight[rows, None])
        if col_part is not None:
            weights[:, :n_terms] += col_part
    if columns is not None:
        weights.scatter_(1, columns, terms.positive[rows])
    if excluded is not None:
        weights.scatter_(1, excluded, 0.0)
    return weights


def _torch_chunks(per_dim: list[Block], rows: Prefixes, cols: Prefixes, scale, bounds, budget):
    """Yields ``(start, stop, What (n_dims, rows, n_cols) fp32, row sums (n_dims, rows), column
    sums (n_dims, n_cols))`` over budget-sized chunks of the block's rows. A chunk's K buffers
    first receive the prefix dot products of each dimension (the GEMM accumulating segment by
    segment), then, largest dimension first, each becomes ``What_k`` in place: ``dots_k`` is read
    once, when ``W_k`` is formed, and the suffix sum runs on the sub-block in cache. With
    ``cos' = (dots a) b^k = cos_k / rho^k`` and ``rho^k W_k`` (the row factor folded into the
    row's weights), ``sum_j rho^k W_k cos'`` is ``r^k`` itself and ``What_k`` takes one more
    product by ``sigma^k``. The row logits are adjusted as the forward adjusts them
    (:func:`_adjuster`), a guided block's mask formed once per chunk (in the first buffer, before
    the dot products)."""
    block = per_dim[0]
    n_rows, n_cols, n_dims = block.n_rows, block.n_cols, len(per_dim)
    device = rows.side.x.device
    adjusted = block.adjustment
    guided = adjusted.guided > 0
    step = _torch_chunk_rows(budget, 4 * n_dims + guided, n_rows, n_cols, device)
    sub = _sub_rows(step, n_cols, device)
    buffer = torch.empty(n_dims * step * n_cols, dtype=torch.float32, device=device)
    mask_buffer = torch.empty(step * n_cols if guided else 0, dtype=torch.bool, device=device)
    cos_buffer, w_buffer = (torch.empty(sub * n_cols, dtype=torch.float32, device=device) for _ in range(2))
    block_rows = slice(block.row_start, block.row_start + n_rows)
    ratio = rows.ratio[:, block_rows]
    logit_factor, inv_norm = ratio * (scale * LOG2E), rows.side.inv_norm[block_rows, None]
    adjuster = _adjuster(adjusted, rows.ratio)
    row_operand = rows.unit_operand
    row_terms = [_RowTerms(b, ratio[k]) for k, b in enumerate(per_dim)]
    col_inv_norm, col_ratio = cols.inv_norm[:, None, :n_cols], cols.ratio[:, None, :n_cols]
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        global_rows = slice(block.row_start + start, block.row_start + stop)
        chunk = buffer[: n_dims * (stop - start) * n_cols].view(n_dims, stop - start, n_cols)
        columns, excluded, masked = None, None, None
        if block.positive_mode:
            columns = positive_columns(
                block.positive_mode, block.labels, start, stop, block.row_start, device
            )
        if block.exclude_period:
            excluded = _excluded_columns(
                block.row_start + start, stop - start, n_cols, block.exclude_period, device
            )
        if guided:
            mask = mask_buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
            masked = guide_mask(adjusted, global_rows, n_cols, columns, out=mask, cos_out=chunk[0])
        a_all = (rows.operand if row_operand is None else row_operand)[global_rows]
        b_all = cols.operand[:n_cols]
        for k, (lo, hi) in enumerate(bounds):
            _product(a_all[:, lo:hi], b_all[:, lo:hi].T, chunk[k], None if k == 0 else chunk[k - 1])
        row_sums = torch.empty((n_dims, stop - start), dtype=torch.float32, device=device)
        col_partials = torch.empty(
            (n_dims, -(-(stop - start) // sub), n_cols), dtype=torch.float32, device=device
        )
        for index, first in enumerate(range(0, stop - start, sub)):
            last = min(first + sub, stop - start)
            here, rows_here = slice(first, last), slice(start + first, start + last)
            loss_rows = slice(block.row_start + start + first, block.row_start + start + last)
            cos = cos_buffer[: (last - first) * n_cols].view(last - first, n_cols)
            logits = w_buffer[: (last - first) * n_cols].view(last - first, n_cols)
            columns_here = None if columns is None else columns[here]
            excluded_here = None if excluded is None else excluded[here]
            masked_here = None if masked is None else masked[here]
            a_here = None if row_operand is not None else inv_norm[rows_here]
            factor_here = logit_factor[:, rows_here, None]
            for k in range(n_dims - 1, -1, -1):
                dots = chunk[k, here]
                _scaled_cosines(dots, a_here, col_inv_norm[k], cos)
                # The forward's logits, by the same expression.
                torch.mul(cos, factor_here[k], out=logits)
                adjust_rows = None
                if adjuster is not None:
                    adjust_rows = functools.partial(
                        adjuster, cos=cos, k=k, rows=loss_rows, columns=columns_here, masked=masked_here
                    )
                weights = _torch_weights(
                    row_terms[k], logits, rows_here, columns_here, excluded_here, adjust_rows
                )
                # Row sums in fp32 (their total for d scale in fp64, by the caller).
                torch.linalg.vecdot(weights, cos, out=row_sums[k, here])
                torch.sum(cos.mul_(weights), dim=0, out=col_partials[k, index])
                if k == n_dims - 1:
                    torch.mul(weights, col_ratio[k], out=dots)
                else:
                    torch.addcmul(chunk[k + 1, here], weights, col_ratio[k], out=dots)
        yield start, stop, chunk, row_sums, col_partials.sum(dim=1)


def _pack(values: list[Tensor | None], length: int, like: Tensor) -> Tensor:
    """The per-index values of one dimension as a ``(len(values), length)`` fp32 block; a
    missing or shorter array reads as zeros."""
    packed = like.new_zeros((len(values), length), dtype=torch.float32)
    for index, value in enumerate(values):
        if value is not None:
            packed[index, : value.shape[0]] = value
    return packed


def _row_data(block: Block, rows: Prefixes, k: int, global_rows: slice, first: int, last: int, like):
    """``_matryoshka_weights_kernel``'s per-row values (``ROW_FIELDS``) of dimension ``k`` for the
    block's rows ``first:last``."""

    def part(values):
        return None if values is None else values[first:last]

    values = [rows.inv_norm[k, global_rows], rows.ratio[k, global_rows], part(block.row_lse),
              part(block.row_weight), part(block.positive_value)]  # fmt: skip
    return _pack(values, last - first, like)


def _gemm_chunks(per_dim: list[Block], rows: Prefixes, cols: Prefixes, scale, bounds, budget):
    """``_torch_chunks`` by cuBLAS and ``_matryoshka_weights_kernel``: per L2-sized sub-chunk of
    rows, every dimension's prefix dot products (``dots_k = dots_{k-1} + segment``) and, for a
    guided block, the guide's, then one pass writing every ``What_s`` into a budget-sized chunk."""
    block = per_dim[0]
    n_rows, n_cols, n_dims = block.n_rows, block.n_cols, len(per_dim)
    device, element = rows.side.x.device, rows.side.x.element_size()
    adjusted = block.adjustment
    n_buffers = n_dims + (adjusted.guided > 0)
    sub = dot_chunk_rows(n_rows, n_cols * n_buffers, budget // 2, device)
    dots_buffer = torch.empty(n_dims * sub * n_cols, dtype=torch.float32, device=device)
    guide_buffer = torch.empty((n_buffers - n_dims) * sub * n_cols, dtype=torch.float32, device=device)
    step = max(sub, budget_rows(budget - 4 * n_buffers * sub * n_cols, n_dims * n_cols * element, n_rows))
    what_buffer = rows.side.x.new_empty(n_dims * step * n_cols)
    col_data = torch.stack(
        [
            _pack([cols.inv_norm[k, :n_cols], cols.ratio[k, :n_cols], b.col_lse, b.col_weight], n_cols, scale)
            for k, b in enumerate(per_dim)
        ]
    )  # fmt: skip
    config = MATRYOSHKA_PASS
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        what = what_buffer[: n_dims * (stop - start) * n_cols].view(n_dims, stop - start, n_cols)
        row_sums, col_sums = [], torch.zeros((n_dims, n_cols), dtype=torch.float32, device=device)
        for first in range(start, stop, sub):
            last = min(first + sub, stop)
            global_rows = slice(block.row_start + first, block.row_start + last)
            dots = dots_buffer[: n_dims * (last - first) * n_cols].view(n_dims, last - first, n_cols)
            a_all, b_all = rows.operand[global_rows], cols.operand[:n_cols]
            for k, (lo, hi) in enumerate(bounds):
                _product(a_all[:, lo:hi], b_all[:, lo:hi].T, dots[k], None if k == 0 else dots[k - 1])
            guide_dots = _guide_dots(adjusted, global_rows.start, global_rows.stop, n_cols, guide_buffer)
            row_data = torch.stack(
                [_row_data(b, rows, k, global_rows, first, last, scale) for k, b in enumerate(per_dim)]
            )
            pointers, integers, constexprs = adjustment_arguments(
                adjusted, global_rows.start, row_data, guide_dots
            )
            row_blocks, col_blocks = (
                ceil_div(last - first, config.block_rows),
                ceil_div(n_cols, config.block_cols),
            )
            partial_rows = torch.empty((n_dims, col_blocks, last - first), dtype=torch.float32, device=device)
            partial_cols = torch.empty((n_dims, row_blocks, n_cols), dtype=torch.float32, device=device)
            out = what[:, first - start :]
            labels = row_data if block.labels is None else block.labels[first:last]
            with launch_device(device):
                _matryoshka_weights_kernel[(row_blocks * col_blocks,)](
                    dots, row_data, col_data, scale, labels, out, partial_rows, partial_cols, *pointers,
                    last - first, n_cols, block.n_col_terms, n_dims, dots.stride(0), dots.stride(1),
                    out.stride(0), out.stride(1), block.row_start + first, max(block.exclude_period, 1),
                    *integers,
                    ROW_TERMS=block.row_lse is not None, COL_TERMS=block.col_lse is not None,
                    POSITIVE=block.positive_mode, EXCLUDE=exclusion(block.exclude_period, n_cols),
                    **constexprs, ROW_FIELDS=ROW_FIELDS, COL_FIELDS=COL_FIELDS, BLOCK_R=config.block_rows,
                    BLOCK_C=config.block_cols, num_warps=config.num_warps, num_stages=config.num_stages,
                )  # fmt: skip
            row_sums.append(partial_rows.sum(dim=1))
            col_sums += partial_cols.sum(dim=1)
        yield start, stop, what, torch.cat(row_sums, dim=1), col_sums


def _accumulate(per_dim: list[Block], grads: dict, scale, implementation, bounds, budget) -> Tensor:
    """The block's share of the backward: ``U_rows[:, seg_s] += What_s @ unit(cols)[:, seg_s]``
    and ``U_cols[:, seg_s] += What_s^T @ unit(rows)[:, seg_s]`` per segment, inside the GEMM; the
    row and column sums of ``W_k cos_k`` added to the inputs' ``r^k``. Returns ``sum_k sum W_k
    cos_k`` (fp64 total of fp32 row sums)."""
    block = per_dim[0]
    w_cos = torch.zeros((), dtype=torch.float64, device=block.rows.x.device)
    if block.n_rows == 0 or block.n_cols == 0:
        return w_cos
    rows, cols = grads[id(block.rows)], grads[id(block.cols)]
    chunks = _torch_chunks if implementation == "torch" else _gemm_chunks
    rows_unit, cols_unit = block.rows.unit, block.cols.unit[: block.n_cols]
    for start, stop, what, row_sums, col_sums in chunks(
        per_dim, rows.prefixes, cols.prefixes, scale, bounds, budget
    ):
        global_rows = slice(block.row_start + start, block.row_start + stop)
        for s, (lo, hi) in enumerate(bounds):
            # Rounded once to the inputs' dtype (the torch strategy forms What in fp32).
            weights = what[s].to(block.rows.x.dtype)
            accumulate_product(rows.u[s][global_rows], weights, cols_unit[:, lo:hi])
            accumulate_product(cols.u[s][: block.n_cols], weights.T, rows_unit[global_rows, lo:hi])
        rows.radial[:, global_rows] += row_sums
        cols.radial[:, : block.n_cols] += col_sums
        w_cos = w_cos + row_sums.sum(dtype=torch.float64)
    return w_cos


@torch.library.custom_op("simcse_fast::matryoshka_loss_backward", mutates_args=())
def matryoshka_loss_backward_op(
    grad_loss: Tensor, queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None, stats: Tensor,
    dims: list[int], weights: list[float], n_local: int, query_to_query: bool, doc_to_query: bool,
    doc_to_doc: bool, joint: bool, with_positive: bool, exclude_diagonal: bool, implementation: str,
    budget: int, hardness: int, hardness_strength: float, doc_block: int, guide_queries: Tensor | None,
    guide_docs: Tensor | None, margin: float, relative_margin: bool, scale_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`matryoshka_loss_op`'s per-row loss in queries, docs and scale (zero
    unless ``scale_grad``). The guide gets no gradient (sentence-transformers computes it without
    one); hardness weighting's term is a stop-gradient, so ``W_k`` keeps the factor ``s``."""
    _check_implementation(implementation)
    flags = (query_to_query, doc_to_query, doc_to_doc, joint, with_positive, exclude_diagonal)
    guide_args = (guide_queries, guide_docs, margin, relative_margin)
    q, d, pq, pd, bounds, scale32, layout = _setup(
        queries, docs, dims, scale, n_local, flags, hardness, hardness_strength, doc_block, guide_args
    )
    chosen = layout.chosen
    grad = grad_loss.float()
    per_dim_stats = [split_stats(stats[k], chosen) for k in range(len(dims))]
    complements = [complement(lse, negative_lse, chosen, joint) for lse, negative_lse in per_dim_stats]
    # One power of two for every What_s: |What_s| <= sum_k max(rho^k)^2 max |W_k|.
    largest = torch.zeros((), dtype=torch.float32, device=queries.device)
    for k, weight in enumerate(weights):
        rho = torch.maximum(pq.ratio[k].amax(), pd.ratio[k].amax())
        largest = largest + rho * rho * weight_bound(complements[k], chosen, grad * abs(weight), joint)
    w_scale = power_of_two_scale(largest)
    empty = torch.empty(0, dtype=torch.float32, device=queries.device)
    per_dim_blocks = []
    for k, (lse, _) in enumerate(per_dim_stats):
        scaled_grad = (grad * (weights[k] * w_scale)).contiguous()
        dim_blocks = blocks(
            q, d, n_local, chosen, lse, complements[k], empty, scaled_grad, labels, joint, doc_block,
            layout.adjustments,
        )  # fmt: skip
        per_dim_blocks.append(dim_blocks)
    grads = {id(q): _Gradient(pq, bounds), id(d): _Gradient(pd, bounds)}
    w_cos = torch.zeros((), dtype=torch.float64, device=queries.device)
    for per_dim in zip(*per_dim_blocks, strict=True):
        w_cos = w_cos + _accumulate(list(per_dim), grads, scale32, implementation, bounds, budget)
    factor = scale32 / w_scale
    grad_scale = (w_cos.float() / w_scale) if scale_grad else torch.zeros_like(w_scale)
    return (
        grads[id(q)].result(factor, bounds),
        grads[id(d)].result(factor, bounds),
        grad_scale.reshape(scale.shape).to(scale.dtype),
    )


@matryoshka_loss_backward_op.register_fake
def _matryoshka_loss_backward_fake(grad_loss, queries, docs, scale, *_args):
    return queries.new_empty(queries.shape), docs.new_empty(docs.shape), scale.new_empty(scale.shape)


_FLAGS = (
    "dims", "weights", "n_local", "query_to_query", "doc_to_query", "doc_to_doc", "joint", "with_positive",
    "exclude_diagonal", "implementation", "budget", "hardness", "hardness_strength", "doc_block",
)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    queries, docs, scale, labels, *rest = inputs
    *flags, guide_queries, guide_docs, margin, relative_margin = rest
    _, stats = output
    ctx.save_for_backward(queries, docs, scale, labels, stats, guide_queries, guide_docs)
    ctx.flags = dict(zip(_FLAGS, flags, strict=True))
    ctx.guide_flags = (margin, relative_margin)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_loss: Tensor, _grad_stats):
    queries, docs, scale, labels, stats, guide_queries, guide_docs = ctx.saved_tensors
    grads = matryoshka_loss_backward_op(
        grad_loss, queries, docs, scale, labels, stats, *ctx.flags.values(), guide_queries, guide_docs,
        *ctx.guide_flags, ctx.needs_input_grad[2],
    )  # fmt: skip
    return *grads, *([None] * (1 + len(_FLAGS) + 4))


matryoshka_loss_op.register_autograd(_backward, setup_context=_setup_context)
