"""The benchmark's reports: the environment of a run, the busy-machine warnings, the markdown
table, ``results.json`` and the PNG plots."""

from __future__ import annotations

import datetime
import itertools
import json
import platform
import subprocess
import warnings
from pathlib import Path

import torch

from .. import __version__
from .cases import FAMILY_OF, OPS
from .timing import BUSY_SPREAD, Device, is_busy


def git_commit() -> str:
    """The checkout's commit (12 hex digits), or ``"unknown"`` outside a git checkout."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def environment(device: Device) -> dict:
    """Device, versions, commit and date: what a result is only meaningful with."""
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


def shape_text(shape: dict) -> str:
    """``{"N": 8, "D": 16}`` -> ``"N=8xD=16"``."""
    return "x".join(f"{key}={value}" for key, value in shape.items())


def busy_warnings(document: dict, threshold: float = BUSY_SPREAD) -> list[str]:
    """One line per timed case whose p80 exceeds ``threshold`` times its p20 in some pass,
    naming the case and its widest pass, the widest first, then the dispatch measurements that
    do: such a spread says that other work shared the machine, and the medians are less
    trustworthy."""
    worst: dict[tuple, tuple[float, str, dict]] = {}
    for row in document["rows"]:
        if row["status"] != "ok":
            continue
        stats = {"p20": row["p20_ms"], "p80": row["p80_ms"]}
        key = (row["op"], row["impl"], shape_text(row["shape"]))
        if is_busy(stats, threshold) and row["spread"] > worst.get(key, (0.0,))[0]:
            worst[key] = (row["spread"], row["pass"], stats)
    widest_first = sorted(worst.items(), key=lambda item: -item[1][0])
    lines = [
        f"{op} {impl} {shape}: {pass_name} p20 {stats['p20']:.3g} ms, p80 {stats['p80']:.3g} ms "
        f"(p80/p20 = {ratio:.2f} > {threshold})"
        for (op, impl, shape), (ratio, pass_name, stats) in widest_first
    ]
    for impl, stats in document.get("dispatch_overhead_us", {}).items():
        if is_busy(stats, threshold):
            lines.append(
                f"dispatch overhead {impl}: p20 {stats['p20']:.3g} us, p80 {stats['p80']:.3g} us "
                f"(p80/p20 = {stats['p80'] / stats['p20']:.2f} > {threshold})"
            )
    return lines


def _rate_text(row: dict) -> str:
    """A row's throughput with its unit."""
    return f"{row['gbps']:.1f} GB/s" if "gbps" in row else f"{row['tflops']:.3f} TFLOP/s"


def markdown_table(document: dict) -> str:
    """The run as markdown: environment, ceilings, memory budget, one table row per op, shape,
    implementation and pass (median, p20-p80 and their ratio, rate, fraction of the ceiling,
    peak extra memory), the dispatch overhead, the peers not measured and the busy warnings."""
    ceilings = document["ceilings"]
    lines = [
        f"simcse_fast benchmark — {document['device']} — {document['dtype']} — torch {document['torch']}, "
        f"triton {document['triton']}, commit {document['commit']}, {document['date']}",
        "",
        f"Ceilings measured in this run: copy {ceilings['copy_gbps']:.3g} GB/s, "
        f"bf16 matmul {ceilings['bf16_tflops']:.3g} TFLOP/s, "
        f"{document['dtype']} matmul {ceilings['matmul_' + document['dtype'] + '_tflops']:.3g} TFLOP/s.",
    ]
    if document.get("memory_budget_gb") is not None:
        lines += [
            "",
            f"Memory budget: {document['memory_budget_gb']:.1f} GB ({document['memory_budget_source']}); "
            "a case whose estimated need exceeds it is skipped, not run.",
        ]
    lines += [
        "",
        "| op | shape | impl | pass | median ms | p20-p80 ms | p80/p20 | GB/s or TFLOP/s | % of ceiling "
        "| peak extra MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in document["rows"]:
        head = f"| {row['op']} | {shape_text(row['shape'])} | {row['impl']} | {row['pass']} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']} | | | | | |")
            continue
        memory = "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}"
        lines.append(
            f"{head} {row['median_ms']:.3f} | {row['p20_ms']:.3f}-{row['p80_ms']:.3f} | "
            f"{row['spread']:.2f} | {_rate_text(row)} | {100 * row['fraction_of_ceiling']:.1f} | {memory} |"
        )
    if document.get("dispatch_overhead_us"):
        batch, seq_len, hidden = document["dispatch_shape"]
        lines += [
            "",
            f"Dispatch overhead: one masked_mean_pool forward on B={batch}, L={seq_len}, H={hidden} "
            "(checks, backend choice, dispatch, launch):",
            "",
            "| impl | median us | p20-p80 us |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| {impl} | {stats['p50']:.1f} | {stats['p20']:.1f}-{stats['p80']:.1f} |"
            for impl, stats in document["dispatch_overhead_us"].items()
        ]
    if document["missing_peers"]:
        lines += ["", "Peers not measured:"]
        lines += [f"- {name}: {reason}" for name, reason in sorted(document["missing_peers"].items())]
    if document.get("busy_warnings"):
        lines += ["", f"Timings that spread beyond p80/p20 = {BUSY_SPREAD} (the machine was busy):"]
        lines += [f"- {line}" for line in document["busy_warnings"]]
    return "\n".join(lines) + "\n"


