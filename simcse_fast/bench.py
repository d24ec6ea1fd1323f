"""The benchmark harness behind ``simcse-fast bench``.

For each op (``masked_mean_pool``, ``masked_max_pool``, ``info_nce``), shape and
implementation — every simcse_fast backend that runs on the device and the peers a user would
pick instead (the eager reference, ``torch.compile`` of it, sentence-transformers, inf_cl) —
it measures forward, backward and forward + backward separately:

* time: the median of many runs after warm-up (compilation is never timed), with CUDA events
  on a GPU and ``perf_counter`` on a CPU; several input sets are rotated so that caches do not
  flatter small shapes;
* peak extra memory of forward + backward: ``torch.cuda.max_memory_allocated`` after a reset on
  a GPU, the resident-set high-water mark (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``) on a CPU;
* throughput against ceilings measured in the same run: GB/s of the bytes a pooling pass must
  move (``pooling_bytes``) against a large device copy, useful TFLOP/s of the loss
  (``loss_flops``: 2NMD forward, 4NMD backward) against a large matmul.

An implementation that runs out of memory is recorded as ``"oom"`` at that shape (and not tried
at larger ones), never as a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, available_backends, functional, reference

OPS = {"pooling": ("masked_mean_pool", "masked_max_pool"), "loss": ("info_nce",)}
PASSES = ("forward", "backward", "forward+backward")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Shapes per preset and device type: pooling (B, L, H), loss (N, D) with M = N.
PRESETS = {
    "quick": {
        "cpu": {"pooling": [(32, 128, 384)], "loss": [(512, 384)]},
        "cuda": {"pooling": [(64, 128, 768), (256, 512, 1024)], "loss": [(512, 768), (4096, 768)]},
    },
    "default": {
        "cpu": {"pooling": [(32, 128, 384), (64, 256, 768)], "loss": [(512, 384), (2048, 768)]},
        "cuda": {
            "pooling": [(64, 128, 768), (128, 256, 1024), (256, 512, 1024)],
            "loss": [(n, d) for d in (384, 768, 1024) for n in (512, 4096, 32768)],
        },
    },
    "full": {
        "cpu": {
            "pooling": [(32, 128, 384), (64, 256, 768), (128, 512, 1024)],
            "loss": [(n, d) for d in (384, 768) for n in (512, 2048, 8192)],
        },
        "cuda": {
            "pooling": [
                (64, 128, 768),
                (128, 256, 1024),
                (256, 512, 1024),
                (512, 512, 1024),
                (1024, 512, 1024),
            ],
            "loss": [(512 * 2**k, d) for d in (384, 768, 1024) for k in range(12)],
        },
    },
}

MIN_MEASURE_SECONDS = {"cpu": 0.3, "cuda": 0.2}
"""Each pass is repeated until this much time was measured (and at least ``min_repeats``)."""


def pooling_bytes(batch: int, seq_len: int, hidden: int, element_size: int, mask_element_size: int = 1):
    """Bytes a pooling pass must move, by pass: the forward reads the token embeddings and the
    mask and writes the pooled rows; the backward reads the output gradient and the mask and
    writes the token gradient."""
    tokens = batch * seq_len * hidden * element_size
    mask = batch * seq_len * mask_element_size
    pooled = batch * hidden * element_size
    forward = tokens + mask + pooled
    backward = pooled + mask + tokens
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def loss_flops(n: int, m: int, d: int):
    """Useful FLOPs of the loss by pass: ``2NMD`` for the similarity matrix in the forward,
    ``4NMD`` for its two gradient products in the backward."""
    return {"forward": 2 * n * m * d, "backward": 4 * n * m * d, "forward+backward": 6 * n * m * d}


@dataclasses.dataclass
class Case:
    """One implementation of one op at one shape: ``make_inputs()`` builds fresh leaf tensors
    (requiring grad), ``run(*inputs)`` returns the output whose backward is timed."""

    op: str
    impl: str
    shape: dict
    make_inputs: Callable[[], list[torch.Tensor]]
    run: Callable[..., torch.Tensor]


class Device:
    """Timing, synchronization and memory measurement on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
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

    def name(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _resident_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


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
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def measure_ceilings(device: Device, dtype: torch.dtype) -> dict:
    """A large device-to-device copy (GB/s, read + write) and large matmuls (TFLOP/s) in bf16
    and in the benchmark dtype, each at its fastest run: a ceiling is what the device can do."""
    copy_bytes = 2**30 if device.is_cuda else 2**28
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device.device).uniform_()
    target = torch.empty_like(source)
    copy_ms = _measure_ms(device, functools.partial(target.copy_, source), min_repeats=5, statistic=min)
    del source, target
    ceilings = {"copy_gbps": 2 * copy_bytes / copy_ms / 1e6}
    for matmul_dtype in dict.fromkeys((torch.bfloat16, dtype)):
        # CPUs without bf16/fp16 matrix units run half-precision matmuls slowly: a smaller
        # matrix keeps the ceiling measurement from dominating a quick run.
        size = 8192 if device.is_cuda else 2048 if matmul_dtype == torch.float32 else 256
        a = torch.randn(size, size, device=device.device).to(matmul_dtype)
        b = torch.randn(size, size, device=device.device).to(matmul_dtype)
        tflops = 2 * size**3 / _measure_ms(device, lambda a=a, b=b: a @ b, min_repeats=3, statistic=min) / 1e9
        ceilings[f"matmul_{str(matmul_dtype).removeprefix('torch.')}_tflops"] = tflops
    ceilings["bf16_tflops"] = ceilings["matmul_bfloat16_tflops"]
    return ceilings


