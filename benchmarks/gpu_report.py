"""The reports of the GPU check (``benchmarks/gpu_check.py``), from its results document alone:
the targets (what was met and what was not), ``summary.md``, ``results.md``, the plots and the
short summary printed last. ``python benchmarks/gpu_check.py --report DIR`` rewrites them from
``DIR/results.json``."""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path

import train_step


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _ok_rows(document: dict, **where) -> list[dict]:
    """The measured rows whose fields have the values ``where`` gives."""
    rows = [row for row in document["rows"] if row["status"] == "ok"]
    return [row for row in rows if all(row[key] == value for key, value in where.items())]


def _our_loss_impl(document: dict) -> str | None:
    """The loss as users get it: ``simcse_fast[auto]`` where there is a choice of strategies,
    else the one strategy measured."""
    impls = {row["impl"] for row in document["rows"] if row["op"] == "info_nce"}
    if "simcse_fast[auto]" in impls:
        return "simcse_fast[auto]"
    ours = sorted(impl for impl in impls if impl.startswith("simcse_fast["))
    return ours[0] if ours else None


def _median(document: dict, op: str, impl: str, shape: dict, pass_name: str) -> float | None:
    rows = _ok_rows(document, op=op, impl=impl, shape=shape)
    return next((row["median_ms"] for row in rows if row["pass"] == pass_name), None)


def _status_of(document: dict, op: str, impl: str, shape: dict) -> str:
    row = next((r for r in document["rows"] if (r["op"], r["impl"], r["shape"]) == (op, impl, shape)), None)
    return "not measured" if row is None else row["status"]


def targets(document: dict) -> list[dict]:
    """Each target, what was measured against it and whether it was met (``None``: not measured,
    and why): the loss's forward + backward at least as fast as eager at every N and about 2x
    (siglip-kernel's measured 2.1x) at the largest; pooling at 90% of the copy bandwidth and 3x
    eager; the training step 1.3x sentence-transformers' fit; the bf16 gradient error within 2x
    eager's; the GPU tests passing."""

    def unmeasured(target: str, stage: str) -> list[dict]:
        outcome = next((s for s in document["gpu_check"]["stages"] if s["name"] == stage), {})
        why = f"the {stage} stage {outcome.get('status', 'did not run')}"
        why += f" ({outcome['reason']})" if outcome.get("reason") else ""
        return [{"target": target, "met": None, "measured": f"not measured: {why}"}]

    found = _loss_targets(document) or unmeasured(
        "loss forward+backward >= eager at every N, ~2x at the largest", "loss"
    )
    found += _pooling_targets(document) or unmeasured(
        "pooling >= 90% of the copy bandwidth and >= 3x eager", "pooling"
    )
    found += _train_targets(document.get("train_step")) or unmeasured(
        "train step >= 1.3x sentence-transformers' fit", "train"
    )
    found += _precision_targets(document.get("loss_precision")) or unmeasured(
        "bf16 gradient error <= 2x eager's", "loss"
    )
    tests = document.get("gpu_tests") or {}
    if "tests" not in tests:
        return found + unmeasured("pytest -m gpu passes", "gpu-tests")
    detail = (
        f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
        f"{tests['skipped']} skipped in {tests['seconds']:.0f} s"
    )
    if tests.get("interrupted"):
        detail += " (interrupted at the time limit)"
    met = tests["failures"] + tests["errors"] == 0 and not tests.get("interrupted")
    return [*found, {"target": "pytest -m gpu passes", "met": met, "measured": detail}]


