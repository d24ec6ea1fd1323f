"""Strategy ``"gemm"`` (siglip-kernel's measured design): the vendor GEMM (cuBLAS on a GPU) forms
each row chunk's dot products with an fp32 result, and one Triton pass over the chunk
(``PRECOMPUTED=True``) reduces it to the forward's statistics or writes ``W``: every product runs
at cuBLAS speed, the exponentials and reductions in one memory-bound pass.

The chunk of dot products is sized to half the GPU's L2 (at least ``MIN_GEMM_ROWS`` rows, for
the GEMM's efficiency): cuBLAS writes it and the pass reads it back while it is still in L2. The
backward writes ``W`` for a budget-sized chunk of rows (several such sub-chunks) before the two
products, so the accumulation into the fp32 gradient buffers, ``rows x D`` read and written per
chunk inside the GEMM, is amortized over many rows. When every direction's dot products fit the
budget, the forward keeps them and the backward reads them instead of recomputing."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .fused import ForwardPartials, launch_weights
from .kernels import PASS_CONFIGS
from .numerics import NO_ADJUSTMENT, Adjustment, Block, Side, budget_rows

MIN_GEMM_ROWS = 256
"""Fewer rows than this make a skinny GEMM that cuBLAS runs well below its rate."""

MODEL_L2_BYTES = 50 << 20
"""The H100's L2, for CPU tensors under the interpreter (which model that GPU)."""


@functools.cache
def _l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def dot_chunk_rows(n_rows: int, n_cols: int, budget: int, device: torch.device) -> int:
    """Rows of one chunk of fp32 dot products: half the L2, at least ``MIN_GEMM_ROWS``, at most
    what the budget allows and ``n_rows``."""
    if device.type == "cuda":
        l2 = _l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    else:
        l2 = MODEL_L2_BYTES
    rows = max(MIN_GEMM_ROWS, l2 // 2 // max(4 * n_cols, 1))
    return min(rows, budget_rows(budget, 4 * n_cols, n_rows))


def row_lse(
    rows: Side, n_rows, cols: Side, n_cols, period, positive, scale, budget, kept, config=None,
    adjusted: Adjustment = NO_ADJUSTMENT,
):  # fmt: skip
    """The forward of one direction: per chunk, cuBLAS's dot products (and the guide's, for a
    guided softmax) then the pass; with ``kept`` (a flat fp32 buffer of ``n_rows x n_cols``),
    all at once into it, for the backward."""
    device = rows.x.device
    guided = adjusted.guided > 0
    if kept is not None:
        step, buffer = n_rows, kept
    else:
        step = dot_chunk_rows(n_rows, n_cols, budget // (2 if guided else 1), device)
        buffer = torch.empty(step * n_cols, dtype=torch.float32, device=device)
    guide_buffer = torch.empty(step * n_cols if guided else 0, dtype=torch.float32, device=device)
    partials = ForwardPartials(n_rows, step, n_cols, PASS_CONFIGS["forward"], device)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        out = buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
        dots = rows.dots(slice(start, stop), cols, n_cols, out=out)
        guide_dots = _guide_dots(adjusted, start, stop, n_cols, guide_buffer)
        partials.launch(rows, start, stop, cols, n_cols, period, positive, scale, adjusted, dots, guide_dots)
    return partials.merge(bool(positive[0]))


def _guide_dots(adjusted: Adjustment, start: int, stop: int, n_cols: int, buffer: Tensor) -> Tensor | None:
    """The guide's fp32 dot products of rows ``start:stop`` for a guided softmax, else None."""
    if not adjusted.guided:
        return None
    out = buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
    return adjusted.guide_rows.dots(slice(start, stop), adjusted.guide_cols, n_cols, out=out)


def weight_chunks(block: Block, scale: Tensor, budget: int, scale_grad: bool, config=None):
    """Yields ``(start, stop, W, sum W cos or None)`` over budget-sized chunks of ``W``, each
    filled by L2-sized sub-chunks of dot products (or from the forward's kept ones; the guide's
    are recomputed)."""
    n_rows, n_cols, device = block.n_rows, block.n_cols, block.rows.x.device
    element = block.rows.x.element_size()
    pass_config = PASS_CONFIGS["weights"]
    guided = block.adjustment.guided > 0
    dot_buffers = 2 if guided else 1
    if block.kept is not None:
        sub, dots_buffer = None, None
        step = budget_rows(budget, n_cols * (element + 4 * (dot_buffers - 1)), n_rows)
        guide_buffer = torch.empty(step * n_cols if guided else 0, dtype=torch.float32, device=device)
    else:
        sub = dot_chunk_rows(n_rows, n_cols, budget // (2 * dot_buffers), device)
        dots_buffer = torch.empty(sub * n_cols, dtype=torch.float32, device=device)
        guide_buffer = torch.empty(sub * n_cols if guided else 0, dtype=torch.float32, device=device)
        step = max(sub, budget_rows(budget - 4 * dot_buffers * sub * n_cols, n_cols * element, n_rows))
    w_buffer = block.rows.x.new_empty(step * n_cols)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        parts = []
        for first in range(start, stop, sub or step):
            last = min(first + (sub or step), stop)
            if block.kept is not None:
                # The transposed view of doc_to_query's kept block is made row-major for the pass.
                dots = block.kept[first:last].contiguous()
            else:
                rows = slice(block.row_start + first, block.row_start + last)
                into = dots_buffer[: (last - first) * n_cols].view(last - first, n_cols)
                dots = block.rows.dots(rows, block.cols, n_cols, out=into)
            guide_dots = _guide_dots(
                block.adjustment, block.row_start + first, block.row_start + last, n_cols, guide_buffer
            )
            out = w_buffer[(first - start) * n_cols :]
            _, w_cos = launch_weights(
                block, first, last, scale, out, scale_grad, pass_config, dots, guide_dots
            )
            parts.append(w_cos)
        weights = w_buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
        yield start, stop, weights, (torch.stack(parts).sum() if scale_grad else None)