def spread(times: list[float]) -> dict:
    """Median and 20th / 80th percentiles of a list of timings (milliseconds)."""
    ordered = sorted(times)

    def percentile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"median": statistics.median(ordered), "p20": percentile(0.2), "p80": percentile(0.8)}


def _measure_ms(device: Device, fn, *, min_repeats: int = 5, warmup: int = 2, setup=None, statistic=spread):
    """``statistic`` (default: median, p20, p80) of the milliseconds of ``fn()`` (or
    ``fn(setup())``, setup untimed), run at least ``min_repeats`` times and until
    ``MIN_MEASURE_SECONDS`` were timed."""
    for _ in range(warmup):
        fn() if setup is None else fn(setup())
    device.synchronize()
    times, budget = [], MIN_MEASURE_SECONDS[device.device.type] * 1e3
    while len(times) < min_repeats or (sum(times) < budget and len(times) < 1000):
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


def measure_case(case: Case, device: Device, min_repeats: int) -> dict:
    """Median milliseconds of each pass and the peak extra memory of forward + backward."""
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

    result = {
        "forward": _measure_ms(device, forward, min_repeats=min_repeats, setup=next_inputs),
        "backward": _measure_ms(
            device, backward, min_repeats=min_repeats, setup=lambda: forward(next_inputs())
        ),
        "forward+backward": _measure_ms(device, forward_backward, min_repeats=min_repeats, setup=next_inputs),
    }
    inputs = next_inputs()
    with device.peak_memory(result):
        forward_backward(inputs)
    return result


def _compiled(fn):
    compiled = torch.compile(fn)

    def run(*args, **kwargs):
        return compiled(*args, **kwargs)

    return run


def _sentence_transformers_peers() -> tuple[object, object, str | None]:
    """(MultipleNegativesRankingLoss, Pooling) of the installed sentence-transformers, or the
    reason they are missing."""
    try:
        import sentence_transformers  # noqa: F401
    except Exception as error:  # any import failure means the peer is missing
        return None, None, f"sentence-transformers not importable ({error})"
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.models import Pooling
    return MultipleNegativesRankingLoss, Pooling, None


def _inf_cl_loss() -> tuple[object, str | None]:
    try:
        from inf_cl import cal_inf_loss
    except Exception as error:  # any import failure means the peer is missing
        return None, f"inf_cl not importable ({error})"
    return cal_inf_loss, None


