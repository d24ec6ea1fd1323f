"""Per-call Python overhead of the pooling path, piece by piece, with the kernel launch replaced
by a no-op: what a call costs beyond its kernel, which at SimCSE's shape (B = 512, L = 32,
H = 768, 25 MB in bf16, ~9 µs at H100 copy bandwidth) is of the kernel's own order.

    python benchmarks/dispatch_overhead.py [--calls 20000] [--out benchmarks/results/DIR]

Runs on CPU tensors of shape (1, 1, 8): the launchers are timed with their Triton kernels
stubbed (the Triton launch itself, a few µs on a GPU, is not included). Prints a markdown table
of p20/p50/p80 over 7 repeats of ``--calls`` calls and writes it with its environment to
``--out``/dispatch_overhead.md when given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import simcse_fast as sf
from simcse_fast import _backends, _checks, functional, pooling

REPEATS = 7


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int) -> list[float]:
    for _ in range(min(calls, 1000)):
        fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return cuts[1], statistics.median(times), cuts[7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 1, 8)
    x_grad = x.clone().requires_grad_()
    mask = torch.ones(1, 1, dtype=torch.bool)
    stub = pooling.PoolingBackend(pooling.ALL_FLOAT_DTYPES, pooling.triton_forward, pooling.triton_backward)
    pooling.POOLING_BACKENDS["stub"] = stub
    pooling._mean_pool_forward_kernel = _NoLaunch()
    cases = {
        "argument checks": lambda: _checks.check_pooling_inputs(x, mask),
        "backend choice": lambda: _backends.resolve_backend(
            "auto", x.device, "masked_mean_pool", functional.POOLING_DTYPES, x.dtype, "token_embeddings"
        ),
        "Triton launcher, kernel stubbed": lambda: pooling.triton_forward("mean", x, mask, False),
        "custom op + launcher, no grad": lambda: pooling.masked_mean_pool_op(x, mask, "stub"),
        "custom op + launcher, with grad": lambda: pooling.masked_mean_pool_op(x_grad, mask, "stub"),
        "eager path + launcher, no grad": lambda: pooling.pool("mean", False, x, mask, "stub"),
        "eager path + launcher, with grad": lambda: pooling.pool("mean", False, x_grad, mask, "stub"),
        "eager reference (torch backend), with grad": lambda: sf.masked_mean_pool(
            x_grad, mask, backend="torch"
        ),
    }
    lines = ["| step | p20 µs | p50 µs | p80 µs |", "| --- | ---: | ---: | ---: |"]
    for name, fn in cases.items():
        low, median, high = quantiles(per_call_us(fn, args.calls))
        lines.append(f"| {name} | {low:.1f} | {median:.1f} | {high:.1f} |")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    environment = (
        f"{platform.processor() or platform.machine()}, 1 thread, Python {platform.python_version()}, "
        f"torch {torch.__version__}, commit {commit or 'unknown'}, {REPEATS} x {args.calls} calls"
    )
    report = "\n".join(
        ["# Pooling dispatch overhead per call (CPU, kernel launch stubbed)", "", environment, "", *lines]
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dispatch_overhead.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
