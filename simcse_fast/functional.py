"""The public functions: argument checks, backend choice, then the op of that backend.

``backend``: ``None`` (the process default: ``SIMCSE_FAST_BACKEND``, else ``"auto"``),
``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``. See ``simcse_fast._backends``.
"""

from __future__ import annotations

from torch import Tensor

from . import pooling, reference
from ._backends import resolve_backend
from ._checks import check_pooling_inputs


def masked_mean_pool(
    token_embeddings: Tensor, attention_mask: Tensor, *, backend: str | None = None
) -> Tensor:
    """Mean of the present tokens: ``(B, L, H), (B, L) -> (B, H)``.

    ``out[b, h] = sum_l present[b, l] x[b, l, h] / max(1, sum_l present[b, l])`` with
    ``present = attention_mask != 0`` (bool, integer or floating mask). Output in the input's
    dtype, accumulated in fp32 (fp64 for fp64 input). Rows with no present token give zeros and
    zero gradient; values at absent positions never reach the output.
    """
    check_pooling_inputs(token_embeddings, attention_mask)
    if resolve_backend(backend, token_embeddings.device) == "triton":
        return pooling.masked_mean_pool_op(token_embeddings, attention_mask)
    return reference.masked_mean_pool(token_embeddings, attention_mask)


def masked_max_pool(
    token_embeddings: Tensor, attention_mask: Tensor, *, backend: str | None = None
) -> Tensor:
    """Elementwise maximum over the present tokens: ``(B, L, H), (B, L) -> (B, H)``.

    ``out[b, h] = max_{l : attention_mask[b, l] != 0} x[b, l, h]``, in the input's dtype. Rows
    with no present token give zeros and zero gradient. NaN ranks above every number. The
    gradient goes to one position per ``(b, h)``: the first (lowest ``l``) present position
    holding the maximum.
    """
    check_pooling_inputs(token_embeddings, attention_mask)
    if resolve_backend(backend, token_embeddings.device) == "triton":
        pooled, _ = pooling.masked_max_pool_op(token_embeddings, attention_mask)
        return pooled
    return reference.masked_max_pool(token_embeddings, attention_mask)
