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

Forward: the dot products ``<q_i, d_j>`` of the raw inputs (half products are exact in fp32,
accumulated in fp32) times ``a_i b_j`` in fp32, so the cosines carry no rounding of normalized
copies. Three strategies compute them (``select.py`` chooses): ``"fused"`` (``fused.py``)
recomputes them in Triton tiles, flash-attention style, a program holding a block of query rows
and streaming one *range* of key blocks; ``"gemm"`` (``gemm.py``) lets cuBLAS write a row
chunk's dot products in fp32 and one Triton pass reduces them; ``"torch"`` (``torch_path.py``)
does the same with PyTorch ops on any device. The Triton grid is (query blocks) x (key ranges),
so that every batch size launches about two waves on the GPU; each program writes a partial
(shift, sum of exponentials) per row and the partials are merged in a fixed order
(deterministic). Since ``|cos| <= 1``, when ``|s| <= 40`` the fixed shift ``|s|``
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

``W`` is formed a chunk of rows at a time by the strategy (the Triton weights kernel on recomputed
or cuBLAS-computed dot products, or tensor ops), by the same formulas in every strategy, and the
heavy products go to the vendor GEMM (cuBLAS on a GPU) with fp32 accumulation, accumulated inside
the GEMM (``addmm``, ``beta = 1``):

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
When every direction's N x M matrix fits the budget, the ``"torch"`` and ``"gemm"`` strategies
keep it from the forward (cosines, dot products) and the backward does not recompute it (as eager
PyTorch keeps its logits).

Layout of the package: ``numerics`` (what every strategy shares), ``kernels`` (the Triton
kernels, their tiles and grids), one module per strategy, ``op`` (the ``torch.library`` custom
ops over them), ``select`` (which strategy runs), ``matryoshka`` (the loss at several prefix
dimensions in one pass: its kernel, strategies and ops). ``LOSS_BACKENDS`` and
``LOSS_STRATEGIES`` below declare, once, what each backend and strategy supports.

Offsets into the inputs are int64 (N * D passes 2**31 at N = 4M, D = 768).
"""

from __future__ import annotations

import torch

from .kernels import CTAS_PER_SM, FUSED_CONFIGS, PASS_CONFIGS, TileConfig
from .matryoshka import implementation_for as matryoshka_implementation
from .matryoshka import matryoshka_budget, matryoshka_loss_backward_op, matryoshka_loss_op
from .numerics import DIRECTIONS, HARDNESS_MODES, NORM_EPS, inverse_norms, memory_budget
from .op import PLAIN, LossOptions, contrastive_loss_backward_op, contrastive_loss_op
from .select import (
    DEFAULT_STRATEGY,
    LOSS_STRATEGIES,
    STRATEGY_ENV_VAR,
    choose_implementation,
    loss_strategies,
    pinned_strategy,
    strategy_choices,
)

LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOSS_BACKENDS = {"triton": LOSS_DTYPES, "torch": LOSS_DTYPES}
"""The one declaration of the loss's backends and the dtypes they take: the Triton kernels
(strategies ``"fused"`` and ``"gemm"``) and the PyTorch path (``"torch"``: never N x M unless the
budget allows). The compiled extension has pooling only. ``resolve_backend``, ``simcse-fast
info`` and the README read it; ``LOSS_STRATEGIES`` and ``loss_strategies`` say which strategy
runs where."""

__all__ = [
    "CTAS_PER_SM",
    "DEFAULT_STRATEGY",
    "DIRECTIONS",
    "FUSED_CONFIGS",
    "HARDNESS_MODES",
    "LOSS_BACKENDS",
    "LOSS_DTYPES",
    "LOSS_STRATEGIES",
    "NORM_EPS",
    "PASS_CONFIGS",
    "PLAIN",
    "STRATEGY_ENV_VAR",
    "LossOptions",
    "TileConfig",
    "choose_implementation",
    "contrastive_loss_backward_op",
    "contrastive_loss_op",
    "inverse_norms",
    "loss_strategies",
    "matryoshka_budget",
    "matryoshka_implementation",
    "matryoshka_loss_backward_op",
    "matryoshka_loss_op",
    "memory_budget",
    "pinned_strategy",
    "strategy_choices",
]
