"""The GPU check: one command that, on a GPU machine and from a fresh copy of the repository,
installs the package, measures the machine's ceilings, runs the GPU tests, benchmarks the loss,
pooling and a training step, and writes everything under one folder.

    python benchmarks/gpu_check.py --out DIR [--dry-run] [--stages NAME,...] [--limits NAME=S,...]
                                   [--budget S] [--commit SHA] [--cuda-archs 90]
    python benchmarks/gpu_check.py --report DIR      # rewrite DIR's tables, summary and plots

Each stage runs in its own process under its own time limit (``STAGES``; ``--limits`` changes
them), within an overall budget (``--budget``, 8 minutes by default): a stage that reaches its
limit is interrupted (SIGINT, then SIGKILL after ``GRACE_S``), what it measured before is
kept, and the next stage starts. The results are rewritten after every stage, so a run that is
cut short still leaves what finished (the plots are drawn at the end; ``--report`` draws them
for a run cut short). ``DIR`` receives at most eight files: ``results.json``
(everything, in the format of ``simcse-fast bench``'s results plus the GPU check's sections),
``results.md`` (the tables), ``summary.md`` (what met its target and what did not),
``gpu_check.log`` (the build log and every stage's output), ``pytest.xml`` (the GPU tests'
junit report) and the plots ``loss_time_memory.png`` and ``pooling_bandwidth.png``.

``--dry-run`` runs every stage on the CPU at tiny sizes (nothing installed, ``torch.compile``
with its ``eager`` backend), in under a minute: the CI test that keeps this script working.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

from gpu_report import summary_lines, targets, write_reports

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0
"""The whole run's wall-clock budget: stages stop early enough for the report to be written."""
GRACE_S = 10.0
"""Seconds an interrupted stage has to write what it measured before it is killed."""
REPORT_RESERVE_S = 15.0
"""Seconds of the budget kept for the last stage's grace and the report."""
MIN_STAGE_S = 5.0
"""A stage with less time than this left in the budget is skipped."""
LOG_CAP_BYTES = 3 * 2**20
"""The log keeps at most this much of one stage's output (its beginning and its end)."""
OUTPUT_FILES = ("results.json", "results.md", "summary.md", "gpu_check.log", "pytest.xml",
                "loss_time_memory.png", "pooling_bandwidth.png")  # fmt: skip
"""Everything written under ``--out`` (a GPU machine returns at most eight files)."""
VERSIONS_OF = ("torch", "triton", "transformers", "sentence-transformers", "numpy", "datasets", "accelerate",
               "pytest", "hypothesis", "matplotlib", "setuptools", "pybind11")  # fmt: skip
"""The packages whose versions a run records."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the stages measure: shapes (loss ``(N, D)`` with M = N, its recipes (hardness
    weighting, GIST) ``(N, D)``, the gradient error's
    ``(N, D)``, pooling ``(B, L, H)``), the training step's encoder (``train_step.ENCODERS``),
    batch, mini-batch, measured steps and the batches of the largest-batch search; how
    (``simcse-fast bench``'s preset, repeats and seconds per pass, the ``torch.compile``
    backend); and the paths ``pytest -m gpu`` runs."""

    dtype: str
    loss: tuple
    recipes: tuple
    precision: tuple
    pooling: tuple
    packed: tuple
    encoder: str
    batch: int
    mini_batch_size: int
    train_repeats: int
    search_start: int
    search_limit: int
    preset: str
    min_repeats: int | None
    min_seconds: float | None
    compile_backend: str
    tests: tuple


GPU_SIZES = Sizes(
    dtype="bfloat16",
    loss=((4096, 768), (32768, 768), (65536, 768)),
    recipes=((4096, 768),),
    precision=(4096, 768),
    pooling=((512, 32, 768), (256, 512, 1024)),
    packed=((512, 32, 768),),
    encoder="distilroberta",
    batch=512,
    mini_batch_size=128,
    train_repeats=3,
    search_start=1024,
    search_limit=2**17,
    preset="default",
    min_repeats=None,
    min_seconds=None,
    compile_backend="inductor",
    tests=("tests",),
)
DRY_RUN_SIZES = Sizes(
    dtype="bfloat16",
    loss=((64, 32), (128, 32)),
    recipes=((32, 16),),
    precision=(64, 32),
    pooling=((4, 8, 32),),
    packed=((4, 8, 32),),
    encoder="tiny-bert",
    batch=16,
    mini_batch_size=8,
    train_repeats=2,
    search_start=32,
    search_limit=32,
    preset="quick",
    min_repeats=2,
    min_seconds=0.0,
    compile_backend="eager",
    tests=("tests/test_packed_pooling.py",),
)


