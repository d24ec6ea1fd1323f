"""Strategy ``"torch"``: the loss in PyTorch ops, on any device. The vendor GEMM forms each row
chunk's cosines in fp32 and tensor ops reduce them; the backward forms ``W`` with the same
formulas as the Triton kernels. When every direction's cosines fit the budget, the forward keeps
them and the backward does not recompute them (as eager PyTorch keeps its logits): on a GPU this
is the eager-equivalent candidate of the selection."""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import NO_ADJUSTMENT, Adjustment, Block, Side, budget_rows, exclusion_mask, positive_columns

TEMPORARY_BYTES = 12
"""Bytes per element of a chunk's fp32 temporaries beside ``W``: cosines or logits, and the
column terms."""


def cosines(rows: Side, row_slice: slice, cols: Side, n_cols: int, out: Tensor | None = None) -> Tensor:
    """``cos(rows.x[row_slice], cols.x[:n_cols])`` in fp32. Half inputs on a GPU: the tensor-core
    GEMM of the raw rows (exact products, fp32 accumulation) times ``a_i b_j``; otherwise the fp32
    GEMM of fp32 unit rows, whose rounding (2**-24) is below that of the accumulation."""
    if rows.x.is_cuda and rows.x.dtype != torch.float32:
        dots = rows.dots(row_slice, cols, n_cols)
        dots = dots.mul_(rows.inv_norm[row_slice, None]).mul_(cols.inv_norm[None, :n_cols])
        return dots if out is None else out.copy_(dots)
    return torch.matmul(rows.unit32[row_slice], cols.unit32[:n_cols].T, out=out)


def adjust(
    logits: Tensor, cos: Tensor, row_slice: slice, adjusted: Adjustment, positive: Tensor | None,
    masked: Tensor | None = None, strength: Tensor | None = None,
):  # fmt: skip
    """``_adjusted_row_logits`` in PyTorch ops, in place on ``logits`` (rows ``row_slice`` of the
    loss, columns ``0..``); ``positive``: each row's positive column ``(rows, 1)``, which a guided
    query_to_doc keeps. ``masked``: the guide's mask of these rows (:func:`guide_mask`) where the
    caller formed it already (the Matryoshka loss applies one mask to every dimension);
    ``strength``: per-row hardness strengths ``(rows, 1)`` in place of the adjustment's number
    (the Matryoshka loss folds each prefix's factors into them)."""
    if adjusted.hardness:
        _add_hardness(logits, cos, row_slice.start, adjusted, strength)
    if adjusted.guided:
        if masked is None:
            masked = guide_mask(adjusted, row_slice, logits.shape[1], positive)
        logits.masked_fill_(masked, float("-inf"))
    return logits


