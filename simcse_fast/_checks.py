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
        dimensions = "dimension" if ndim == 1 else "dimensions"
        raise ValueError(f"{name} must have {ndim} {dimensions}, got shape {tuple(value.shape)}")


def reads_values_on_host(tensor: Tensor) -> bool:
    """Whether a check of ``tensor``'s values reads them back (CPU tensors: no device to wait
    for, and a ``ValueError`` names what is wrong). Values on a GPU are checked on the device by
    an asynchronous assertion instead, as ``cross_entropy`` checks its targets: no
    synchronization, so a step stays fast and capturable in a CUDA graph; a failed assertion
    surfaces as a CUDA error at the next synchronization, with the message."""
    return tensor.device.type == "cpu"


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


OFFSET_DTYPES = (torch.int32, torch.int64)


def check_packed_inputs(token_embeddings, cu_seqlens) -> None:
    """``token_embeddings``: floating ``(T, H)``; ``cu_seqlens``: int32/int64 ``(B + 1,)`` on the
    same device, starting at 0, non-decreasing, ending at ``T``. The values are read (one device
    synchronization), except inside ``torch.compile``, where reading them would break the graph."""
    check_tensor("token_embeddings", token_embeddings, 2)
    check_float_dtype("token_embeddings", token_embeddings)
    check_tensor("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in OFFSET_DTYPES:
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor of offsets; got {cu_seqlens.dtype}")
    if cu_seqlens.shape[0] == 0:
        raise ValueError("cu_seqlens must have B + 1 >= 1 offsets (0 first, T last); got an empty tensor")
    check_same_device("cu_seqlens", cu_seqlens, "token_embeddings", token_embeddings)
    if torch.compiler.is_compiling():
        return
    n_tokens = token_embeddings.shape[0]
    first, last = cu_seqlens[0], cu_seqlens[-1]
    decreasing = (cu_seqlens[1:] < cu_seqlens[:-1]).any()
    expected = (
        f"cu_seqlens must hold sequence offsets into the T = {n_tokens} rows of token_embeddings: "
        "0 first, non-decreasing, T last"
    )
    if not reads_values_on_host(cu_seqlens):
        torch._assert_async((first == 0) & (last == n_tokens) & ~decreasing, expected)
        return
    first, last, decreasing = torch.stack([first.long(), last.long(), decreasing.long()]).tolist()
    if first != 0 or last != n_tokens or decreasing:
        found = f"got first {first}, last {last}" + (", and a decrease" if decreasing else "")
        raise ValueError(f"{expected}; {found}")


LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("mean", "sum", "none")


def check_embedding_pair(name: str, value, other_name: str, other) -> None:
    """Two ``(rows, D)`` embedding matrices with the same D, dtype (fp16, bf16 or fp32) and device."""
    check_tensor(name, value, 2)
    check_tensor(other_name, other, 2)
    if value.dtype == torch.float64:
        raise TypeError(
            f"{name} must have dtype float16, bfloat16 or float32; got float64: the fused kernels and the "
            "chunked path compute in fp32, which would silently lose float64's precision (for a float64 "
            "computation use simcse_fast.reference, which builds the N x M matrix)"
        )
    check_float_dtype(name, value, LOSS_DTYPES)
    if value.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one column (D >= 1): a cosine of empty vectors is undefined; "
            f"got shape {tuple(value.shape)}"
        )
    if other.dtype != value.dtype:
        raise TypeError(f"{other_name} must have the dtype of {name} ({value.dtype}); got {other.dtype}")
    if other.shape[1] != value.shape[1]:
        raise ValueError(
            f"{other_name} must have the embedding size D = {value.shape[1]} of {name}; "
            f"got shape {tuple(other.shape)}"
        )
    check_same_device(other_name, other, name, value)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def scale_tensor(scale, device: torch.device) -> Tensor:
    """``scale`` as a 0-dim floating tensor on ``device``; a tensor keeps its autograd graph (one
    on another device is copied there at each call: keep a learnable scale on the embeddings'
    device). A number is filled in on the device (``torch.full``, a kernel argument): no
    host-to-device copy, which would synchronize and break a CUDA-graph capture."""
    if isinstance(scale, Tensor):
        if scale.dim() != 0:
            raise ValueError(
                f"scale must be a float or a 0-dim tensor; got a tensor of shape {tuple(scale.shape)}"
            )
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating tensor; got {scale.dtype}")
        return scale.to(device)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a 0-dim tensor, got {type(scale).__name__}")
    return torch.full((), float(scale), dtype=torch.float32, device=device)


def check_labels(labels, n_anchors: int, n_candidates: int, device: torch.device) -> None:
    """``labels``: integer ``(N,)`` on the anchors' device with values in ``[0, M)``. The range is
    checked on the host for CPU tensors and by a device-side assertion on a GPU
    (:func:`reads_values_on_host`); inside ``torch.compile`` only shape and dtype."""
    check_tensor("labels", labels, 1)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.shape[0] != n_anchors:
        raise ValueError(
            f"labels must have shape (N,) = ({n_anchors},), one per anchor; got {tuple(labels.shape)}"
        )
    check_same_device("labels", labels, "anchors", torch.empty(0, device=device))
    if not labels.numel() or torch.compiler.is_compiling():
        return
    expected = f"labels must index candidates, in [0, {n_candidates})"
    if not reads_values_on_host(labels):
        torch._assert_async(((labels >= 0) & (labels < n_candidates)).all(), expected)
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_candidates:
        raise ValueError(f"{expected}; got values from {low} to {high}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")


def check_loss_scale(scale) -> None:
    """A float scale of a loss (an inverse temperature) must be positive and finite; a tensor
    scale is not read (that would synchronize with the GPU): a learnable one is the caller's."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive, finite number (an inverse temperature); got {scale}")