def build_cases(op: str, shape: tuple, dtype: torch.dtype, device: Device, *, compile_peers: bool):
    """Every implementation of ``op`` at ``shape`` that can run here, and the peers that
    cannot, with the reason."""
    generator = torch.Generator(device=device.device)
    generator.manual_seed(0)
    missing: dict[str, str] = {}
    backends = [name for name in available_backends() if name != "triton" or device.is_cuda]

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device.device, dtype=torch.float32).to(dtype)

    cases = []
    if op in OPS["pooling"]:
        batch, seq_len, hidden = shape
        lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator, device=device.device)
        mask = torch.arange(seq_len, device=device.device)[None, :] < lengths[:, None]
        shape_dict = {"B": batch, "L": seq_len, "H": hidden}

        def make_inputs():
            return [randn(batch, seq_len, hidden).requires_grad_()]

        ref = functools.partial(getattr(reference, op), attention_mask=mask)
        for backend in backends:
            ours = functools.partial(getattr(functional, op), attention_mask=mask, backend=backend)
            cases.append(Case(op, f"simcse_fast[{backend}]", shape_dict, make_inputs, ours))
        cases.append(Case(op, "reference (eager)", shape_dict, make_inputs, ref))
        if compile_peers:
            cases.append(Case(op, "reference (torch.compile)", shape_dict, make_inputs, _compiled(ref)))
        else:
            missing["reference (torch.compile)"] = (
                "skipped by --quick (compilation takes longer than the run)"
            )
        _, st_pooling, reason = _sentence_transformers_peers()
        if st_pooling is None:
            missing["sentence-transformers Pooling"] = reason
        else:
            module = st_pooling(hidden, pooling_mode="mean" if op == "masked_mean_pool" else "max").to(
                device.device
            )

            def st_pool(x):
                return module({"token_embeddings": x, "attention_mask": mask.long()})["sentence_embedding"]

            cases.append(Case(op, "sentence-transformers Pooling", shape_dict, make_inputs, st_pool))
        return cases, missing

    n, d = shape
    shape_dict = {"N": n, "M": n, "D": d}

    def make_pair():
        return [randn(n, d).requires_grad_(), randn(n, d).requires_grad_()]

    for backend in backends:
        ours = functools.partial(functional.info_nce, backend=backend)
        cases.append(Case(op, f"simcse_fast[{backend}]", shape_dict, make_pair, ours))
    cases.append(Case(op, "reference (eager)", shape_dict, make_pair, reference.info_nce))
    if compile_peers:
        cases.append(
            Case(op, "reference (torch.compile)", shape_dict, make_pair, _compiled(reference.info_nce))
        )
    else:
        missing["reference (torch.compile)"] = "skipped by --quick (compilation takes longer than the run)"
    st_loss, _, reason = _sentence_transformers_peers()
    if st_loss is None:
        missing["sentence-transformers MNRL"] = reason
    else:
        mnrl = st_loss(model=None, scale=20.0)

        def st_info_nce(anchors, candidates):
            return mnrl.compute_loss_from_embeddings([anchors, candidates], None)

        cases.append(Case(op, "sentence-transformers MNRL", shape_dict, make_pair, st_info_nce))
    inf_cl, reason = _inf_cl_loss()
    if inf_cl is None:
        missing["inf_cl"] = reason
    elif not device.is_cuda:
        missing["inf_cl"] = "needs a CUDA device"
    else:
        head_dim = next(size for size in (256, 128, 64, 32, 16, d) if d % size == 0)
        scale = torch.tensor(20.0, device=device.device)

        def inf_cl_info_nce(anchors, candidates):
            unit_a, unit_c = F.normalize(anchors, dim=1), F.normalize(candidates, dim=1)
            return inf_cl(unit_a, unit_c, scale=scale, head_dim=head_dim)

        cases.append(Case(op, "inf_cl", shape_dict, make_pair, inf_cl_info_nce))
    return cases, missing


