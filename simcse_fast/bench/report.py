"""The benchmark's reports: the environment of a run, the busy-machine warnings, the markdown
table, ``results.json`` and the PNG plots."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import platform
import subprocess
import sys
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


def contradictions(document: dict) -> list[str]:
    """One line per case whose forward or backward median exceeds its forward + backward
    median: a part slower than the whole means the machine was busy while one of them ran."""
    medians: dict[tuple, dict[str, float]] = {}
    for row in document["rows"]:
        if row["status"] == "ok" and row.get("median_ms") is not None:
            key = (row["op"], row["impl"], shape_text(row["shape"]))
            medians.setdefault(key, {})[row["pass"]] = row["median_ms"]
    lines = []
    for (op, impl, shape), passes in medians.items():
        whole = passes.get("forward+backward")
        for part in ("forward", "backward"):
            if whole is not None and passes.get(part, 0.0) > whole:
                lines.append(
                    f"{op} {impl} {shape}: {part} median {passes[part]:.3g} ms > forward+backward "
                    f"median {whole:.3g} ms (a part slower than the whole)"
                )
    return lines


def busy_warnings(document: dict, threshold: float = BUSY_SPREAD) -> list[str]:
    """What says that other work shared the machine, so that the medians are less trustworthy:
    one line per timed case whose p80 exceeds ``threshold`` times its p20 in some pass, naming
    the case and its widest pass, the widest first; then the cases whose forward or backward
    is slower than their forward + backward (``contradictions``); then the dispatch
    measurements that spread beyond ``threshold``."""
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
    lines += contradictions(document)
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
    if document.get("loss_strategy_choices"):
        lines += ["", 'The loss strategy "auto" picked (simcse_fast.similarity.strategy_choices()):', ""]
        lines += [f"- {case}: {choice}" for case, choice in sorted(document["loss_strategy_choices"].items())]
    if document["missing_peers"]:
        lines += ["", "Peers not measured:"]
        lines += [f"- {name}: {reason}" for name, reason in sorted(document["missing_peers"].items())]
    if document.get("busy_warnings"):
        lines += ["", f"Timings that say the machine was busy (p80/p20 beyond {BUSY_SPREAD}, or a pass "
                      "slower than forward + backward):"]  # fmt: skip
        lines += [f"- {line}" for line in document["busy_warnings"]]
    return "\n".join(lines) + "\n"


def _legend_below(figure, handles: list, labels: list[str], top_axes_bottom: float) -> None:
    """One legend for the whole figure, under its plots, so that no entry covers data."""
    columns = min(3, max(1, len(labels)))
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, top_axes_bottom),
                  ncol=columns, fontsize=8, frameon=False)  # fmt: skip


def _colors(plt, names) -> dict[str, tuple]:
    """A distinct colour per name (tab10, then tab20 beyond ten), in sorted order: the same
    implementation has the same colour in every panel."""
    names = sorted(set(names))
    palette = plt.cm.tab10.colors if len(names) <= 10 else plt.cm.tab20.colors
    return dict(zip(names, itertools.cycle(palette)))


def _plot_loss(document: dict, rows: list[dict], plt, path: Path) -> None:
    """Time and peak memory of the loss against N, a colour per implementation and a column of
    panels per D (time above memory; side by side for a single D); a case that ran out of
    memory or was skipped for the budget is a cross at its estimated need (a dotted vertical
    line where there is no estimate). The legend sits under the plots."""
    from matplotlib.lines import Line2D

    impls = sorted({row["impl"] for row in rows})
    dims = sorted({row["shape"]["D"] for row in rows})
    colors = _colors(plt, impls)
    if max(len({row["shape"]["N"] for row in rows if row["shape"]["D"] == dim}) for dim in dims) < 3:
        _plot_loss_bars(document, rows, plt, path, colors)
        return
    legend_height = 0.25 * math.ceil(len(impls) / 3) + 0.15
    if len(dims) == 1:
        height = 4.2 + legend_height
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, height))
        panels = {dims[0]: (time_axis, memory_axis)}
    else:
        height = 7.5 + legend_height
        figure, grid = plt.subplots(2, len(dims), figsize=(5 * len(dims), height), squeeze=False)
        panels = {dim: (grid[0][column], grid[1][column]) for column, dim in enumerate(dims)}
    for dim, (time_axis, memory_axis) in panels.items():
        for impl in impls:
            mine = [r for r in rows if r["impl"] == impl and r["shape"]["D"] == dim]
            mine.sort(key=lambda r: r["shape"]["N"])
            measured = [r for r in mine if r["status"] == "ok"]
            style = {"color": colors[impl], "marker": "o", "markersize": 4}
            time_axis.plot([r["shape"]["N"] for r in measured], [r["median_ms"] for r in measured], **style)
            memory_axis.plot([r["shape"]["N"] for r in measured], [r["peak_mem_mb"] or 0.0 for r in measured],
                             **style)  # fmt: skip
            for failed in (r for r in mine if r["status"] != "ok"):
                if failed.get("memory_need_mb") is None:
                    memory_axis.axvline(failed["shape"]["N"], color=colors[impl], linestyle=":")
                    continue
                point = (failed["shape"]["N"], failed["memory_need_mb"])
                memory_axis.plot(*point, marker="x", markersize=10, color=colors[impl], linestyle="none")
                reason = failed["status"].split(":")[0]  # "oom" or "skipped"
                memory_axis.annotate(reason, point, fontsize=7, textcoords="offset points", xytext=(4, 4))
        time_axis.set_yscale("log")
        memory_axis.set_yscale("symlog", linthresh=1.0)  # a peak can be 0 MB
        memory_axis.margins(0.1)  # room for the labels of the crosses
        for axis, title in (
            (time_axis, f"info_nce forward+backward, median ms, D = {dim}"),
            (memory_axis, f"peak extra MB, D = {dim} (x: out of memory or over budget, at the need)"),
        ):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("N = M")
            axis.set_title(title, fontsize=8)
            axis.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colors[impl], marker="o", markersize=4) for impl in impls]
    figure.suptitle(f"{document['device']} — {document['dtype']}")
    bottom = legend_height / height
    figure.tight_layout(rect=(0, bottom, 1, 1))
    _legend_below(figure, handles, impls, bottom)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_loss_bars(document: dict, rows: list[dict], plt, path: Path, colors: dict) -> None:
    """The loss at a few shapes (fewer than three N per D: no curve to draw): forward + backward
    time and peak extra memory side by side, a group of bars per shape, a bar per
    implementation, log scales; a case that did not run is named in its group's label."""
    from matplotlib.patches import Patch

    shapes = sorted({(row["shape"]["N"], row["shape"]["D"]) for row in rows})
    measured = [row for row in rows if row["status"] == "ok"]
    groups = []
    for n, dim in shapes:
        mine = [row for row in rows if (row["shape"]["N"], row["shape"]["D"]) == (n, dim)]
        failed = sorted({f"{row['impl']}: {row['status']}" for row in mine if row["status"] != "ok"})
        groups.append(
            ("\n".join([f"N={n}, D={dim}", *failed]), [row for row in mine if row["status"] == "ok"])
        )
    height = 1.2 + 0.2 * len(measured) + 0.25 * len(shapes) + 0.25 * math.ceil(len(colors) / 3)
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, height))
    for axis, key, title in ((time_axis, "median_ms", "info_nce forward+backward, median ms"),
                             (memory_axis, "peak_mem_mb", "peak extra MB")):  # fmt: skip
        values = [row[key] or 0.0 for row in measured]
        _grouped_bars(axis, groups, lambda row, key=key: max(row[key] or 0.0, 1e-3), lambda row: row["impl"],
                      colors, note=lambda row, key=key: f"{row[key] or 0:.3g}")  # fmt: skip
        low = max(min(values, default=1.0), 1e-3) / 2  # a peak of 0 MB is drawn at the axis' start
        _log_axis(axis, low, max(max(values, default=1.0), low) * 4)
        axis.set_title(title, fontsize=9)
    figure.suptitle(f"{document['device']} — {document['dtype']}")
    legend_height = 0.25 * math.ceil(len(colors) / 3) + 0.15
    bottom = legend_height / height
    figure.tight_layout(rect=(0, bottom, 1, 1))
    _legend_below(figure, [Patch(color=color) for color in colors.values()], list(colors), bottom)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _pooling_label(row: dict) -> str:
    """A pooling row's implementation, the padded op measured beside a packed one shortened to
    "..., padded op"."""
    padded = f" {row['op'].replace('packed_', 'masked_')} (padded)"
    return row["impl"].replace(padded, ", padded op") if row["op"] in OPS["packed"] else row["impl"]