def _loss_targets(document: dict) -> list[dict]:
    """Our loss (``simcse_fast[auto]``, or the one strategy there is) against eager PyTorch,
    forward + backward: at least as fast at every N, ~2x at the largest."""
    ours = _our_loss_impl(document)
    shapes = sorted({json.dumps(row["shape"]) for row in document["rows"] if row["op"] == "info_nce"},
                    key=lambda text: json.loads(text)["N"])  # fmt: skip
    if ours is None or not shapes:
        return []
    speedups = []
    for shape in map(json.loads, shapes):
        mine = _median(document, "info_nce", ours, shape, "forward+backward")
        eager = _median(document, "info_nce", "reference (eager)", shape, "forward+backward")
        if mine is None:
            speedups.append((shape, None, f"{ours}: {_status_of(document, 'info_nce', ours, shape)}"))
        elif eager is None:
            # Eager out of memory, or over the budget, at a size ours runs: ours wins. Eager not
            # reached or failing: nothing to compare.
            status = _status_of(document, "info_nce", "reference (eager)", shape)
            beaten = status == "oom" or status.startswith("skipped")
            speedups.append((shape, math.inf if beaten else None, f"eager did not run ({status})"))
        else:
            speedups.append(
                (shape, eager / mine, f"{eager / mine:.2f}x, {mine:.3g} ms vs eager {eager:.3g} ms")
            )
    measured = [speedup for _, speedup, _ in speedups if speedup is not None]
    met = None if len(measured) < len(speedups) else all(speedup >= 1 for speedup in measured)
    detail = "; ".join(f"N={shape['N']}: {text}" for shape, _, text in speedups)
    shape, largest, text = speedups[-1]
    return [
        {"target": f"loss forward+backward ({ours}) >= eager at every N", "met": met, "measured": detail},
        {"target": f"loss forward+backward ~2x eager at N={shape['N']} (siglip-kernel: 2.1x)",
         "met": None if largest is None else largest >= 2.0, "measured": text},
    ]  # fmt: skip


def _pooling_targets(document: dict) -> list[dict]:
    """Per pooling op, shape and pass (forward, backward): our fastest backend's fraction of the
    copy bandwidth (>= 90%) and its speed over eager (>= 3x)."""
    found, groups = [], []
    for row in document["rows"]:
        key = (row["op"], json.dumps(row["shape"]), row["pass"])
        if row["op"] != "info_nce" and row["pass"] != "forward+backward" and key not in groups:
            groups.append(key)
    for op, shape_text, pass_name in groups:
        rows = [
            row
            for row in _ok_rows(document, op=op, **{"pass": pass_name})
            if json.dumps(row["shape"]) == shape_text
        ]
        ours = [
            row for row in rows if row["impl"].startswith("simcse_fast[") and "(padded)" not in row["impl"]
        ]
        eager = next((row for row in rows if row["impl"] == "reference (eager)"), None)
        target = (
            f"pooling {op} {_shape_label(json.loads(shape_text))} {pass_name}: >= 90% of copy, >= 3x eager"
        )
        if not ours:
            found.append({"target": target, "met": None, "measured": "ours not measured"})
            continue
        best = max(ours, key=lambda row: row["gbps"])
        fraction = best["fraction_of_ceiling"]
        measured = f"{best['impl']} {best['gbps']:.0f} GB/s = {100 * fraction:.0f}% of copy, "
        if eager is None:
            found.append({"target": target, "met": None, "measured": measured + "eager not measured"})
            continue
        speedup = eager["median_ms"] / best["median_ms"]
        met = fraction >= 0.9 and speedup >= 3
        found.append({"target": target, "met": met, "measured": measured + f"{speedup:.1f}x eager"})
    return found


def _shape_label(shape: dict) -> str:
    dims = "x".join(str(shape[key]) for key in ("B", "L", "H") if key in shape)
    return f"{dims} packed" if "T" in shape else dims


TRAIN_PAIRS = (
    ("simcse_fast uncached", "sentence-transformers fit MNRL"),
    ("simcse_fast cached", "sentence-transformers fit CachedMNRL"),
)
"""Our training step and the sentence-transformers step it is held against."""


