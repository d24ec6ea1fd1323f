"""Triton if it imports, a stand-in otherwise, so that ``import simcse_fast`` never fails.

Kernel modules write ``from ._triton import triton, tl`` and decorate kernels as usual. Without
Triton the decorators leave plain functions behind, and backend selection refuses ``"triton"``
with the import error as the reason, so those functions are never called.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as error:
    TRITON_IMPORT_ERROR = error

    def _jit(fn=None, **_options):
        return fn if fn is not None else (lambda inner: inner)

    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)


def _detect_interpreter() -> bool:
    """True when ``@triton.jit`` produces interpreted kernels (``TRITON_INTERPRET=1`` was set
    before Triton was imported); the kernels then run on CPU tensors."""
    if TRITON_IMPORT_ERROR is not None:
        return False

    @triton.jit
    def probe():
        pass

    return type(probe).__name__ == "InterpretedFunction"


HAS_TRITON = TRITON_IMPORT_ERROR is None


def launch_device(device: torch.device):
    """The context every Triton launch runs in: ``device`` made current for CUDA tensors.
    Triton launches on the current CUDA device with its current stream, so tensors on
    ``cuda:1`` launched while device 0 is current would be read across devices (or fail);
    CPU tensors under the interpreter need no device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


TRITON_INTERPRETER = _detect_interpreter()


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


if TRITON_INTERPRETER:
    import numpy

    # Triton <= 3.6's interpreter calls int() on one-element arrays, which numpy >= 2.4 refuses:
    # every kernel with a loop then fails deep inside with an unhelpful TypeError.
    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        warnings.warn(
            f"the interpreter of Triton {triton.__version__} fails with numpy {numpy.__version__} "
            "('TypeError: only 0-dimensional arrays can be converted to Python scalars'); "
            "install numpy<2.4 or triton>=3.7",
            RuntimeWarning,
            stacklevel=1,
        )
