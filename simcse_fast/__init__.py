"""simcse_fast: fused GPU kernels for contrastive sentence-embedding training.

Public API::

    sf.masked_mean_pool(token_embeddings, attention_mask, *, backend=None)  # (B,L,H),(B,L) -> (B,H)
    sf.masked_max_pool(token_embeddings, attention_mask, *, backend=None)   # (B,L,H),(B,L) -> (B,H)
    sf.packed_mean_pool(token_embeddings, cu_seqlens, *, backend=None)    # (T,H),(B+1,) -> (B,H)
    sf.packed_max_pool(token_embeddings, cu_seqlens, *, backend=None)     # (T,H),(B+1,) -> (B,H)
    sf.similarity_logsumexp(queries, keys, *, scale=20.0, exclude_diagonal=False, backend=None)  # -> (N,)
    sf.info_nce(anchors, candidates, *, labels=None, scale=20.0, symmetric=False,
                reduction="mean", backend=None)                              # -> loss
    sf.InfoNCELoss(scale=20.0, learnable_scale=False, symmetric=False,   # nn.Module:
                   gather_across_devices=False, reduction="mean")          # (anchors, candidates, labels)
    sf.SimCSE(model_name_or_path, pooling="mean", max_seq_length=32)      # encoder + fused pooling
    sf.reference             # pure-PyTorch versions of every op: the specification
    sf.available_backends()  # e.g. ["torch", "triton"]
"""

from . import reference
from ._backends import BACKENDS, available_backends
from .encoder import SimCSE
from .functional import (
    info_nce,
    masked_max_pool,
    masked_mean_pool,
    packed_max_pool,
    packed_mean_pool,
    similarity_logsumexp,
)
from .modules import InfoNCELoss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "InfoNCELoss",
    "SimCSE",
    "available_backends",
    "info_nce",
    "masked_max_pool",
    "masked_mean_pool",
    "packed_max_pool",
    "packed_mean_pool",
    "reference",
    "similarity_logsumexp",
]
