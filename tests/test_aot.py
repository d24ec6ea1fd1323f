"""Every Triton kernel configuration compiles for the H100 (sm_90) with no register spills.

Runs ``aot_compile.py`` in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces
the kernels) and reads the resource usage of each cubin.
"""

from __future__ import annotations

import json
import os
import re
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

    # Per configuration (kernel kind x block width): 7 padded variants and 2 packed ones.
    assert len(pooling_results) == len(POOLING_CONFIGS) * (7 + 2)
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


def test_pooling_forward_issues_every_load_of_a_tile_before_using_it(pooling_results):
    """The load schedule: x is read under its bounds only, so Triton's pipeliner turns each
    tile's loads into asynchronous 16-byte copies (LDGSTS), all issued before the tile is summed
    (one tile in the prologue, the next inside the loop while this one is consumed). A tile of
    4096 elements over 128 threads is 32 elements a thread: 4 copies in half precision, 8 in fp32
    (half of that for the max kernel's tile of 2048)."""
    from simcse_fast.pooling import TILE_ELEMENTS

    checked = 0
    for result in pooling_results:
        case = result["case"]
        if "_forward_" not in result["kernel"] or " aligned" not in case or "=fp64" in case:
            continue
        element_size = 4 if "x_ptr=fp32" in case else 2
        kind = result["kernel"].removeprefix("_").removesuffix("_kernel").replace("_pool", "")
        copies_per_tile = TILE_ELEMENTS[kind] * element_size // (128 * 16)
        assert result["async_copies"] >= 2 * copies_per_tile, result
        checked += 1
    assert checked > 0


