"""Every Triton kernel configuration compiles for the H100 (sm_90) with no register spills.

Runs ``aot_compile.py`` in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces
the kernels) and reads the resource usage of each cubin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent


def compile_family(family: str) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, str(HERE / "aot_compile.py"), family],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def pooling_results() -> list[dict]:
    return compile_family("pooling")


def test_pooling_kernels_compile_for_sm90_without_spills(pooling_results):
    from simcse_fast.pooling import POOLING_CONFIGS

    assert len(pooling_results) >= 4 * len(POOLING_CONFIGS) * 4
    spilled = [r["case"] for r in pooling_results if r["local"] > 0 or r["stack"] > 0]
    assert not spilled, f"register spills (local memory) in: {spilled}"
    assert all(0 < r["reg"] <= 255 for r in pooling_results)


def test_pooling_kernels_use_16_byte_accesses_on_aligned_inputs(pooling_results):
    """The bandwidth floor needs vector loads of x (forward) and vector stores of grad_x."""
    for result in pooling_results:
        if " aligned" not in result["case"] or "=fp64" in result["case"]:
            continue
        if "_forward_" in result["case"]:
            assert result["vector_loads"], result["case"]
        else:
            assert result["vector_stores"], result["case"]


@pytest.fixture(scope="module")
def similarity_results() -> list[dict]:
    return compile_family("similarity")


SM90_SHARED_MEMORY_PER_BLOCK = 227 * 1024
"""The most dynamic shared memory one CTA may use on sm_90 (cuobjdump shows only the static part)."""


def test_similarity_kernels_compile_for_sm90_without_spills(similarity_results):
    assert len(similarity_results) == 4 * (4 + 6 * 2)
    spilled = [r["case"] for r in similarity_results if r["local"] > 0 or r["stack"] > 0]
    assert not spilled, f"register spills (stack or local memory) in: {spilled}"
    assert all(0 < r["reg"] <= 255 for r in similarity_results)


def test_similarity_kernels_fit_sm90_shared_memory(similarity_results):
    """Pipelined tiles live in dynamic shared memory: the launch fails if it exceeds 227 KB."""
    for result in similarity_results:
        assert 0 < result["dynamic_shared"] <= SM90_SHARED_MEMORY_PER_BLOCK, result


def test_similarity_kernels_use_hopper_tensor_cores(similarity_results):
    """bf16, fp16 and TF32 dots must lower to wgmma; exact fp32 ("ieee") runs on FMA units."""
    for result in similarity_results:
        case = result["case"]
        exact_fp32 = "'ieee'" in case and (" q_ptr=fp32" in case or " x_ptr=fp32" in case)
        assert result["wgmma"] != exact_fp32, case
