"""Strategy ``"fused"``: Triton tiles recompute the dot products (``PRECOMPUTED=False``), so no
chunk of them is ever written; the forward streams key tiles past a block of query rows
(flash-attention style), the backward writes ``W`` a budget-sized chunk of rows at a time and the
vendor GEMM does the two products. The tile (``kernels.FUSED_CONFIGS``) is part of the strategy's
name: ``"fused:128x128"``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import launch_device
from .kernels import (
    _gradient_weights_kernel,
    _lse_partial_kernel,
    ceil_div,
    dot_precision,
    exclusion,
    forward_grid,
    fused_config,
    sm_count,
    weights_grid,
    weights_tile,
)
from .numerics import NO_ADJUSTMENT, Adjustment, Block, Side, budget_rows, merge_partials


def adjustment_arguments(adjusted: Adjustment, start: int, unused: Tensor, guide_dots: Tensor | None):
    """``(pointers, integers, constexprs)`` of the kernels' hardness and guide arguments for rows
    ``start..`` of a row softmax adjusted by ``adjusted`` (``_adjusted_row_logits``); an unused
    pointer takes ``unused``. ``guide_dots``: the rows' fp32 guide dot products when precomputed."""
    rows, cols = adjusted.guide_rows, adjusted.guide_cols
    if not adjusted.guided:
        pointers = (unused,) * 6
        integers = (0, 0, 0, 0, adjusted.hardness_strength, adjusted.own_period)
        precision = "ieee"
    else:
        pointers = (
            rows.x[start:], cols.x, unused if guide_dots is None else guide_dots, rows.inv_norm[start:],
            cols.inv_norm, adjusted.threshold[start:],
        )  # fmt: skip
        guide_stride = 0 if guide_dots is None else guide_dots.stride(0)
        integers = (rows.x.shape[1], rows.x.stride(0), cols.x.stride(0), guide_stride, 0.0, 1)
        precision = dot_precision(rows.x.dtype)
    constexprs = {"HARDNESS": adjusted.hardness, "GUIDED": adjusted.guided, "GUIDE_PRECISION": precision}
    return pointers, integers, constexprs


class ForwardPartials:
    """The per-split partial sums of one direction's forward, filled by one or more launches
    (a launch per row chunk for ``"gemm"``) and merged in a fixed order. The key ranges are
    planned once, for launches of ``launch_rows`` rows, so that every launch fills the GPU."""

    def __init__(self, n_rows: int, launch_rows: int, n_cols: int, config, device: torch.device):
        (_, splits), self.keys_per_split = forward_grid(launch_rows, n_cols, config, sm_count(device))
        self.config = config
        self.partials = torch.empty((3, splits, n_rows), dtype=torch.float32, device=device)

    def launch(
        self, rows: Side, start, stop, cols: Side, n_cols, period, positive, scale, adjusted: Adjustment,
        dots=None, guide_dots=None,
    ):  # fmt: skip
        """Partials of ``rows.x[start:stop]`` against ``cols.x[:n_cols]``, the row softmax adjusted by
        ``adjusted``; ``dots`` (and ``guide_dots`` for a guided softmax): their ``(stop - start,
        n_cols)`` fp32 dot products when precomputed (strategy ``"gemm"``)."""
        mode, labels = positive
        config, partials = self.config, self.partials
        unused = rows.inv_norm  # an unused pointer argument takes any tensor
        pointers, integers, constexprs = adjustment_arguments(adjusted, start, unused, guide_dots)
        grid = (ceil_div(stop - start, config.block_rows), partials.shape[1])
        with launch_device(rows.x.device):
            _lse_partial_kernel[grid](
                rows.x[start:], cols.x, unused if dots is None else dots, rows.inv_norm[start:],
                cols.inv_norm, scale, unused if labels is None else labels[start:],
                partials[0, :, start:], partials[1, :, start:], partials[2, :, start:], *pointers,
                stop - start, n_cols, self.keys_per_split, rows.x.shape[1], rows.x.stride(0),
                cols.x.stride(0), 0 if dots is None else dots.stride(0), start, partials.stride(1),
                max(period, 1), *integers,
                EXCLUDE=exclusion(period, n_cols), POSITIVE=mode, PRECOMPUTED=dots is not None, **constexprs,
                BLOCK_N=config.block_rows, BLOCK_M=config.block_cols, BLOCK_D=config.block_d,
                DOT_PRECISION=dot_precision(rows.x.dtype), num_warps=config.num_warps,
                num_stages=config.num_stages,
            )  # fmt: skip

    def merge(self, with_positive: bool):
        """``(lse, lse without the positive or None)``."""
        shift, total, negatives = self.partials
        return merge_partials(shift, total), (merge_partials(shift, negatives) if with_positive else None)


