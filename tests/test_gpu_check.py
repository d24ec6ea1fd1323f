"""The GPU check (``benchmarks/gpu_check.py``) without a GPU: its dry run end to end (every stage
on the CPU at tiny sizes, the output folder's structure), the time limits of its stages, and
the targets it judges from a results document."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402
import train_step  # noqa: E402

from simcse_fast import bench, similarity  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The output folder of ``gpu_check.py --dry-run`` and the command's exit status and stdout."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    return out, completed


@pytest.mark.slow
def test_dry_run_writes_what_a_gpu_machine_returns(dry_run):
    out, completed = dry_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert set(files) == set(gpu_check.OUTPUT_FILES) and len(files) <= 8, files
    for path in out.iterdir():
        assert path.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", path.name)
        assert 0 < path.stat().st_size <= 16 * 2**20
    # The summary is printed last: every stage and every target.
    tail = completed.stdout[completed.stdout.index("gpu_check: ") :]
    for name in gpu_check.STAGE_NAMES:
        assert re.search(rf"^{name} +ok ", tail, re.M), tail
    assert "targets:" in tail
    log = (out / "gpu_check.log").read_text()
    assert all(f"] {name} (" in log for name in gpu_check.STAGE_NAMES) and "skipped" in log


@pytest.mark.slow
def test_dry_run_results_cover_every_stage(dry_run):
    out, _ = dry_run
    document = json.loads((out / "results.json").read_text())
    check = document["gpu_check"]
    assert check["dry_run"] and [stage["name"] for stage in check["stages"]] == list(gpu_check.STAGE_NAMES)
    assert all(stage["status"] == "ok" and stage["seconds"] < stage["limit_s"] for stage in check["stages"])
    assert document["environment"]["versions"]["torch"] and document["commit"]
    assert document["ceilings"]["copy_gbps"] > 0 and document["ceilings"]["headline"] == "median"
    assert document["install"]["backends"] == ["torch"]

    sizes = gpu_check.DRY_RUN_SIZES
    rows = {(row["op"], row["impl"], row["shape"].get("N", row["shape"].get("B")), row["pass"]): row
            for row in document["rows"]}  # fmt: skip
    loss_impls = [f"simcse_fast[{name}]" for name in similarity.loss_strategies("cpu")]
    loss_impls += ["reference (eager)", "reference (torch.compile)", "sentence-transformers MNRL"]
    for impl in loss_impls:
        for n, _ in sizes.loss:
            for pass_name in bench.PASSES:
                row = rows[("info_nce", impl, n, pass_name)]
                assert row["status"] == "ok" and row["median_ms"] > 0 and row["tflops"] > 0, row
    for op in ("masked_mean_pool", "masked_max_pool", "packed_mean_pool", "packed_max_pool"):
        batch = (sizes.pooling if op.startswith("masked") else sizes.packed)[0][0]
        assert rows[(op, "simcse_fast[torch]", batch, "forward")]["gbps"] > 0
        assert rows[(op, "reference (eager)", batch, "backward")]["status"] == "ok"
    assert (
        rows[("masked_max_pool", "reference (torch.compile)", sizes.pooling[0][0], "forward")]["status"]
        == "ok"
    )
    assert set(document["dispatch_overhead_us"]) >= {"simcse_fast[torch]", "reference (eager)"}

    precision = document["loss_precision"]
    assert (precision["N"], precision["D"]) == sizes.precision
    assert {(row["impl"], row["gradient"]) for row in precision["rows"]} == {
        (impl, gradient)
        for impl in [*loss_impls[:-3], "eager PyTorch"]
        for gradient in ("anchors", "candidates")
    }
    assert all(0 < row["median"] <= row["p90"] <= row["worst"] for row in precision["rows"])

    train = document["train_step"]
    assert [row["impl"] for row in train["rows"]] == list(train_step.IMPLEMENTATIONS)
    for row in train["rows"]:
        assert row["status"] == "ok" and row["batch"] == sizes.batch and row["sentences_per_s"] > 0, row
        assert row["seconds"]["p20"] <= row["seconds"]["p50"] <= row["seconds"]["p80"]
    largest = train["largest_cached"]
    assert largest["largest"] == sizes.search_limit and "stops at batch" in largest["stopped_by"]

    tests = document["gpu_tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"] and tests["failed_count"] == 0

    judged = {target["target"].split(" (")[0].split(":")[0] for target in document["targets"]}
    uncached = "train step simcse_fast uncached >= 1.3x sentence-transformers fit MNRL"
    for expected in ("loss forward+backward", "pooling masked_mean_pool", uncached, "pytest -m gpu passes"):
        assert any(name.startswith(expected) for name in judged), (expected, judged)


@pytest.mark.slow
def test_dry_run_reports_rewrite_from_the_results(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check summary") and "| target | measured | result |" in summary
    results = (out / "results.md").read_text()
    for heading in (
        "## Loss and pooling",
        "## bf16 gradient error",
        "## Training step",
        "## GPU tests",
        "## Targets",
    ):
        assert heading in results
    (out / "summary.md").unlink()
    assert gpu_check.main(["--report", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary


def test_a_stage_past_its_limit_is_interrupted_then_killed(tmp_path, monkeypatch):
    log = tmp_path / "log"
    polite = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    started = time.monotonic()
    with log.open("a") as file:
        returncode, timed_out = gpu_check.run_process(polite, 0.5, file)
    # SIGINT: a KeyboardInterrupt (exit status 1), or the signal itself during the start-up.
    assert timed_out and returncode in (1, -2) and time.monotonic() - started < 20
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.5)
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "print('ignoring', flush=True); time.sleep(60)"]  # fmt: skip
    with log.open("a") as file:
        returncode, timed_out = gpu_check.run_process(stubborn, 0.5, file)
    assert timed_out and returncode == -9


CEILINGS = {"copy_gbps": 10.0, "bf16_tflops": 1.0, "matmul_bfloat16_tflops": 1.0}


def _run(tmp_path, outcomes) -> gpu_check.Run:
    run = gpu_check.Run(tmp_path / "out", tmp_path, dry_run=True, budget_s=480, limits={},
                        stages=gpu_check.STAGE_NAMES, commit="abc", cuda_archs=None)  # fmt: skip
    run.outcomes = outcomes
    return run


def test_what_a_stage_did_not_reach_is_recorded_as_not_run(tmp_path):
    shape = {"N": 64, "M": 64, "D": 32}
    fields = {
        "shape": shape,
        "dtype": "bfloat16",
        "status": "ok",
        "p20_ms": 1.0,
        "p50_ms": 1.0,
        "p80_ms": 1.0,
        "spread": 1.0,
        "peak_mem_mb": 1.0,
        "tflops": 1.0,
        "fraction_of_ceiling": 0.5,
    }
    measured = [
        {"op": "info_nce", "impl": impl, "pass": pass_name, "median_ms": median, **fields}
        for impl, median in (("simcse_fast[torch]", 1.0), ("reference (eager)", 2.5))
        for pass_name in bench.PASSES
    ]  # fmt: skip
    impls = ("simcse_fast[torch]", "reference (eager)", "sentence-transformers MNRL")
    planned = [{"op": "info_nce", "impl": impl, "shape": shape} for impl in impls]
    (tmp_path / "loss.json").write_text(json.dumps({"planned": planned, "document": {"rows": measured}}))
    (tmp_path / "ceilings.json").write_text(json.dumps({"ceilings": CEILINGS}))
    outcome = {"name": "loss", "what": "", "status": "timed out", "reason": "stopped at its limit of 7 s"}
    document = gpu_check.gather(_run(tmp_path, [outcome]))
    missing = [row for row in document["rows"] if row["impl"] == "sentence-transformers MNRL"]
    assert len(missing) == 3 and all(
        row["status"].startswith("not run: the loss stage timed out") for row in missing
    )
    targets = {target["target"]: target for target in document["targets"]}
    speed = targets["loss forward+backward (simcse_fast[torch]) >= eager at every N"]
    assert speed["met"] is True and "2.50x" in speed["measured"]
    assert targets["loss forward+backward ~2x eager at N=64 (siglip-kernel: 2.1x)"]["met"] is True
    train = next(target for target in document["targets"] if target["target"].startswith("train step"))
    assert train["met"] is None and "not measured: the train stage not run" in train["measured"]
    assert "| sentence-transformers MNRL | forward | not run: the loss stage timed out" in (
        gpu_report.results_markdown(document)
    )


def test_targets_judge_pooling_and_the_training_step(tmp_path):
    document = gpu_check.gather(_run(tmp_path, []))
    shape = {"B": 4, "L": 8, "H": 32}
    for impl, median, fraction in (("simcse_fast[triton]", 1.0, 0.95), ("reference (eager)", 3.5, 0.27)):
        document["rows"].append({"op": "masked_mean_pool", "impl": impl, "pass": "forward", "shape": shape,
                                 "status": "ok", "median_ms": median, "gbps": 100 * fraction,
                                 "fraction_of_ceiling": fraction})  # fmt: skip
    rows = [
        {"impl": "simcse_fast uncached", "status": "ok", "sentences_per_s": 1200.0, "peak_extra_mb": 1.0},
        {
            "impl": "sentence-transformers fit MNRL",
            "status": "ok",
            "sentences_per_s": 1000.0,
            "peak_extra_mb": 2.0,
        },
    ]
    document["train_step"] = {"batch": 512, "rows": rows}
    found = {target["target"]: target for target in gpu_report.targets(document)}
    pooling = found["pooling masked_mean_pool 4x8x32 forward: >= 90% of copy, >= 3x eager"]
    assert pooling["met"] is True and "3.5x eager" in pooling["measured"]
    uncached = found["train step simcse_fast uncached >= 1.3x sentence-transformers fit MNRL (B=512)"]
    assert uncached["met"] is False and uncached["measured"].startswith("1.20x")
    cached = found["train step simcse_fast cached >= 1.3x sentence-transformers fit CachedMNRL (B=512)"]
    assert cached["met"] is None


def test_junit_summary_counts_and_names_failures(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad">'
        '<failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_b" name="test_setup"><error message="fixture broke"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_check.junit_summary(report)
    assert (summary["tests"], summary["passed"], summary["failures"], summary["errors"]) == (4, 1, 1, 1)
    assert summary["failed"] == [
        "tests.test_a::test_bad: assert 1 == 2",
        "tests.test_b::test_setup: fixture broke",
    ]
    assert "no junit report" in gpu_check.junit_summary(tmp_path / "missing.xml")["junit"]


def test_command_line_is_checked(tmp_path, capsys):
    for arguments, message in (
        (["--stages", "loss,attention"], "--stages takes names among install"),
        (["--limits", "loss=-1"], "--limits takes STAGE=SECONDS"),
        (["--budget", "0"], "--budget takes a positive number"),
    ):
        with pytest.raises(SystemExit):
            gpu_check.main(["--dry-run", "--out", str(tmp_path), *arguments])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--report", str(tmp_path)])
    assert "is not the results of a GPU check" in capsys.readouterr().err