def _plot_loss(document: dict, rows: list[dict], plt, path: Path) -> None:
    """Time and peak memory of the loss against N, a line per implementation and D; a case
    that ran out of memory or was skipped for the budget is a cross at its estimated need
    (a dotted vertical line where there is no estimate)."""
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl, dim in sorted({(row["impl"], row["shape"]["D"]) for row in rows}):
        mine = sorted(
            (r for r in rows if r["impl"] == impl and r["shape"]["D"] == dim), key=lambda r: r["shape"]["N"]
        )
        measured = [r for r in mine if r["status"] == "ok"]
        label = f"{impl}, D={dim}"
        line = time_axis.plot([r["shape"]["N"] for r in measured], [r["median_ms"] for r in measured],
                              marker="o", label=label)[0]  # fmt: skip
        memory_axis.plot([r["shape"]["N"] for r in measured], [r["peak_mem_mb"] or 0.0 for r in measured],
                         marker="o", label=label, color=line.get_color())  # fmt: skip
        for failed in (r for r in mine if r["status"] != "ok"):
            if failed.get("memory_need_mb") is None:
                memory_axis.axvline(failed["shape"]["N"], color=line.get_color(), linestyle=":")
                continue
            point = (failed["shape"]["N"], failed["memory_need_mb"])
            memory_axis.plot(*point, marker="x", markersize=10, color=line.get_color(), linestyle="none")
            reason = failed["status"].split(":")[0]  # "oom" or "skipped"
            memory_axis.annotate(reason, point, fontsize=7, textcoords="offset points", xytext=(4, 4))
    time_axis.set_yscale("log")
    memory_axis.set_yscale("symlog", linthresh=1.0)  # a peak can be 0 MB
    memory_axis.margins(0.1)  # room for the labels of the crosses
    for axis, title in (
        (time_axis, "info_nce forward+backward time (ms)"),
        (memory_axis, "peak extra memory (MB); x: out of memory or over budget, at the estimated need"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("N = M")
        axis.set_title(title, fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=7)
    figure.suptitle(f"{document['device']} — {document['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_pooling(document: dict, rows: list[dict], plt, path: Path) -> None:
    """Forward + backward bandwidth of every pooling op and implementation against the batch
    size B·L·H, with the device copy's as the ceiling."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = sorted({(row["op"], row["impl"]) for row in rows})
    # Up to 20 distinct colours (the default cycle repeats after 10); packed ops drawn as squares.
    for (op, impl), color in zip(lines, itertools.cycle(plt.cm.tab20.colors)):
        points = sorted(
            (r["shape"]["B"] * r["shape"]["L"] * r["shape"]["H"], r["gbps"])
            for r in rows
            if r["op"] == op and r["impl"] == impl
        )
        marker = "s" if op in OPS["packed"] else "o"
        axis.plot(
            [p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=f"{op} {impl}"
        )
    axis.axhline(document["ceilings"]["copy_gbps"], color="black", linestyle="--", label="device copy")
    axis.set_xscale("log")
    axis.set_xlabel("padded batch elements (B·L·H)")
    axis.set_ylabel("GB/s, forward+backward")
    axis.set_title(f"pooling bandwidth — {document['device']} — {document['dtype']}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(document: dict, out_dir: Path) -> list[Path]:
    """PNG plots: loss time and memory vs N (forward + backward), pooling bandwidth vs batch
    size. Needs matplotlib (``pip install simcse-fast[bench]``); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    whole_step = [row for row in document["rows"] if row["pass"] == "forward+backward"]
    loss_rows = [row for row in whole_step if FAMILY_OF[row["op"]].rate == "tflops"]
    if any(row["status"] == "ok" for row in loss_rows):
        written.append(out_dir / "loss_time_memory.png")
        _plot_loss(document, loss_rows, plt, written[-1])
    pooling_rows = [row for row in whole_step if row["status"] == "ok" and "gbps" in row]
    if pooling_rows:
        written.append(out_dir / "pooling_bandwidth.png")
        _plot_pooling(document, pooling_rows, plt, written[-1])
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
    except ImportError as error:
        warnings.warn(
            f"plots not written: {error} (pip install 'simcse-fast[bench]' for matplotlib)",
            UserWarning,
            stacklevel=2,
        )
    return written