def _train_targets(record: dict | None) -> list[dict]:
    """Our step's sentences/s over sentence-transformers' fit step (>= 1.3x), uncached against
    MNRL and cached against CachedMNRL; the largest cached batch, for information."""
    if not record:
        return []
    rows = {row["impl"]: row for row in record.get("rows", [])}
    found = []
    for ours, theirs in TRAIN_PAIRS:
        mine, peer = rows.get(ours), rows.get(theirs)
        target = f"train step {ours} >= 1.3x {theirs} (B={record['batch']})"
        if not mine or not peer or mine["status"] != "ok" or peer["status"] != "ok":
            statuses = [
                f"{name}: {row['status'] if row else 'not measured'}"
                for name, row in ((ours, mine), (theirs, peer))
            ]
            found.append({"target": target, "met": None, "measured": ", ".join(statuses)})
            continue
        ratio = mine["sentences_per_s"] / peer["sentences_per_s"]
        measured = (
            f"{ratio:.2f}x: {mine['sentences_per_s']:.0f} vs {peer['sentences_per_s']:.0f} sentences/s, "
            f"peak extra {mine['peak_extra_mb']:.0f} vs {peer['peak_extra_mb']:.0f} MB"
        )
        found.append({"target": target, "met": ratio >= 1.3, "measured": measured})
    largest = record.get("largest_cached")
    if largest:
        found.append(
            {
                "target": f"largest batch of {largest['impl']} (information)",
                "met": None,
                "measured": f"{largest['largest']} ({largest['stopped_by']})",
            }
        )
    return found


def _precision_targets(record: dict | None) -> list[dict]:
    """Each strategy's bf16 gradient error at most 2x eager PyTorch's at the median, p90 and
    worst row."""
    if not record:
        return []
    eager = {row["gradient"]: row for row in record["rows"] if row["impl"] == "eager PyTorch"}
    found = []
    for impl in dict.fromkeys(row["impl"] for row in record["rows"] if row["impl"] != "eager PyTorch"):
        ratios = [
            row[q] / eager[row["gradient"]][q]
            for row in record["rows"]
            if row["impl"] == impl
            for q in ("median", "p90", "worst")
            if eager.get(row["gradient"], {}).get(q)
        ]
        worst = max(ratios, default=None)
        measured = (
            "no eager reference" if worst is None else f"at most {worst:.2f}x eager's (median, p90, worst)"
        )
        found.append(
            {
                "target": f"{impl} bf16 gradient error <= 2x eager's (N={record['N']}, D={record['D']})",
                "met": None if worst is None else worst <= 2.0,
                "measured": measured,
            }
        )
    for impl, error in record.get("errors", {}).items():
        found.append({"target": f"{impl} bf16 gradient error <= 2x eager's", "met": None, "measured": error})
    return found


def _met_text(met) -> str:
    return {True: "met", False: "NOT MET", None: "n/a"}[met]


def _targets_table(document: dict) -> list[str]:
    lines = ["| target | measured | result |", "| --- | --- | --- |"]
    return lines + [
        f"| {t['target']} | {t['measured']} | {_met_text(t['met'])} |" for t in document["targets"]
    ]


def summary_markdown(document: dict) -> str:
    """``summary.md``: where and when, each target met or not, the stages that did not finish
    and the GPU tests that failed."""
    check = document["gpu_check"]
    lines = [
        f"# GPU check summary — {document['device']}" + (" (dry run)" if check["dry_run"] else ""),
        "",
        f"{document['date']}, commit {document['commit']}, torch {document['torch']}, triton "
        f"{document['triton']}; {check['wall_s']:.0f} s of a {check['budget_s']:.0f} s budget.",
        "",
        *_targets_table(document),
    ]
    problems = [stage for stage in check["stages"] if stage["status"] not in ("ok", "not run")]
    if problems:
        lines += ["", "Stages that did not finish:", ""]
        lines += [f"- {stage['name']}: {stage['status']} ({stage.get('reason', '')})" for stage in problems]
    failed = (document.get("gpu_tests") or {}).get("failed")
    if failed:
        lines += ["", "GPU tests that failed:", ""] + [f"- {name}" for name in failed]
    return "\n".join(lines) + "\n"


