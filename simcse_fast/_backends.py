"""Backend names, the process default, and the choice of backend for a call.

``backend=None`` means the environment variable ``SIMCSE_FAST_BACKEND``, else ``"auto"``.
An explicitly requested backend runs or raises ``ValueError`` saying why it cannot; only
``"auto"`` falls back, to the best backend available for the tensors' device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import torch

from ._triton import HAS_TRITON, TRITON_IMPORT_ERROR, TRITON_INTERPRETER
from .config import BACKENDS


def _load_extension():
    """``(simcse_fast._C, None)`` or ``(None, why it is missing)``. A build that exists but
    does not load (e.g. built for another Python) warns once; a missing build is silent."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, (
            "the compiled extension simcse_fast._C is not built (reinstall with nvcc on PATH, or "
            "SIMCSE_FAST_BUILD_CUDA=1 to insist; see the README)"
        )
    try:
        from . import _C
    except ImportError as error:
        warnings.warn(f"simcse_fast._C is built but does not load: {error}", RuntimeWarning, stacklevel=2)
        return None, f"the compiled extension simcse_fast._C does not load ({error})"
    return _C, None


CUDA_EXTENSION, CUDA_EXTENSION_ERROR = _load_extension()


def _find_nvcc() -> str | None:
    """nvcc where setup.py looks for it: ``CUDA_HOME`` or ``CUDA_PATH``, then ``PATH``."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _installation() -> str:
    """How this copy of simcse_fast got here: ``"wheel"``, ``"source"`` (an sdist or a folder,
    built at install), ``"editable"`` (``pip install -e`` of this checkout) or ``"checkout"``
    (imported from a source tree that no install points at)."""
    package = Path(__file__).resolve().parent
    try:
        distribution = metadata.distribution("simcse-fast")
    except metadata.PackageNotFoundError:
        return "checkout"
    if distribution.read_text("INSTALLER") is None:
        return "checkout"  # the metadata of a source tree (an egg-info beside the code), not an install
    try:
        direct = json.loads(distribution.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    if direct.get("dir_info", {}).get("editable"):
        return "editable" if direct.get("url") == package.parent.as_uri() else "checkout"
    if Path(distribution.locate_file("simcse_fast")).resolve() != package:
        return "checkout"
    from_source = "dir_info" in direct or direct.get("url", "").endswith((".tar.gz", ".zip"))
    return "source" if from_source else "wheel"


def extension_build_status() -> str:
    """Whether the compiled extension ``simcse_fast._C`` was built for this installation and, if
    not, why as far as the installation tells; whether it runs here is ``unavailable_reasons``'."""
    if CUDA_EXTENSION is not None:
        return f"built ({Path(CUDA_EXTENSION.__file__).name})"
    if importlib.util.find_spec(f"{__package__}._C") is not None:
        return f"built, but {CUDA_EXTENSION_ERROR.removeprefix('the compiled extension simcse_fast._C ')}"
    installation = _installation()
    if installation == "wheel":
        return (
            "not built: installed from the wheel, which is pure Python; an install from source (pip install "
            "--no-binary simcse-fast, or a checkout) builds it where nvcc is found"
        )
    if installation == "checkout":
        return (
            f"not built: {Path(__file__).resolve().parent} is a source checkout without a build in place "
            "(pip install pybind11 && python setup.py build_ext --inplace builds it)"
        )
    nvcc = _find_nvcc()
    if nvcc is None:
        return (
            "not built: installed from source, and there is no nvcc here (CUDA_HOME, CUDA_PATH, PATH): "
            "the install builds it only with nvcc"
        )
    return (
        f"not built: installed from source, and nvcc is here now ({nvcc}): the install ran without it, "
        "with SIMCSE_FAST_BUILD_CUDA=0, or the compile failed (under the default SIMCSE_FAST_BUILD_CUDA=auto "
        "that only warns); reinstall with SIMCSE_FAST_BUILD_CUDA=1 to build it or see nvcc's error"
    )


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


def _cuda_unusable_reason(device: torch.device | None) -> str | None:
    if CUDA_EXTENSION is None:
        return CUDA_EXTENSION_ERROR
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return f"the compiled CUDA kernels need CUDA tensors, got {device.type}"
    index = torch.cuda.current_device() if device.index is None else device.index
    if not CUDA_EXTENSION.kernels_available(index):
        capability = ".".join(map(str, torch.cuda.get_device_capability(index)))
        return (
            f"simcse_fast._C holds no kernel for this GPU (compute capability {capability}): reinstall "
            "with SIMCSE_FAST_CUDA_ARCHS including it (see the README)"
        )
    return None


def available_backends() -> list[str]:
    """Backends that can run on this machine, e.g. ``["torch", "triton"]`` on a GPU box."""
    names = ["torch"]
    if _triton_unusable_reason(None) is None:
        names.append("triton")
    if _cuda_unusable_reason(None) is None:
        names.append("cuda")
    return names


def unavailable_reasons() -> dict[str, str]:
    """Why each backend missing from :func:`available_backends` cannot run on this machine."""
    reasons = {"triton": _triton_unusable_reason(None), "cuda": _cuda_unusable_reason(None)}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def resolve_backend(
    backend: str | None,
    device: torch.device,
    op: str,
    supported: Mapping[str, tuple[torch.dtype, ...]],
    dtype: torch.dtype,
    argument: str,
) -> str:
    """The concrete backend (``"triton"``, ``"cuda"`` or ``"torch"``) to run ``op`` on tensors of
    ``dtype`` on ``device``. ``supported`` is the op family's backend table: each backend that
    has a kernel for ``op``, with the dtypes it takes (``argument`` names the input in errors).

    Raises ``TypeError`` for a non-string ``backend`` and ``ValueError`` for an unknown name or
    an explicit backend that cannot run here. ``"auto"`` prefers Triton on CUDA tensors.
    """
    if backend is None:
        backend = default_backend()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        triton_runs = "triton" in supported and dtype in supported["triton"]
        if device.type == "cuda" and triton_runs and _triton_unusable_reason(device) is None:
            return "triton"
        return "torch"
    if backend not in supported:
        reason = f"there is no {backend} kernel for {op}; use one of {', '.join(supported)}"
    elif dtype not in supported[backend]:
        names = ", ".join(str(allowed).removeprefix("torch.") for allowed in supported[backend])
        reason = f"its {op} takes {argument} of dtype {names}; got {dtype}"
    elif backend == "triton":
        reason = _triton_unusable_reason(device)
    elif backend == "cuda":
        reason = _cuda_unusable_reason(device)
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend
