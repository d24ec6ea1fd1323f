"""The public functions: argument checks, backend choice, then the op of that backend.

``backend``: ``None`` (the process default: ``SIMCSE_FAST_BACKEND``, else ``"auto"``),
``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``. See ``simcse_fast._backends``.
"""

from __future__ import annotations

from torch import Tensor

from . import pooling, reference, similarity
from ._backends import resolve_backend
from ._checks import (
    check_bool,
    check_embedding_pair,
    check_labels,
    check_pooling_inputs,
    check_reduction,
    scale_tensor,
)

LOSS_BACKENDS = ("triton", "torch")
"""The loss has Triton kernels and the chunked PyTorch path; the compiled extension has pooling only."""


def _pooling_backend(token_embeddings, attention_mask, backend, op: str) -> str:
    check_pooling_inputs(token_embeddings, attention_mask)
    implementation = resolve_backend(backend, token_embeddings.device, op)
    if implementation == "cuda" and token_embeddings.dtype not in pooling.CUDA_DTYPES:
        raise ValueError(
            "backend='cuda' takes float32, float16 or bfloat16 token_embeddings; "
            f"got {token_embeddings.dtype}"
        )
    return implementation


def masked_mean_pool(
    token_embeddings: Tensor, attention_mask: Tensor, *, backend: str | None = None
) -> Tensor:
    """Mean of the present tokens: ``(B, L, H), (B, L) -> (B, H)``.

    ``out[b, h] = sum_l present[b, l] x[b, l, h] / max(1, sum_l present[b, l])`` with
    ``present = attention_mask != 0`` (bool, integer or floating mask). Output in the input's
    dtype, accumulated in fp32 (fp64 for fp64 input). Rows with no present token give zeros and
    zero gradient; values at absent positions never reach the output.
    """
    implementation = _pooling_backend(token_embeddings, attention_mask, backend, "masked_mean_pool")
    if implementation == "torch":
        return reference.masked_mean_pool(token_embeddings, attention_mask)
    return pooling.masked_mean_pool_op(token_embeddings, attention_mask, implementation)


def masked_max_pool(
    token_embeddings: Tensor, attention_mask: Tensor, *, backend: str | None = None
) -> Tensor:
    """Elementwise maximum over the present tokens: ``(B, L, H), (B, L) -> (B, H)``.

    ``out[b, h] = max_{l : attention_mask[b, l] != 0} x[b, l, h]``, in the input's dtype. Rows
    with no present token give zeros and zero gradient. NaN ranks above every number. The
    gradient goes to one position per ``(b, h)``: the first (lowest ``l``) present position
    holding the maximum.
    """
    implementation = _pooling_backend(token_embeddings, attention_mask, backend, "masked_max_pool")
    if implementation == "torch":
        return reference.masked_max_pool(token_embeddings, attention_mask)
    pooled, _ = pooling.masked_max_pool_op(token_embeddings, attention_mask, implementation)
    return pooled


def similarity_logsumexp(
    queries: Tensor, keys: Tensor, *, scale=20.0, exclude_diagonal: bool = False, backend: str | None = None
) -> Tensor:
    """Row-wise log-sum-exp of scaled cosine similarities, without the N x M matrix.

    ``out[i] = log sum_j exp(scale * <q_i / max(|q_i|, eps), k_j / max(|k_j|, eps)>)``, eps =
    1e-12; ``queries (N, D)``, ``keys (M, D)`` (fp32, fp16 or bf16, same dtype and device) ->
    ``(N,)`` fp32. ``exclude_diagonal=True`` leaves out the term ``j = i`` (needs M >= N).
    ``scale``: a float or a 0-dim tensor, which receives a gradient. Extra memory beyond the
    inputs and their gradients is O((N + M) D).
    """
    check_embedding_pair("queries", queries, "keys", keys)
    check_bool("exclude_diagonal", exclude_diagonal)
    if exclude_diagonal and keys.shape[0] < queries.shape[0]:
        raise ValueError(
            f"exclude_diagonal=True needs at least as many keys as queries (M >= N); "
            f"got N = {queries.shape[0]}, M = {keys.shape[0]}"
        )
    scale = scale_tensor(scale, queries.device)
    implementation = resolve_backend(backend, queries.device, "similarity_logsumexp", LOSS_BACKENDS)
    return similarity.similarity_logsumexp_op(queries, keys, scale, exclude_diagonal, implementation)


def info_nce(
    anchors: Tensor,
    candidates: Tensor,
    *,
    labels: Tensor | None = None,
    scale=20.0,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy over scaled cosine similarities (InfoNCE, MultipleNegativesRankingLoss).

    ``logits = scale * cos(anchors (N, D), candidates (M, D))``, M >= N, never materialized.
    ``labels`` (N,) defaults to ``arange(N)``: candidate ``i`` is anchor ``i``'s positive and
    rows ``N..M-1`` are extra (hard) negatives. Per anchor
    ``l_i = logsumexp_j(logits[i, j]) - logits[i, labels[i]]``. ``symmetric=True`` (default
    labels only) also scores each positive ``j < N`` against all anchors:
    ``l_i = (logsumexp_j logits[i, j] + logsumexp_k logits[k, i]) / 2 - logits[i, i]``.
    ``reduction``: ``"mean"``, ``"sum"`` (0-dim) or ``"none"`` ((N,)). The loss is fp32;
    gradients reach anchors, candidates and a tensor ``scale`` in their own dtypes.
    """
    check_embedding_pair("anchors", anchors, "candidates", candidates)
    n_anchors, n_candidates = anchors.shape[0], candidates.shape[0]
    if n_candidates < n_anchors:
        raise ValueError(
            "candidates must have at least one row per anchor (M >= N); "
            f"got N = {n_anchors}, M = {n_candidates}"
        )
    check_bool("symmetric", symmetric)
    check_reduction(reduction)
    if labels is not None:
        if symmetric:
            raise ValueError("symmetric=True scores candidate i as anchor i's positive; it takes no labels")
        check_labels(labels, n_anchors, n_candidates, anchors.device)
    scale = scale_tensor(scale, anchors.device)
    implementation = resolve_backend(backend, anchors.device, "info_nce", LOSS_BACKENDS)
    labels = None if labels is None else labels.long()
    loss, _, _ = similarity.info_nce_op(anchors, candidates, scale, labels, symmetric, implementation)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