def test_pooling_occupancy_table_matches_the_compiled_kernels(pooling_results):
    """``pooling.CTAS_PER_SM`` (the wave model that picks the blocks) is what the registers and
    shared memory of the bf16 padded kernels allow on an SM of 64K registers, 228 KB of shared
    memory (1 KB reserved per CTA) and 2048 threads. The table is Triton 3.9's; other releases
    allocate registers a little differently (3.6: 8 CTAs of the 256-column max forward kernel
    where 3.9 fits 7), so one CTA either way is the model's tolerance."""
    from simcse_fast.pooling import CTAS_PER_SM

    seen = set()
    for result in pooling_results:
        case = result["case"]
        if result["packed"] or " aligned" not in case or "int64-strides" in case or "=bf16" not in case:
            continue
        kind = result["kernel"].removeprefix("_").removesuffix("_kernel").replace("_pool", "")
        registers = -(-result["reg"] // 8) * 8
        by_registers = 65536 // (registers * 128)
        by_shared = 228 * 1024 // (result["dynamic_shared"] + 1024)
        assert abs(CTAS_PER_SM[kind, result["block_h"]] - min(16, by_registers, by_shared)) <= 1, result
        seen.add((kind, result["block_h"]))
    assert seen == set(CTAS_PER_SM)


@pytest.fixture(scope="module")
def similarity_results() -> list[dict]:
    return compile_family("similarity")


SM90_SHARED_MEMORY_PER_BLOCK = 227 * 1024
"""The most dynamic shared memory one CTA may use on sm_90 (cuobjdump shows only the static part)."""


def test_similarity_kernels_compile_for_sm90_without_spills(similarity_results):
    from simcse_fast.similarity import FUSED_CONFIGS

    # Per input dtype (bf16, fp16, fp32, fp32 with TF32): the default tile with every flag set (5
    # forward, 14 weights); each other half tile with 5 heavy sets; the gemm pass 5 + 14 + 2;
    # hardness and the guide: 5 + 6 with the default tile, 4 with the pass, 1 with an fp32 guide.
    assert len(similarity_results) == 4 * (5 + 14) + 5 * (len(FUSED_CONFIGS[2]) - 1) + 21 + 16
    spilled = [r["case"] for r in similarity_results if r["local"] > 0 or r["stack"] > 0]
    assert not spilled, f"register spills (stack or local memory) in: {spilled}"
    assert all(0 < r["reg"] <= 255 for r in similarity_results)


def test_similarity_kernels_fit_sm90_shared_memory(similarity_results):
    """Pipelined tiles live in dynamic shared memory: the launch fails if it exceeds 227 KB."""
    for result in similarity_results:
        if "PRECOMPUTED': False" in result["case"]:
            assert 0 < result["dynamic_shared"] <= SM90_SHARED_MEMORY_PER_BLOCK, result
        else:  # the gemm pass reads its chunk straight into registers
            assert result["dynamic_shared"] <= 4 * 1024, result


def test_similarity_kernels_use_hopper_tensor_cores(similarity_results):
    """bf16, fp16 and TF32 dots must lower to wgmma; exact fp32 ("ieee") runs on FMA units, and
    the gemm strategy's pass has no dot at all (cuBLAS did the products)."""
    for result in similarity_results:
        case = result["case"]
        exact_fp32 = "'DOT_PRECISION': 'ieee'" in case and (" q_ptr=fp32" in case or " x_ptr=fp32" in case)
        no_dot = exact_fp32 or "PRECOMPUTED': True" in case
        assert result["wgmma"] != no_dot, case


def _ctas_per_sm(result) -> int:
    """CTAs of a compiled kernel that fit one sm_90 SM: 64K registers (allocated 8 a thread at a
    time), 228 KB of shared memory less 1 KB reserved per CTA, 2048 threads."""
    threads = 32 * int(re.search(r"num_warps=(\d+)", result["case"]).group(1))
    registers = -(-result["reg"] // 8) * 8
    return min(
        65536 // (registers * threads), 228 * 1024 // (result["dynamic_shared"] + 1024), 2048 // threads
    )


def test_similarity_occupancy_table_matches_the_compiled_kernels(similarity_results):
    """``kernels.CTAS_PER_SM`` is the fewest CTAs per SM of each bf16 kernel and tile over the
    compiled flag sets, within one CTA across Triton releases; the default half-precision tile
    keeps two CTAs per SM (at most 128 registers a thread) with every flag set of the plain losses
    but doc_to_doc's periodic exclusion: exclude_diagonal, query_to_query and the symmetric block
    with a learnable scale included (hardness weighting and the guide's tile take more)."""
    from simcse_fast.similarity import CTAS_PER_SM

    fewest = {}
    for result in similarity_results:
        case = result["case"]
        if "=bf16" not in case:
            continue
        kernel = "forward" if "_lse_partial_kernel" in case else "weights"
        key = (kernel, case.split("tile=")[1])
        fewest[key] = min(fewest.get(key, 99), _ctas_per_sm(result))
    assert set(fewest) == set(CTAS_PER_SM)
    for key, ctas in fewest.items():
        assert abs(CTAS_PER_SM[key] - ctas) <= 1, (key, ctas)
    for result in similarity_results:
        case = result["case"]
        plain = "'EXCLUDE': 2" not in case and "'HARDNESS': 0, 'GUIDED': 0" in case
        if case.split("tile=")[1] in ("128x64", "128x64/cols") and plain:
            assert _ctas_per_sm(result) >= 2, result


@pytest.fixture(scope="module")
def matryoshka_results() -> list[dict]:
    return compile_family("matryoshka")


def test_matryoshka_kernel_compiles_for_sm90_without_spills(matryoshka_results):
    """The Matryoshka weights kernel: every flag set (7, What in bf16), the heaviest in fp16
    and fp32, hardness weighting (each mode, and the symmetric block) and GIST's guide (its two
    block kinds) in bf16: no spills, no dot (cuBLAS did the products, the guide's included), its
    chunks read into registers, and the occupancy its table states (``MATRYOSHKA_CTAS_PER_SM``,
    plain and adjusted, one CTA of tolerance)."""
    from simcse_fast.similarity.matryoshka import MATRYOSHKA_CTAS_PER_SM

    assert len(matryoshka_results) == 7 + 2 + 6
    spilled = [r["case"] for r in matryoshka_results if r["local"] > 0 or r["stack"] > 0]
    assert not spilled, f"register spills (stack or local memory) in: {spilled}"
    for result in matryoshka_results:
        assert 0 < result["reg"] <= 255 and not result["wgmma"], result
        assert result["dynamic_shared"] <= 4 * 1024, result
        assert result["vector_loads"], result["case"]
    for kind, adjusted in (("bf16", False), ("bf16 adjusted", True)):
        fewest = min(
            _ctas_per_sm(r)
            for r in matryoshka_results
            if "w_ptr=bf16" in r["case"] and ("'HARDNESS': 0, 'GUIDED': 0" not in r["case"]) == adjusted
        )
        assert abs(MATRYOSHKA_CTAS_PER_SM[kind] - fewest) <= 1, (kind, fewest)