def _environment_table(document: dict) -> list[str]:
    environment = document["environment"]
    facts = {
        "date (UTC)": document["date"],
        "commit": document["commit"],
        "GPU": environment.get("gpu"),
        "driver": environment.get("driver"),
        "CUDA (torch)": environment.get("torch_cuda"),
        "nvcc": environment.get("nvcc"),
        "SMs": environment.get("sms"),
        "compute capability": environment.get("compute_capability"),
        "python": document["python"],
        **environment.get("versions", {}),
    }
    return ["| | |", "| --- | --- |"] + [
        f"| {key} | {value} |" for key, value in facts.items() if value is not None
    ]


def _stages_table(check: dict) -> list[str]:
    lines = ["| stage | what | status | seconds | limit s |", "| --- | --- | --- | ---: | ---: |"]
    for stage in check["stages"]:
        seconds = f"{stage['seconds']:.0f}" if "seconds" in stage else ""
        status = stage["status"] + (f": {stage['reason']}" if stage.get("reason") else "")
        lines.append(
            f"| {stage['name']} | {stage['what']} | {status} | {seconds} | {stage.get('limit_s', '')} |"
        )
    return lines


def _install_lines(install: dict | None) -> list[str]:
    if not install:
        return []
    backends = (
        f"backends {', '.join(install.get('backends', []))}; CUDA extension: {install.get('cuda_extension')}"
    )
    if install.get("skipped"):
        return ["", f"Install: {install['skipped']}; {backends}."]
    how = f"pip exit status {install.get('pip_returncode')}"
    if install.get("fallback"):
        how += f", then nvcc in place: exit status {install['fallback'].get('returncode')}"
    archs = install.get("cuda_archs")
    return ["", f"Install: `{install['command']}` with SIMCSE_FAST_CUDA_ARCHS={archs} ({how}); {backends}."]


def _ceiling_lines(ceilings: dict | None) -> list[str]:
    if not ceilings:
        return []
    lines = [
        "",
        f"Ceilings ({ceilings.get('headline', 'fastest')} of repeats): copy {ceilings['copy_gbps']:.4g} GB/s "
        f"(read + written), bf16 matmul {ceilings['bf16_tflops']:.4g} TFLOP/s ({ceilings.get('sizes', {})}).",
        "",
    ]
    for name, stats in ceilings.get("timings_ms", {}).items():
        lines.append(
            f"- {name}: p20-p80 {stats['p20']:.4g}-{stats['p80']:.4g} ms, fastest {stats['fastest']:.4g} ms"
        )
    return lines