def rows_for(case: Case, measured: dict, dtype: torch.dtype, ceilings: dict) -> list[dict]:
    """Result rows (one per pass) with throughput and fraction of the matching ceiling."""
    dtype_name = str(dtype).removeprefix("torch.")
    rows = []
    for pass_name in PASSES:
        row = {
            "op": case.op,
            "impl": case.impl,
            "pass": pass_name,
            "shape": case.shape,
            "dtype": dtype_name,
            "status": "ok",
            "median_ms": measured[pass_name]["median"],
            "p20_ms": measured[pass_name]["p20"],
            "p80_ms": measured[pass_name]["p80"],
            "peak_mem_mb": measured.get("peak_mem_mb"),
        }
        seconds = measured[pass_name]["median"] / 1e3
        if case.op == "info_nce":
            flops = loss_flops(case.shape["N"], case.shape["M"], case.shape["D"])[pass_name]
            row["tflops"] = flops / seconds / 1e12
            row["fraction_of_ceiling"] = row["tflops"] / ceilings[f"matmul_{dtype_name}_tflops"]
        else:
            element_size = torch.empty((), dtype=dtype).element_size()
            moved = pooling_bytes(case.shape["B"], case.shape["L"], case.shape["H"], element_size)[pass_name]
            row["gbps"] = moved / seconds / 1e9
            row["fraction_of_ceiling"] = row["gbps"] / ceilings["copy_gbps"]
        rows.append(row)
    return rows


def failed_rows(case: Case, dtype: torch.dtype, status: str) -> list[dict]:
    dtype_name = str(dtype).removeprefix("torch.")
    return [
        {
            "op": case.op,
            "impl": case.impl,
            "pass": pass_name,
            "shape": case.shape,
            "dtype": dtype_name,
            "status": status,
            "median_ms": None,
            "p20_ms": None,
            "p80_ms": None,
            "fraction_of_ceiling": None,
            "peak_mem_mb": None,
        }
        for pass_name in PASSES
    ]


