"""The loss as ``torch.library`` custom ops (forward and backward, with fake kernels and the
autograd formula), over whichever strategy ``implementation`` names: ``"torch"``, ``"gemm"`` or
``"fused:<tile>"`` (``kernels.FUSED_CONFIGS``). Neither op reads a value back to the host nor
copies host data to the device: a step that calls them can be captured in a CUDA graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import fused, gemm, torch_path
from .numerics import (
    Block,
    Guide,
    Side,
    accumulate_product,
    adjustment,
    blocks,
    complement,
    direction_geometry,
    direction_positive,
    directions,
    kept_views,
    pair_cosines,
    positive_slots,
    row_loss,
    split_stats,
    weight_scale,
)

STRATEGY_MODULES = {"fused": fused, "gemm": gemm, "torch": torch_path}
"""Each strategy's ``row_lse`` (the forward of one direction) and ``weight_chunks`` (``W`` a chunk
of rows at a time)."""

KEEPING_STRATEGIES = ("gemm", "torch")
"""Strategies whose forward keeps its N x M intermediate for the backward when it fits the
budget: ``"gemm"`` its dot products, ``"torch"`` its cosines (fp32 either way)."""


def parse_implementation(implementation: str):
    """``(strategy module, tile name or None)`` of an implementation string."""
    strategy, _, tile = implementation.partition(":")
    return STRATEGY_MODULES[strategy], (tile or None)


def kept_elements(n_local, n_queries, n_docs, doc_block, chosen, implementation, budget) -> int:
    """Size of the matrix the forward keeps for the backward: every direction's or nothing."""
    if implementation not in KEEPING_STRATEGIES:
        return 0
    total = sum(n_local * direction_geometry(d, n_queries, n_docs, doc_block)[0] for d in chosen)
    return total if 4 * total <= budget else 0


def _row_lse(rows, n_rows, cols, n_cols, period, positive, scale, implementation, budget, kept, adjusted):
    """``(lse, lse without the positive or None)`` of ``rows[:n_rows]`` against ``cols[:n_cols]``;
    ``positive = (mode, labels)``, mode 0 (none), 1 (column = row) or 2 (column = label);
    ``adjusted``: the row softmax's ``Adjustment``."""
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.x.device)
        return empty, (empty if positive[0] else None)
    module, tile = parse_implementation(implementation)
    return module.row_lse(rows, n_rows, cols, n_cols, period, positive, scale, budget, kept, tile, adjusted)


class _Layout:
    """The directions of one loss call and each one's row-softmax adjustment."""

    def __init__(self, n_local, flags, hardness, hardness_strength, doc_block, guide_args):
        query_to_query, doc_to_query, doc_to_doc, _, with_positive, exclude_diagonal = flags
        guide_queries, guide_docs, margin, relative_margin = guide_args
        self.chosen = directions(
            query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive, hardness > 0,
            guide_queries is not None,
        )  # fmt: skip
        guide = None
        if guide_queries is not None:
            guide = Guide.build(guide_queries, guide_docs, n_local, margin, relative_margin)
        self.adjustments = {
            direction.name: adjustment(direction, hardness, hardness_strength, doc_block, guide)
            for direction in self.chosen
        }


@dataclass(frozen=True)
class LossOptions:
    """The op's arguments beyond the layout flags: hardness weighting (``hardness`` 0 or
    ``numerics.HARDNESS_MODES``, its strength), documents per column (``doc_block``, None: Nq)
    and GIST's guide (its query and document embeddings, margin and margin strategy)."""

    hardness: int = 0
    hardness_strength: float = 0.0
    doc_block: int | None = None
    guide_queries: Tensor | None = None
    guide_docs: Tensor | None = None
    margin: float = 0.0
    relative_margin: bool = False

    def op_args(self, n_queries: int) -> tuple:
        """The trailing arguments of :func:`contrastive_loss_op` for ``n_queries`` queries."""
        doc_block = n_queries if self.doc_block is None else self.doc_block
        return (
            self.hardness, float(self.hardness_strength), doc_block, self.guide_queries, self.guide_docs,
            float(self.margin), self.relative_margin,
        )  # fmt: skip


PLAIN = LossOptions()


def _scale32(scale: Tensor) -> Tensor:
    return scale.to(torch.float32).reshape(1)