def guide_mask(
    adjusted: Adjustment, row_slice: slice, n_cols: int, positive: Tensor | None, out: Tensor | None = None,
    cos_out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The terms a guided row softmax leaves out, ``(rows, n_cols)`` bool: the guide's cosine above
    the row's threshold, the row's ``positive`` column kept for ``GUIDED`` 1. ``out`` receives the
    mask, ``cos_out`` (fp32) the guide's cosines on the way, where given."""
    guide = cosines(adjusted.guide_rows, row_slice, adjusted.guide_cols, n_cols, out=cos_out)
    masked = torch.gt(guide, adjusted.threshold[row_slice, None], out=out)
    if adjusted.guided == 1:
        masked.scatter_(1, positive, False)
    return masked


def _add_hardness(
    logits: Tensor, cos: Tensor, first_row: int, adjusted: Adjustment, strength: Tensor | None = None
) -> None:
    """``logits += strength * cos`` on the hardness-selected columns of rows ``first_row..``
    (``strength``: the adjustment's number, or per row ``(rows, 1)``). The columns a mode leaves
    out (HARDNESS 1: a row's own columns ``r + k P``; 3: column ``r``) and the ones mode 2 selects
    (own columns past the first block) are a few per row, and only rows ``r < P`` have them: they
    are gathered and scattered instead of masking all N x M."""
    n_rows, n_cols = logits.shape
    period = max(1, adjusted.own_period if adjusted.hardness != 3 else n_cols)
    n_own = max(0, min(first_row + n_rows, period, n_cols) - first_row)
    own_rows = torch.arange(first_row, first_row + n_own, device=logits.device)[:, None]
    first_block = 1 if adjusted.hardness == 2 else 0
    blocks = torch.arange(first_block, max(first_block, -(-n_cols // period)), device=logits.device)
    own = own_rows + period * blocks[None, :]
    in_range = own < n_cols
    # Out-of-range entries point at the row's column r and carry its value unchanged: a
    # duplicate index then writes what is already there.
    own = torch.where(in_range, own, own_rows)
    kept = logits[:n_own].gather(1, own)
    if strength is None:
        strength = own_strength = adjusted.hardness_strength
    else:
        own_strength = strength[:n_own]
    if adjusted.hardness == 2:
        hardness = cos[:n_own].gather(1, own) * own_strength
        logits[:n_own].scatter_(1, own, kept + torch.where(in_range, hardness, 0.0))
        return
    logits.add_(cos * strength)
    logits[:n_own].scatter_(1, own, kept)


def row_lse(
    rows: Side, n_rows, cols: Side, n_cols, period, positive, scale, budget, kept, config=None,
    adjusted: Adjustment = NO_ADJUSTMENT,
):  # fmt: skip
    """``(lse, lse without the positive or None)`` of ``rows[:n_rows]`` against ``cols[:n_cols]``,
    the row softmax adjusted by ``adjusted``; ``kept``: a flat buffer that receives the (plain)
    cosines for the backward, or None."""
    mode, labels = positive
    lse = torch.empty(n_rows, dtype=torch.float32, device=rows.x.device)
    negative_lse = torch.empty_like(lse) if mode else None
    temporaries = TEMPORARY_BYTES + (8 if adjusted.guided or adjusted.hardness else 0)
    step = budget_rows(budget, temporaries * n_cols, n_rows)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        out = None if kept is None else kept.view(n_rows, n_cols)[start:stop]
        cos = cosines(rows, slice(start, stop), cols, n_cols, out=out)
        terms = cos * scale
        columns = positive_columns(mode, labels, start, stop, 0, lse.device) if mode else None
        if adjusted.hardness or adjusted.guided:
            adjust(terms, cos, slice(start, stop), adjusted, columns)
        if period:
            global_rows = torch.arange(start, stop, device=lse.device)
            terms.masked_fill_(exclusion_mask(global_rows, n_cols, period), float("-inf"))
        shift = terms.amax(dim=1, keepdim=True) if n_cols else terms.new_zeros((stop - start, 1))
        shift = torch.where(shift == float("-inf"), torch.zeros_like(shift), shift)
        terms.sub_(shift).exp_()
        shift = shift.squeeze(1)
        if not mode:
            lse[start:stop] = shift + terms.sum(dim=1).log()
            continue
        # The sum without the positive comes first and the positive is added to it: no
        # difference of nearly equal sums, whatever P_positive.
        positive_terms = terms.gather(1, columns).squeeze(1)
        negatives = terms.scatter_(1, columns, 0.0).sum(dim=1)
        lse[start:stop] = shift + (negatives + positive_terms).log()
        negative_lse[start:stop] = shift + negatives.log()
    return lse, negative_lse


def weight_chunks(block: Block, scale: Tensor, budget: int, scale_grad: bool, config=None):
    """Yields ``(start, stop, W, sum W cos or None)`` over the block's rows, a budget-sized chunk
    at a time: the same ``W`` as ``_gradient_weights_kernel``, in PyTorch ops."""
    element = block.rows.x.element_size()
    adjusted = block.adjustment.hardness or block.adjustment.guided
    temporaries = TEMPORARY_BYTES + (8 if adjusted else 0)  # the guide's cosines and the mask
    step = budget_rows(budget, block.n_cols * (element + temporaries), block.n_rows)
    for start in range(0, block.n_rows, step):
        stop = min(start + step, block.n_rows)
        yield (start, stop, *_weights(block, start, stop, scale, scale_grad))


def _weights(block: Block, start: int, stop: int, scale: Tensor, scale_grad: bool):
    rows = slice(block.row_start + start, block.row_start + stop)
    if block.kept is not None:
        cos = block.kept[start:stop]
    else:
        cos = cosines(block.rows, rows, block.cols, block.n_cols)
    logits = cos * scale
    n_terms = block.n_col_terms
    col_part = None
    if block.col_lse is not None:
        col_part = (logits[:, :n_terms] - block.col_lse[None, :]).exp_().mul_(block.col_weight[None, :])
    columns = None
    if block.positive_mode:
        columns = positive_columns(
            block.positive_mode, block.labels, start, stop, block.row_start, cos.device
        )
    if block.row_lse is None:
        weights = col_part  # a block of column terms only spans exactly those columns
    else:
        if block.adjustment.hardness or block.adjustment.guided:
            adjust(logits, cos, rows, block.adjustment, columns)
        weights = logits.sub_(block.row_lse[start:stop, None]).exp_().mul_(block.row_weight[start:stop, None])
        if col_part is not None:
            weights[:, :n_terms] += col_part
    if block.positive_mode:
        weights.scatter_(1, columns, block.positive_value[start:stop, None])
    if block.exclude_period:
        global_rows = torch.arange(rows.start, rows.stop, device=cos.device)
        weights.masked_fill_(exclusion_mask(global_rows, block.n_cols, block.exclude_period), 0.0)
    # Row sums in fp32, their total in fp64: W sums to about 0 over a row, so the terms cancel,
    # and one fp32 accumulator over all N x M of them lost ten times eager's accuracy (scale 50).
    w_cos = torch.linalg.vecdot(weights, cos).sum(dtype=torch.float64).float() if scale_grad else None
    return weights.to(block.rows.x.dtype), w_cos
