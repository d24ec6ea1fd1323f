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

The names load on first use (PEP 562), so that ``import simcse_fast`` (and the ``simcse-fast``
command, which checks its arguments first) does not pay for importing PyTorch until it is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BACKENDS": "config",
    "InfoNCELoss": "modules",
    "SimCSE": "encoder",
    "available_backends": "_backends",
    "info_nce": "functional",
    "masked_max_pool": "functional",
    "masked_mean_pool": "functional",
    "packed_max_pool": "functional",
    "packed_mean_pool": "functional",
    "reference": None,
    "similarity_logsumexp": "functional",
}
"""Each public name and the submodule that defines it (None: the name is a submodule)."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    source = _EXPORTS[name]
    value = importlib.import_module(f"{__name__}.{source or name}")
    if source is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