def _pooling_shape_label(shape: dict) -> str:
    """``B×L×H`` of a pooling shape, with the packed tokens ``T`` on a second line."""
    text = f"{shape['B']}×{shape['L']}×{shape['H']}"
    return f"{text}\nT={shape['T']}" if "T" in shape else text


def _log_axis(axis, low: float, high: float) -> None:
    """A log x-axis from ``low`` to ``high`` labelled 1, 2, 5 per decade in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_xscale("log")
    axis.set_xlim(low, high)
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(True, axis="x", which="major", alpha=0.3)


def _grouped_bars(axis, groups: list[tuple[str, list[dict]]], value, label, colors, note=None) -> None:
    """Horizontal bars, a group per ``(tick label, rows)``, a bar per row: length ``value(row)``,
    colour ``colors[label(row)]``, and ``note(row)`` written at its end where given."""
    ticks, tick_labels, position = [], [], 0.0
    for text, group in groups:
        first = position
        for row in sorted(group, key=label):
            axis.barh(position, value(row), height=0.8, color=colors[label(row)])
            if note is not None:
                axis.annotate(note(row), (value(row), position), fontsize=7, xytext=(2, 0),
                              textcoords="offset points", va="center")  # fmt: skip
            position += 1
        ticks.append((first + position - 1) / 2)
        tick_labels.append(text)
        position += 0.8
    axis.set_yticks(ticks, tick_labels, fontsize=8)
    axis.invert_yaxis()


def _plot_pooling(document: dict, rows: list[dict], plt, path: Path) -> None:
    """Forward + backward bandwidth of pooling: a panel per op, in each a group of horizontal
    bars per shape (one bar per implementation, labelled with its fraction of the device copy),
    GB/s on a log scale shared by the panels, the device copy's as a dashed line; the legend
    under the panels."""
    from matplotlib.patches import Patch

    ops = [op for family in ("pooling", "packed") for op in OPS[family] if any(r["op"] == op for r in rows)]
    labels = sorted({_pooling_label(row) for row in rows})
    colors = _colors(plt, labels)
    copy_gbps = document["ceilings"]["copy_gbps"]
    lowest = min(min(row["gbps"] for row in rows), copy_gbps)
    columns = 1 if len(ops) == 1 else 2
    panel_rows = math.ceil(len(ops) / columns)

    def panel_height(op):
        mine = [r for r in rows if r["op"] == op]
        return 0.8 + 0.2 * len(mine) + 0.2 * len({shape_text(r["shape"]) for r in mine})

    heights = [max(map(panel_height, ops[i * columns : (i + 1) * columns])) for i in range(panel_rows)]
    legend_height = 0.25 * math.ceil((len(labels) + 1) / 3) + 0.15
    height = sum(heights) + legend_height + 0.5
    figure, axes = plt.subplots(panel_rows, columns, figsize=(12, height), squeeze=False,
                                gridspec_kw={"height_ratios": heights})  # fmt: skip
    for axis in axes.flat[len(ops) :]:
        axis.set_visible(False)
    for op, axis in zip(ops, axes.flat[: len(ops)], strict=True):
        mine = [r for r in rows if r["op"] == op]
        shapes = sorted({shape_text(r["shape"]): r["shape"] for r in mine}.items(),
                        key=lambda item: math.prod(item[1][k] for k in ("B", "L", "H")))  # fmt: skip
        groups = [(_pooling_shape_label(shape), [r for r in mine if shape_text(r["shape"]) == text])
                  for text, shape in shapes]  # fmt: skip
        _grouped_bars(axis, groups, lambda row: row["gbps"], _pooling_label, colors,
                      note=lambda row: f"{100 * row['gbps'] / copy_gbps:.2g}%")  # fmt: skip
        axis.axvline(copy_gbps, color="black", linestyle="--", linewidth=1)
        _log_axis(axis, lowest / 2, copy_gbps * 2)
        axis.set_title(op, fontsize=9)
        axis.set_ylabel("B×L×H", fontsize=8)
        axis.set_xlabel("GB/s, forward+backward (label: % of the device copy)", fontsize=8)
    handles = [Patch(color=colors[label]) for label in labels]
    handles.append(plt.Line2D([], [], color="black", linestyle="--"))
    figure.suptitle(f"pooling bandwidth — {document['device']} — {document['dtype']}")
    bottom = legend_height / height
    figure.tight_layout(rect=(0, bottom, 1, 1))
    _legend_below(figure, handles, [*labels, f"device copy ({copy_gbps:.4g} GB/s)"], bottom)
    figure.savefig(path, dpi=120)
    plt.close(figure)


PLOTS_NEED = "matplotlib is not installed: pip install 'simcse-fast[bench]'"


def write_plots(document: dict, out_dir: Path) -> list[Path]:
    """PNG plots: loss time and memory vs N (forward + backward), pooling bandwidth per op and
    shape. Needs matplotlib (``pip install simcse-fast[bench]``; ``ImportError`` saying so
    without it); returns the files written."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(PLOTS_NEED) from error

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
    matplotlib is installed (without it one line on stderr says which extra to install);
    returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    markdown_path.write_text(markdown_table(document))
    written = [json_path, markdown_path]
    try:
        written += write_plots(document, out_dir)
    except ImportError as error:
        print(f"simcse-fast bench: plots not written: {error}", file=sys.stderr)
    return written
