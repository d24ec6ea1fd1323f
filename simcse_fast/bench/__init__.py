"""The benchmark harness behind ``simcse-fast bench``.

For each op (padded pooling ``masked_mean_pool`` / ``masked_max_pool``, packed pooling
``packed_mean_pool`` / ``packed_max_pool``, the loss ``info_nce``; on request the recipes
``mnrl_hardness`` and ``gist`` beside sentence-transformers' classes), shape and implementation —
every simcse_fast backend that runs on the device (for the loss, every loss strategy, pinned,
and the one ``"auto"`` picks) and the peers a user would pick instead (the eager reference,
``torch.compile`` of it, PyTorch's chunked ``F.linear_cross_entropy``, sentence-transformers,
inf_cl; for packed pooling the padded op on the same sentences) — it measures forward,
backward and forward + backward separately: p20, median and p80 of the time, peak extra
memory, and throughput against ceilings measured in the same run (GB/s of the bytes a pooling
pass must move against a large device copy, useful TFLOP/s of the loss against a large
matmul). It also times one tiny ``masked_mean_pool`` call per backend: the per-call (dispatch)
overhead.

A pass whose p80/p20 exceeds ``timing.BUSY_SPREAD``, or a forward or backward slower than the
forward + backward of the same case, is listed in the document's ``busy_warnings``: the machine
was busy. An implementation that runs out of memory is recorded as ``"oom"`` at that shape (and
not tried at larger ones), never as a crash; one whose estimated need exceeds the memory budget
is recorded as ``"skipped: would need X GB"`` without running (on a CPU, running out of memory
means the kernel kills the process).

Layout: ``cases`` (shapes, work models, implementations per op family), ``timing`` (clocks,
memory, percentiles), ``report`` (markdown, JSON, plots); this module runs them.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable

import torch

from .. import similarity
from .cases import (
    DEFAULT_FAMILIES,
    DISPATCH_SHAPE,
    FAMILIES,
    FAMILY_OF,
    OPS,
    PASSES,
    PRESETS,
    Case,
    build_loss,
    build_packed,
    build_pooling,
    build_recipes,
    dispatch_calls,
    loss_flops,
    packed_pooling_bytes,
    pooling_bytes,
)
from .report import busy_warnings, environment, git_commit, markdown_table, write_plots, write_results
from .timing import (
    BUSY_SPREAD,
    Device,
    environment_variables,
    is_busy,
    is_out_of_memory,
    measure_call_us,
    measure_case,
    measure_ceilings,
    spread,
)

__all__ = [
    "BUSY_SPREAD",
    "DEFAULT_FAMILIES",
    "DISPATCH_SHAPE",
    "MEASUREMENT",
    "OPS",
    "PASSES",
    "PRESETS",
    "Case",
    "Device",
    "build_loss",
    "build_packed",
    "build_pooling",
    "build_recipes",
    "busy_warnings",
    "case_rows",
    "environment",
    "environment_variables",
    "git_commit",
    "is_busy",
    "is_out_of_memory",
    "loss_flops",
    "markdown_table",
    "measure_case",
    "packed_pooling_bytes",
    "pooling_bytes",
    "run_benchmark",
    "spread",
    "write_plots",
    "write_results",
]

MEASUREMENT = {
    "quick": (3, {"cpu": 0.1, "cuda": 0.1}),
    "default": (10, {"cpu": 0.3, "cuda": 0.2}),
    "full": (10, {"cpu": 0.3, "cuda": 0.2}),
}
"""Per preset: the timed runs per pass at least, and the seconds timed per pass at least on a
CPU / GPU (short passes run more often). --quick's few runs keep its largest loss sizes within
its minute; of three runs, p20 and p80 interpolate between the fastest, the median and the
slowest."""


def _memory_budget(device: Device, budget_gb: float | None) -> tuple[float | None, str]:
    """The memory a case may need, in GB, and where the figure comes from."""
    if budget_gb is not None:
        if not budget_gb > 0:
            raise ValueError(f"memory_budget_gb must be positive; got {budget_gb!r}")
        return budget_gb, "given"
    available = device.available_bytes()
    if available is None:
        return None, "no budget: available memory unknown"
    if device.is_cuda:
        return available / 1e9, "free device memory at the start"
    # Half: the estimates are approximate and the rest of the machine keeps running.
    return available / 2 / 1e9, "half the memory available at the start"


def _row(case: Case, pass_name: str, dtype: torch.dtype, status: str, stats=None, peak_mem_mb=None) -> dict:
    """The fields every result row has: what was measured, its status, and the percentiles
    ``stats`` of its time (``None`` when it did not run)."""

    def timing(key: str):
        return None if stats is None else stats[key]

    return {
        "op": case.op,
        "impl": case.impl,
        "pass": pass_name,
        "shape": case.shape,
        "dtype": str(dtype).removeprefix("torch."),
        "status": status,
        "median_ms": timing("p50"),
        "p20_ms": timing("p20"),
        "p50_ms": timing("p50"),
        "p80_ms": timing("p80"),
        "spread": None if stats is None else stats["p80"] / stats["p20"],
        "peak_mem_mb": peak_mem_mb,
    }


def rows_for(case: Case, measured: dict, dtype: torch.dtype, ceilings: dict) -> list[dict]:
    """Result rows (one per pass) with percentiles, spread, throughput and fraction of the
    matching ceiling."""
    family = FAMILY_OF[case.op]
    work = family.work(case.shape, torch.empty((), dtype=dtype).element_size())
    rows = []
    for pass_name in PASSES:
        row = _row(case, pass_name, dtype, "ok", measured[pass_name], measured.get("peak_mem_mb"))
        rate = work[pass_name] / (row["median_ms"] / 1e3)
        if family.rate == "tflops":
            row["tflops"] = rate / 1e12
            row["fraction_of_ceiling"] = row["tflops"] / ceilings[f"matmul_{row['dtype']}_tflops"]
        else:
            row["gbps"] = rate / 1e9
            row["fraction_of_ceiling"] = row["gbps"] / ceilings["copy_gbps"]
        rows.append(row)
    return rows


def failed_rows(case: Case, dtype: torch.dtype, status: str) -> list[dict]:
    """Result rows (one per pass) of a case that did not run: ``status`` says why, and
    ``memory_need_mb`` is its estimated need where it has one."""
    need = None if case.memory_need is None else case.memory_need / 2**20
    return [
        _row(case, pass_name, dtype, status) | {"fraction_of_ceiling": None, "memory_need_mb": need}
        for pass_name in PASSES
    ]


def _measure_dispatch(device: Device, dtype: torch.dtype, document: dict) -> None:
    """Adds each backend's per-call overhead (``dispatch_overhead_us``: p20, p50, p80) to
    ``document``."""
    calls, missing = dispatch_calls(device, dtype)
    document["missing_peers"].update(missing)
    document["dispatch_shape"] = list(DISPATCH_SHAPE)
    document["dispatch_overhead_us"] = {impl: measure_call_us(device, call) for impl, call in calls.items()}


ERROR_POLICIES = ("raise", "record")


def case_rows(case: Case, device: Device, dtype, min_repeats: int, budget_gb, ceilings: dict, oom: set,
              errors: str = "raise"):  # fmt: skip
    """The result rows of one case: measured, or why not. ``oom`` holds (op, implementation,
    width: D of the loss, H of pooling) of the cases that ran out of memory: the shapes that
    follow at that width, larger in the presets, are not tried. Another error is raised, or
    with ``errors="record"`` recorded as the rows' status (``"error: ..."``, the traceback on
    stderr)."""
    memory_key = (case.op, case.impl, case.shape.get("D", case.shape.get("H")))
    if memory_key in oom:
        return failed_rows(case, dtype, "oom")
    if budget_gb is not None and case.memory_need is not None and case.memory_need > budget_gb * 1e9:
        return failed_rows(case, dtype, f"skipped: would need {case.memory_need / 1e9:.1f} GB")
    try:
        measured = measure_case(case, device, min_repeats)
    except Exception as error:
        if not is_out_of_memory(error):
            if errors == "raise":
                raise
            traceback.print_exc()
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            return failed_rows(case, dtype, f"error: {type(error).__name__}: {first_line}")
        oom.add(memory_key)
        gc.collect()
        if device.is_cuda:
            torch.cuda.empty_cache()
        return failed_rows(case, dtype, "oom")
    return rows_for(case, measured, dtype, ceilings)


def run_benchmark(
    ops=DEFAULT_FAMILIES,
    preset: str = "default",
    sizes: dict | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    min_repeats: int | None = None,
    progress: bool = True,
    memory_budget_gb: float | None = None,
    *,
    ceilings: dict | None = None,
    min_seconds: float | None = None,
    compile_peers: bool | None = None,
    select: Callable[[str], bool] | None = None,
    dispatch: bool = True,
    on_rows: Callable[[dict, list[dict]], None] | None = None,
    errors: str = "raise",
) -> dict:
    """Run the benchmark and return the result document (see the module docstring for the
    method and ``write_results`` for what is written). ``ops`` names op families (keys of
    ``OPS``). ``preset`` picks the shapes unless ``sizes`` gives them (``{"pooling": [(B, L,
    H)], "packed": [(B, L, H)], "loss": [(N, D)]}``) and the measurement (``MEASUREMENT``,
    unless ``min_repeats`` is given); ``"quick"`` also skips the ``torch.compile`` peer, whose
    compilation would dominate a short run. ``memory_budget_gb`` (default: the free device
    memory on a GPU, half the available memory on a CPU) bounds the estimated need of a case.

    For runs split into parts (the GPU check): ``ceilings`` measured before are used instead of
    measuring them again; ``min_seconds`` replaces the preset's least time measured per pass
    (``0``: ``min_repeats`` runs only); ``compile_peers`` overrides the preset's choice of timing the
    ``torch.compile`` peers; only the implementations whose name ``select(impl)`` accepts are
    built and run;
    ``dispatch=False`` leaves out the dispatch overhead; ``on_rows(document, rows)`` is called
    with the rows of each case as soon as they are measured, so a caller can keep them even if
    a later case never returns; ``errors="record"`` records a case that fails (other than by
    running out of memory) as an ``"error: ..."`` row instead of raising."""
    from tqdm.auto import tqdm

    unknown = [family for family in ops if family not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops must name op families among {', '.join(OPS)}; got {ops!r}")
    if preset not in MEASUREMENT:
        raise ValueError(f"preset must be one of {', '.join(MEASUREMENT)}; got {preset!r}")
    if errors not in ERROR_POLICIES:
        raise ValueError(f"errors must be one of {', '.join(ERROR_POLICIES)}; got {errors!r}")
    default_repeats, preset_seconds = MEASUREMENT[preset]
    min_repeats = default_repeats if min_repeats is None else min_repeats
    if min_repeats < 1:
        raise ValueError(f"min_repeats must be at least 1; got {min_repeats!r}")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if min_seconds is None:
        min_seconds = preset_seconds[torch_device.type]
    bench_device = Device(torch_device, min_seconds)
    budget_gb, budget_source = _memory_budget(bench_device, memory_budget_gb)
    dtype = dtype or (torch.bfloat16 if bench_device.is_cuda else torch.float32)
    shapes = sizes or PRESETS[preset][torch_device.type]
    compile_peers = preset != "quick" if compile_peers is None else compile_peers
    tasks = [(family, op, shape) for family in ops for op in OPS[family] for shape in shapes.get(family, [])]
    document = environment(bench_device)
    document.update(
        {
            "preset": preset if sizes is None else "custom",
            "dtype": str(dtype).removeprefix("torch."),
            "memory_budget_gb": budget_gb,
            "memory_budget_source": budget_source,
            "ceilings": ceilings if ceilings is not None else measure_ceilings(bench_device, dtype),
            "rows": [],
            "missing_peers": {},
        }
    )
    if dispatch:
        _measure_dispatch(bench_device, dtype, document)
    oom: set[tuple[str, str, int | None]] = set()
    bar = tqdm(total=len(tasks), desc="simcse-fast bench", unit="shape", disable=not progress)
    try:
        for family, op, shape in tasks:
            cases, missing = FAMILIES[family].build(
                op, shape, dtype, bench_device, compile_peers, wanted=select
            )
            document["missing_peers"].update(missing)
            # Each memory measurement starts with a full garbage collection, which the heap of
            # torch, transformers and sentence-transformers makes slow (seconds on a busy CPU):
            # objects alive now, the cases included, are moved out of the collector's sight.
            gc.collect()
            gc.freeze()
            for case in cases:
                if select is not None and not select(case.impl):
                    continue
                bar.set_postfix_str(f"{op} {case.impl} {shape}")
                rows = case_rows(
                    case, bench_device, dtype, min_repeats, budget_gb, document["ceilings"], oom, errors
                )
                document["rows"] += rows
                if family == "loss":
                    document["loss_strategy_choices"] = similarity.strategy_choices()
                if on_rows is not None:
                    on_rows(document, rows)
            bar.update()
    finally:
        bar.close()
        gc.unfreeze()
    document["busy_warnings"] = busy_warnings(document)
    return document
