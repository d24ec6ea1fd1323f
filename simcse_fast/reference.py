"""Pure-PyTorch reference implementations: the executable specification of simcse_fast.

Every public op of the package has a twin here with the same signature. These versions are
written for clarity, not speed: they build the full ``N x M`` similarity matrix and copy the
token embeddings freely. They compute in ``promote_types(input dtype, float32)``, so float64
inputs give float64 results, which is how the tests hold the kernels to account.

This module imports nothing from ``simcse_fast``; the tests and benchmarks import it.
Inputs are assumed valid (the public API checks them); ``backend`` is accepted and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "info_nce",
    "masked_max_pool",
    "masked_mean_pool",
    "packed_max_pool",
    "packed_mean_pool",
    "similarity_logsumexp",
]

NORM_EPS = 1e-12
"""Norms are clamped at this value before dividing, as in ``torch.nn.functional.normalize``."""


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def masked_mean_pool(token_embeddings: Tensor, attention_mask: Tensor, *, backend=None) -> Tensor:
    """Mean of the present tokens of each sequence.

    ``out[b, h] = sum_l present[b, l] * x[b, l, h] / max(1, sum_l present[b, l])`` with
    ``present = attention_mask != 0``. Shapes: ``x (B, L, H)``, ``attention_mask (B, L)`` ->
    ``(B, H)`` in ``x.dtype``. A row with no present token gives zeros. Values at absent
    positions never reach the output, even when they are NaN.
    """
    present = (attention_mask != 0).unsqueeze(-1)
    x = token_embeddings.to(_accumulation_dtype(token_embeddings.dtype))
    total = torch.where(present, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    count = present.sum(dim=1).clamp_min(1).to(x.dtype)
    return (total / count).to(token_embeddings.dtype)


def masked_max_pool(token_embeddings: Tensor, attention_mask: Tensor, *, backend=None) -> Tensor:
    """Elementwise maximum over the present tokens of each sequence.

    ``out[b, h] = max_{l : present[b, l]} x[b, l, h]``; shapes ``(B, L, H), (B, L) -> (B, H)``.
    A row with no present token gives zeros and passes no gradient. NaN counts as larger than
    every number, so a NaN among the present tokens comes out as NaN.

    Gradient: ``d out[b, h] / d x[b, l, h]`` is 1 at exactly one position, the *first*
    (lowest ``l``) present position holding the maximum (or the first NaN), and 0 elsewhere.
    """
    if token_embeddings.shape[1] == 0:
        return token_embeddings.sum(dim=1)  # zeros that stay attached to the autograd graph
    present = (attention_mask != 0).unsqueeze(-1)
    x = token_embeddings.to(_accumulation_dtype(token_embeddings.dtype))
    with torch.no_grad():
        # A fill on the device: torch.tensor(-inf, device=...) would copy from the host, a
        # synchronization on a GPU (this is the "torch" backend there).
        maximum = torch.where(present, x, x.new_full((), float("-inf"))).amax(dim=1, keepdim=True)
        is_argmax = present & ((x == maximum) | x.isnan())
        # argmax of a bool tensor returns the first True, which fixes the tie rule.
        first_argmax = is_argmax.to(torch.uint8).argmax(dim=1, keepdim=True)
    pooled = x.gather(1, first_argmax).squeeze(1)
    has_tokens = present.any(dim=1)
    return torch.where(has_tokens, pooled, torch.zeros((), dtype=x.dtype, device=x.device)).to(
        token_embeddings.dtype
    )


def _segments(token_embeddings: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """``(lengths (B,), segment (T,))``: each sequence's length and each token's sequence,
    computed without reading the offsets on the host (so it traces under ``torch.compile``)."""
    offsets = cu_seqlens.long()
    lengths = offsets[1:] - offsets[:-1]
    sequences = torch.arange(lengths.shape[0], device=token_embeddings.device)
    return lengths, torch.repeat_interleave(sequences, lengths, output_size=token_embeddings.shape[0])


def packed_mean_pool(token_embeddings: Tensor, cu_seqlens: Tensor, *, backend=None) -> Tensor:
    """Mean of each sequence of a packed (varlen) batch.

    ``token_embeddings (T, H)`` holds the tokens of ``B`` sequences back to back; sequence ``b``
    is rows ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` (``cu_seqlens (B + 1,)``, starting at 0,
    non-decreasing, ending at ``T``). ``out[b] = sum of its rows / max(1, its length)`` ->
    ``(B, H)`` in the input's dtype; an empty sequence gives zeros. Equal to
    :func:`masked_mean_pool` of the right-padded batch.
    """
    lengths, segment = _segments(token_embeddings, cu_seqlens)
    x = token_embeddings.to(_accumulation_dtype(token_embeddings.dtype))
    total = x.new_zeros((lengths.shape[0], x.shape[1])).index_add(0, segment, x)
    return (total / lengths.clamp_min(1).to(x.dtype)[:, None]).to(token_embeddings.dtype)


def packed_max_pool(token_embeddings: Tensor, cu_seqlens: Tensor, *, backend=None) -> Tensor:
    """Elementwise maximum of each sequence of a packed batch (layout as in
    :func:`packed_mean_pool`) -> ``(B, H)``. An empty sequence gives zeros and passes no
    gradient; NaN ranks above every number; the gradient goes to the first position holding the
    maximum, as in :func:`masked_max_pool` of the right-padded batch."""
    lengths, segment = _segments(token_embeddings, cu_seqlens)
    x = token_embeddings.to(_accumulation_dtype(token_embeddings.dtype))
    batch, (n_tokens, hidden) = lengths.shape[0], x.shape
    with torch.no_grad():
        index = segment[:, None].expand(-1, hidden)
        # amax propagates NaN, so a NaN maximum marks its NaN tokens.
        maximum = x.new_full((batch, hidden), float("-inf")).scatter_reduce(0, index, x, "amax")
        at_maximum = (x == maximum[segment]) | x.isnan()
        token = torch.arange(n_tokens, device=x.device)[:, None].expand(-1, hidden)
        candidates = torch.where(at_maximum, token, n_tokens)
        first = torch.full((batch, hidden), n_tokens, device=x.device).scatter_reduce(
            0, index, candidates, "amin"
        )
    has_tokens = (lengths > 0)[:, None]
    if n_tokens == 0:
        return x.sum(dim=0).expand(batch, hidden).to(token_embeddings.dtype)  # zeros on the autograd graph
    pooled = x.gather(0, first.clamp_max(n_tokens - 1))
    return torch.where(has_tokens, pooled, torch.zeros((), dtype=x.dtype, device=x.device)).to(
        token_embeddings.dtype
    )


def _scaled_cosine_logits(queries: Tensor, keys: Tensor, scale) -> Tensor:
    """``logits[i, j] = scale * <q_i / max(|q_i|, eps), k_j / max(|k_j|, eps)>``, shape (N, M)."""
    dtype = _accumulation_dtype(queries.dtype)
    q = F.normalize(queries.to(dtype), dim=-1, eps=NORM_EPS)
    k = F.normalize(keys.to(dtype), dim=-1, eps=NORM_EPS)
    if isinstance(scale, Tensor):
        scale = scale.to(dtype)
    return scale * (q @ k.T)


def similarity_logsumexp(
    queries: Tensor, keys: Tensor, *, scale=20.0, exclude_diagonal: bool = False, backend=None
) -> Tensor:
    """Row-wise log-sum-exp of scaled cosine similarities.

    ``out[i] = log sum_j exp(scale * cos(q_i, k_j))``; ``queries (N, D)``, ``keys (M, D)`` ->
    ``(N,)`` in float32 (float64 for float64 inputs). With ``exclude_diagonal=True`` the term
    ``j = i`` is left out of row ``i`` (requires ``M >= N``). ``scale`` is a float or a 0-dim
    tensor, which receives a gradient.
    """
    logits = _scaled_cosine_logits(queries, keys, scale)
    if exclude_diagonal:
        n = queries.shape[0]
        diagonal = torch.zeros_like(logits, dtype=torch.bool)
        diagonal[torch.arange(n), torch.arange(n)] = True
        logits = logits.masked_fill(diagonal, float("-inf"))
    return torch.logsumexp(logits, dim=1)


def info_nce(
    anchors: Tensor,
    candidates: Tensor,
    *,
    labels: Tensor | None = None,
    scale=20.0,
    symmetric: bool = False,
    reduction: str = "mean",
    backend=None,
) -> Tensor:
    """Cross-entropy over scaled cosine similarities (InfoNCE, MultipleNegativesRankingLoss).

    ``logits = scale * cos(anchors (N, D), candidates (M, D))``, shape (N, M). ``labels`` (N,)
    defaults to ``arange(N)``: candidate ``i`` is anchor ``i``'s positive and rows ``N..M-1``
    are extra negatives. Per anchor: ``l_i = logsumexp_j(logits[i, j]) - logits[i, labels[i]]``.

    ``symmetric=True`` (default labels only) also scores each positive ``j < N`` against all
    anchors: ``l_i = (logsumexp_j logits[i, j] + logsumexp_k logits[k, i]) / 2 - logits[i, i]``,
    the mean of the two cross-entropies.

    ``reduction``: ``"mean"`` and ``"sum"`` give a 0-dim tensor, ``"none"`` the (N,) vector.
    The result is float32 (float64 for float64 inputs).
    """
    logits = _scaled_cosine_logits(anchors, candidates, scale)
    n = anchors.shape[0]
    rows = torch.arange(n, device=logits.device)
    if labels is None:
        labels = rows
    positive = logits[rows, labels]
    forward_lse = torch.logsumexp(logits, dim=1)
    if symmetric:
        backward_lse = torch.logsumexp(logits[:, :n].T, dim=1)
        loss = (forward_lse + backward_lse) / 2 - positive
    else:
        loss = forward_lse - positive
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
