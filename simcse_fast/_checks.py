"""Argument checks shared by the public functions: each failure names the argument and what
was expected, as ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong value or shape)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, ndim: int) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")


def check_float_dtype(name: str, value: Tensor, allowed=FLOAT_DTYPES) -> None:
    if value.dtype not in allowed:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {value.dtype}")


def check_same_device(name: str, value: Tensor, other_name: str, other: Tensor) -> None:
    if value.device != other.device:
        raise ValueError(
            f"{name} is on {value.device} but {other_name} is on {other.device}; "
            "they must be on the same device"
        )


def check_pooling_inputs(token_embeddings, attention_mask) -> None:
    """``token_embeddings``: floating ``(B, L, H)``; ``attention_mask``: bool, integer or
    floating ``(B, L)`` on the same device."""
    check_tensor("token_embeddings", token_embeddings, 3)
    check_float_dtype("token_embeddings", token_embeddings)
    check_tensor("attention_mask", attention_mask, 2)
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or floating; got {attention_mask.dtype}")
    if tuple(attention_mask.shape) != tuple(token_embeddings.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape (B, L) = {tuple(token_embeddings.shape[:2])} to match "
            f"token_embeddings {tuple(token_embeddings.shape)}; got {tuple(attention_mask.shape)}"
        )
    check_same_device("attention_mask", attention_mask, "token_embeddings", token_embeddings)
