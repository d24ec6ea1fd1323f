"""The benchmark harness on tiny sizes: result schema, the byte and FLOP models, the CLI."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from simcse_fast import bench, cli, reference, similarity

ROW_KEYS = {
    "op",
    "impl",
    "pass",
    "shape",
    "dtype",
    "status",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "fraction_of_ceiling",
    "peak_mem_mb",
}


def test_pooling_byte_model():
    # x: 2*3*4 fp16 = 48 bytes, mask 2*3 = 6 bytes, pooled 2*4 fp16 = 16 bytes.
    assert bench.pooling_bytes(2, 3, 4, element_size=2, mask_element_size=1) == {
        "forward": 48 + 6 + 16,
        "backward": 16 + 6 + 48,
        "forward+backward": 140,
    }


def test_loss_flop_model():
    assert bench.loss_flops(3, 5, 7) == {"forward": 210, "backward": 420, "forward+backward": 630}


@pytest.fixture(scope="module")
def tiny_run():
    sizes = {"pooling": [(3, 5, 16)], "loss": [(8, 16)]}
    return bench.run_benchmark(preset="quick", sizes=sizes, device="cpu", min_repeats=2, progress=False)


def test_result_document_schema(tiny_run, tmp_path):
    document = tiny_run
    for key in ("device", "torch", "triton", "commit", "date", "dtype", "ceilings", "rows", "missing_peers"):
        assert key in document
    assert document["ceilings"]["copy_gbps"] > 0 and document["ceilings"]["bf16_tflops"] > 0
    ops = {row["op"] for row in document["rows"]}
    assert ops == {"masked_mean_pool", "masked_max_pool", "info_nce"}
    impls = {row["impl"] for row in document["rows"]}
    assert {"simcse_fast[torch]", "reference (eager)"} <= impls
    assert "reference (torch.compile)" in impls or "reference (torch.compile)" in document["missing_peers"]
    for row in document["rows"]:
        assert ROW_KEYS <= set(row), row
        assert row["pass"] in bench.PASSES and row["status"] == "ok"
        assert row["median_ms"] > 0 and row["fraction_of_ceiling"] > 0
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert ("tflops" in row) == (row["op"] == "info_nce") and ("gbps" in row) != ("tflops" in row)
    written = bench.write_results(document, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(
        json.dumps(document["rows"])
    )
    table = (tmp_path / "results.md").read_text()
    assert "| info_nce | N=8xM=8xD=16 | simcse_fast[torch] | forward+backward |" in table
    assert {path.name for path in written} >= {"results.json", "results.md"}


def test_rates_follow_the_models(tiny_run):
    for row in tiny_run["rows"]:
        seconds = row["median_ms"] / 1e3
        if row["op"] == "info_nce":
            flops = bench.loss_flops(8, 8, 16)[row["pass"]]
            assert row["tflops"] == pytest.approx(flops / seconds / 1e12)
        else:
            moved = bench.pooling_bytes(3, 5, 16, element_size=4)[row["pass"]]
            assert row["gbps"] == pytest.approx(moved / seconds / 1e9)


def test_out_of_memory_is_recorded_not_raised(monkeypatch):
    calls = []

    def exhausted(case, device, min_repeats):
        calls.append((case.impl, case.shape["N"]))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(bench, "measure_case", exhausted)
    document = bench.run_benchmark(
        ops=("loss",),
        preset="quick",
        sizes={"loss": [(8, 16), (16, 16)]},
        device="cpu",
        min_repeats=1,
        progress=False,
    )
    assert {row["status"] for row in document["rows"]} == {"oom"}
    assert all(n == 8 for _, n in calls), "an implementation that ran out of memory is not tried at larger N"


def test_cli_rejects_bad_sizes_and_ops(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "12x"])
    assert "neither BxLxH" in capsys.readouterr().err
    assert cli.main(["bench", "--ops", "attention"]) == 2
    assert "--ops takes pooling and/or loss" in capsys.readouterr().err


def test_cli_bench_prints_a_table(tmp_path, capsys):
    assert (
        cli.main(["bench", "--quick", "--sizes", "2x4x16,8x16", "--repeats", "1", "--out", str(tmp_path)])
        == 0
    )
    output = capsys.readouterr().out
    assert "| masked_mean_pool | B=2xL=4xH=16 | simcse_fast[torch] | forward |" in output
    assert (tmp_path / "results.json").exists()


def test_spread_gives_interpolated_percentiles():
    assert bench.spread([5.0, 1.0, 3.0, 2.0, 4.0, 6.0]) == pytest.approx({"p20": 2.0, "p50": 3.5, "p80": 5.0})
    assert bench.spread([7.0]) == {"p20": 7.0, "p50": 7.0, "p80": 7.0}
    with pytest.raises(ValueError, match="times"):
        bench.spread([])


def test_rows_carry_the_spread(tiny_run):
    for row in tiny_run["rows"]:
        assert row["p50_ms"] == row["median_ms"]
        assert row["spread"] == pytest.approx(row["p80_ms"] / row["p20_ms"]) and row["spread"] >= 1
    markdown = bench.markdown_table(tiny_run)
    assert "| p20-p80 ms | p80/p20 |" in markdown


def test_busy_is_decided_by_p80_over_p20():
    quiet = bench.spread([10.0, 10.2, 10.1, 10.4, 10.3, 10.0, 11.0, 10.1, 10.2, 10.6])
    disturbed = bench.spread([10.0, 10.1, 10.0, 10.2, 25.0, 24.0, 30.0, 10.1, 26.0, 22.0])
    assert not bench.is_busy(quiet) and bench.is_busy(disturbed)
    assert bench.is_busy({"p20": 1.0, "p80": bench.BUSY_SPREAD + 0.01})
    assert not bench.is_busy({"p20": 1.0, "p80": bench.BUSY_SPREAD})
    assert not bench.is_busy(disturbed, threshold=3.0)
    with pytest.raises(ValueError, match="threshold"):
        bench.is_busy(quiet, threshold=0.5)


def _row(op, impl, shape, pass_name, p20, p80):
    return {"op": op, "impl": impl, "shape": shape, "pass": pass_name, "status": "ok",
            "p20_ms": p20, "p80_ms": p80, "spread": p80 / p20}  # fmt: skip


def test_busy_warnings_name_each_case_widest_first():
    document = {
        "rows": [
            _row("info_nce", "reference (eager)", {"N": 8, "M": 8, "D": 16}, "forward", 1.0, 1.1),
            _row("info_nce", "reference (eager)", {"N": 8, "M": 8, "D": 16}, "backward", 1.0, 2.0),
            _row("info_nce", "reference (eager)", {"N": 8, "M": 8, "D": 16}, "forward+backward", 1.0, 1.8),
            _row("masked_max_pool", "simcse_fast[torch]", {"B": 2, "L": 4, "H": 8}, "forward", 1.0, 3.0),
            _row("masked_mean_pool", "simcse_fast[torch]", {"B": 2, "L": 4, "H": 8}, "forward", 1.0, 1.2),
        ],
        "dispatch_overhead_us": {"simcse_fast[torch]": {"p20": 10.0, "p50": 12.0, "p80": 40.0}},
    }
    lines = bench.busy_warnings(document)
    assert len(lines) == 3
    assert lines[0].startswith("masked_max_pool simcse_fast[torch] B=2xL=4xH=8: forward ")
    assert lines[1].startswith("info_nce reference (eager) N=8xM=8xD=16: backward ") and "2.00" in lines[1]
    assert lines[2].startswith("dispatch overhead simcse_fast[torch]")


def _fake_timings(spread_factor: float):
    """A ``measure_case`` stand-in: every pass p20 = 1 ms, p80 = ``spread_factor`` ms, and a peak
    memory of N^2 bytes for the implementations that build the similarity matrix, N for ours."""

    def measure(case, device, min_repeats):
        stats = {"p20": 1.0, "p50": (1.0 + spread_factor) / 2, "p80": spread_factor}
        size = case.shape.get("N", 1)
        memory = size**2 if case.memory_need is not None else size
        return {name: dict(stats) for name in bench.PASSES} | {"peak_mem_mb": memory / 2**20}

    return measure


@pytest.fixture
def no_ceiling_runs(monkeypatch):
    """Ceilings and dispatch overhead as constants: the tests that use this check wiring, not speed."""
    ceilings = {
        "copy_gbps": 10.0,
        "matmul_bfloat16_tflops": 1.0,
        "matmul_float32_tflops": 1.0,
        "bf16_tflops": 1.0,
    }
    monkeypatch.setattr(bench, "measure_ceilings", lambda device, dtype: dict(ceilings))
    monkeypatch.setattr(bench, "measure_call_us", lambda device, call: {"p20": 9.0, "p50": 10.0, "p80": 11.0})


def test_cli_warns_when_the_machine_was_busy(monkeypatch, no_ceiling_runs, capsys):
    monkeypatch.setattr(bench, "measure_case", _fake_timings(spread_factor=4.0))
    assert cli.main(["bench", "--ops", "loss", "--sizes", "8x16", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    assert (
        "| info_nce | N=8xM=8xD=16 | simcse_fast[torch] | forward | 2.500 | 1.000-4.000 | 4.00 |"
        in captured.out
    )
    assert "warning: the machine was busy" in captured.err
    assert "info_nce simcse_fast[torch] N=8xM=8xD=16" in captured.err


def test_cli_is_quiet_on_an_idle_machine(monkeypatch, no_ceiling_runs, capsys):
    monkeypatch.setattr(bench, "measure_case", _fake_timings(spread_factor=1.1))
    assert cli.main(["bench", "--ops", "loss", "--sizes", "8x16", "--repeats", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_memory_budget_skips_what_would_not_fit(monkeypatch, no_ceiling_runs, tmp_path):
    measured = []
    fake = _fake_timings(spread_factor=1.1)

    def measure(case, device, min_repeats):
        measured.append(case.impl)
        return fake(case, device, min_repeats)

    monkeypatch.setattr(bench, "measure_case", measure)
    document = bench.run_benchmark(
        ops=("loss",), sizes={"loss": [(4096, 16)]}, device="cpu", min_repeats=1, progress=False,
        memory_budget_gb=0.1,
    )  # fmt: skip
    assert document["memory_budget_gb"] == 0.1 and document["memory_budget_source"] == "given"
    statuses = {row["impl"]: row["status"] for row in document["rows"]}
    need_gb = bench.cases.NM_PEER_BUFFERS * 4096**2 * 4 / 1e9
    assert statuses["reference (eager)"] == f"skipped: would need {need_gb:.1f} GB"
    assert statuses["simcse_fast[torch]"] == "ok"
    assert "reference (eager)" not in measured and "simcse_fast[torch]" in measured
    written = {path.name for path in bench.write_results(document, tmp_path)}
    assert "loss_time_memory.png" in written, "a skipped case is drawn at its estimated need"
    assert (
        f"| reference (eager) | forward | skipped: would need {need_gb:.1f} GB |"
        in (tmp_path / "results.md").read_text()
    )
    with pytest.raises(ValueError, match="memory_budget_gb"):
        bench.run_benchmark(ops=("loss",), sizes={"loss": [(8, 16)]}, device="cpu", memory_budget_gb=0)


def test_run_benchmark_names_bad_arguments():
    with pytest.raises(ValueError, match="ops"):
        bench.run_benchmark(ops=("attention",), device="cpu")
    with pytest.raises(ValueError, match="preset"):
        bench.run_benchmark(preset="fast", device="cpu")
    with pytest.raises(ValueError, match="min_repeats"):
        bench.run_benchmark(device="cpu", min_repeats=0)


def test_quick_sweeps_at_least_three_loss_sizes():
    for device_type, shapes in bench.PRESETS["quick"].items():
        sizes_by_dim: dict[int, set[int]] = {}
        for n, d in shapes["loss"]:
            sizes_by_dim.setdefault(d, set()).add(n)
        assert all(len(sizes) >= 3 for sizes in sizes_by_dim.values()), device_type


@pytest.mark.slow
def test_quick_end_to_end_plots_the_loss_against_n(monkeypatch, no_ceiling_runs, tmp_path):
    """``simcse-fast bench --quick --ops loss`` with the real preset and cases and synthetic
    timings (the real sweep takes tens of seconds): every implementation gets a row at each of
    the sweep's sizes and the plot is written."""
    monkeypatch.setattr(bench, "measure_case", _fake_timings(spread_factor=1.1))
    assert cli.main(["bench", "--quick", "--ops", "loss", "--device", "cpu", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    swept = {}
    for row in document["rows"]:
        swept.setdefault(row["impl"], set()).add(row["shape"]["N"])
    assert {"simcse_fast[torch]", "reference (eager)"} <= set(swept)
    assert all(len(sizes) >= 3 for sizes in swept.values()), swept
    assert (tmp_path / "loss_time_memory.png").stat().st_size > 0


def test_dispatch_overhead_is_reported(tiny_run):
    overhead = tiny_run["dispatch_overhead_us"]
    assert {"simcse_fast[torch]", "reference (eager)"} <= set(overhead)
    for stats in overhead.values():
        assert 0 < stats["p20"] <= stats["p50"] <= stats["p80"]
    assert tiny_run["dispatch_shape"] == list(bench.DISPATCH_SHAPE)
    assert "Dispatch overhead: one masked_mean_pool forward on B=1, L=1, H=8" in bench.markdown_table(
        tiny_run
    )


def test_packed_pooling_against_the_padded_op(no_ceiling_runs):
    document = bench.run_benchmark(
        ops=("packed",), sizes={"packed": [(3, 5, 16)]}, device="cpu", min_repeats=1, progress=False
    )
    assert {row["op"] for row in document["rows"]} == {"packed_mean_pool", "packed_max_pool"}
    impls = {row["impl"] for row in document["rows"]}
    assert {
        "simcse_fast[torch]",
        "reference (eager)",
        "simcse_fast[torch] masked_mean_pool (padded)",
    } <= impls
    for row in document["rows"]:
        shape = row["shape"]
        assert (shape["B"], shape["L"], shape["H"]) == (3, 5, 16) and 3 <= shape["T"] <= 15
        moved = bench.packed_pooling_bytes(shape["T"], 3, 16, element_size=4)[row["pass"]]
        assert row["gbps"] == pytest.approx(moved / (row["median_ms"] / 1e3) / 1e9)


def test_a_pass_slower_than_forward_plus_backward_is_flagged():
    shape = {"N": 1024, "M": 1024, "D": 64}
    document = {"rows": []}
    for pass_name, median in (("forward", 79.97), ("backward", 3.0), ("forward+backward", 4.46)):
        row = _row("info_nce", "reference (eager)", shape, pass_name, median, median * 1.01)
        document["rows"].append(row | {"median_ms": median})
    lines = bench.busy_warnings(document)
    assert lines == [
        "info_nce reference (eager) N=1024xM=1024xD=64: forward median 80 ms > forward+backward "
        "median 4.46 ms (a part slower than the whole)"
    ]


def test_cli_warns_when_a_pass_is_slower_than_the_whole(monkeypatch, no_ceiling_runs, capsys):
    def measure(case, device, min_repeats):
        fast, slow = {"p20": 1.0, "p50": 1.0, "p80": 1.1}, {"p20": 5.0, "p50": 5.0, "p80": 5.1}
        return {"forward": slow, "backward": fast, "forward+backward": dict(fast), "peak_mem_mb": 1.0}

    monkeypatch.setattr(bench, "measure_case", measure)
    assert cli.main(["bench", "--ops", "loss", "--sizes", "8x16", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: the machine was busy" in err and "a part slower than the whole" in err


def test_missing_matplotlib_says_which_extra_in_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    written = bench.write_results(tiny_run, tmp_path)
    assert {path.name for path in written} == {"results.json", "results.md"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'simcse-fast[bench]'" in err, err


OPTIONAL_IMPORTS = {"inf_cl": "a peer, where installed", "huggingface_hub": "transformers' own dependency"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_the_bench_needs_only_the_bench_extra():
    """Every third-party module the package imports (the harness, its plots, its peers) is a
    dependency, in the ``bench`` extra, or an optional peer: ``pip install -e ".[bench]"`` is
    all the README's benchmark command needs."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    installed = _requirement_names(project["dependencies"] + project["optional-dependencies"]["bench"])
    assert {"matplotlib", "sentence-transformers"} <= installed
    imported = set()
    for path in (root / "simcse_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"simcse_fast", *OPTIONAL_IMPORTS}
    needed = {name.replace("_", "-") for name in third_party}
    assert needed <= installed, (
        f"imported but in neither the dependencies nor the bench extra: {needed - installed}"
    )


def test_loss_cases_pin_each_strategy_and_auto_where_there_is_a_choice(monkeypatch):
    device = bench.Device(torch.device("cpu"))
    cases, _ = bench.build_loss("info_nce", (8, 16), torch.float32, device, False)
    ours = [case for case in cases if case.impl.startswith("simcse_fast[")]
    assert [(case.impl, case.environment) for case in ours] == [
        ("simcse_fast[torch]", {similarity.STRATEGY_ENV_VAR: "torch"})
    ]
    monkeypatch.setattr(similarity, "loss_strategies", lambda device: ("fused", "gemm", "torch"))
    cases, _ = bench.build_loss("info_nce", (8, 16), torch.float32, device, False)
    pinned = {case.impl: case.environment[similarity.STRATEGY_ENV_VAR] for case in cases if case.environment}
    expected = {"fused": "fused", "gemm": "gemm", "torch": "torch", "auto": "auto"}
    assert pinned == {f"simcse_fast[{name}]": strategy for name, strategy in expected.items()}


def test_a_case_is_measured_under_its_environment(monkeypatch):
    seen = []

    def run(anchors, candidates):
        seen.append(os.environ.get(similarity.STRATEGY_ENV_VAR))
        return (anchors * candidates).sum()

    monkeypatch.delenv(similarity.STRATEGY_ENV_VAR, raising=False)

    def make_inputs():
        return [torch.ones(2, 2, requires_grad=True), torch.ones(2, 2, requires_grad=True)]

    pin = {similarity.STRATEGY_ENV_VAR: "gemm"}
    case = bench.Case("info_nce", "pinned", {"N": 2, "M": 2, "D": 2}, make_inputs, run, environment=pin)
    bench.measure_case(case, bench.Device(torch.device("cpu"), min_seconds=0.0), min_repeats=1)
    assert seen and set(seen) == {"gemm"} and similarity.STRATEGY_ENV_VAR not in os.environ


def test_linear_cross_entropy_peer_is_the_one_direction_info_nce(generator):
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    device = bench.Device(torch.device("cpu"))
    cases, _ = bench.build_loss("info_nce", (64, 16), torch.float64, device, True)
    peer = next(case for case in cases if case.impl == "torch linear_cross_entropy")
    anchors, candidates = (torch.randn(64, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(
        peer.run(anchors, candidates), reference.info_nce(anchors, candidates, scale=20.0)
    )


def test_ceilings_name_their_headline():
    with pytest.raises(ValueError, match="headline"):
        bench.measure_ceilings(bench.Device(torch.device("cpu")), torch.float32, headline="best")


def test_select_builds_and_runs_only_the_implementations_named(monkeypatch, no_ceiling_runs):
    monkeypatch.setattr(bench, "measure_case", _fake_timings(spread_factor=1.1))
    saved = []
    document = bench.run_benchmark(
        ops=("loss",), sizes={"loss": [(8, 16)]}, device="cpu", min_repeats=1, progress=False,
        select=lambda impl: impl == "reference (eager)", dispatch=False,
        on_rows=lambda document, rows: saved.append(len(rows)),
    )  # fmt: skip
    assert {row["impl"] for row in document["rows"]} == {"reference (eager)"} and saved == [3]
    assert "sentence-transformers MNRL" not in document["missing_peers"]
    assert "dispatch_overhead_us" not in document


def test_recipes_time_hardness_and_gist_beside_sentence_transformers(no_ceiling_runs, generator):
    """The recipes family (on request): each op's fused loss beside sentence-transformers' class,
    the same value."""
    pytest.importorskip("sentence_transformers")
    device = bench.Device(torch.device("cpu"))
    for op in ("mnrl_hardness", "gist"):
        cases, missing = bench.build_recipes(op, (24, 16), torch.float32, device, False)
        if op == "mnrl_hardness" and "sentence-transformers MNRL" in missing:
            assert "hardness_mode" in missing["sentence-transformers MNRL"]
            continue
        ours, theirs = cases
        inputs = ours.make_inputs()
        torch.testing.assert_close(ours.run(*inputs), theirs.run(*inputs), rtol=1e-5, atol=1e-5)
    assert "recipes" not in bench.DEFAULT_FAMILIES