def git_commit() -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def environment(device: Device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # Triton is optional
        triton_version = None
    return {
        "device": device.name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "simcse_fast": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_benchmark(
    ops=("pooling", "loss"),
    preset: str = "default",
    sizes: dict | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    min_repeats: int = 10,
    progress: bool = True,
) -> dict:
    """Run the benchmark and return the result document (see the module docstring for the
    method and ``write_results`` for what is written). ``preset`` picks the shapes unless
    ``sizes`` gives them ({"pooling": [(B, L, H)], "loss": [(N, D)]}); ``"quick"`` also skips
    the ``torch.compile`` peer, whose compilation would dominate a short run."""
    from tqdm.auto import tqdm

    bench_device = Device(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = dtype or (torch.bfloat16 if bench_device.is_cuda else torch.float32)
    shapes = sizes or PRESETS[preset][bench_device.device.type]
    tasks = [(op, shape) for family in ops for op in OPS[family] for shape in shapes.get(family, [])]
    document = environment(bench_device)
    document.update(
        {"preset": preset if sizes is None else "custom", "dtype": str(dtype).removeprefix("torch.")}
    )
    document["ceilings"] = measure_ceilings(bench_device, dtype)
    document["rows"], document["missing_peers"] = [], {}
    out_of_memory: set[tuple[str, str, int]] = set()
    with tqdm(total=len(tasks), desc="simcse-fast bench", unit="shape", disable=not progress) as bar:
        for op, shape in tasks:
            cases, missing = build_cases(op, shape, dtype, bench_device, compile_peers=preset != "quick")
            document["missing_peers"].update(missing)
            for case in cases:
                bar.set_postfix_str(f"{op} {case.impl} {shape}")
                memory_key = (op, case.impl, shape[-1])
                if memory_key in out_of_memory:
                    document["rows"] += failed_rows(case, dtype, "oom")
                    continue
                try:
                    measured = measure_case(case, bench_device, min_repeats)
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    out_of_memory.add(memory_key)
                    document["rows"] += failed_rows(case, dtype, "oom")
                    gc.collect()
                    if bench_device.is_cuda:
                        torch.cuda.empty_cache()
                    continue
                document["rows"] += rows_for(case, measured, dtype, document["ceilings"])
            bar.update()
    return document


def _shape_text(shape: dict) -> str:
    return "x".join(f"{key}={value}" for key, value in shape.items())


def markdown_table(document: dict) -> str:
    ceilings = document["ceilings"]
    lines = [
        f"simcse_fast benchmark — {document['device']} — {document['dtype']} — torch {document['torch']}, "
        f"triton {document['triton']}, commit {document['commit']}, {document['date']}",
        "",
        f"Ceilings measured in this run: copy {ceilings['copy_gbps']:.3g} GB/s, "
        f"bf16 matmul {ceilings['bf16_tflops']:.3g} TFLOP/s, "
        f"{document['dtype']} matmul {ceilings['matmul_' + document['dtype'] + '_tflops']:.3g} TFLOP/s.",
        "",
        "| op | shape | impl | pass | median ms | p20-p80 ms | GB/s or TFLOP/s | % of ceiling "
        "| peak extra MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in document["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['op']} | {_shape_text(row['shape'])} | {row['impl']} | {row['pass']} | "
                         f"{row['status']} | | | | |")  # fmt: skip
            continue
        rate = f"{row['gbps']:.1f} GB/s" if "gbps" in row else f"{row['tflops']:.3f} TFLOP/s"
        memory = "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}"
        lines.append(
            f"| {row['op']} | {_shape_text(row['shape'])} | {row['impl']} | {row['pass']} | "
            f"{row['median_ms']:.3f} | {row['p20_ms']:.3f}-{row['p80_ms']:.3f} | {rate} | "
            f"{100 * row['fraction_of_ceiling']:.1f} | {memory} |"
        )
    if document["missing_peers"]:
        lines += ["", "Peers not measured:"]
        lines += [f"- {name}: {reason}" for name, reason in sorted(document["missing_peers"].items())]
    return "\n".join(lines) + "\n"


def write_plots(document: dict, out_dir: Path) -> list[Path]:
    """PNG plots: loss time and memory vs N (forward + backward), pooling bandwidth vs input
    size. Needs matplotlib (``pip install simcse-fast[bench]``); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [row for row in document["rows"] if row["status"] == "ok" and row["pass"] == "forward+backward"]
    loss_rows = [row for row in ok if row["op"] == "info_nce"]
    if loss_rows:
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
        for impl, dim in sorted({(row["impl"], row["shape"]["D"]) for row in loss_rows}):
            points = sorted(
                (r["shape"]["N"], r["median_ms"], r["peak_mem_mb"] or 0.0)
                for r in loss_rows
                if r["impl"] == impl and r["shape"]["D"] == dim
            )
            label = f"{impl}, D={dim}"
            time_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            memory_axis.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
        time_axis.set_yscale("log")
        memory_axis.set_yscale("symlog", linthresh=1.0)  # a peak can be 0 MB
        for axis, title in (
            (time_axis, "info_nce forward+backward time (ms)"),
            (memory_axis, "peak extra memory (MB)"),
        ):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("N = M")
            axis.set_title(title)
            axis.grid(True, which="both", alpha=0.3)
        time_axis.legend(fontsize=7)
        figure.suptitle(f"{document['device']} — {document['dtype']}")
        figure.tight_layout()
        path = out_dir / "loss_time_memory.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    pooling_rows = [row for row in ok if row["op"] != "info_nce"]
    if pooling_rows:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for op, impl in sorted({(row["op"], row["impl"]) for row in pooling_rows}):
            points = sorted(
                (r["shape"]["B"] * r["shape"]["L"] * r["shape"]["H"], r["gbps"])
                for r in pooling_rows
                if r["op"] == op and r["impl"] == impl
            )
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{op} {impl}")
        axis.axhline(document["ceilings"]["copy_gbps"], color="black", linestyle="--", label="device copy")
        axis.set_xscale("log")
        axis.set_xlabel("token embedding elements (B·L·H)")
        axis.set_ylabel("GB/s, forward+backward")
        axis.set_title(f"pooling bandwidth — {document['device']} — {document['dtype']}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / "pooling_bandwidth.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def write_results(document: dict, out_dir: Path) -> list[Path]:
    """``results.json`` (the document), ``results.md`` (the table) and the PNG plots when
    matplotlib is installed; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    markdown_path.write_text(markdown_table(document))
    written = [json_path, markdown_path]
    try:
        written += write_plots(document, out_dir)
    except ImportError:
        pass
    return written
