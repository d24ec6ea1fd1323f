"""The timing core of the benchmark: clocks, peak memory, percentiles and the busy-machine test.

* Time: CUDA events on a GPU, ``perf_counter`` on a CPU; each case is warmed up (compilation
  is never timed), then each pass is repeated at least ``min_repeats`` times and until
  ``Device.min_seconds`` were timed, cycling through several input sets so that caches do not
  flatter small shapes. The result of a pass is its p20, p50 (the median) and p80.
* Peak extra memory of forward + backward: ``torch.cuda.max_memory_allocated`` after a reset
  on a GPU, the resident-set high-water mark (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``) on a CPU.
* Ceilings measured in the same run: a large device copy (GB/s) and large matmuls (TFLOP/s).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import itertools
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

BUSY_SPREAD = 1.5
"""A pass whose p80 exceeds this multiple of its p20 was timed on a busy machine. Repeating
the same work on an idle machine keeps the middle 60% of runs close: in the committed
2-thread CPU run (benchmarks/results/cpu-x86_64-2threads) the median p80/p20 is 1.07 and 90%
of the rows stay under 1.3, while the rows that other processes disturbed reach 1.5 to 9.5.
1.5 leaves room for allocator and cache effects on small shapes and flags the disturbed ones."""


class Device:
    """Timing, synchronization and memory measurement on one device. ``min_seconds``: each
    pass is repeated until this much time was measured (and at least ``min_repeats`` times)."""

    def __init__(self, device: torch.device, min_seconds: float = 0.3):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.min_seconds = min_seconds

    def synchronize(self) -> None:
        """Waits for the device's queued work (a no-op on a CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds that ``fn()`` keeps the device busy (CUDA events) or takes (CPU)."""
        if self.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start_time = time.perf_counter()
        fn()
        return (time.perf_counter() - start_time) * 1e3

    @contextlib.contextmanager
    def peak_memory(self, result: dict):
        """Sets ``result["peak_mem_mb"]`` to the extra peak memory of the enclosed work."""
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            self.synchronize()
            result["peak_mem_mb"] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            return
        base = _reset_resident_high_water_mark()
        yield
        peak = _resident_kib("VmHWM")
        result["peak_mem_mb"] = None if base is None or peak is None else (peak - base) / 1024

    def available_bytes(self) -> int | None:
        """Memory free for a case now: free device memory on a GPU, ``MemAvailable`` on a
        Linux CPU, ``None`` where it cannot be read."""
        if self.is_cuda:
            return torch.cuda.mem_get_info(self.device)[0]
        kib = _proc_kib("/proc/meminfo", "MemAvailable")
        return None if kib is None else kib * 1024

    def name(self) -> str:
        """The device as results name it: the GPU model, or the CPU and its thread count."""
        if self.is_cuda:
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _proc_kib(path: str, field: str) -> int | None:
    """The KiB figure of ``field`` in a Linux /proc file, ``None`` where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _resident_kib(field: str) -> int | None:
    """This process's ``VmRSS`` / ``VmHWM`` in KiB."""
    return _proc_kib("/proc/self/status", field)


def _release_free_heap_memory() -> None:
    """Returns the C allocator's free pages to the system (glibc ``malloc_trim``), so that
    memory freed by earlier runs does not hide this run's growth of the resident set."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_resident_high_water_mark() -> int | None:
    """Resets VmHWM to the current resident size (Linux) and returns that size in KiB."""
    _release_free_heap_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _resident_kib("VmRSS")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device or the host ran out of memory (PyTorch's CPU allocator
    says "can't allocate memory")."""
    message = str(error).lower()
    return (
        isinstance(error, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in message
        or "can't allocate memory" in message
    )


def spread(times: list[float]) -> dict:
    """p20, p50 (the median) and p80 of a list of timings, linearly interpolated between the
    sorted values."""
    if not times:
        raise ValueError("times must hold at least one timing; got an empty list")
    ordered = sorted(times)

    def percentile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"p20": percentile(0.2), "p50": percentile(0.5), "p80": percentile(0.8)}


def is_busy(stats: dict, threshold: float = BUSY_SPREAD) -> bool:
    """Whether timings with these percentiles (``spread``'s keys) spread so much that the
    machine was busy: p80 above ``threshold`` times p20."""
    if not threshold >= 1:
        raise ValueError(f"threshold must be at least 1 (p80 >= p20 always); got {threshold!r}")
    return stats["p80"] > threshold * stats["p20"]


def measure_ms(device: Device, fn, *, min_repeats: int = 5, warmup: int = 0, setup=None, statistic=spread):
    """``statistic`` (default: p20, p50, p80) of the milliseconds of ``fn()`` (or
    ``fn(setup())``, setup untimed) after ``warmup`` untimed calls, run at least
    ``min_repeats`` times and until ``device.min_seconds`` were timed (at most 1000 runs)."""
    for _ in range(warmup):
        fn() if setup is None else fn(setup())
    device.synchronize()
    times, budget_ms = [], device.min_seconds * 1e3
    while len(times) < min_repeats or (sum(times) < budget_ms and len(times) < 1000):
        if setup is None:
            times.append(device.time_ms(fn))
        else:
            state = setup()
            device.synchronize()
            times.append(device.time_ms(functools.partial(fn, state)))
    return statistic(times)


