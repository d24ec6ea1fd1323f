"""Backend names, the process default, and the choice of backend for a call.

``backend=None`` means the environment variable ``SIMCSE_FAST_BACKEND``, else ``"auto"``.
An explicitly requested backend runs or raises ``ValueError`` saying why it cannot; only
``"auto"`` falls back, to the best backend available for the tensors' device.
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON, TRITON_IMPORT_ERROR, TRITON_INTERPRETER

BACKENDS = ("auto", "triton", "cuda", "torch")
BACKEND_ENV_VAR = "SIMCSE_FAST_BACKEND"


def default_backend() -> str:
    """The backend used when a call passes ``backend=None``."""
    value = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"environment variable {BACKEND_ENV_VAR}={value!r} is not a backend; "
            f"expected one of {', '.join(BACKENDS)}"
        )
    return value


def _triton_unusable_reason(device: torch.device | None) -> str | None:
    if not HAS_TRITON:
        return f"Triton could not be imported ({TRITON_IMPORT_ERROR})"
    if device is None:
        if torch.cuda.is_available() or TRITON_INTERPRETER:
            return None
        return "no CUDA device is available"
    if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETER):
        return None
    if device.type == "cpu":
        return (
            "the Triton kernels need CUDA tensors; CPU tensors run only under the Triton "
            "interpreter (TRITON_INTERPRET=1 set before Triton is imported, meant for tests)"
        )
    return f"the Triton kernels do not run on {device.type} tensors"


def _cuda_unusable_reason() -> str:
    return "the compiled extension simcse_fast._C is not part of this build"


def available_backends() -> list[str]:
    """Backends that can run on this machine, e.g. ``["torch", "triton"]`` on a GPU box."""
    names = ["torch"]
    if _triton_unusable_reason(None) is None:
        names.append("triton")
    return names


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend (``"triton"``, ``"cuda"`` or ``"torch"``) for tensors on ``device``.

    Raises ``TypeError`` for a non-string ``backend`` and ``ValueError`` for an unknown name or
    an explicit backend that cannot run here.
    """
    if backend is None:
        backend = default_backend()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_unusable_reason(device) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = _triton_unusable_reason(device)
    elif backend == "cuda":
        reason = _cuda_unusable_reason()
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend
