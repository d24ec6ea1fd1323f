"""The CUDA kernels of ``csrc/`` compiled for the H100 (sm_90) by nvcc, without a GPU: no register
spills under their ``__launch_bounds__``, and each forward step issues its UNROLL 16-byte loads
of x before using them (read off the SASS)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the one Triton bundles."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    triton = pytest.importorskip("triton")
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, str]:
    """(ptxas's report, the SASS) of csrc/pooling.cu for sm_90."""
    target = tmp_path_factory.mktemp("cuda") / "pooling.o"
    report = subprocess.run(
        [NVCC, "-O3", "-std=c++17", "-c", "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90",
         "-Xptxas", "-v", str(ROOT / "csrc" / "pooling.cu"), "-o", str(target)],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    sass = subprocess.run([cuobjdump(), "-sass", str(target)], capture_output=True, text=True, check=True)
    return report, sass.stdout


def test_every_kernel_compiles_without_spills(compiled):
    report, _ = compiled
    entries = re.split(r"Compiling entry function '(\w+)'", report)[1:]
    usage = dict(zip(entries[::2], entries[1::2], strict=True))
    assert len(usage) == 4 * 3 * 2, report  # 4 kernels x 3 dtypes x (16-byte, scalar) accesses
    spilled = [
        name for name, text in usage.items() if not re.search(r"\b0 bytes stack frame, 0 bytes spill", text)
    ]
    assert not spilled, f"spills in {spilled}"


def sass_function(sass: str, kernel: str, element: str) -> list[str]:
    """The instructions of ``kernel<element, 8>``."""
    match = re.search(rf"Function : (\S*{kernel}I{element}Li8\S*)\n(.*?)(?=\n\s*Function :|\Z)", sass, re.S)
    assert match, f"{kernel}<{element}, 8> not in the SASS"
    return [
        line.split(";")[0] for line in match.group(2).splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)
    ]


def first_read(instructions: list[str], start: int, registers: set[str]) -> int:
    for index in range(start + 1, len(instructions)):
        sources = instructions[index].split(",", 1)[1:]  # operands after the destination
        if sources and registers & set(re.findall(r"\bR\d+\b", sources[0])):
            return index
    return len(instructions)


@pytest.mark.parametrize("kernel", ["mean_pool_forward_kernel", "max_pool_forward_kernel"])
def test_forward_steps_issue_all_loads_before_the_first_use(compiled, kernel):
    """The 16-byte loads of x come UNROLL = 4 at a time: each is issued before the data of the
    first one is read (x is loaded under its bounds only, not the mask's value)."""
    instructions = sass_function(compiled[1], kernel, "6__half")
    loads = []
    for index, instruction in enumerate(instructions):
        match = re.search(r"LDG\.E\.128 R(\d+),", instruction)
        if match:
            base = int(match.group(1))
            loads.append((index, {f"R{base + offset}" for offset in range(4)}))
    assert len(loads) >= 4, instructions
    first_index, first_registers = loads[0]
    use = first_read(instructions, first_index, first_registers)
    issued = sum(index < use for index, _ in loads)
    assert issued >= 4, "\n".join(instructions[first_index : use + 1])