def launch_weights(
    block: Block, start: int, stop: int, scale: Tensor, out: Tensor, scale_grad: bool, config, dots=None,
    guide_dots=None,
):  # fmt: skip
    """``W`` of the block's rows ``start:stop`` into ``out`` (viewed as ``(rows, n_cols)``) by the
    weights kernel with tile ``config``; ``dots`` (and ``guide_dots`` for a guided block): the
    chunk's fp32 dot products when they are precomputed. Returns ``(W, sum W cos or None)``."""
    n_rows = stop - start
    weights = out[: n_rows * block.n_cols].view(n_rows, block.n_cols)
    x = block.rows.x[block.row_start + start :]
    inv_x = block.rows.inv_norm[block.row_start + start :]

    def rows_of(tensor):  # an unused pointer argument takes any tensor
        return inv_x if tensor is None else tensor[start:stop]

    config = weights_tile(config, block.row_lse is not None and block.col_lse is not None)
    grid = weights_grid(n_rows, block.n_cols, config)
    w_cos = torch.empty(grid[0] if scale_grad else 0, dtype=torch.float32, device=x.device)
    pointers, integers, constexprs = adjustment_arguments(
        block.adjustment, block.row_start + start, inv_x, guide_dots
    )
    with launch_device(x.device):
        _gradient_weights_kernel[grid](
            x, block.cols.x, inv_x if dots is None else dots, inv_x, block.cols.inv_norm, scale,
            rows_of(block.row_lse), rows_of(block.row_weight),
            inv_x if block.col_lse is None else block.col_lse,
            inv_x if block.col_weight is None else block.col_weight,
            rows_of(block.positive_value), rows_of(block.labels), weights, w_cos if scale_grad else inv_x,
            *pointers, n_rows, block.n_cols, block.n_col_terms, x.shape[1], x.stride(0),
            block.cols.x.stride(0), 0 if dots is None else dots.stride(0), weights.stride(0),
            block.row_start + start, max(block.exclude_period, 1), *integers,
            ROW_TERMS=block.row_lse is not None, COL_TERMS=block.col_lse is not None,
            POSITIVE=block.positive_mode, EXCLUDE=exclusion(block.exclude_period, block.n_cols),
            SCALE_GRAD=scale_grad, **constexprs,
            PRECOMPUTED=dots is not None, BLOCK_R=config.block_rows, BLOCK_C=config.block_cols,
            BLOCK_D=config.block_d, GROUP_R=config.group_rows, DOT_PRECISION=dot_precision(x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    # Tile sums in fp32, their total in fp64 (see torch_path: the terms of W cos nearly cancel).
    return weights, (w_cos.sum(dtype=torch.float64).float() if scale_grad else None)


def row_lse(
    rows: Side, n_rows, cols: Side, n_cols, period, positive, scale, budget, kept, config=None,
    adjusted: Adjustment = NO_ADJUSTMENT,
):  # fmt: skip
    """The forward of one direction: one launch over all rows, the keys split into ranges."""
    tile = fused_config(rows.x.element_size(), config)
    partials = ForwardPartials(n_rows, n_rows, n_cols, tile, rows.x.device)
    partials.launch(rows, 0, n_rows, cols, n_cols, period, positive, scale, adjusted)
    return partials.merge(bool(positive[0]))


def weight_chunks(block: Block, scale: Tensor, budget: int, scale_grad: bool, config=None):
    """Yields ``(start, stop, W, sum W cos or None)``: one weights launch per budget-sized chunk of
    rows, into one reused buffer."""
    tile = fused_config(block.rows.x.element_size(), config)
    step = budget_rows(budget, block.n_cols * block.rows.x.element_size(), block.n_rows)
    buffer = block.rows.x.new_empty(step * block.n_cols)
    for start in range(0, block.n_rows, step):
        stop = min(start + step, block.n_rows)
        yield (start, stop, *launch_weights(block, start, stop, scale, buffer, scale_grad, tile))