@torch.library.custom_op("simcse_fast::contrastive_loss", mutates_args=())
def contrastive_loss_op(
    queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None, n_local: int,
    query_to_query: bool, doc_to_query: bool, doc_to_doc: bool, joint: bool, with_positive: bool,
    exclude_diagonal: bool, implementation: str, budget: int, hardness: int, hardness_strength: float,
    doc_block: int, guide_queries: Tensor | None, guide_docs: Tensor | None, margin: float,
    relative_margin: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per-row loss ``(n_local,)`` fp32 (package docstring); the row statistics the backward
    reuses, ``(#directions + #directions with a positive, n_local)`` fp32 (each direction's
    log-sum-exp, then the log-sum-exp without the positive); the N x M intermediate the strategy
    keeps for the backward (flat fp32, empty unless it fits ``budget`` bytes). Inputs already
    checked. ``doc_block``: documents per column (the positives; Nq but for GIST, whose queries
    are not gathered). ``hardness`` (0, or 1-3: ``numerics.HARDNESS_MODES``) with its strength
    weights query_to_doc's negatives; ``guide_queries``/``guide_docs`` (GIST) mask the terms the
    guide rates above each row's positive less ``margin`` (``relative_margin``: times its
    magnitude)."""
    q, d, scale32 = Side(queries), Side(docs), _scale32(scale)
    flags = (query_to_query, doc_to_query, doc_to_doc, joint, with_positive, exclude_diagonal)
    guide_args = (guide_queries, guide_docs, margin, relative_margin)
    layout = _Layout(n_local, flags, hardness, hardness_strength, doc_block, guide_args)
    chosen = layout.chosen
    kept = torch.empty(
        kept_elements(n_local, q.rows, d.rows, doc_block, chosen, implementation, budget),
        dtype=torch.float32, device=queries.device,
    )  # fmt: skip
    views = kept_views(kept, n_local, q.rows, d.rows, doc_block, chosen)
    lses, negative_lses = [], []
    for direction in chosen:
        n_cols, period = direction_geometry(direction, q.rows, d.rows, doc_block)
        piece = views[direction.name].view(-1) if direction.name in views else None
        rows, cols = (q if direction.rows_are_queries else d), (q if direction.cols_are_queries else d)
        positive = direction_positive(direction, labels)
        lse, negative_lse = _row_lse(
            rows, n_local, cols, n_cols, period, positive, scale32, implementation, budget, piece,
            layout.adjustments[direction.name],
        )  # fmt: skip
        lses.append(lse)
        if negative_lse is not None:
            negative_lses.append(negative_lse)
    lse = torch.stack(lses)
    stats = torch.cat([lse, torch.stack(negative_lses)]) if negative_lses else lse
    positive_logits = scale32 * pair_cosines(q, d, n_local, labels) if with_positive else None
    loss = row_loss(lse, split_stats(stats, chosen)[1], chosen, positive_logits, joint)
    return loss, stats, kept


@contrastive_loss_op.register_fake
def _contrastive_loss_fake(
    queries, docs, scale, labels, n_local, query_to_query, doc_to_query, doc_to_doc, joint,
    with_positive, exclude_diagonal, implementation, budget, hardness, hardness_strength, doc_block,
    guide_queries, guide_docs, margin, relative_margin,
):  # fmt: skip
    chosen = directions(
        query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive, hardness > 0,
        guide_queries is not None,
    )  # fmt: skip
    kept = kept_elements(n_local, queries.shape[0], docs.shape[0], doc_block, chosen, implementation, budget)
    n_stats = len(chosen) + positive_slots(chosen)
    return (
        queries.new_empty((n_local,), dtype=torch.float32),
        queries.new_empty((n_stats, n_local), dtype=torch.float32),
        queries.new_empty((kept,), dtype=torch.float32),
    )


def _accumulate_block(block: Block, scale: Tensor, implementation: str, budget: int, scale_grad: bool):
    """``U_rows += W @ unit(cols)`` and ``U_cols += W^T @ unit(rows)``, a chunk of rows at a time,
    each accumulated inside the GEMM; returns ``sum W cos`` in fp32 (for ``d scale``) when
    ``scale_grad``, else None."""
    if block.n_rows == 0 or block.n_cols == 0:
        return None
    module, tile = parse_implementation(implementation)
    cols_unit = block.cols.unit[: block.n_cols]
    w_cos = []
    for start, stop, weights, chunk_w_cos in module.weight_chunks(block, scale, budget, scale_grad, tile):
        w_cos.append(chunk_w_cos)
        rows = slice(block.row_start + start, block.row_start + stop)
        accumulate_product(block.rows.grad_acc[rows], weights, cols_unit)
        accumulate_product(block.cols.grad_acc[: block.n_cols], weights.T, block.rows.unit[rows])
    return torch.stack(w_cos).sum() if scale_grad else None


@torch.library.custom_op("simcse_fast::contrastive_loss_backward", mutates_args=())
def contrastive_loss_backward_op(
    grad_loss: Tensor, queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None,
    stats: Tensor, kept: Tensor, n_local: int, query_to_query: bool, doc_to_query: bool,
    doc_to_doc: bool, joint: bool, with_positive: bool, exclude_diagonal: bool, implementation: str,
    budget: int, hardness: int, hardness_strength: float, doc_block: int, guide_queries: Tensor | None,
    guide_docs: Tensor | None, margin: float, relative_margin: bool, scale_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`contrastive_loss_op`'s per-row loss in queries, docs and scale (zero
    unless ``scale_grad``: ``sum W cos`` costs a pass over ``W`` on the torch path). The guide
    gets no gradient (sentence-transformers computes it without one)."""
    q, d, scale32 = Side(queries), Side(docs), _scale32(scale)
    flags = (query_to_query, doc_to_query, doc_to_doc, joint, with_positive, exclude_diagonal)
    guide_args = (guide_queries, guide_docs, margin, relative_margin)
    layout = _Layout(n_local, flags, hardness, hardness_strength, doc_block, guide_args)
    chosen = layout.chosen
    lse, negative_lse = split_stats(stats, chosen)
    complement_ = complement(lse, negative_lse, chosen, joint)
    grad = grad_loss.float()
    w_scale = weight_scale(complement_, chosen, grad, joint)
    scaled_grad = (grad * w_scale).contiguous()
    w_cos = torch.zeros((), dtype=torch.float32, device=queries.device)
    all_blocks = blocks(
        q,
        d,
        n_local,
        chosen,
        lse,
        complement_,
        kept,
        scaled_grad,
        labels,
        joint,
        doc_block,
        layout.adjustments,
    )
    for block in all_blocks:
        block_w_cos = _accumulate_block(block, scale32, implementation, budget, scale_grad)
        if block_w_cos is not None:
            w_cos = w_cos + block_w_cos
    factor = scale32 / w_scale
    grad_scale = (w_cos / w_scale).reshape(scale.shape).to(scale.dtype)
    return q.gradient(factor), d.gradient(factor), grad_scale