@dataclasses.dataclass
class Context:
    """What a stage's process knows: its name, the work folder shared by the stages, the time
    at which it will be interrupted (``time.time()``), the sizes, and the command's options."""

    stage: str
    work: Path
    deadline: float
    dry_run: bool
    sizes: Sizes
    cuda_archs: str | None = None

    @property
    def result_path(self) -> Path:
        return self.work / f"{self.stage}.json"

    def save(self, **fields) -> None:
        """Merges ``fields`` into the stage's result file (atomically: a stage interrupted while
        writing leaves the previous version)."""
        data = _read_json(self.result_path) or {}
        data.update(fields)
        temporary = self.result_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=1, default=str))
        temporary.replace(self.result_path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


# ----------------------------------------------------------------------------------------------
# The stages. Each runs in its own process (``--stage NAME``) and saves its results as it goes.


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(ctx: Context):
    import torch

    return getattr(torch, ctx.sizes.dtype)


def stage_install(ctx: Context) -> None:
    """pip's editable install with the CUDA extension built for this GPU's architecture only
    (``SIMCSE_FAST_BUILD_CUDA=1``, so a compile error shows); where pip fails (an old setuptools,
    an externally managed Python), the extension is compiled in place with the same nvcc
    command. Then which backends the package offers here, and why not the others."""
    archs = ctx.cuda_archs
    if archs is None and not ctx.dry_run:
        import torch

        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        archs = f"{major}{minor}"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-v", "-e", "."]
    record = {"command": " ".join(["pip", *command[3:]]), "cuda_archs": archs}
    if ctx.dry_run:
        record["skipped"] = "dry run: nothing installed, the stages import the checkout"
    else:
        env = dict(os.environ, SIMCSE_FAST_CUDA_ARCHS=archs, SIMCSE_FAST_BUILD_CUDA="1")
        started = time.perf_counter()
        pip = subprocess.run(command, cwd=ROOT, env=env)
        record |= {"pip_returncode": pip.returncode, "pip_seconds": time.perf_counter() - started}
        ctx.save(install=record)
        if pip.returncode != 0:
            record["fallback"] = _build_in_place(archs)
            ctx.save(install=record)
    import simcse_fast
    from simcse_fast import _backends

    record |= {
        "simcse_fast": simcse_fast.__version__,
        "backends": simcse_fast.available_backends(),
        "unavailable": _backends.unavailable_reasons(),
        "cuda_extension": "built" if _backends.CUDA_EXTENSION is not None else _backends.CUDA_EXTENSION_ERROR,
    }
    ctx.save(install=record)
    if not ctx.dry_run and _backends.CUDA_EXTENSION is None:
        raise RuntimeError(f"the CUDA extension is not there: {_backends.CUDA_EXTENSION_ERROR}")


def _build_in_place(archs: str) -> dict:
    """Compiles ``simcse_fast._C`` into the checkout with setup.py's own nvcc command."""
    import runpy
    import sysconfig

    os.environ["SIMCSE_FAST_CUDA_ARCHS"] = archs
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="simcse_fast_setup")
    nvcc = setup["find_nvcc"]()
    if nvcc is None:
        return {"returncode": None, "reason": "nvcc not found"}
    target = ROOT / "simcse_fast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = setup["nvcc_command"](nvcc, target)
    print("pip failed; building simcse_fast._C in place:", " ".join(command), flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT)
    return {
        "command": " ".join(command).replace(f"{ROOT}/", ""),
        "returncode": completed.returncode,
        "seconds": time.perf_counter() - started,
    }


