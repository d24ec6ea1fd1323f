"""Triton if it imports, a stand-in otherwise, so that ``import simcse_fast`` never fails.

Kernel modules write ``from ._triton import triton, tl`` and decorate kernels as usual. Without
Triton the decorators leave plain functions behind, and backend selection refuses ``"triton"``
with the import error as the reason, so those functions are never called.
"""

from __future__ import annotations

import types

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
TRITON_INTERPRETER = _detect_interpreter()