@contrastive_loss_backward_op.register_fake
def _contrastive_loss_backward_fake(grad_loss, queries, docs, scale, *_args):
    return queries.new_empty(queries.shape), docs.new_empty(docs.shape), scale.new_empty(scale.shape)


_FLAGS = (
    "n_local", "query_to_query", "doc_to_query", "doc_to_doc", "joint", "with_positive",
    "exclude_diagonal", "implementation", "budget", "hardness", "hardness_strength", "doc_block",
)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    queries, docs, scale, labels, *rest = inputs
    *flags, guide_queries, guide_docs, margin, relative_margin = rest
    _, stats, kept = output
    ctx.save_for_backward(queries, docs, scale, labels, stats, kept, guide_queries, guide_docs)
    ctx.flags = dict(zip(_FLAGS, flags, strict=True))
    ctx.guide_flags = (margin, relative_margin)
    ctx.mark_non_differentiable(stats, kept)


def _backward(ctx, grad_loss: Tensor, _grad_stats, _grad_kept):
    queries, docs, scale, labels, stats, kept, guide_queries, guide_docs = ctx.saved_tensors
    flags = ctx.flags
    grads = contrastive_loss_backward_op(
        grad_loss, queries, docs, scale, labels, stats, kept, flags["n_local"], flags["query_to_query"],
        flags["doc_to_query"], flags["doc_to_doc"], flags["joint"], flags["with_positive"],
        flags["exclude_diagonal"], flags["implementation"], flags["budget"], flags["hardness"],
        flags["hardness_strength"], flags["doc_block"], guide_queries, guide_docs, *ctx.guide_flags,
        ctx.needs_input_grad[2],
    )  # fmt: skip
    return *grads, *([None] * 17)


contrastive_loss_op.register_autograd(_backward, setup_context=_setup_context)
