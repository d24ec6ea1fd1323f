"""Which strategy runs the loss: pinned by ``SIMCSE_FAST_LOSS_STRATEGY``, else chosen by timing.

On a GPU the fastest strategy depends on the GPU, the dtype and the shape, so under
``backend="auto"`` (or ``"triton"``) the first call for a (device, dtype, shape bucket, loss
layout) runs every candidate once forward and backward on the call's own inputs, times each
(CUDA events, the median of a few runs after a warm-up) and keeps the fastest for the process, as
``torch.backends.cudnn.benchmark`` and ``triton.autotune`` do. The candidates are the fused tiles
(``"fused:<tile>"``, ``kernels.FUSED_CONFIGS``), ``"gemm"``, and under ``"auto"`` also ``"torch"``,
which runs the products on cuBLAS and keeps the cosines when they fit as eager PyTorch keeps its
logits: the pick is never slower than that eager-equivalent candidate on the inputs it was timed
on. Shape buckets are powers of two of N, M and D.

Timing synchronizes with the GPU, so it never runs inside a CUDA-graph capture or a region that
``torch.compile`` traces: there the choice made earlier for that bucket applies, else
``DEFAULT_STRATEGY`` (run one eager step first, or pin a strategy, to have the timed choice in a
compiled or captured step). CPU tensors have one strategy, ``"torch"`` (under the Triton
interpreter, ``backend="triton"`` runs the default tile unless a strategy is pinned).

The choices are logged at debug level on the ``simcse_fast`` logger and listed by
:func:`strategy_choices` (``simcse-fast info`` shows the setting).
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings

import torch
from torch import Tensor

from .._triton import HAS_TRITON, launch_device
from . import op
from .kernels import FUSED_CONFIGS

LOSS_STRATEGIES = ("fused", "gemm", "torch")
"""How the loss runs on a GPU: ``"fused"`` (Triton tiles recompute the cosines), ``"gemm"``
(cuBLAS computes each row chunk's dot products, one fused Triton pass reduces them) or
``"torch"`` (cuBLAS and PyTorch ops: the eager-equivalent candidate). CPU tensors run ``"torch"``
only."""

STRATEGY_ENV_VAR = "SIMCSE_FAST_LOSS_STRATEGY"
"""``auto`` (default: timed at first use) or a strategy: ``fused`` (its default tile),
``fused:<tile>`` (a tile of ``kernels.FUSED_CONFIGS``, e.g. ``fused:128x128``), ``gemm`` or
``torch``. A pinned strategy makes runs reproducible bit for bit across processes."""

DEFAULT_STRATEGY = "gemm"
"""What a CUDA-graph capture or a ``torch.compile`` trace runs when no timed choice exists for
its bucket: every product on cuBLAS, the least dependent on tile tuning."""

TIMED_RUNS = 3
"""Timed forward + backward runs per candidate, after one warm-up run (which also compiles the
candidate's kernels)."""

logger = logging.getLogger("simcse_fast")

_CHOICES: dict[tuple, str] = {}


def loss_strategies(device) -> tuple[str, ...]:
    """The strategies that can run the loss on ``device``."""
    if torch.device(device).type == "cuda" and HAS_TRITON:
        return LOSS_STRATEGIES
    return ("torch",)


def strategy_choices() -> dict[str, str]:
    """What the timing chose so far in this process: ``{case: implementation}``, the case naming
    the device, dtype, shape bucket and loss layout."""
    return {_describe(key): choice for key, choice in _CHOICES.items()}


def _describe(key: tuple) -> str:
    device, dtype, n_queries, n_docs, dim, layout, backward = key
    phases = "forward+backward" if backward else "forward"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{device} {dtype_name} Nq<={n_queries} Nd<={n_docs} D<={dim} {layout} {phases}"


def pinned_strategy() -> str | None:
    """The implementation ``SIMCSE_FAST_LOSS_STRATEGY`` pins, or None for ``auto``/unset. Raises
    ``ValueError`` for a value that names no strategy."""
    value = os.environ.get(STRATEGY_ENV_VAR, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    strategy, _, tile = value.partition(":")
    tiles = sorted({config.name for configs in FUSED_CONFIGS.values() for config in configs})
    if strategy not in LOSS_STRATEGIES or (tile and (strategy != "fused" or tile not in tiles)):
        raise ValueError(
            f"environment variable {STRATEGY_ENV_VAR}={value!r} is not a loss strategy; expected auto, "
            f"{', '.join(LOSS_STRATEGIES)} or fused:<tile> with a tile of {', '.join(tiles)}"
        )
    return value


def _with_tile(implementation: str, element_size: int) -> str:
    """``"fused"`` -> ``"fused:<default tile for the dtype>"``; a tile the dtype lacks -> its default."""
    strategy, _, tile = implementation.partition(":")
    if strategy != "fused":
        return implementation
    names = [config.name for config in FUSED_CONFIGS[element_size]]
    return f"fused:{tile if tile in names else names[0]}"


def candidates(backend: str, element_size: int) -> list[str]:
    """The implementations timed for a call with ``backend`` ("triton" or "auto") on a GPU."""
    names = [f"fused:{config.name}" for config in FUSED_CONFIGS[element_size]] + ["gemm"]
    return names if backend == "triton" else [*names, "torch"]


def _selects_by_timing(device: torch.device) -> bool:
    """Timing is for GPUs; a test may pretend (the interpreter runs the candidates on a CPU)."""
    return device.type == "cuda"


def _cannot_time() -> bool:
    """Inside a region ``torch.compile`` traces or a CUDA-graph capture, timing (which
    synchronizes) is impossible."""
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    )


def _bucket(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


def choose_implementation(
    backend: str, resolved: str, queries: Tensor, docs: Tensor, scale: Tensor, labels: Tensor | None,
    n_local: int, flags: tuple, budget: int, options: op.LossOptions = op.PLAIN,
) -> str:  # fmt: skip
    """The implementation a call runs. ``backend``: the requested ``"auto"`` or ``"triton"`` (or
    ``"torch"``); ``resolved``: the backend :func:`resolve_backend` gave for the tensors
    (``"triton"`` or ``"torch"``); ``flags``: the op's six boolean flags."""
    pinned = pinned_strategy()
    if resolved == "torch":
        if pinned is not None and pinned != "torch" and backend != "auto":
            raise ValueError(
                f"{STRATEGY_ENV_VAR}={pinned!r} needs the Triton kernels, but backend={backend!r} runs "
                "the torch path here"
            )
        return "torch"
    element_size = queries.element_size()
    if pinned is not None:
        if pinned == "torch" and backend == "triton":
            raise ValueError(
                f"{STRATEGY_ENV_VAR}='torch' contradicts backend='triton': pin a Triton strategy "
                "(fused, fused:<tile>, gemm) or ask for backend='torch'"
            )
        return _with_tile(pinned, element_size)
    if not _selects_by_timing(queries.device):
        return _with_tile("fused", element_size)
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (queries, docs, scale))
    layout = _layout(n_local == queries.shape[0], labels is not None, flags, budget, options)
    key = (
        str(queries.device), queries.dtype, _bucket(queries.shape[0]), _bucket(docs.shape[0]),
        _bucket(queries.shape[1]), layout, needs_backward,
    )  # fmt: skip
    if key in _CHOICES:
        return _CHOICES[key]
    if _cannot_time():
        return DEFAULT_STRATEGY
    timings = {}
    for implementation in candidates(backend, element_size):
        try:
            timings[implementation] = _measure(
                implementation, queries, docs, scale, labels, n_local, flags, budget, options, needs_backward
            )
        except Exception as error:  # a tile this GPU cannot run (Triton's OutOfResources), an OOM
            warnings.warn(
                f"loss strategy {implementation} failed while timing {_describe(key)} and is left out: "
                f"{type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
    if not timings:
        warnings.warn(
            f"no loss strategy ran while timing {_describe(key)}; using {DEFAULT_STRATEGY}",
            RuntimeWarning,
            stacklevel=3,
        )
        return DEFAULT_STRATEGY
    choice = min(timings, key=timings.get)
    _CHOICES[key] = choice
    logger.debug(
        "simcse_fast loss strategy for %s: %s (%s)",
        _describe(key), choice, ", ".join(f"{name} {ms:.3f} ms" for name, ms in timings.items()),
    )  # fmt: skip
    return choice


def _layout(all_local: bool, has_labels: bool, flags: tuple, budget: int, options: op.LossOptions) -> str:
    names = ("query_to_query", "doc_to_query", "doc_to_doc", "joint", "with_positive", "exclude_diagonal")
    parts = [name for name, flag in zip(names, flags[:6], strict=True) if flag]
    if has_labels:
        parts.append("labels")
    if options.hardness:
        parts.append(f"hardness{options.hardness}")
    if options.guide_queries is not None:
        parts.append("guided")
    if not all_local:
        parts.append("gathered")
    return "+".join(parts or ["lse"]) + f" budget<={_bucket(budget) >> 20}MiB"


def _measure(implementation, queries, docs, scale, labels, n_local, flags, budget, options, needs_backward):
    """Median milliseconds of the op's forward (and backward) with ``implementation``."""
    scale_grad = needs_backward and scale.requires_grad
    queries, docs, scale = queries.detach(), docs.detach(), scale.detach()
    extra = options.op_args(queries.shape[0])

    def run():
        loss, stats, kept = op.contrastive_loss_op(
            queries, docs, scale, labels, n_local, *flags, implementation, budget, *extra
        )
        if needs_backward:
            op.contrastive_loss_backward_op(
                torch.ones_like(loss), queries, docs, scale, labels, stats, kept, n_local, *flags,
                implementation, budget, *extra, scale_grad,
            )  # fmt: skip

    with torch.no_grad():
        return time_ms(run, queries.device)


def time_ms(run, device: torch.device) -> float:
    """Median wall time of ``run()`` in milliseconds over ``TIMED_RUNS`` runs after one warm-up,
    by CUDA events on the device's current stream."""
    times = []
    with launch_device(device):
        run()
        for _ in range(TIMED_RUNS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)