def _input_rotation(device: Device, input_bytes: int) -> int:
    """Input sets cycled through: enough to exceed the GPU's L2 cache twice (at most 8 and
    within a quarter of free memory); 2 on a CPU."""
    if not device.is_cuda:
        return 2
    l2_bytes = getattr(torch.cuda.get_device_properties(device.device), "L2_cache_size", 50 * 2**20)
    free_bytes, _ = torch.cuda.mem_get_info(device.device)
    wanted = math.ceil(2 * l2_bytes / max(input_bytes, 1))
    return max(1, min(8, wanted, free_bytes // 4 // max(input_bytes, 1)))


@contextlib.contextmanager
def environment_variables(values: dict[str, str] | None):
    """Sets ``values`` in ``os.environ`` for the enclosed work and restores what was there."""
    saved = {name: os.environ.get(name) for name in values or {}}
    os.environ.update(values or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure_case(case, device: Device, min_repeats: int) -> dict:
    """Percentiles of the milliseconds of each pass of ``case`` (a ``cases.Case``) and the
    peak extra memory of one forward + backward. Two untimed forward + backward runs warm the
    case up (the first compiles and allocates); the second is the one whose memory is
    measured, as warm as the timed runs that follow. ``case.environment`` is set throughout
    (forward and backward alike)."""
    with environment_variables(case.environment):
        return _measure_case(case, device, min_repeats)


def _measure_case(case, device: Device, min_repeats: int) -> dict:
    """``measure_case`` without the environment."""
    first = case.make_inputs()
    input_bytes = sum(t.numel() * t.element_size() for t in first)
    input_sets = [first] + [case.make_inputs() for _ in range(_input_rotation(device, input_bytes) - 1)]
    rotation = itertools.cycle(input_sets)

    def next_inputs():
        inputs = next(rotation)
        for tensor in inputs:
            tensor.grad = None
        return inputs

    def forward(inputs):
        return case.run(*inputs)

    def backward(output):
        output.backward(torch.ones_like(output))

    def forward_backward(inputs):
        backward(case.run(*inputs))

    forward_backward(next_inputs())
    result = {}
    with device.peak_memory(result):
        forward_backward(next_inputs())
    result |= {
        "forward": measure_ms(device, forward, min_repeats=min_repeats, setup=next_inputs),
        "backward": measure_ms(
            device, backward, min_repeats=min_repeats, setup=lambda: forward(next_inputs())
        ),
        "forward+backward": measure_ms(device, forward_backward, min_repeats=min_repeats, setup=next_inputs),
    }
    return result


def measure_call_us(device: Device, fn: Callable[[], object], *, calls: int = 200, min_repeats: int = 10):
    """p20, p50 and p80 of the microseconds one ``fn()`` costs, each timing covering ``calls``
    back-to-back calls: for an op on tiny tensors this is its per-call overhead (argument
    checks, backend choice, dispatch, launch) at the rate a loop of calls sustains."""

    def many_calls():
        for _ in range(calls):
            fn()

    milliseconds = measure_ms(device, many_calls, min_repeats=min_repeats, warmup=1)
    return {key: value * 1e3 / calls for key, value in milliseconds.items()}


CEILING_HEADLINES = ("fastest", "median")


def measure_ceilings(device: Device, dtype: torch.dtype, headline: str = "fastest") -> dict:
    """A large device-to-device copy (GB/s, read + write) and large matmuls (TFLOP/s on random
    data) in bf16 and in the benchmark dtype. ``headline`` picks the run a ceiling is computed
    from: ``"fastest"`` (what the device can do) or ``"median"``; ``"timings_ms"`` keeps the
    p20/p50/p80 and fastest milliseconds of each, and ``"sizes"`` what was timed."""
    if headline not in CEILING_HEADLINES:
        raise ValueError(f"headline must be one of {', '.join(CEILING_HEADLINES)}; got {headline!r}")

    def statistic(times):
        return spread(times) | {"fastest": min(times)}

    def headline_ms(timings):
        return timings["fastest" if headline == "fastest" else "p50"]

    copy_bytes = 2**30 if device.is_cuda else 2**28
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device.device).uniform_()
    target = torch.empty_like(source)
    copy_ms = measure_ms(device, functools.partial(target.copy_, source), warmup=2, statistic=statistic)
    del source, target
    ceilings = {"copy_gbps": 2 * copy_bytes / headline_ms(copy_ms) / 1e6}
    timings, sizes = {"copy": copy_ms}, {"copy_bytes": copy_bytes}
    for matmul_dtype in dict.fromkeys((torch.bfloat16, dtype)):
        name = str(matmul_dtype).removeprefix("torch.")
        # CPUs without bf16/fp16 matrix units run half-precision matmuls slowly: a smaller
        # matrix keeps the ceiling measurement from dominating a quick run.
        size = 8192 if device.is_cuda else 2048 if matmul_dtype == torch.float32 else 256
        a = torch.randn(size, size, device=device.device).to(matmul_dtype)
        b = torch.randn(size, size, device=device.device).to(matmul_dtype)
        milliseconds = measure_ms(
            device, lambda a=a, b=b: a @ b, min_repeats=3, warmup=2, statistic=statistic
        )
        ceilings[f"matmul_{name}_tflops"] = 2 * size**3 / headline_ms(milliseconds) / 1e9
        timings[f"matmul_{name}"], sizes[f"matmul_{name}_size"] = milliseconds, size
    ceilings["bf16_tflops"] = ceilings["matmul_bfloat16_tflops"]
    ceilings |= {"headline": headline, "timings_ms": timings, "sizes": sizes}
    return ceilings
