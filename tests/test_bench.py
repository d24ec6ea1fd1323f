"""The benchmark harness on tiny sizes: result schema, the byte and FLOP models, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from simcse_fast import bench, cli

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