def stage_ceilings(ctx: Context) -> None:
    """The device as PyTorch sees it, then its ceilings: a 1 GiB device-to-device copy (GB/s,
    bytes read + written) and an 8192^3 bf16 matmul on random data (TFLOP/s), median of repeats."""
    import torch

    from simcse_fast import bench

    device = bench.Device(torch.device(_device()))
    found = {"device": device.name(), "torch_cuda": torch.version.cuda}
    if device.is_cuda:
        properties = torch.cuda.get_device_properties(device.device)
        found |= {
            "compute_capability": f"{properties.major}.{properties.minor}",
            "sms": properties.multi_processor_count,
            "memory_gb": properties.total_memory / 1e9,
            "l2_cache_mb": getattr(properties, "L2_cache_size", 0) / 2**20,
        }
    ctx.save(device=found)
    ctx.save(ceilings=bench.measure_ceilings(device, _dtype(ctx), headline="median"))


def stage_gpu_tests(ctx: Context) -> None:
    """``pytest -m gpu`` with a junit report. Interrupted at the stage's limit, pytest stops,
    reports what ran and writes the junit file; this process waits for it."""
    junit = ctx.work / "pytest.xml"
    options = ["-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    options += ["--durations=10", *ctx.sizes.tests]
    interrupted = []
    # pytest gets the SIGINT too (it is in this process group) and stops cleanly; this process
    # only notes it and waits for the report.
    signal.signal(signal.SIGINT, lambda number, frame: interrupted.append(number))
    started = time.perf_counter()
    returncode = subprocess.call([sys.executable, "-m", "pytest", *options, f"--junitxml={junit}"], cwd=ROOT)
    record = {
        "command": " ".join(["pytest", *options]),
        "returncode": returncode,
        "seconds": time.perf_counter() - started,
        "interrupted": bool(interrupted),
    }
    record |= junit_summary(junit)
    ctx.save(gpu_tests=record)
    # 0: passed, 1: some failed (reported), 2: interrupted (at the limit), 5: nothing collected.
    if returncode not in (0, 1, 2, 5):
        raise RuntimeError(f"pytest could not run the tests (exit status {returncode})")


def junit_summary(path: Path) -> dict:
    """Counts of a junit XML report (tests, failures, errors, skipped, seconds) and the ids of the
    tests that failed or errored (at most 30, with the first line of their message)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        return {"junit": f"no junit report ({_first_line(error)})"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(suite.get(key, 0)) for suite in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        problem = case.find("failure")
        problem = case.find("error") if problem is None else problem
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()[:1]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {' '.join(message)[:200]}")
    return counts | {"failed": failed[:30], "failed_count": len(failed)}


def _bench_sizes(ctx: Context, ops) -> dict:
    return {op: [tuple(shape) for shape in getattr(ctx.sizes, op)] for op in ops}


def _ceilings(ctx: Context):
    """The ceilings the ceilings stage measured, else ``None`` (measured again by the caller)."""
    return (_read_json(ctx.work / "ceilings.json") or {}).get("ceilings")


def _planned(ops, sizes: dict, dtype, device: str, compile_peers: bool, select) -> list[dict]:
    """The (op, implementation, shape) a ``run_benchmark`` call will measure."""
    import torch

    from simcse_fast import bench
    from simcse_fast.bench.cases import FAMILIES

    bench_device = bench.Device(torch.device(device))
    planned = []
    for family in ops:
        for op in bench.OPS[family]:
            for shape in sizes.get(family, []):
                cases, _ = FAMILIES[family].build(
                    op, shape, dtype, bench_device, compile_peers, wanted=select
                )
                planned += [
                    {"op": case.op, "impl": case.impl, "shape": case.shape}
                    for case in cases
                    if select(case.impl)
                ]
    return planned


def _run_bench(ctx: Context, ops, select, dispatch: bool) -> None:
    """``run_benchmark`` on the stage's ops and sizes with the measured ceilings, each case's rows
    saved as soon as they are measured, a failing case recorded as an error row."""
    from simcse_fast import bench
    from simcse_fast.bench import cases

    cases.COMPILE_BACKEND = ctx.sizes.compile_backend
    sizes, dtype, device = _bench_sizes(ctx, ops), _dtype(ctx), _device()
    ctx.save(planned=_planned(ops, sizes, dtype, device, True, select))
    document = bench.run_benchmark(
        ops=ops,
        preset=ctx.sizes.preset,
        sizes=sizes,
        dtype=dtype,
        device=device,
        min_repeats=ctx.sizes.min_repeats,
        min_seconds=ctx.sizes.min_seconds,
        progress=False,
        ceilings=_ceilings(ctx),
        compile_peers=True,
        select=select,
        dispatch=dispatch,
        on_rows=lambda document, rows: ctx.save(document=document),
        errors="record",
    )
    ctx.save(document=document)


def _is_compiled(impl: str) -> bool:
    return impl == "reference (torch.compile)"


def stage_loss(ctx: Context) -> None:
    """The bf16 gradient error of each loss strategy and of eager PyTorch against float64 (easy
    positives), then the loss timed: every strategy pinned, ``"auto"``, and the peers except
    ``torch.compile`` (its own stage); last its recipes, hardness weighting and GIST beside
    sentence-transformers' classes."""
    import loss_precision

    from simcse_fast import functional, similarity

    n, dim = ctx.sizes.precision
    device = _device()
    implementations = {
        f"simcse_fast[{strategy}]": (functional.info_nce, {similarity.STRATEGY_ENV_VAR: strategy})
        for strategy in similarity.loss_strategies(device)
    }
    implementations["eager PyTorch"] = (loss_precision.eager_info_nce, None)
    record = {"N": n, "D": dim, "dtype": ctx.sizes.dtype, "positives": "anchor + 0.35 N(0, 1)", "scale": 20.0,
              "rows": [], "errors": {}}  # fmt: skip
    for name, implementation in implementations.items():
        try:
            record["rows"] += loss_precision.gradient_errors(
                {name: implementation}, n, dim, device, _dtype(ctx)
            )
        except Exception as error:
            traceback.print_exc()
            record["errors"][name] = _first_line(error)
        ctx.save(precision=record)
    _run_bench(ctx, ("loss", "recipes"), lambda impl: not _is_compiled(impl), dispatch=False)


def stage_pooling(ctx: Context) -> None:
    """Padded and packed pooling, mean and max, every backend and peer except ``torch.compile``
    (its own stage), and each backend's dispatch overhead."""
    _run_bench(ctx, ("pooling", "packed"), lambda impl: not _is_compiled(impl), dispatch=True)


def stage_compile(ctx: Context) -> None:
    """The ``torch.compile`` peers of the loss and of padded pooling, last: their compilation
    takes the longest and matters the least."""
    _run_bench(ctx, ("loss", "pooling"), _is_compiled, dispatch=False)


def stage_train(ctx: Context) -> None:
    """Each implementation of ``benchmarks/train_step.py`` at the check's batch, then the largest
    batch ``simcse-fast train --mini-batch-size`` fits, searched within the stage's limit."""
    import train_step

    sizes = ctx.sizes
    folder = ctx.work / "encoder"
    folder.mkdir(exist_ok=True)
    train_step.build_model(folder, sizes.encoder)
    record = {
        "encoder": sizes.encoder,
        "encoder_config": train_step.ENCODERS[sizes.encoder],
        "tokens": train_step.SEQUENCE_LENGTH,
        "batch": sizes.batch,
        "mini_batch_size": sizes.mini_batch_size,
        "rows": [],
    }
    ctx.save(train_step=record)
    for name in train_step.IMPLEMENTATIONS:
        try:
            row = train_step.measure(
                str(folder),
                name,
                sizes.batch,
                mini_batch_size=sizes.mini_batch_size,
                repeats=sizes.train_repeats,
            )
        except ImportError as error:
            row = {"impl": name, "batch": sizes.batch, "status": f"skipped: {_first_line(error)}"}
        except Exception as error:
            traceback.print_exc()
            row = {"impl": name, "batch": sizes.batch, "status": f"error: {_first_line(error)}"}
        record["rows"].append(row)
        ctx.save(train_step=record)

    def save_search(search: dict) -> None:
        record["largest_cached"] = search
        ctx.save(train_step=record)

    try:
        train_step.largest_batch(
            str(folder), train_step.CACHED, sizes.search_start, ctx.deadline - GRACE_S,
            limit=sizes.search_limit, mini_batch_size=sizes.mini_batch_size, on_try=save_search,
        )  # fmt: skip
    except Exception as error:
        traceback.print_exc()
        search = record.get("largest_cached") or {"impl": train_step.CACHED, "largest": None, "tries": []}
        save_search(search | {"stopped_by": f"error: {_first_line(error)}"})


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage: its name, time limit (seconds), what it does, and its function."""

    name: str
    limit_s: float
    what: str
    run: Callable[[Context], None]


STAGES = (
    Stage("install", 90, "pip install -e . with the CUDA extension for this GPU", stage_install),
    Stage("ceilings", 30, "device, copy bandwidth and bf16 GEMM rate", stage_ceilings),
    Stage("gpu-tests", 90, "pytest -m gpu", stage_gpu_tests),
    Stage("loss", 90, "loss strategies and peers, bf16 gradient error", stage_loss),
    Stage("pooling", 40, "padded and packed pooling, every backend and peer", stage_pooling),
    Stage("train", 80, "a training step against sentence-transformers' fit", stage_train),
    Stage("compile", 45, "the torch.compile peers", stage_compile),
)
"""The stages in order; the limits add up to 465 s of the 480 s budget."""
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def run_stage_process(ctx: Context) -> int:
    """The body of a stage's process: runs the stage, saving its error if it fails."""
    stage = next(stage for stage in STAGES if stage.name == ctx.stage)
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the checkout, installed or not
    try:
        stage.run(ctx)
    except KeyboardInterrupt:
        ctx.save(interrupted=True)
        return 130
    except Exception as error:
        traceback.print_exc()
        ctx.save(error=_first_line(error))
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# The orchestration: stages as processes with time limits, the log, the output folder.


def stage_environment(work: Path, dry_run: bool) -> dict:
    """The environment of the stages' processes: the checkout importable, unbuffered output, no
    network access attempted, no progress bars; no Triton interpreter on a GPU, one thread in a
    dry run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env |= {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
        "WANDB_DISABLED": "true",
    }
    if dry_run:
        # Tiny sizes gain nothing from threads, and a machine shared with other work loses much
        # to oversubscribed ones.
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_process(command: list[str], timeout: float, log, env: dict | None = None) -> tuple[int | None, bool]:
    """Runs ``command`` in its own process group, its output appended to ``log``; at ``timeout``
    seconds the group gets SIGINT, and SIGKILL ``GRACE_S`` later. Returns (exit status or None,
    whether it timed out); the group is killed at the end either way (no process outlives it)."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    timed_out = False
    try:
        process.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    except KeyboardInterrupt:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        raise
    _signal_group(process.pid, signal.SIGKILL)
    return process.returncode, timed_out


def _signal_group(group: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, number)


def _trim_log(path: Path, start: int, cap: int = LOG_CAP_BYTES) -> None:
    """Keeps at most ``cap`` bytes of what was appended to ``path`` after offset ``start``: its
    first quarter and its end."""
    size = path.stat().st_size
    if size - start <= cap:
        return
    with path.open("rb") as file:
        before = file.read(start)
        head = file.read(cap // 4)
        file.seek(size - (cap - cap // 4))
        tail = file.read()
    marker = f"\n[... {size - start - cap} bytes of this stage's output left out ...]\n".encode()
    path.write_bytes(before + head + marker + tail)


@dataclasses.dataclass
class Run:
    """One run of the check: options, the work folder, the stages' outcomes so far."""

    out: Path
    work: Path
    dry_run: bool
    budget_s: float
    limits: dict
    stages: tuple
    commit: str | None
    cuda_archs: str | None
    started: float = dataclasses.field(default_factory=time.time)
    outcomes: list = dataclasses.field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.out / "gpu_check.log"

    def note(self, message: str) -> None:
        """A line on stdout and in the log."""
        print(message, flush=True)
        with self.log.open("a") as log:
            log.write(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}\n")

    def run_stage(self, stage: Stage) -> dict:
        """Runs ``stage`` in its own process under its limit (less where the budget has less
        left), its output appended to the log; returns its outcome (status, seconds, reason)."""
        elapsed = time.time() - self.started
        left = self.budget_s - REPORT_RESERVE_S - elapsed
        limit = self.limits.get(stage.name, stage.limit_s)
        outcome = {"name": stage.name, "what": stage.what, "limit_s": limit}
        if left < MIN_STAGE_S:
            reason = f"no time left in the {self.budget_s:.0f} s budget"
            self.note(f"{stage.name}: skipped, {reason}")
            return outcome | {"status": "skipped", "reason": reason}
        timeout = min(limit, left)
        self.note(f"{stage.name} ({stage.what}): started, limit {timeout:.0f} s")
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name,
                   "--work", str(self.work), "--deadline", str(time.time() + timeout)]  # fmt: skip
        command += ["--dry-run"] if self.dry_run else []
        command += ["--cuda-archs", self.cuda_archs] if self.cuda_archs else []
        started = time.time()
        start_offset = self.log.stat().st_size
        with self.log.open("a") as log:
            env = stage_environment(self.work, self.dry_run)
            returncode, timed_out = run_process(command, timeout, log, env)
        _trim_log(self.log, start_offset)
        seconds = time.time() - started
        result = _read_json(self.work / f"{stage.name}.json") or {}
        outcome |= {"seconds": seconds, "returncode": returncode}
        if timed_out:
            outcome |= {"status": "timed out", "reason": f"stopped at its limit of {timeout:.0f} s"}
        elif returncode != 0:
            reason = result.get("error") or f"exit status {returncode} (see gpu_check.log)"
            outcome |= {"status": "failed", "reason": reason}
        else:
            outcome["status"] = "ok"
        self.note(
            f"{stage.name}: {outcome['status']} in {seconds:.0f} s"
            + (f" ({outcome['reason']})" if "reason" in outcome else "")
        )
        return outcome


def gather(run: Run) -> dict:
    """The results document from the stages' result files and outcomes (see ``--report``)."""
    results = {name: _read_json(run.work / f"{name}.json") or {} for name in STAGE_NAMES}
    outcomes = {outcome["name"]: outcome for outcome in run.outcomes}
    environment = _read_json(run.work / "environment.json") or {}
    device = results["ceilings"].get("device", {})
    environment |= {key: value for key, value in device.items() if key != "device"}
    name = device.get("device") or environment.get("gpu") or "unknown device"
    document = {
        "device": name,
        "results_folder": _slug(name) + ("-dry-run" if run.dry_run else ""),
        "torch": environment.get("versions", {}).get("torch"),
        "triton": environment.get("versions", {}).get("triton"),
        "simcse_fast": environment.get("simcse_fast"),
        "commit": environment.get("commit"),
        "python": environment.get("python"),
        "date": environment.get("date"),
        "dtype": (DRY_RUN_SIZES if run.dry_run else GPU_SIZES).dtype,
        "environment": environment,
        "gpu_check": {
            "dry_run": run.dry_run,
            "budget_s": run.budget_s,
            "wall_s": time.time() - run.started,
            "sizes": dataclasses.asdict(DRY_RUN_SIZES if run.dry_run else GPU_SIZES),
            "stages": [outcomes.get(stage.name, _not_among_stages(stage)) for stage in STAGES],
        },
        "install": results["install"].get("install"),
        "ceilings": results["ceilings"].get("ceilings"),
        "rows": [],
        "missing_peers": {},
        "gpu_tests": results["gpu-tests"].get("gpu_tests"),
        "loss_precision": results["loss"].get("precision"),
        "train_step": results["train"].get("train_step"),
    }
    for stage in ("loss", "pooling", "compile"):
        part = results[stage].get("document") or {}
        document["rows"] += part.get("rows", [])
        document["missing_peers"] |= part.get("missing_peers", {})
        for key in (
            "dispatch_overhead_us",
            "dispatch_shape",
            "memory_budget_gb",
            "memory_budget_source",
            "preset",
        ):
            if key in part:
                document[key] = part[key]
        document.setdefault("loss_strategy_choices", {}).update(part.get("loss_strategy_choices", {}))
        document["rows"] += _not_run_rows(
            results[stage].get("planned", []), part.get("rows", []), outcomes.get(stage), document["dtype"]
        )
    document["rows"] = _ordered(document["rows"])
    if document["rows"]:
        from simcse_fast import bench

        if document["ceilings"] is None:
            document["ceilings"] = (
                results["loss"].get("document") or results["pooling"].get("document") or {}
            ).get("ceilings")
        document["busy_warnings"] = bench.busy_warnings(document)
    document["targets"] = targets(document)
    return document


def _not_among_stages(stage: Stage) -> dict:
    return {"name": stage.name, "what": stage.what, "status": "not run", "reason": "not among --stages"}


def _not_run_rows(planned: list[dict], rows: list[dict], outcome: dict | None, dtype: str) -> list[dict]:
    """A row per pass of each planned case without rows: its stage stopped before it."""
    if not planned or outcome is None or outcome.get("status") == "ok":
        return []
    done = {(row["op"], row["impl"], json.dumps(row["shape"], sort_keys=True)) for row in rows}
    reason = f"not run: the {outcome['name']} stage {outcome['status']} ({outcome.get('reason', '')})"
    missing = []
    for case in planned:
        if (case["op"], case["impl"], json.dumps(case["shape"], sort_keys=True)) in done:
            continue
        for pass_name in ("forward", "backward", "forward+backward"):
            missing.append(
                {
                    "op": case["op"],
                    "impl": case["impl"],
                    "pass": pass_name,
                    "shape": case["shape"],
                    "dtype": dtype,
                    "status": reason,
                    "median_ms": None,
                    "p20_ms": None,
                    "p50_ms": None,
                    "p80_ms": None,
                    "spread": None,
                    "peak_mem_mb": None,
                    "fraction_of_ceiling": None,
                }
            )
    return missing


def _ordered(rows: list[dict]) -> list[dict]:
    """Rows grouped by op (loss, padded pooling, packed pooling) and shape, in measuring order."""
    op_order = ["info_nce", "masked_mean_pool", "masked_max_pool", "packed_mean_pool", "packed_max_pool"]
    shapes: dict[str, int] = {}
    for row in rows:
        shapes.setdefault(json.dumps(row["shape"], sort_keys=True), len(shapes))

    def key(indexed):
        index, row = indexed
        op = op_order.index(row["op"]) if row["op"] in op_order else len(op_order)
        return op, shapes[json.dumps(row["shape"], sort_keys=True)], index

    return [row for _, row in sorted(enumerate(rows), key=key)]


def _slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: the folder name of ``benchmarks/results/<device>/``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def record_environment(run: Run) -> dict:
    """Versions, GPU, driver and CUDA from the orchestrating process (no torch import): recorded
    before any stage, so even a run whose stages all fail says where it ran."""
    versions = {}
    for package in VERSIONS_OF:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    environment = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": run.commit or _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "simcse_fast": _package_version(),
        "versions": versions,
    }
    smi = _command_output(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
    )
    if smi:
        fields = [field.strip() for field in smi.splitlines()[0].split(",")]
        environment |= dict(zip(("gpu", "driver", "gpu_memory", "compute_cap"), fields, strict=False))
        environment["gpus"] = len(smi.splitlines())
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "bin" / "nvcc")
    release = _command_output([str(nvcc), "--version"])
    environment["nvcc"] = release.strip().splitlines()[-1] if release else None
    (run.work / "environment.json").write_text(json.dumps(environment, indent=1))
    return environment


def _command_output(command: list[str]) -> str | None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout if completed.returncode == 0 else None


def _git_commit() -> str:
    output = _command_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    return output.strip() if output else "unknown (no git checkout; pass --commit)"


def _package_version() -> str | None:
    match = re.search(r'__version__ = "([^"]+)"', (ROOT / "simcse_fast" / "__init__.py").read_text())
    return match.group(1) if match else None


def orchestrate(run: Run) -> int:
    """Runs the stages in order, rewriting the output after each; returns 0 when every stage
    ran to completion, 1 otherwise (the output is written either way), 130 when interrupted."""
    run.out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (run.out / name).unlink(missing_ok=True)
    kind = "dry run" if run.dry_run else "run"
    run.note(f"gpu_check {kind} into {run.out}: stages {', '.join(run.stages)}, budget {run.budget_s:.0f} s")
    record_environment(run)
    try:
        for stage in STAGES:
            if stage.name in run.stages:
                run.outcomes.append(run.run_stage(stage))
                if (run.work / "pytest.xml").exists():
                    shutil.copyfile(run.work / "pytest.xml", run.out / "pytest.xml")
                # The plots wait for the end: --report draws them from results.json if the run
                # is cut short.
                write_reports(gather(run), run.out, plots=False)
    except KeyboardInterrupt:
        run.note("interrupted: writing what finished")
        write_reports(gather(run), run.out)
        return 130
    document = gather(run)
    write_reports(document, run.out)
    written = sorted(path.name for path in run.out.iterdir() if path.name in OUTPUT_FILES)
    run.note(
        f"wrote {', '.join(written)} in {run.out}; "
        f"commit them to benchmarks/results/{document['results_folder']}/"
    )
    for line in summary_lines(document):
        print(line)
    return 0 if all(outcome["status"] == "ok" for outcome in run.outcomes) else 1


def _limits(text: str | None) -> dict:
    """``--limits install=120,loss=60`` -> ``{"install": 120.0, "loss": 60.0}``."""
    limits = {}
    for part in filter(None, (text or "").split(",")):
        name, _, seconds = part.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = float("nan")
        if name.strip() not in STAGE_NAMES or not value > 0:
            raise argparse.ArgumentTypeError(
                f"--limits takes STAGE=SECONDS,... with stages among {', '.join(STAGE_NAMES)}; got {part!r}"
            )
        limits[name.strip()] = value
    return limits


def build_parser() -> argparse.ArgumentParser:
    stages = "; ".join(f"{stage.name} ({stage.limit_s:.0f} s): {stage.what}" for stage in STAGES)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"stages: {stages}")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", help="the output folder (created; the check's own files in it are replaced)")
    action.add_argument(
        "--report", metavar="DIR", help="rewrite DIR's results.md, summary.md and plots from DIR/results.json"
    )
    action.add_argument("--stage", choices=STAGE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (< 1 min)"
    )
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="the stages to run, comma-separated")
    parser.add_argument("--limits", type=_limits, default={}, help="time limits, e.g. loss=120,train=60")
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run ({BUDGET_S:.0f})"
    )
    parser.add_argument("--commit", help="the commit checked out (recorded; default: git rev-parse HEAD)")
    parser.add_argument("--cuda-archs", help="SIMCSE_FAST_CUDA_ARCHS of the install (default: this GPU's)")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = DRY_RUN_SIZES if args.dry_run else GPU_SIZES
    if args.stage:
        ctx = Context(args.stage, Path(args.work), args.deadline, args.dry_run, sizes, args.cuda_archs)
        return run_stage_process(ctx)
    if args.report:
        folder = Path(args.report)
        document = _read_json(folder / "results.json")
        if document is None or "gpu_check" not in document:
            parser.error(f"--report: {folder / 'results.json'} is not the results of a GPU check")
        written = write_reports(document, folder)
        print("wrote " + ", ".join(path.name for path in written))
        return 0
    stages = tuple(name.strip() for name in args.stages.split(",") if name.strip())
    unknown = [name for name in stages if name not in STAGE_NAMES]
    if unknown or not stages:
        parser.error(f"--stages takes names among {', '.join(STAGE_NAMES)}; got {args.stages!r}")
    if not args.budget > 0:
        parser.error(f"--budget takes a positive number of seconds; got {args.budget}")
    if not args.dry_run and not _has_cuda():
        parser.error(
            "no CUDA device here: run on a GPU machine, or add --dry-run to check the script on a CPU"
        )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        run = Run(
            Path(args.out),
            Path(work),
            args.dry_run,
            args.budget,
            args.limits,
            stages,
            args.commit,
            args.cuda_archs,
        )
        return orchestrate(run)


def _has_cuda() -> bool:
    """Whether PyTorch sees a CUDA device, asked in a separate process: this one stays free of
    CUDA (its children own the GPU)."""
    probe = [sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