def _precision_lines(precision: dict | None) -> list[str]:
    if not precision:
        return []
    lines = [
        "",
        "## bf16 gradient error against float64",
        "",
        f"N = M = {precision['N']}, D = {precision['D']}, positives {precision['positives']}, scale "
        f"{precision['scale']:g}; row errors |g - g64| / |g64| of the gradients.",
        "",
        "| implementation | gradient | median | p90 | worst |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in precision["rows"]:
        errors = " | ".join(f"{row[q]:.2e}" for q in ("median", "p90", "worst"))
        lines.append(f"| {row['impl']} | d {row['gradient']} | {errors} |")
    lines += [f"| {impl} | | {error} | | |" for impl, error in precision.get("errors", {}).items()]
    return lines


def _train_lines(train: dict | None) -> list[str]:
    if not train:
        return []
    lines = [
        "",
        "## Training step",
        "",
        f"Encoder {train['encoder']} ({train['encoder_config']}), random weights, {train['tokens']} tokens a "
        f"sentence, batch {train['batch']}, mini-batches of {train['mini_batch_size']} where cached. Peak "
        "extra memory is over the model and optimizer state held between steps (held MB, on a GPU).",
        "",
        *train_step.table(train["rows"]),
    ]
    largest = train.get("largest_cached")
    if largest:
        tries = [
            f"{t['batch']}: {t['seconds']['p50']:.2f} s, {t['peak_extra_mb']:.0f} MB"
            if t["status"] == "ok"
            else f"{t['batch']}: {t['status']}"
            for t in largest["tries"]
        ]
        lines += [
            "",
            f"Largest batch of {largest['impl']}: {largest['largest']} ({largest['stopped_by']}); "
            "one step each: "
            f"{'; '.join(tries)}.",
        ]
    return lines


def _test_lines(tests: dict | None) -> list[str]:
    if not tests:
        return []
    if "tests" in tests:
        counts = (
            f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped in {tests['seconds']:.0f} s"
        )
    else:
        counts = str(tests.get("junit"))
    lines = ["", "## GPU tests", "", f"`{tests.get('command')}`: {counts}"]
    return lines + [f"- {name}" for name in tests.get("failed", [])]


def results_markdown(document: dict) -> str:
    """``results.md``: environment, stages, install, ceilings, the benchmark table (loss and
    pooling, with the ``simcse-fast bench`` layout), gradient error, the training step, the GPU
    tests, and the summary's targets."""
    from simcse_fast import bench

    check = document["gpu_check"]
    title = f"# GPU check — {document['device']}" + (
        " (dry run: CPU, tiny sizes)" if check["dry_run"] else ""
    )
    lines = [title, "", *_environment_table(document), "", *_stages_table(check)]
    lines += _install_lines(document.get("install")) + _ceiling_lines(document.get("ceilings"))
    if document["rows"] and document.get("ceilings"):
        lines += ["", "## Loss and pooling", ""]
        if check["sizes"]["compile_backend"] != "inductor":
            lines += [f"torch.compile ran with its `{check['sizes']['compile_backend']}` backend.", ""]
        lines.append(bench.markdown_table(document).rstrip())
    lines += _precision_lines(document.get("loss_precision")) + _train_lines(document.get("train_step"))
    lines += _test_lines(document.get("gpu_tests"))
    lines += ["", "## Targets", "", *_targets_table(document)]
    return "\n".join(lines) + "\n"


def write_reports(document: dict, out: Path, plots: bool = True) -> list[Path]:
    """results.json, results.md, summary.md and (with ``plots``, where matplotlib is installed)
    the plots."""
    from simcse_fast import bench

    (out / "results.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    written = [out / "results.json"]
    for name, render in (("summary.md", summary_markdown), ("results.md", results_markdown)):
        try:
            (out / name).write_text(render(document))
            written.append(out / name)
        except Exception:  # a report that cannot be drawn must not lose the others
            traceback.print_exc()
    if plots and document["rows"] and document.get("ceilings"):
        try:
            written += bench.write_plots(document, out)
        except Exception as error:
            print(f"gpu_check: plots not written: {_first_line(error)}", file=sys.stderr)
    return written


def summary_lines(document: dict) -> list[str]:
    """The short summary printed last on stdout: stages, then targets."""
    check = document["gpu_check"]
    lines = [
        "",
        f"gpu_check: {document['device']}{' (dry run)' if check['dry_run'] else ''}, "
        f"commit {document['commit']}, "
        f"{check['wall_s']:.0f} s of {check['budget_s']:.0f}",
        "",
        f"{'stage':<10} {'status':<10} {'s':>5} {'limit':>5}  note",
    ]
    for stage in check["stages"]:
        seconds = f"{stage['seconds']:.0f}" if "seconds" in stage else "-"
        limit = f"{stage['limit_s']:.0f}" if "limit_s" in stage else "-"
        lines.append(
            f"{stage['name']:<10} {stage['status']:<10} {seconds:>5} {limit:>5}  {stage.get('reason', '')}"
        )
    lines += ["", "targets:"]
    lines += [f"  {_met_text(t['met']):<8} {t['target']}: {t['measured']}" for t in document["targets"]]
    return lines
